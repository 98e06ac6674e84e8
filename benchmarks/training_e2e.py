"""End-to-end training speed: the real ``anomalib train`` against a bare torch loop, measured side by side.

Run by hand on a quiet machine (no other heavy process: torch's threads slow down badly when they share cores)::

    python -m benchmarks.training_e2e                 # writes docs/benchmarks/training-end-to-end.md
    python -m benchmarks.training_e2e --baseline REV  # also times `anomalib train` with the plugin at git REV

For each data set (magnetic_tile from ../shared/data, and the generated demo set written as 900 px PNGs, the size
of MVTec AD images) and each model size (128 and 224 px), it runs:

- ``anomalib train`` with ``configs/isstad_tiny.yaml`` (the real console command in a subprocess: data loading,
  validation, checkpoints and the progress bar included), a few epochs per stage, timed by ``e2e_timer.EpochTimer``;
- the same command with the plugin at ``--baseline`` (a git worktree placed first on ``PYTHONPATH``), when given;
- a bare loop in this process: the training images decoded and resized once into one tensor, then the same network,
  stage-1 augmentation, stage-2 corruption, losses and optimiser, with no Lightning and no anomalib.

Seconds per epoch are medians over each stage's epochs after its first (which pays for the stage switch) and
before the last (which pays for the final validation and checkpoint, once per run), so a long run's per-epoch
cost; the last epoch's extra, setup (process start to the first epoch) and the whole command's wall time are
listed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import torch
import yaml
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import resize
from tqdm import tqdm

from benchmarks.common import DOCS, REPO, machine, markdown_table, median, write_page

DATA = REPO.parent / "shared" / "data"
TINY_CONFIG = REPO / "configs" / "isstad_tiny.yaml"
OPTIONS_NEW_IN_THIS_CHANGE = ("val_every_n_epochs", "checkpoint_every_n_epochs", "train_cache_gb")
BIN = Path(sys.executable).parent


def demo_root(work: Path) -> Path:
    """The demo data set at MVTec AD's image size (900 px PNGs, 209 training images)."""
    from isstad_plugin.demo.dataset import make_demo_dataset

    make_demo_dataset(work / "demo900", n_train=209, n_test_good=20, n_test_per_defect=10, size=900)
    return work / "demo900"


