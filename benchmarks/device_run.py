"""ISSTAD's paper setting on one GPU, end to end through anomalib's Engine: throughput, memory, then a full training.

``benchmarks/device_run.sh`` runs this on the lent GPU machine (see ``docs/benchmarks/gpu.md`` for how); the test
suite runs it on the CPU at a tiny size (``--device cpu --size tiny``), the same code path.

    python -m benchmarks.device_run --data DATA --out OUT [--device cuda] [--size paper] [--budget-s 420]

Phases, each written to ``OUT`` as soon as it is done (a run stopped by its time limit keeps what it measured):

1. ``environment.json``: GPU, driver, CUDA, package versions, CPU.
2. ``throughput.json``: for fp32 (``32-true``) and ``bf16-mixed``, a short fit of the paper's network (ViT-L/16 at
   224 px, decoder 512 x 12, batch 16) with a few epochs of each stage: seconds per epoch and images per second of
   each stage (median of the epochs after each stage's first), peak GPU memory, the FLOPs of one training step
   (counted by ``torch.utils.flop_counter`` on the torch model) and so the achieved TFLOP/s against the bf16 peak.
3. ``training.json``: the paper's setting from scratch (305 + 200 epochs, bf16-mixed; no MAE weights can be fetched
   there) on magnetic_tile, with the validation/test split and the original-resolution scoring of the CPU benchmark
   (:mod:`isstad_plugin.benchmark.scoring`). If the measured throughput says the paper's epochs do not fit in the
   time left, both stages are shortened in proportion (the Engine's ``max_epochs``; the plan scales them) and the
   file says so: planned and trained epochs are both recorded.
4. ``training_cpu_recipe.json``, if time is left: ``configs/isstad_cpu.yaml``'s recipe on the same data at four times
   its epochs, so the page shows how accuracy from scratch grows with compute.

``docs/benchmarks/gpu.md`` is generated from these files by ``python -m benchmarks.gpu_report FOLDER``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import isstad_plugin_hook
import torch
from lightning.pytorch import Callback, seed_everything

isstad_plugin_hook.install()  # what a pip install's isstad_plugin.pth does at start-up; here the working tree runs

BF16_PEAK_TFLOPS = 790.0  # H200 dense bf16 matrix rate measured here on random data (device tool's KINDS.md)
BATCH = 16  # the paper's stage-2 batch (stage 1: 20); one batch for both stages keeps one datamodule

# The paper's network (Isstad's defaults) and a tiny one with the same code path for the CPU test.
SIZES: dict[str, dict[str, Any]] = {
    "paper": {"backbone": "vit_large", "image_size": 224, "patch_size": 16, "decoder_embed_dim": 512,
              "decoder_depth": 12, "decoder_num_heads": 16},
    "tiny": {"backbone": "vit_tiny", "image_size": 32, "patch_size": 16, "decoder_embed_dim": 32,
             "decoder_depth": 1, "decoder_num_heads": 2},
}
# epochs of each stage in the throughput fits, and of the full run (the paper's 305 + 200), per size
THROUGHPUT_EPOCHS = {"paper": 3, "tiny": 2}
FULL_EPOCHS = {"paper": (305, 200), "tiny": (2, 2)}
CPU_RECIPE = {"backbone": "vit_tiny", "image_size": 128, "patch_size": 16, "decoder_embed_dim": 128,
              "decoder_depth": 4, "decoder_num_heads": 4, "stage1_warmup_epochs": 5, "stage1_base_lr": 0.002,
              "stage2_lr": 0.002, "corruption_fills": ["color", "flip", "noise", "shift", "other"],
              "reconstruction_target": "clean", "anomaly_map_kind": "error", "image_score": "max",
              "image_score_map": "product", "map_calibration": "per_pixel"}

RESERVE_S = {"paper": 60.0, "tiny": 0.0}  # seconds kept for scoring after a full run

logger = logging.getLogger("device_run")


class Clock:
    """The run's time budget: seconds spent and left."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s = time.perf_counter(), budget_s

    @property
    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EpochTimer(Callback):
    """Wall seconds and images of every training epoch, with the ISSTAD stage it ran in (device synchronised)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        synchronize(pl_module.device)
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._images += len(batch.image)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        synchronize(pl_module.device)
        self.epochs.append({"stage": pl_module.stage, "seconds": time.perf_counter() - self._start,
                            "images": self._images})

    def stage_rate(self, stage: int) -> dict[str, float] | None:
        """Median seconds per epoch and images per second of ``stage``'s epochs after its first (warm-up)."""
        epochs = [e for e in self.epochs if e["stage"] == stage][1:]
        if not epochs:
            return None
        seconds = statistics.median(e["seconds"] for e in epochs)
        return {"seconds_per_epoch": seconds, "images_per_s": statistics.median(e["images"] / e["seconds"]
                                                                                for e in epochs),
                "epochs_timed": len(epochs)}


