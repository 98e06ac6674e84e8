"""A threshold from good images alone against anomalib's F1 threshold learnt with defective images, on real defects.

    python -m benchmarks.good_only_thresholds [--benchmark results/benchmark/three_categories] [--rate 0.01]
                                              [--models isstad cutpaste]

Uses the models the benchmark trained (``isstad-benchmark -c configs/benchmark/three_categories.yaml``: every model,
category and seed; all were trained on good images only) and, for each:

- **good-only threshold**: set on the validation half's *good* images alone so that at most ``rate`` of them score
  above it (:func:`isstad_plugin.models.components.thresholds.false_alarm_threshold`, what the models do when the
  validation split holds no defective image);
- **F1 threshold**: anomalib's F1-adaptive threshold on the whole validation half, defective images included (what
  the models do otherwise).

Both are applied to the test half: the false-alarm rate on its good images and the share of its defective images
caught. Image scores are the models' raw scores (the thresholds are compared where they are learnt). Writes
``docs/benchmarks/good-only-thresholds.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import torch

from benchmarks.common import DOCS, REPO, machine, markdown_table, write_page

PAGE = DOCS / "good-only-thresholds.md"
COLUMNS = ["model", "category", "seed", "held_out_good", "good_only_threshold_far", "good_only_threshold_caught",
           "f1_threshold_far", "f1_threshold_caught", "test_good", "test_defective"]


def trained_checkpoint(row_dir: Path) -> Path:
    found = sorted(row_dir.rglob("model.ckpt"), key=lambda path: path.stat().st_mtime)
    if not found:
        msg = f"no model.ckpt under {row_dir}: run the benchmark first"
        raise FileNotFoundError(msg)
    return found[-1]


def load_model(spec: dict, checkpoint: Path):  # noqa: ANN201 (an AnomalibModule)
    from anomalib.models import get_model

    from isstad_plugin.backbones import register_offline_backbones
    from isstad_plugin.models.components.evaluation import image_and_pixel_evaluator

    register_offline_backbones()
    model_class = type(get_model(spec["run"]["model"]["class_path"].rpartition(".")[2], **_init_args(spec),
                                 evaluator=image_and_pixel_evaluator()))
    return model_class.load_from_checkpoint(checkpoint, map_location="cpu", evaluator=image_and_pixel_evaluator(),
                                            **_init_args(spec))


def _init_args(spec: dict) -> dict:
    from isstad_plugin.benchmark.job import resolve_backbone

    return resolve_backbone(spec["run"])[0]


def row(spec: dict, checkpoint: Path, rate: float) -> dict[str, object]:
    from anomalib.metrics import F1AdaptiveThreshold

    from isstad_plugin.benchmark.job import build_datamodule
    from isstad_plugin.benchmark.scoring import original_size_outputs
    from isstad_plugin.models.components.thresholds import false_alarm_threshold

    model = load_model(spec, checkpoint).eval()
    datamodule = build_datamodule(spec["data"], spec["split_seed"])
    datamodule.setup()
    transform = model.pre_processor.transform
    validation = original_size_outputs(model.model, transform, datamodule.val_dataloader(), with_maps=False)
    test = original_size_outputs(model.model, transform, datamodule.test_dataloader(), with_maps=False)
    good_only = false_alarm_threshold(validation.scores[validation.labels == 0], rate)
    f1 = F1AdaptiveThreshold(fields=("a", "b"))
    f1.update(type("Batch", (), {"a": validation.scores, "b": validation.labels}))
    f1_threshold = f1.compute()
    good, defective = test.scores[test.labels == 0], test.scores[test.labels == 1]

    def share(scores: torch.Tensor, threshold: torch.Tensor) -> float:
        return round(float((scores > threshold).float().mean()), 4)

    return {"model": spec["run"]["name"], "category": spec["category"], "seed": spec["seed"],
            "held_out_good": int((validation.labels == 0).sum()),
            "good_only_threshold_far": share(good, good_only), "good_only_threshold_caught": share(defective, good_only),
            "f1_threshold_far": share(good, f1_threshold), "f1_threshold_caught": share(defective, f1_threshold),
            "test_good": len(good), "test_defective": len(defective)}


def cell(rows: list[dict], column: str) -> str:
    values = [float(r[column]) for r in rows]
    spread = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{100 * statistics.fmean(values):.1f}{spread} %"


def page(rows: list[dict], rate: float, command: str) -> list[str]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["category"]), []).append(r)
    table = [[model, category, len(group), group[0]["held_out_good"], f"{group[0]['test_good']} / {group[0]['test_defective']}",
              cell(group, "good_only_threshold_far"), cell(group, "good_only_threshold_caught"),
              cell(group, "f1_threshold_far"), cell(group, "f1_threshold_caught")]
             for (model, category), group in groups.items()]
    return [
        "# Thresholds from good images alone, against F1 thresholds learnt with defective images", "",
        f"Command: `{command}`", f"Machine: {machine()}.", "",
        ("The models are the three-category benchmark's ([`three_categories.md`](three_categories.md)): trained on "
        "good images only, every seed whose trained model is at hand (the seeds column; per-run seeds in the CSV). Two image thresholds for each, both learnt on the validation half of the test "
        "folder (split seed 42) and both applied to the other half:"), "",
        (f"- **good-only**: at most {100 * rate:g} % of the validation half's *good* images above it, its defective "
        "images unused: what the models do when the validation split holds no defective image "
        "(`false_alarm_rate`, README section *Your own images*);"),
        "- **F1**: anomalib's F1-adaptive threshold on the whole validation half, defective images included.", "",
        ("A user with a folder of good parts holds out good images from training instead (20 % by default, half of "
        "them for the threshold); here the held-out good images are the validation half's, so both thresholds see "
        "the same models and the same test images. Mean ± std over the seeds."), "",
        markdown_table(["model", "category", "seeds", "held-out good images", "test good / defective",
                        "good-only: false alarms", "good-only: defects caught", "F1: false alarms", "F1: defects caught"],
                       table), "",
        ("With few held-out good images, a rate of 1 % means the highest of them: the threshold sits at the edge of "
        "the good images seen, and a test good image above all of them is a false alarm. Per-run figures: "
        "[`good-only-thresholds.csv`](good-only-thresholds.csv)."), "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", type=Path, default=REPO / "results" / "benchmark" / "three_categories")
    parser.add_argument("--rate", type=float, default=0.01, help="false-alarm rate of the good-only threshold")
    parser.add_argument("--models", nargs="+", default=None,
                        help="the benchmark's runs to use (default: every run; e.g. isstad cutpaste, the plugin's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for spec_path in sorted((args.benchmark / "runs").glob("*/*/spec.json")):
        spec = json.loads(spec_path.read_text())
        if args.models and spec["run"]["name"] not in args.models:
            continue
        if not (spec_path.parent / "result.json").is_file():
            print(f"skipping {spec_path.parent}: the benchmark did not finish that row")
            continue
        rows.append(row(spec, trained_checkpoint(spec_path.parent), args.rate))
        print(rows[-1])
    if not rows:
        msg = f"no finished benchmark rows under {args.benchmark / 'runs'}"
        raise SystemExit(msg)
    order = {name: i for i, name in enumerate(["isstad", "patchcore", "cutpaste", "padim",
                                                "magnetic_tile", "kolektorsdd", "bsdata_pitting"])}
    rows.sort(key=lambda r: (order.get(r["model"], 9), order.get(r["category"], 9), r["category"], r["seed"]))
    with PAGE.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    command = ("python -m benchmarks.good_only_thresholds" + (f" --rate {args.rate:g}" if args.rate != 0.01 else "")
               + (f" --models {' '.join(args.models)}" if args.models else ""))
    write_page(PAGE, page(rows, args.rate, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
