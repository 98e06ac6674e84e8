"""ISSTAD recipe search on a CPU budget: variants x seeds, chosen on the validation half only.

Run by hand on a quiet machine::

    python -m benchmarks.isstad_recipe                         # every variant and seed of the config
    python -m benchmarks.isstad_recipe --only reference        # some variants
    python -m benchmarks.isstad_recipe --test                  # also the test half (once, for the chosen recipe)

The config (``configs/benchmark/isstad_recipe.yaml``) names a base model (``init_args`` of ``Isstad``), the variants
(overrides of the base) and the seeds. Each (variant, seed) row trains with ``seed_everything(seed)`` on the
category's ``train/good``, with anomalib's ``val_split_mode: from_test`` (``val_split_ratio: 0.5``): thresholds and
every choice come from the validation half; the image AUROC, pixel AUROC and AUPRO of the validation half are
always recorded, those of the test half only with ``--test``. Finished rows are kept in ``<output_dir>/rows.csv``
(a re-run skips them); ``docs/benchmarks/isstad-recipe.md`` is written from the rows of the config's ``split_seed``
(one validation/test split for every variant and seed), means +- std over training seeds.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from statistics import mean, stdev

import yaml

from benchmarks.common import DOCS, REPO, machine, markdown_table, write_page

CONFIG = REPO / "configs" / "benchmark" / "isstad_recipe.yaml"
METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
COLUMNS = ["variant", "seed", "split_seed", *[f"val_{m}" for m in METRICS], *[f"test_{m}" for m in METRICS], "train_min"]


def run_row(config: dict, variant: str, seed: int, with_test: bool, work: Path) -> dict:
    """Train one variant with one seed; metrics of the validation half (and of the test half if asked)."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from isstad_plugin import Isstad

    seed_everything(seed, workers=True)
    model = Isstad(**{**config["base"], **(config["variants"][variant] or {})})
    # the split is the config's, the same for every variant and seed; the seed varies only the training
    datamodule = MVTecAD(**config["data"], val_split_mode="from_test", val_split_ratio=0.5, seed=config["split_seed"])
    engine = Engine(default_root_dir=work / f"{variant}-{seed}", accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False)
    start = time.time()
    engine.fit(model=model, datamodule=datamodule)
    minutes = (time.time() - start) / 60
    row = {"variant": variant, "seed": seed, "split_seed": config["split_seed"], "train_min": f"{minutes:.1f}"}
    val = engine.test(model=model, dataloaders=datamodule.val_dataloader(), verbose=False)[0]
    row.update({f"val_{m}": f"{val[m]:.4f}" for m in METRICS})
    if with_test:
        test = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
        row.update({f"test_{m}": f"{test[m]:.4f}" for m in METRICS})
    return row


def summary(rows: list[dict], variants: list[str]) -> list[list[str]]:
    """Per variant: mean +- std over its seeds of every recorded metric."""
    table = []
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]  # rows of one split (see main)
        if not mine:
            continue
        cells = [variant, str(len(mine))]
        for column in COLUMNS[2:]:
            values = [float(r[column]) for r in mine if r.get(column)]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{mean(values):.3f} ± {stdev(values):.3f}")
        table.append(cells)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=CONFIG)
    parser.add_argument("--only", nargs="+", help="variants to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the config's)")
    parser.add_argument("--test", action="store_true", help="also score the test half (for the chosen recipe)")
    parser.add_argument("--output", type=Path, default=DOCS / "isstad-recipe.md")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    output_dir = REPO / config["output_dir"]
    output_dir.mkdir(parents=True, exist_ok=True)
    rows_path = output_dir / "rows.csv"
    rows = list(csv.DictReader(rows_path.open())) if rows_path.is_file() else []
    split = str(config["split_seed"])
    # rows of another split (older runs drew a split per seed) are kept in the file but never reused or mixed in
    current = [r for r in rows if r.get("split_seed") == split]
    done = {(r["variant"], int(r["seed"])) for r in current if not args.test or r.get("test_image_AUROC")}
    variants = list(config["variants"])
    unknown = sorted(set(args.only or []) - set(variants))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; the config has {variants}")
    for variant in args.only or variants:
        for seed in args.seeds or config["seeds"]:
            if (variant, seed) in done:
                print(f"kept {variant} seed {seed}")
                continue
            row = run_row(config, variant, seed, args.test, output_dir / "runs")
            rows = [r for r in rows if (r["variant"], int(r["seed"]), r.get("split_seed")) != (variant, seed, split)]
            rows.append(row)
            current = [r for r in rows if r.get("split_seed") == split]
            with rows_path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
            print(f"done {variant} seed {seed}: {row}", flush=True)
    header = ["variant", "seeds", *[f"val {m}" for m in METRICS], *[f"test {m}" for m in METRICS], "train min"]
    described = [[name, f"`{yaml.safe_dump(overrides or {}, default_flow_style=True, width=10_000).strip()}`"]
                 for name, overrides in config["variants"].items()]
    write_page(args.output, [
        "# ISSTAD recipe search on magnetic_tile (CPU budget, from scratch)",
        "",
        f"Generated by `python -m benchmarks.isstad_recipe -c {args.config.relative_to(REPO)}` from "
        f"`{rows_path.relative_to(REPO)}` (do not edit by hand).",
        "",
        f"Machine: {machine()}.",
        "",
        f"Base model: `{yaml.safe_dump(config['base'], default_flow_style=True, width=10_000).strip()}`; data: "
        f"`{config['data']['category']}`, validation = half of the test folder (`val_split_mode: from_test`, split "
        f"seed {split}, the same for every variant and seed), chosen on it only; the test half is scored only for the "
        "chosen recipe. Mean ± std over training seeds.",
        "",
        markdown_table(header, summary(current, variants)) if current else "No run with this split yet.",
        "",
        "## Variants",
        "",
        markdown_table(["variant", "overrides of the base"], described),
        "",
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
