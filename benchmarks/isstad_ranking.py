"""ISSTAD image-ranking levers on the validation halves of three categories (issue: ISSTAD that ranks images as well
as PatchCore). Chosen on validation only; the test halves are not read here.

    python -m benchmarks.isstad_ranking [--benchmark results/benchmark/three_categories]

**Objective, fixed before any figure was read:** the mean over magnetic_tile, kolektorsdd and bsdata_pitting of the
validation half's image AUROC (each category's mean over the training seeds), with the pixel AUROC and AUPRO means no
lower than the frozen recipe's (``configs/isstad_cpu.yaml`` as of 2026-12-04, the benchmark's ``isstad`` row). The
image-score levers below leave every pixel map as it is, so for them the image AUROC decides alone.

Every scoring lever is measured on the *same trained models*: the benchmark's ``isstad`` checkpoints (every category
and seed it finished), rescored with the options of each variant (:data:`SCORINGS`): what the scoring learns from
the training images (the map calibration, the feature memory) is learnt again for each (from one pass over the
training images per model, shared by its scorings). Validation metrics are
computed as the benchmark computes them (:mod:`isstad_plugin.benchmark.scoring`, original resolution, raw scores).
Writes ``docs/benchmarks/isstad-ranking.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import torch

from benchmarks.common import DOCS, REPO, machine, markdown_table, write_page

PAGE = DOCS / "isstad-ranking.md"
CATEGORIES = ("magnetic_tile", "kolektorsdd", "bsdata_pitting")
# scoring options over the frozen recipe's (the benchmark's isstad row): one lever each
SCORINGS: dict[str, dict] = {
    "recipe (calibrated max)": {},
    "top 1 % mean": {"image_score": "top_k", "image_score_top_fraction": 0.01},
    "top 10 % mean": {"image_score": "top_k", "image_score_top_fraction": 0.1},
    "paper (mean of G(G(p) G(r)))": {"image_score": "paper"},
    "authors' extended (top 10 %, powers 1, 1)": {"image_score": "extended", "image_score_top_fraction": 0.1},
    "authors' extended, error only (powers 0, 1)": {"image_score": "extended", "image_score_top_fraction": 0.1,
                                                    "image_score_powers": [0.0, 1.0]},
    "encoder features, 1024-token coreset": {"image_score": "features", "feature_memory_size": 1024},
    "encoder features, 4096-token coreset": {"image_score": "features", "feature_memory_size": 4096},
}
COLUMNS = ["scoring", "category", "seed", "val_image_AUROC", "val_pixel_AUROC", "val_pixel_AUPRO"]


def checkpoints(benchmark: Path) -> list[tuple[dict, Path]]:
    """``(spec, model.ckpt)`` of every finished ``isstad`` row of the benchmark."""
    found = []
    for spec_path in sorted((benchmark / "runs" / "isstad").glob("*/spec.json")):
        if not (spec_path.parent / "result.json").is_file():
            print(f"not finished, skipped: {spec_path.parent}")
            continue
        ckpt = max(spec_path.parent.rglob("model.ckpt"), key=lambda path: path.stat().st_mtime)
        found.append((json.loads(spec_path.read_text()), ckpt))
    return found


def rescored(checkpoint: Path, overrides: dict):  # noqa: ANN201 (an Isstad)
    """The checkpoint's trained network with another scoring (options of the checkpoint, ``overrides`` over them)."""
    from isstad_plugin import Isstad
    from isstad_plugin.models.components.checkpoints import read_checkpoint

    state = read_checkpoint(checkpoint)  # an untrusted pickle: weights_only, anomalib's allow-list
    options = {**state["hyper_parameters"], **overrides}
    model = Isstad(**{k: v for k, v in options.items() if k not in {"pre_processor", "post_processor", "evaluator",
                                                                     "visualizer"}})
    missing, unexpected = model.load_state_dict(state["state_dict"], strict=False)
    learnt_here = ("model.feature_memory.",)
    if unexpected or any(not key.startswith(learnt_here) for key in missing):
        msg = f"{checkpoint}: keys do not match (missing {missing}, unexpected {unexpected})"
        raise RuntimeError(msg)
    return model.eval()


