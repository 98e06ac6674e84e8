"""ISSTAD recipe search on a CPU budget: variants x seeds, chosen on the validation half only.

Run by hand on a quiet machine::

    python -m benchmarks.isstad_recipe                         # every variant and seed of the config
    python -m benchmarks.isstad_recipe --only reference        # some variants
    python -m benchmarks.isstad_recipe --test                  # also the test half (once, for the chosen recipe)
    python -m benchmarks.isstad_recipe --rescore               # score finished runs again (new scorings)

The config (``configs/benchmark/isstad_recipe.yaml``) names a base model (``init_args`` of ``Isstad``), the variants
(overrides of the base) and the seeds. A variant that changes stage 2 only may name ``stage1_from: <variant>``: it
then starts from that variant's stage-1 checkpoint of the same seed (``stage1_epochs: 0``), so the two differ by the
lever alone; its ``train_min`` adds that variant's stage-1 minutes. ``scorings`` (overrides of the scoring options
only; what a scoring does not name is the paper's, whatever the variant's own scoring) are measured on every
trained model without retraining, as rows ``<variant>+<scoring>``. Each (variant, seed) row trains with ``seed_everything(seed)`` on the
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
from lightning.pytorch import Callback

from benchmarks.common import DOCS, REPO, load_search, machine, markdown_table, write_page

CONFIG = REPO / "configs" / "benchmark" / "isstad_recipe.yaml"
METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
COLUMNS = ["variant", "seed", "split_seed", *[f"val_{m}" for m in METRICS], *[f"test_{m}" for m in METRICS], "train_min",
           "stage1_min"]
SCORING_OPTIONS = {"anomaly_map_kind", "image_score", "image_score_top_fraction", "score_sigma", "map_calibration",
                   "image_score_map"}


def run_dir(work: Path, variant: str, seed: int) -> Path:
    return work / f"{variant}-{seed}"


def stage1_checkpoint(work: Path, variant: str, seed: int) -> Path:
    """The stage-1 checkpoint that ``variant`` wrote for ``seed`` (the newest version of its run)."""
    found = sorted(run_dir(work, variant, seed).rglob("stage1.ckpt"), key=lambda path: path.stat().st_mtime)
    if not found:
        msg = f"no stage-1 checkpoint of variant {variant!r} seed {seed} under {run_dir(work, variant, seed)}: run it first"
        raise FileNotFoundError(msg)
    return found[-1]


def finished_checkpoint(work: Path, variant: str, seed: int) -> Path | None:
    """The newest ``model.ckpt`` of ``variant``/``seed`` written after its last epoch, else None."""
    from isstad_plugin.models.components.checkpoints import read_checkpoint

    for path in sorted(run_dir(work, variant, seed).rglob("model.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        checkpoint = read_checkpoint(path)  # an untrusted pickle: weights_only, anomalib's allow-list
        plan = checkpoint.get("isstad_stage_plan") or {}
        if plan and checkpoint.get("epoch", -1) + 1 >= plan["stage1_epochs"] + plan["stage2_epochs"]:
            return path
    return None


def model_options(config: dict, variant: str, seed: int, work: Path) -> tuple[dict, str | None]:
    """``Isstad`` arguments of ``variant`` and the variant whose stage 1 it reuses (None: it trains its own)."""
    overrides = dict(config["variants"][variant] or {})
    parent = overrides.pop("stage1_from", None)
    options = {**config["base"], **overrides}
    if parent is not None:
        options.update(stage1_epochs=0, weights=str(stage1_checkpoint(work, parent, seed)))
    return options, parent


def scored_rows(engine, model, datamodule, with_test: bool, recorded: dict | None = None) -> dict:  # noqa: ANN001
    """Validation (and test) metrics of ``model`` as it scores now; thresholds and normalisation are refreshed
    on the validation half first, so a changed scoring never reuses another scoring's statistics. Validation
    metrics already ``recorded`` for this model and scoring are kept rather than measured again."""
    engine.validate(model=model, datamodule=datamodule, verbose=False)
    row = {}
    if recorded and all(recorded.get(f"val_{m}") for m in METRICS):
        row.update({f"val_{m}": recorded[f"val_{m}"] for m in METRICS})
    else:
        val = engine.test(model=model, dataloaders=datamodule.val_dataloader(), verbose=False)[0]
        row.update({f"val_{m}": f"{val[m]:.4f}" for m in METRICS})
    if with_test:
        test = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
        row.update({f"test_{m}": f"{test[m]:.4f}" for m in METRICS})
    return row


def run_rows(config: dict, variant: str, seed: int, with_test: bool, work: Path, rows: list[dict],
             scorings: list[str] | None = None) -> list[dict]:
    """Train one variant with one seed; rows of metrics of the validation half (and of the test half if asked):
    the variant's own scoring, then each of the config's ``scorings`` (those named, if named) on the same model."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from isstad_plugin import Isstad
    from isstad_plugin.models.isstad.anomaly_map import AnomalyMapGenerator

    seed_everything(seed, workers=True)
    # the split is the config's, the same for every variant and seed; the seed varies only the training
    datamodule = MVTecAD(**config["data"], val_split_mode="from_test", val_split_ratio=0.5, seed=config["split_seed"])
    engine = Engine(default_root_dir=run_dir(work, variant, seed), accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False, callbacks=[StageTimer()])
    previous = next((r for r in rows if r["variant"] == variant and int(r["seed"]) == seed), None)
    finished = finished_checkpoint(work, variant, seed) if previous is not None else None
    options, parent = model_options(config, variant, seed, work)
    if finished is not None:  # trained before (validation row recorded): score that model, do not train again
        model = Isstad.load_from_checkpoint(finished, map_location="cpu")
        minutes, stage1 = float(previous["train_min"]), float(previous["stage1_min"])
    else:
        model = Isstad(**options)
        start = time.time()
        engine.fit(model=model, datamodule=datamodule)
        minutes = (time.time() - start) / 60
        stage1 = next(c for c in engine.trainer.callbacks if isinstance(c, StageTimer)).stage1_minutes
        if parent is not None:  # this run reused the parent's stage 1: its cost is part of this recipe
            stage1 = float(next(r["stage1_min"] for r in rows if r["variant"] == parent and int(r["seed"]) == seed))
            minutes += stage1
    common = {"seed": seed, "split_seed": str(config["split_seed"]), "train_min": f"{minutes:.1f}",
              "stage1_min": f"{stage1:.2f}"}
    def recorded(name: str) -> dict | None:  # this model's earlier row of that scoring (reloaded from its checkpoint)
        return next((r for r in rows if r["variant"] == name and int(r["seed"]) == seed), None) if finished else None

    out = [{"variant": variant, **common, **scored_rows(engine, model, datamodule, with_test, recorded(variant))}]
    if with_test and variant == config.get("figure_variant") and seed == min(config["seeds"]):
        write_figure(model, datamodule, DOCS / "isstad-recipe.png")
    for scoring, scoring_overrides in (config.get("scorings") or {}).items():
        if scorings is not None and scoring not in scorings:
            continue
        unknown = set(scoring_overrides) - SCORING_OPTIONS
        if unknown:
            msg = f"scoring {scoring!r} changes {sorted(unknown)}; a scoring may change only {sorted(SCORING_OPTIONS)}"
            raise ValueError(msg)
        scoring_options = scoring_overrides  # a whole scoring: what it does not name is the paper's
        model.model.anomaly_map_generator = AnomalyMapGenerator(
            scoring_options.get("score_sigma", 4.0), scoring_options.get("anomaly_map_kind", "product"),
            scoring_options.get("image_score", "paper"), scoring_options.get("image_score_top_fraction", 0.01),
            scoring_options.get("map_calibration", "none"), (model.hparams.image_size,) * 2,
            scoring_options.get("image_score_map"))
        name = f"{variant}+{scoring}"
        out.append({"variant": name, **common, **scored_rows(engine, model, datamodule, with_test, recorded(name))})
    return out


