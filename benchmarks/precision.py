"""OpenVINO inference precision: what BF16 changes against FP32 on one exported model, measured.

Run by hand: ``python -m benchmarks.precision`` (writes ``docs/benchmarks/precision.md``). It trains a small ISSTAD
briefly on magnetic_tile (thresholds from the validation half of the test folder), exports it to OpenVINO once,
runs the graph over every test image with ``INFERENCE_PRECISION_HINT`` f32 and bf16 (``isstad_plugin.deploy``'s
options), and reports the score and map differences, label agreement, image and pixel AUROC of each, and the
batch-1 latency. On a CPU without BF16 units OpenVINO computes bf16 requests in FP32: the page says which it was.
The model is far from a good detector at this budget: what matters here is how far the two precisions differ.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torchmetrics.functional.classification import binary_auroc

from benchmarks.common import DOCS, REPO, machine, markdown_table, median, time_calls, write_page
from isstad_plugin import Isstad
from isstad_plugin.deploy import openvino_config, prepare, read_rgb

DATA = REPO.parent / "shared" / "data"
SIZE = 128


def trained_ir(work: Path) -> Path:
    """A tiny ISSTAD (4 + 4 epochs at 128 px) trained on magnetic_tile and exported to OpenVINO."""
    seed_everything(0)
    model = Isstad(backbone="vit_tiny", image_size=SIZE, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
                   stage1_epochs=4, stage2_epochs=4, stage1_warmup_epochs=1, stage2_cosine_epochs=4)
    datamodule = MVTecAD(root=DATA, category="magnetic_tile", train_batch_size=16, eval_batch_size=16, num_workers=2,
                         val_split_mode="from_test", val_split_ratio=0.5, seed=0)
    engine = Engine(default_root_dir=work, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    return Path(engine.export(model=model, export_type=ExportType.OPENVINO, export_root=work / "export"))


def magnetic_tile_test_images() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every magnetic_tile test image at the model size, its label and its mask."""
    import cv2

    files = sorted((DATA / "magnetic_tile" / "test").rglob("*.png"))
    images, labels, masks = [], [], []
    for path in files:
        images.append(prepare(read_rgb(path), (SIZE, SIZE)))
        defect = path.parent.name != "good"
        labels.append(int(defect))
        mask = np.zeros((SIZE, SIZE), np.uint8)
        if defect:
            gt = cv2.imread(str(DATA / "magnetic_tile" / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"),
                            cv2.IMREAD_GRAYSCALE)
            mask = cv2.resize(gt, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST) > 0
        masks.append(mask)
    return np.concatenate(images), np.array(labels), np.stack(masks).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DOCS / "precision.md")
    args = parser.parse_args(argv)
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory(prefix="isstad-precision-") as work:  # checkpoints and the IR: ~100 MB
        model = core.read_model(trained_ir(Path(work)))
    images, labels, masks = magnetic_tile_test_images()
    outputs, latency, executed = {}, {}, {}
    for precision in ("f32", "bf16"):
        compiled = core.compile_model(model, "CPU", {**openvino_config(precision), "PERFORMANCE_HINT": "LATENCY"})
        executed[precision] = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        results = [compiled(images[i:i + 16]) for i in range(0, len(images), 16)]
        outputs[precision] = {o.any_name: np.concatenate([r[o] for r in results]) for o in compiled.outputs}
        latency[precision] = median(time_calls(lambda c=compiled: c(images[:1]), 30, warmup=5)) * 1e3
    rows = []
    for precision in ("f32", "bf16"):
        out = outputs[precision]
        reference = outputs["f32"]
        score_range = np.ptp(reference["pred_score"])
        map_range = np.ptp(reference["anomaly_map"])
        rows.append([
            precision, executed[precision],
            f"{binary_auroc(torch.from_numpy(out['pred_score'].reshape(-1)), torch.from_numpy(labels)).item():.4f}",
            f"{binary_auroc(torch.from_numpy(out['anomaly_map'].reshape(-1)), torch.from_numpy(masks.reshape(-1))).item():.4f}",
            f"{np.abs(out['pred_score'] - reference['pred_score']).max() / score_range:.1e}",
            f"{np.abs(out['anomaly_map'] - reference['anomaly_map']).max() / map_range:.1e}",
            f"{(out['pred_label'].reshape(-1) == reference['pred_label'].reshape(-1)).mean():.3f}",
            f"{latency[precision]:.1f}",
            f"{latency['f32'] / latency[precision]:.2f}x",
        ])
    header = ["requested", "OpenVINO ran", "image AUROC", "pixel AUROC", "max score diff / range",
              "max map diff / range", "labels equal to f32", "batch-1 ms", "speed-up"]
    write_page(args.output, [
        "# OpenVINO inference precision: FP32 vs BF16 on the same exported ISSTAD",
        "",
        "Generated by `python -m benchmarks.precision` (do not edit by hand).",
        "",
        f"Machine: {machine()}.",
        "",
        f"Model: ViT-tiny ISSTAD at {SIZE} px trained 4 + 4 epochs on magnetic_tile (thresholds from the validation "
        f"half of the test folder), exported once; all {len(images)} magnetic_tile test images. The model is a weak "
        "detector at this budget: the rows show how far the precisions differ, not how good ISSTAD is.",
        "",
        markdown_table(header, rows),
        "",
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
