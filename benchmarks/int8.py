"""INT8 (NNCF post-training quantization) against FP32 OpenVINO on the same trained models: accuracy and speed.

Run by hand on a quiet machine: ``python -m benchmarks.int8 [--isstad CKPT] [--cutpaste CKPT] [--only MODEL]``
(writes ``docs/benchmarks/int8.md``; each model's rows are kept in ``results/benchmark/int8/``). Each checkpoint is
exported three times through anomalib's own ``Engine.export``: FP32, ``compression_type=INT8_PTQ`` and ``INT8_ACQ``
(accuracy control: neither image nor pixel AUROC on the validation half may drop by more than 0.01), calibrated on
the validation half of magnetic_tile's test folder (split seed 42, as the recipe pages). Every graph then scores
every image of the test half one by one (batch 1, OpenVINO with ``INFERENCE_PRECISION_HINT=f32``, and the FP32 graph
once more with ``bf16`` where the CPU has it), giving image and pixel AUROC, how the maps differ from the FP32 ones
(max and mean absolute difference, correlation) and the seconds for the whole test half. The defaults are the seed-0
models of the CPU recipes (``benchmarks.isstad_recipe``'s ``budget_lr_x2`` = ``configs/isstad_cpu.yaml``,
the ``chosen`` variant of ``benchmarks.cutpaste_recipe`` = ``configs/cutpaste_cpu.yaml``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov
import torch
import yaml
from anomalib.data import MVTecAD
from anomalib.deploy import CompressionType, OpenVINOInferencer
from anomalib.engine import Engine
from sklearn.metrics import roc_auc_score
from torchvision.transforms.v2 import Resize

from benchmarks.common import DOCS, REPO, machine, markdown_table, write_page
from isstad_plugin import Cutpaste, Isstad
from isstad_plugin.deploy import openvino_config
from isstad_plugin.models.components.quantization import calibration_batches

DATA = REPO.parent / "shared" / "data"
RUNS = REPO / "results" / "benchmark"
CUTPASTE_RECIPE = yaml.safe_load((REPO / "configs" / "benchmark" / "cutpaste_recipe.yaml").read_text())["chosen"]
DEFAULTS = {
    "isstad": RUNS / "isstad_recipe/runs/budget_lr_x2-0/Isstad/MVTecAD/magnetic_tile/v0/weights/lightning/model.ckpt",
    # the variant configs/cutpaste_cpu.yaml was chosen as; `latest` is anomalib's link to the newest run of it
    "cutpaste": RUNS / f"cutpaste_recipe/runs/{CUTPASTE_RECIPE}-0/Cutpaste/MVTecAD/magnetic_tile/latest/weights/"
                "lightning/model.ckpt",
}
CLASSES = {"isstad": Isstad, "cutpaste": Cutpaste}
RESULTS = RUNS / "int8"  # each model's rows, so that --only re-measures one and keeps the other's


def datamodule(batch_size: int) -> MVTecAD:
    return MVTecAD(root=DATA, category="magnetic_tile", train_batch_size=batch_size, eval_batch_size=batch_size,
                   num_workers=0, val_split_mode="from_test", val_split_ratio=0.5, seed=42)


def score(path: Path, size: int, precision: str = "f32") -> dict[str, np.ndarray | float]:
    """Image scores, maps, labels and masks of the test half through the OpenVINO graph at ``path``."""
    inferencer = OpenVINOInferencer(path=path, device="CPU", config=openvino_config(precision))
    data = datamodule(1)
    data.setup()
    scores, maps, labels, masks, seconds = [], [], [], [], 0.0
    for item in data.test_data:
        image = torch.nn.functional.interpolate(item.image[None], size=(size, size), mode="bilinear",
                                                antialias=True)[0].numpy()
        start = time.perf_counter()
        output = inferencer.predict(image)
        seconds += time.perf_counter() - start
        scores.append(float(np.asarray(output.pred_score).ravel()[0]))
        maps.append(np.asarray(output.anomaly_map, dtype=np.float64).reshape(size, size))
        labels.append(int(item.gt_label))
        mask = torch.nn.functional.interpolate(item.gt_mask[None, None].float(), size=(size, size), mode="nearest")
        masks.append(mask[0, 0].numpy() > 0.5)
    return {"scores": np.array(scores), "maps": np.stack(maps), "labels": np.array(labels), "masks": np.stack(masks),
            "seconds": seconds}


def quantized_ops(path: Path) -> int:
    """FakeQuantize nodes of the OpenVINO graph at ``path``: each quantizes one input (activation or weights) of an
    operation that runs in INT8. Counted per input, so an operation put back into floating point by ACQ lowers the
    count even when another of its inputs stays quantized."""
    graph = ov.Core().read_model(path)
    return sum(op.get_type_name() == "FakeQuantize" for op in graph.get_ordered_ops())


def results_path(work: Path, name: str) -> Path:
    return work / name / "FP32" / "weights" / "openvino" / "model.xml"


def default_quantization(fp32: Path, size: int) -> Path:
    """The FP32 graph quantized as anomalib 2.7 does (``nncf.quantize`` with NNCF's defaults, same calibration)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(fp32)
    data = datamodule(16)
    data.val_augmentations = Resize((size, size), antialias=True)  # the graph's input size (the training size)
    quantized = nncf.quantize(model, nncf.Dataset(calibration_batches(model, data), lambda batch: batch["image"]))
    target = fp32.parent.parent / "openvino-default-int8" / fp32.name
    target.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, target)
    metadata = fp32.parent / "metadata.json"
    if metadata.is_file():  # anomalib's inferencer reads thresholds and normalisation from it
        (target.parent / metadata.name).write_bytes(metadata.read_bytes())
    return target