def config_for(root: Path, category: str, size: int, epochs: tuple[int, int], timer_output: Path,
               baseline: bool) -> dict:
    """configs/isstad_tiny.yaml at ``size`` px with ``epochs`` per stage and the epoch timer."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    init_args = config["model"]["init_args"]
    init_args.update(image_size=size, stage1_epochs=epochs[0], stage2_epochs=epochs[1], stage1_warmup_epochs=1,
                     stage2_cosine_epochs=epochs[1])
    if baseline:  # options that the older plugin does not have
        for name in OPTIONS_NEW_IN_THIS_CHANGE:
            init_args.pop(name, None)
    config["data"]["init_args"].update(root=str(root), category=category)
    config["trainer"]["callbacks"] = [{"class_path": "e2e_timer.EpochTimer",
                                       "init_args": {"output": str(timer_output)}}]
    return config


def per_stage_seconds(rows: list[dict], stage1_epochs: int) -> dict[int, list[float]]:
    """Epoch durations grouped by stage (from the epoch index: the timer may run before the stage switch)."""
    durations: dict[int, list[float]] = {1: [], 2: []}
    for row, following in pairwise(rows):
        if row["event"] == "epoch_start":
            durations[1 if row["epoch"] < stage1_epochs else 2].append(following["time"] - row["time"])
    return durations


def time_cli(plugin_path: Path, root: Path, category: str, size: int, epochs: tuple[int, int], work: Path,
             baseline: bool) -> dict:
    """``anomalib train`` with the plugin importable from ``plugin_path``; returns its timings."""
    run_dir = Path(tempfile.mkdtemp(dir=work))
    timer = run_dir / "epochs.jsonl"
    config = run_dir / "config.yaml"
    config.write_text(yaml.safe_dump(config_for(root, category, size, epochs, timer, baseline)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(REPO / "benchmarks")])}
    start = time.time()
    result = subprocess.run([str(BIN / "anomalib"), "train", "-c", str(config)], cwd=run_dir, env=env,
                            capture_output=True, text=True, check=False)
    total = time.time() - start
    if result.returncode != 0:
        msg = f"anomalib train failed in {run_dir}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        raise RuntimeError(msg)
    rows = [json.loads(line) for line in timer.read_text().splitlines()]
    shutil.rmtree(run_dir / "results", ignore_errors=True)  # checkpoints: tens of MB each
    return {"durations": per_stage_seconds(rows, epochs[0]), "images": rows[0]["images"], "setup": rows[0]["time"] - start,
            "total": total}


def load_images(root: Path, category: str, size: int) -> torch.Tensor:
    """Every training image, decoded and resized once (antialiased bilinear, as the pre-processor does)."""
    files = sorted((root / category / "train" / "good").glob("*.png"))
    images = [resize(decode_image(str(f), mode=ImageReadMode.RGB).float() / 255, [size, size], antialias=True)
              for f in files]
    return torch.stack(images).clamp(0, 1)


def time_bare_loop(root: Path, category: str, size: int, epochs: tuple[int, int]) -> dict:
    """The same network, augmentation, corruption, losses and optimiser, in a plain loop over a preloaded tensor."""
    from timm.optim import param_groups_weight_decay

    from isstad_plugin import Isstad
    from isstad_plugin.models.isstad.loss import masked_patch_mse
    from isstad_plugin.models.isstad.optim import adamw

    start = time.time()
    config = yaml.safe_load(TINY_CONFIG.read_text())
    init_args = {**config["model"]["init_args"], "image_size": size, "stage1_epochs": epochs[0],
                 "stage2_epochs": epochs[1]}
    batch_size = config["data"]["init_args"]["train_batch_size"]
    torch.manual_seed(0)
    module = Isstad(**init_args)
    net, hp = module.model, module.hparams
    images = load_images(root, category, size)
    steps = -(-len(images) // batch_size)
    durations: dict[int, list[float]] = {1: [], 2: []}
    setup = time.time() - start
    for stage, n_epochs in ((1, epochs[0]), (2, epochs[1])):
        net.freeze_encoder(stage == 2)
        net.train()
        lr = hp.stage1_base_lr * batch_size / 256 if stage == 1 else hp.stage2_lr
        decay = hp.stage1_weight_decay if stage == 1 else hp.stage2_weight_decay
        optimizer = adamw(param_groups_weight_decay(net, decay), torch.device("cpu"), lr=lr, betas=(0.9, 0.95))
        for _ in range(n_epochs):
            epoch_start = time.time()
            order = torch.randperm(len(images))
            for step in range(steps):
                batch = images[order[step * batch_size:(step + 1) * batch_size]]
                if stage == 1:
                    loss = masked_patch_mse(*net(module.stage1_augmentation(batch), mask_ratio=hp.mask_ratio))
                else:
                    corrupted, mask = module.corruption(batch)
                    output = net(corrupted)
                    loss = module.loss(output.block_logits, mask, output.reconstruction, net.normalize(corrupted),
                                       net.denormalize(output.reconstruction), corrupted).total
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            durations[stage].append(time.time() - epoch_start)
    return {"durations": durations, "images": len(images), "setup": setup, "total": time.time() - start}


def table(rows: list[dict]) -> str:
    """Markdown table of dict rows (columns in first-seen order)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return markdown_table(columns, [[row.get(column, "") for column in columns] for row in rows])


def summarise(name: str, dataset: str, size: int, timing: dict) -> dict:
    """Per stage, the median of its epochs after the first (stage switch) and before the run's last (the final
    validation and checkpoint, paid once per run); the last epoch's extra time gets a column of its own."""
    row = {"data set": dataset, "px": size, "images": timing["images"], "run": name}
    stage2 = timing["durations"][2]
    typical = {1: timing["durations"][1][1:] or timing["durations"][1], 2: stage2[1:-1] or stage2}
    for stage in (1, 2):
        row[f"stage {stage} s/epoch"] = round(median(typical[stage]), 2)
        row[f"stage {stage} img/s"] = round(timing["images"] / median(typical[stage]), 1)
    row["last epoch extra s"] = round(stage2[-1] - median(typical[2]), 1)
    row["setup s"] = round(timing["setup"], 1)
    row["total s"] = round(timing["total"], 1)
    return row


