"""CutPaste CPU recipe on magnetic_tile: variants x seeds through the real Engine, chosen on the validation half.

Run by hand on a quiet machine::

    python -m benchmarks.cutpaste_recipe                   # every variant and seed of the config, validation half
    python -m benchmarks.cutpaste_recipe --only chosen     # some variants
    python -m benchmarks.cutpaste_recipe --test            # also the test half (once, after the choice)

The config (``configs/benchmark/cutpaste_recipe.yaml``) names the base ``Cutpaste`` options, the variants (overrides)
and the seeds (a variant may name its own ``seeds``). Each (variant, seed) trains with ``seed_everything(seed)`` on ``train/good``; anomalib's
``val_split_mode: from_test`` (ratio 0.5, the config's ``split_seed``) gives the validation half on which thresholds
and every choice are made. Rows are kept in ``<output_dir>/rows.csv`` (a re-run skips finished rows; ``--test``
re-runs rows that lack test metrics) and ``docs/benchmarks/cutpaste-recipe.md`` is written from them: means +- std
over seeds.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from benchmarks.common import DOCS, REPO, load_search, machine, markdown_table, write_page
from benchmarks.isstad_recipe import summary

CONFIG = REPO / "configs" / "benchmark" / "cutpaste_recipe.yaml"
METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
COLUMNS = ["variant", "seed", *[f"val_{m}" for m in METRICS], *[f"test_{m}" for m in METRICS], "train_min"]


def run_row(config: dict, variant: str, seed: int, with_test: bool, work: Path) -> dict:
    """Train one variant with one seed; its validation (and test) metrics and training minutes."""
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from isstad_plugin import Cutpaste

    torch.set_num_threads(config.get("threads", 2))
    seed_everything(seed, workers=True)
    options = {**config["base"], **config["variants"][variant], "augmentation_seed": seed}
    options.pop("seeds", None)
    datamodule = MVTecAD(**config["data"], val_split_mode="from_test", val_split_ratio=0.5, seed=config["split_seed"])
    model = Cutpaste(**options)
    engine = Engine(default_root_dir=work / f"{variant}-{seed}", accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False, max_epochs=options["max_epochs"],
                    check_val_every_n_epoch=options["max_epochs"])
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    row = {"variant": variant, "seed": seed, "train_min": f"{(time.perf_counter() - start) / 60:.1f}"}
    val = engine.test(model=model, dataloaders=datamodule.val_dataloader(), verbose=False)[0]
    row.update({f"val_{m}": f"{val[m]:.4f}" for m in METRICS})
    if with_test:
        test = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
        row.update({f"test_{m}": f"{test[m]:.4f}" for m in METRICS})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--only", nargs="+", help="variants to run (default: all)")
    parser.add_argument("--test", action="store_true", help="also score the test half (once, after the choice)")
    args = parser.parse_args(argv)
    config, output_dir, rows_file, rows = load_search(args.config)
    variants = list(config["variants"])
    for variant in args.only or variants:
        for seed in config["variants"][variant].get("seeds", config["seeds"]):
            previous = next((r for r in rows if r["variant"] == variant and int(r["seed"]) == seed), None)
            if previous is not None and (previous.get("test_image_AUROC") or not args.test):
                print(f"kept {variant} seed {seed}")
                continue
            row = run_row(config, variant, seed, args.test, output_dir / "runs")
            rows = [r for r in rows if not (r["variant"] == variant and int(r["seed"]) == seed)] + [row]
            with rows_file.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
            print(f"done {variant} seed {seed}: {row}", flush=True)
    header = ["variant", "seeds", *[f"val {m}" for m in METRICS], *[f"test {m}" for m in METRICS], "train min"]
    described = [[name, str(options)] for name, options in config["variants"].items()]
    write_page(DOCS / "cutpaste-recipe.md", [
        "# CutPaste CPU recipe on magnetic_tile",
        "",
        "Command: `python -m benchmarks.cutpaste_recipe` (validation half), then `--test` once after the choice.",
        f"Machine: {machine()}.",
        f"Data: magnetic_tile; validation and test halves of its test folder (anomalib's `from_test`, split seed "
        f"{config['split_seed']}); every choice made on the validation half. Means ± std over training seeds "
        f"{config['seeds']}; `train min` is the wall time of `Engine.fit` (training, Gaussian fits, one validation).",
        "",
        markdown_table(header, summary(rows, variants)),
        "",
        f"Chosen (`configs/cutpaste_cpu.yaml`): `{config['chosen']}`, by the rule: {config['rule']}.",
        "",
        *([config["note"], ""] if config.get("note") else []),
        f"Base options (`Cutpaste`): `{config['base']}`",
        "",
        markdown_table(["variant", "overrides of the base"], described),
        "",
        "How the variants were chosen, and why the paper's fine-tuning is not among them: "
        "`isstad_plugin/models/cutpaste/README.md` (Diagnosis, CPU recipe).",
        "",
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