def write(out: Path, name: str, data: dict[str, Any]) -> None:
    (out / name).write_text(json.dumps(data, indent=1, default=str))
    logger.info("wrote %s", out / name)


def environment(device: torch.device) -> dict[str, Any]:
    """What ran: GPU, driver, CUDA, packages, CPU."""
    from importlib import metadata

    from benchmarks.device_prepare import wanted_wheels
    from isstad_plugin.benchmark.timing import cpu_description

    def installed(names: Iterable[str]) -> dict[str, str]:
        versions = {}
        for name in names:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = "not installed"
        return versions

    packages = installed(("torch", "torchvision", "lightning", "anomalib", "timm", "torchmetrics", "kornia",
                          "jsonargparse", "omegaconf", "isstad-plugin", "numpy"))
    # the versions of the carried wheels that ran (benchmarks/device_prepare.py resolved them from its environment)
    carried = installed(wanted_wheels())
    info: dict[str, Any] = {"device": str(device), "python": platform.python_version(), "packages": packages,
                            "carried_wheels": carried,
                            "cpu": cpu_description()[0], "cpu_count": os.cpu_count(),
                            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=properties.name, gpu_memory_gb=round(properties.total_memory / 2**30, 1),
                    multiprocessors=properties.multi_processor_count,
                    capability=f"{properties.major}.{properties.minor}")
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            info["driver"] = f"unknown ({error})"
    return info


def datamodule(root: Path, category: str, workers: int) -> Any:
    """The CPU benchmark's data: MVTecAD with the validation half of the test folder (split seed 42)."""
    from anomalib.data import MVTecAD

    return MVTecAD(root=root, category=category, train_batch_size=BATCH, eval_batch_size=BATCH, num_workers=workers,
                   val_split_mode="from_test", val_split_ratio=0.5, seed=42)


def engine(out: Path, device: torch.device, precision: str, **trainer: Any) -> Any:
    from anomalib.engine import Engine

    # no progress bar: it reads the loss from the GPU at every step, which stalls the queue of work
    return Engine(default_root_dir=out / "runs", accelerator=device.type, devices=1, precision=precision,
                  logger=False, enable_progress_bar=False, **trainer)


def step_flops(options: dict[str, Any], device: torch.device, stage: int) -> float:
    """FLOPs of one training step (forward, loss and backward) per image of ``stage``, counted by torch on the
    network and the loss the Lightning module uses, at batch 2 on random images."""
    from torch.utils.flop_counter import FlopCounterMode

    from isstad_plugin import Isstad

    model = Isstad(**options, stage1_epochs=1, stage2_epochs=1).to(device)
    model.enter_stage(stage)
    images = torch.rand(2, 3, options["image_size"], options["image_size"], device=device)
    from isstad_plugin.models.isstad.loss import masked_patch_mse

    with FlopCounterMode(display=False) as counter:
        if stage == 1:
            loss = masked_patch_mse(*model.model(images, mask_ratio=0.75))
        else:
            corrupted, mask = model.corruption(images)
            output = model.model(corrupted)
            loss = model.loss(output.block_logits, mask, output.reconstruction, model.model.normalize(corrupted),
                              model.model.denormalize(output.reconstruction), corrupted).total
        loss.backward()
    return counter.get_total_flops() / 2