def row(spec: dict, checkpoint: Path, name: str, overrides: dict, pixels_from: dict | None = None,
        learnt: dict | None = None) -> dict:
    """One scoring of one trained model on the validation half; ``pixels_from``: a row of the same model whose pixel
    metrics this scoring shares (an image-score lever leaves the maps as they are), so the maps are not scored
    again. ``learnt``: this model's training-image maps and tokens, filled by the first call (one pass over the
    training images per model: every scoring here shares the map options, so their calibration is the same, and each
    feature memory is chosen again from the same tokens)."""
    from isstad_plugin.benchmark.job import build_datamodule
    from isstad_plugin.benchmark.scoring import metrics_at_original_resolution, original_size_outputs
    from isstad_plugin.models.isstad.anomaly_map import learn_from, training_maps_and_tokens

    model = rescored(checkpoint, overrides)
    datamodule = build_datamodule(spec["data"], spec["split_seed"])
    datamodule.setup()
    learnt = {} if learnt is None else learnt
    if not learnt:
        learnt["maps"], learnt["tokens"] = training_maps_and_tokens(model.model, model.pre_processor, datamodule,
                                                                    torch.device("cpu"), tokens=True)
    learn_from(model.model, learnt["maps"], learnt["tokens"])
    transform = model.pre_processor.transform
    validation = original_size_outputs(model.model, transform, datamodule.val_dataloader(),
                                       with_maps=pixels_from is None)
    # the validation half scored against itself: thresholds play no part in AUROC and AUPRO
    metrics = metrics_at_original_resolution(validation, validation)
    pixels = ({k: round(metrics[k], 4) for k in ("pixel_AUROC", "pixel_AUPRO")} if pixels_from is None else
              {k: pixels_from[f"val_{k}"] for k in ("pixel_AUROC", "pixel_AUPRO")})
    return {"scoring": name, "category": spec["category"], "seed": spec["seed"],
            "val_image_AUROC": round(metrics["image_AUROC"], 4), **{f"val_{k}": v for k, v in pixels.items()}}


def summary(rows: list[dict]) -> tuple[list[list], dict[str, float]]:
    """Per scoring: each category's mean ± std over seeds and the mean over the categories (the objective)."""
    table, objective = [], {}
    for name in SCORINGS:
        cells, means = [], []
        for category in CATEGORIES:
            values = [float(r["val_image_AUROC"]) for r in rows if r["scoring"] == name and r["category"] == category]
            if not values:
                cells.append("-")
                continue
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.3f}{spread} ({len(values)})")
            means.append(statistics.fmean(values))
        if len(means) == len(CATEGORIES):
            objective[name] = statistics.fmean(means)
        table.append([name, *cells, f"**{objective[name]:.3f}**" if name in objective else "-"])
    return table, objective


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", type=Path, default=REPO / "results" / "benchmark" / "three_categories")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    csv_path = PAGE.with_suffix(".csv")
    done = list(csv.DictReader(csv_path.open())) if csv_path.is_file() else []
    rows = [r for r in done if r["scoring"] in SCORINGS]
    first = next(iter(SCORINGS))
    for spec, checkpoint in checkpoints(args.benchmark):
        def done_row(name: str, spec: dict = spec) -> dict | None:
            return next((r for r in rows if r["scoring"] == name and r["category"] == spec["category"]
                         and int(r["seed"]) == spec["seed"]), None)

        learnt: dict = {}  # this model's training-image maps and tokens, for all its scorings
        for name, overrides in SCORINGS.items():
            if done_row(name) is not None:
                continue
            rows.append(row(spec, checkpoint, name, overrides, None if name == first else done_row(first), learnt))
            print(rows[-1], flush=True)
            with csv_path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
    table, objective = summary(rows)
    pixel = {name: [float(r[m]) for r in rows if r["scoring"] == name for m in ("val_pixel_AUROC",)]
             for name in SCORINGS}
    same_pixels = len({tuple(values) for values in pixel.values() if values}) == 1
    best = max(objective, key=objective.get) if objective else None
    write_page(PAGE, [
        "# ISSTAD image ranking: scoring levers on three categories' validation halves", "",
        ("Command: `MALLOC_MMAP_THRESHOLD_=1048576 python -m benchmarks.isstad_ranking` (the glibc setting changes no "
         "figure: without it, anomalib's greedy coreset for the 4096-token memory fragments the heap and reached 24 GB); "
         "machine: " + machine() + "."), "",
        ("Objective, fixed before any figure was read: the mean over the three categories of the validation half's "
        "image AUROC (each category's mean over the training seeds), with pixel AUROC and AUPRO no lower than the "
        "frozen recipe's. Every row rescoring the *same* trained models: the benchmark's `isstad` checkpoints "
        "(`configs/isstad_cpu.yaml` as it stood on 2026-12-04; it has used this page's best scoring since), with one "
        "scoring option changed; what a scoring learns from the training "
        "images is learnt again. The test halves are not read here."), "",
        markdown_table(["scoring", *(f"{c} (seeds)" for c in CATEGORIES), "mean of the 3 (objective)"], table), "",
        ("Pixel AUROC and AUPRO are the same for every scoring (these levers change the image score only)."
         if same_pixels else "Pixel metrics differ between scorings: see the CSV."),
        (f"Best on the objective: **{best}** ({objective[best]:.3f}, against the recipe's "
         f"{objective.get('recipe (calibrated max)', float('nan')):.3f})." if best else "No scoring has all three "
         "categories yet."),
        "Per-run figures (pixel metrics included): [`isstad-ranking.csv`](isstad-ranking.csv).", "",
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