def rows_for(name: str, checkpoint: Path, work: Path) -> list[list[str]]:
    model = CLASSES[name].load_from_checkpoint(checkpoint, map_location="cpu")
    size = model.hparams.image_size
    engine = Engine(default_root_dir=work, accelerator="cpu", devices=1, logger=False)
    results, paths = {}, {}
    for precision, compression in (("FP32", None), ("INT8 (PTQ)", CompressionType.INT8_PTQ),
                                   ("INT8 (ACQ)", CompressionType.INT8_ACQ)):
        paths[precision] = engine.export(model=model, export_type="openvino", compression_type=compression,
                                         export_root=work / name / (compression.value if compression else "FP32"),
                                         datamodule=datamodule(16) if compression else None)
    paths["INT8 (anomalib's default)"] = default_quantization(results_path(work, name), size)
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        results["BF16 (FP32 graph)"] = score(paths["FP32"], size, "bf16")
    for precision, path in paths.items():  # timed one after another, in one process
        results[precision] = score(path, size) | {"int8_ops": quantized_ops(path)}
    if "BF16 (FP32 graph)" in results:
        results["BF16 (FP32 graph)"]["int8_ops"] = 0
    reference = results["FP32"]
    rows = []
    for precision, result in sorted(results.items(), key=lambda item: item[0] != "FP32"):
        difference = np.abs(result["maps"] - reference["maps"])
        rows.append([name, precision, f"{roc_auc_score(result['labels'], result['scores']):.4f}",
                     f"{roc_auc_score(result['masks'].ravel(), result['maps'].ravel()):.4f}",
                     f"{difference.max():.4f}", f"{difference.mean():.5f}",
                     f"{np.corrcoef(reference['maps'].ravel(), result['maps'].ravel())[0, 1]:.4f}",
                     f"{result['seconds']:.1f}", f"{reference['seconds'] / result['seconds']:.2f}x",
                     str(result["int8_ops"])])
    return rows


def shown(path: Path) -> Path:
    """``path`` relative to the repository where it lies inside it."""
    path = path.resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=Path, default=default, help=f"{name} checkpoint (default: {default})")
    parser.add_argument("--only", nargs="+", choices=list(DEFAULTS), help="models to measure again (default: all); "
                        "the others' rows are kept from earlier runs")
    parser.add_argument("--output", type=Path, default=DOCS / "int8.md")
    parser.add_argument("--note", default="", help="a line about the run for the page (e.g. what else ran)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.only or DEFAULTS:
        with tempfile.TemporaryDirectory() as tmp:
            rows = rows_for(name, getattr(args, name), Path(tmp))
        # kept per model as soon as it is measured: a later model's failure loses nothing (each takes 20-50 min)
        (RESULTS / f"{name}.json").write_text(json.dumps({"checkpoint": str(getattr(args, name)), "rows": rows}))
    missing = [name for name in DEFAULTS if not (RESULTS / f"{name}.json").is_file()]
    if missing:
        parser.error(f"no rows yet for {missing}: run without --only first")
    measured = {name: json.loads((RESULTS / f"{name}.json").read_text()) for name in DEFAULTS}
    rows = [row for result in measured.values() for row in result["rows"]]
    checkpoints = [f"`{name}`: `{shown(Path(result['checkpoint']))}`" for name, result in measured.items()]
    write_page(args.output, [
        "# INT8 against FP32 (OpenVINO, the same trained models)", "",
        f"Generated by `python -m benchmarks.int8` (do not edit by hand). Machine: {machine()}.", "",
        "The graphs are exported by anomalib's `Engine.export` (`compression_type=INT8_PTQ` and `INT8_ACQ`, calibrated "
        "on the validation half of magnetic_tile's test folder; ACQ puts quantized operations back into floating "
        "point until image and pixel AUROC on that half are both within 0.01 of FP32); our INT8 exports keep the map "
        "smoothing in floating point (`isstad_plugin/models/components/quantization.py`). `anomalib's default`: the "
        "FP32 graph quantized with NNCF's defaults, as anomalib 2.7 does. `BF16`: the FP32 graph run with "
        "OpenVINO's `bf16` precision hint. "
        "Metrics on the test half (split seed 42); map differences against the FP32 graph's maps; `seconds`: batch-1 "
        "inference over the whole test half, measured one graph after another in one process; `quantized inputs`: "
        "FakeQuantize nodes, one per quantized input of an operation that runs in INT8 (ACQ's difference to PTQ is "
        "what it put back into floating point).", "",
        "Checkpoints (the CPU recipes' seed-0 models): " + "; ".join(checkpoints) + ".", "",
        *([args.note, ""] if args.note else []),
        markdown_table(["model", "precision", "image AUROC", "pixel AUROC", "max map diff", "mean map diff",
                        "map corr", "seconds", "speed-up", "quantized inputs"], rows),
        "",
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