def throughput(args: argparse.Namespace, device: torch.device, options: dict[str, Any]) -> dict[str, Any]:
    """Short fits of both stages at each precision: speed, memory and achieved FLOP rate."""
    epochs = THROUGHPUT_EPOCHS[args.size]
    flops = {stage: step_flops(options, device, stage) for stage in (1, 2)}
    results: dict[str, Any] = {"batch": BATCH, "epochs_per_stage": epochs, "flops_per_image": flops,
                               "bf16_peak_tflops": BF16_PEAK_TFLOPS, "precisions": {}}
    from isstad_plugin import Isstad

    for precision in ("32-true", "bf16-mixed"):
        seed_everything(0, workers=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timer = EpochTimer()
        model = Isstad(**options, stage1_epochs=epochs, stage2_epochs=epochs, stage1_warmup_epochs=1,
                       checkpoint_every_n_epochs=0)
        start = time.perf_counter()
        engine(args.out, device, precision, max_epochs=2 * epochs, callbacks=[timer], limit_val_batches=0).fit(
            model=model, datamodule=datamodule(args.data, "magnetic_tile", args.workers))
        row: dict[str, Any] = {"fit_s": time.perf_counter() - start, "epochs": timer.epochs}
        for stage in (1, 2):
            rate = timer.stage_rate(stage)
            if rate is not None:
                rate["achieved_tflops"] = rate["images_per_s"] * flops[stage] / 1e12
                rate["fraction_of_bf16_peak"] = rate["achieved_tflops"] / BF16_PEAK_TFLOPS
            row[f"stage{stage}"] = rate
        if device.type == "cuda":
            row["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        results["precisions"][precision] = row
        write(args.out, "throughput.json", results)
    return results


def full_training(args: argparse.Namespace, device: torch.device, name: str, options: dict[str, Any],
                  epochs: tuple[int, int], seconds_per_epoch: tuple[float, float] | None, clock: Clock,
                  category: str = "magnetic_tile") -> dict[str, Any] | None:
    """Train ``options`` for ``epochs`` (stage 1, stage 2) from scratch, bf16-mixed, then score the test half like
    the CPU benchmark; shortened in proportion when the measured seconds per epoch say it would not fit."""
    from isstad_plugin import Isstad
    from isstad_plugin.benchmark.scoring import score_module

    planned = sum(epochs)
    max_epochs = planned
    reserve = RESERVE_S[args.size]  # scoring the halves, the final validation and the checkpoint
    if seconds_per_epoch is not None:
        per_epoch = (epochs[0] * seconds_per_epoch[0] + epochs[1] * seconds_per_epoch[1]) / planned
        affordable = int((clock.left - reserve) / per_epoch) if per_epoch > 0 else planned
        max_epochs = max(0, min(planned, affordable))
    if max_epochs < 2 or clock.left < 2 * reserve:
        logger.info("%s: no time left (%.0f s) for even 2 epochs; skipped", name, clock.left)
        return None
    seed_everything(42, workers=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = Isstad(**options, stage1_epochs=epochs[0], stage2_epochs=epochs[1], checkpoint_every_n_epochs=0)
    data = datamodule(args.data, category, args.workers)
    timer = EpochTimer()
    # max_time: a safety net if the measured speed does not hold (the epochs actually trained are recorded)
    trainer = engine(args.out / name, device, "bf16-mixed", max_epochs=max_epochs, callbacks=[timer],
                     max_time={"seconds": max(1, int(clock.left - reserve))})
    start = time.perf_counter()
    trainer.fit(model=model, datamodule=data)
    train_s = time.perf_counter() - start
    anomalib_metrics = trainer.test(model=model, datamodule=data, verbose=False)[0]
    result = {"name": name, "category": category, "options": options, "planned_epochs": list(epochs),
              "trained_epochs": [sum(e["stage"] == stage for e in timer.epochs) for stage in (1, 2)],
              "shortened": len(timer.epochs) < planned, "precision": "bf16-mixed", "batch": BATCH, "train_s": train_s,
              "metrics": score_module(model, data), "anomalib_metrics": {k: float(v) for k, v in anomalib_metrics.items()},
              "epoch_seconds": [e["seconds"] for e in timer.epochs]}
    if device.type == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder holding magnetic_tile (MVTec layout)")
    parser.add_argument("--out", type=Path, required=True, help="where the JSON files go ($OUT on the device)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", default="paper", choices=sorted(SIZES))
    parser.add_argument("--budget-s", type=float, default=400.0, help="stop starting new work after this long (seconds)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    clock = Clock(args.budget_s)
    if not (args.data / "magnetic_tile").is_dir():
        parser.error(f"{args.data / 'magnetic_tile'} does not exist (benchmarks/device_prepare.py copies it)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the fp32 rows
    write(args.out, "environment.json", environment(device))

    options = SIZES[args.size]
    speed = throughput(args, device, options)
    bf16 = speed["precisions"]["bf16-mixed"]
    per_epoch = (bf16["stage1"]["seconds_per_epoch"], bf16["stage2"]["seconds_per_epoch"])
    paper = full_training(args, device, "paper_from_scratch", options, FULL_EPOCHS[args.size], per_epoch, clock)
    if paper is not None:
        write(args.out, "training.json", paper)
    recipe_epochs = (200, 200) if args.size == "paper" else (2, 2)
    recipe_options = CPU_RECIPE if args.size == "paper" else {**CPU_RECIPE, **SIZES["tiny"]}
    recipe = full_training(args, device, "cpu_recipe_x4_epochs", recipe_options, recipe_epochs, None, clock)
    if recipe is not None:
        write(args.out, "training_cpu_recipe.json", recipe)
    logger.info("done in %.0f s of a %.0f s budget", args.budget_s - clock.left, args.budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