def ratios(rows: list[dict]) -> list[dict]:
    """Per data set and size: this change vs the bare loop, and the baseline vs this change (s/epoch)."""
    out = []
    keys = sorted({(r["data set"], r["px"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for dataset, size in keys:
        by_run = {r["run"]: r for r in rows if (r["data set"], r["px"]) == (dataset, size)}
        this, bare = by_run.get("anomalib train (this change)"), by_run.get("bare loop")
        base = next((r for n, r in by_run.items() if n.startswith("anomalib train (main")), None)
        entry = {"data set": dataset, "px": size}
        for stage in (1, 2):
            column = f"stage {stage} s/epoch"
            if this and bare:
                entry[f"stage {stage}: this / bare"] = f"{this[column] / bare[column]:.2f}"
            if this and base:
                entry[f"stage {stage}: main / this"] = f"{base[column] / this[column]:.2f}x"
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="git revision of the plugin to time as well (e.g. the previous main)")
    parser.add_argument("--epochs", type=int, nargs=2, default=(3, 4), metavar=("STAGE1", "STAGE2"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--output", type=Path, default=DOCS / "training-end-to-end.md")
    args = parser.parse_args(argv)
    epochs = tuple(args.epochs)
    work = Path(tempfile.mkdtemp(prefix="isstad-e2e-"))
    datasets = [("magnetic_tile", DATA, "magnetic_tile"), ("demo, 900 px PNGs", demo_root(work), "brushed_metal")]
    checkouts = [("anomalib train (this change)", REPO, False)]
    if args.baseline:
        tree = work / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.baseline], check=True,
                       capture_output=True)
        label = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.baseline], check=True,
                               capture_output=True, text=True).stdout.strip()
        checkouts.append((f"anomalib train (main {label})", tree, True))
    rows = []
    jobs = [(d, s) for d in datasets for s in args.sizes]
    try:
        for (dataset, root, category), size in tqdm(jobs, desc="benchmark"):
            for name, path, baseline in checkouts:
                rows.append(summarise(name, dataset, size, time_cli(path, root, category, size, epochs, work, baseline)))
            rows.append(summarise("bare loop", dataset, size, time_bare_loop(root, category, size, epochs)))
            print(rows[-1], flush=True)
    finally:
        if args.baseline:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "baseline")],
                           check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)  # checkpoints and decoded demo images: hundreds of MB
    command = "python -m benchmarks.training_e2e" + (f" --baseline {args.baseline}" if args.baseline else "")
    page = [
        "# Training speed end to end: `anomalib train` vs a bare loop",
        "",
        f"Generated by `{command}` ({epochs[0]} + {epochs[1]} epochs per run; do not edit by hand).",
        "",
        f"Machine: {machine()}; torch threads: {torch.get_num_threads()}.",
        "",
        "`anomalib train -c configs/isstad_tiny.yaml` (ViT-tiny, decoder 128 x 2, batch 16) through the real console "
        "command, including data loading, validation, checkpoints and the progress bar; the bare loop runs the same "
        "network, augmentation, corruption, losses and optimiser on images decoded once into one tensor. "
        "s/epoch: median over each stage's epochs after its first (which pays for the stage switch) and before the "
        "run's last; 'last epoch extra s' is what the last epoch took beyond that: the final validation over the "
        "validation split and the final checkpoint, paid once per run (and by `main` after every epoch). "
        "setup s: command start to the first epoch (imports, data checks, the one-time decode); total s: the whole "
        "command, including its test pass.",
        "",
        table(rows),
        "",
        "## Ratios (seconds per epoch, side by side in this run)",
        "",
        table(ratios(rows)),
        "",
    ]
    write_page(args.output, page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