def write_figure(model, datamodule, path: Path, per_kind: int = 2) -> None:  # noqa: ANN001
    """A grid of test-half images: per defect kind (and good) the first ``per_kind`` images, their ground truth and
    the model's anomaly map twice: all maps on one colour scale (what the scores compare: a hot spot on a good image
    reads as what it is), and each on its own scale (where in the image the model looks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    picked: dict[str, list] = {}
    for batch in datamodule.test_dataloader():
        for index, image_path in enumerate(batch.image_path):
            kind = Path(image_path).parent.name
            if len(picked.setdefault(kind, [])) < per_kind:
                picked[kind].append((batch.image[index], batch.gt_mask[index]))
    rows = [(kind, image, mask) for kind in sorted(picked, key=lambda k: (k != "good", k)) for image, mask in picked[kind]]
    model.eval()
    with torch.no_grad():
        images = torch.cat([model.pre_processor.transform(image.unsqueeze(0)) for _, image, _ in rows])
        maps = model.model(images).anomaly_map[:, 0]
    masks = torch.cat([torch.nn.functional.interpolate(m.float().view(1, 1, *m.shape[-2:]), size=maps.shape[-2:],
                                                       mode="nearest")[:, 0] for *_, m in rows])
    low, high = maps.min().item(), maps.max().item()
    figure, axes = plt.subplots(4, len(rows), figsize=(1.6 * len(rows), 6.9))
    for column, (kind, _, _) in enumerate(rows):
        axes[0, column].imshow(images[column].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[0, column].set_title(kind, fontsize=8)
        axes[1, column].imshow(masks[column].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[2, column].imshow(maps[column].numpy(), cmap="jet", vmin=low, vmax=high)
        axes[3, column].imshow(maps[column].numpy(), cmap="jet")
        for row in range(4):
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
    for row, label in enumerate(["test image", "ground truth", "map, one scale", "map, own scale"]):
        axes[row, 0].set_ylabel(label, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"wrote {path}")


class StageTimer(Callback):
    """Minutes from the start of the fit to the first stage-2 epoch (0 when the fit has no stage 1)."""

    def __init__(self) -> None:
        self.start = time.time()
        self.stage1_minutes = 0.0
        self._seen_stage2 = False

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.start = time.time()

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        if pl_module.stage == 2 and not self._seen_stage2:
            self._seen_stage2 = True
            self.stage1_minutes = (time.time() - self.start) / 60


def summary(rows: list[dict], variants: list[str]) -> list[list[str]]:
    """Per variant: mean +- std over its seeds of every recorded metric."""
    table = []
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]  # rows of one split (see main)
        if not mine:
            continue
        cells = [variant, str(len(mine))]
        for column in [*[f"{h}_{m}" for h in ("val", "test") for m in METRICS], "train_min"]:
            values = [float(r[column]) for r in mine if r.get(column)]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                digits = 1 if column == "train_min" else 3
                cells.append(f"{mean(values):.{digits}f} ± {stdev(values):.{digits}f}")
        table.append(cells)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=CONFIG)
    parser.add_argument("--only", nargs="+", help="variants to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the config's)")
    parser.add_argument("--test", action="store_true", help="also score the test half (for the chosen recipe)")
    parser.add_argument("--figure", action="store_true",
                        help="only draw the figure of the config's figure_variant from its trained seed-0 model")
    parser.add_argument("--rescore", action="store_true",
                        help="score finished runs again (e.g. after adding scorings) from their checkpoints")
    parser.add_argument("--scorings", nargs="*", metavar="NAME",
                        help="the config's scorings to measure (default: all; none given: the variants' own only)")
    parser.add_argument("--output", type=Path, default=DOCS / "isstad-recipe.md")
    args = parser.parse_args(argv)
    config, output_dir, rows_path, rows = load_search(args.config)
    split = str(config["split_seed"])
    # rows of another split (older runs drew a split per seed) are kept in the file but never reused or mixed in
    current = [r for r in rows if r.get("split_seed") == split]
    done = {(r["variant"], int(r["seed"])) for r in current
            if not args.rescore and (not args.test or r.get("test_image_AUROC"))}
    variants = list(config["variants"])
    unknown = sorted(set(args.only or []) - set(variants))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; the config has {variants}")
    unknown = sorted(set(args.scorings or []) - set(config.get("scorings") or {}))
    if unknown:
        parser.error(f"unknown scoring(s) {unknown}; the config has {list(config.get('scorings') or {})}")
    if args.figure:
        from anomalib.data import MVTecAD

        from isstad_plugin import Isstad

        checkpoint = finished_checkpoint(output_dir / "runs", config["figure_variant"], min(config["seeds"]))
        if checkpoint is None:
            parser.error(f"no trained {config['figure_variant']!r} model yet: run that variant first")
        datamodule = MVTecAD(**config["data"], val_split_mode="from_test", val_split_ratio=0.5,
                             seed=config["split_seed"])
        datamodule.setup()
        write_figure(Isstad.load_from_checkpoint(checkpoint, map_location="cpu"), datamodule,
                     DOCS / "isstad-recipe.png")
        return 0
    for variant in args.only or variants:
        for seed in args.seeds or config["seeds"]:
            if (variant, seed) in done:
                print(f"kept {variant} seed {seed}")
                continue
            new = run_rows(config, variant, seed, args.test, output_dir / "runs", current, args.scorings)
            replaced = {(r["variant"], seed, split) for r in new}
            rows = [r for r in rows if (r["variant"], int(r["seed"]), r.get("split_seed")) not in replaced]
            rows.extend(new)
            current = [r for r in rows if r.get("split_seed") == split]
            with rows_path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            for row in new:
                print(f"done {row['variant']} seed {seed}: {row}", flush=True)
    named = [name for variant in variants for name in (variant, *(f"{variant}+{s}" for s in config.get("scorings") or {}))]
    header = ["variant", "seeds", *[f"val {m}" for m in METRICS], *[f"test {m}" for m in METRICS], "train min"]
    described = [[name, f"`{yaml.safe_dump(overrides or {}, default_flow_style=True, width=10_000).strip()}`"]
                 for name, overrides in config["variants"].items()]
    marker = "<!-- Everything below this line is written by hand and kept when the page is regenerated. -->"
    kept = args.output.read_text().split(marker, 1)[1] if args.output.is_file() and marker in args.output.read_text() else "\n"
    figure = DOCS / "isstad-recipe.png"
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
        f"seed {split}, the same for every variant and seed), every choice made on it only; the test half was scored "
        "once, after the choice, for the chosen recipe and each ablation (`-`: not scored on the test half). "
        "Mean ± std over training seeds. `train min`: minutes of `Engine.fit`; a variant that reuses the reference's "
        "stage 1 (`stage1_from`) adds the reference's stage-1 minutes of the same seed.",
        "",
        *([f"![test images, ground truth and anomaly maps of `{config.get('figure_variant')}` (seed "
           f"{min(config['seeds'])})]({figure.name})", ""] if figure.is_file() else []),
        markdown_table(header, summary(current, named)) if current else "No run with this split yet.",
        "",
        "## Variants",
        "",
        markdown_table(["variant", "overrides of the base"], described),
        "",
        *(["## Scorings (measured on every trained model, no retraining)", "",
           markdown_table(["scoring", "overrides of the scoring"],
                          [[name, f"`{yaml.safe_dump(o, default_flow_style=True, width=10_000).strip()}`"]
                           for name, o in config["scorings"].items()]), ""] if config.get("scorings") else []),
        marker + kept.rstrip("\n"),
        "",
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
