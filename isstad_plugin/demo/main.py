"""``isstad-demo``: train and test a tiny ISSTAD end to end, print the metrics and where the pictures are.

With no arguments it generates the embedded demo data set (MVTec AD layout) and uses it; with
``--data-root`` (and ``--category``) it runs on an MVTec-layout folder such as MVTec AD or
``../shared/data`` with ``--category magnetic_tile``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .dataset import DEMO_CATEGORY, make_demo_dataset

TINY_CONFIG = "isstad_tiny.yaml"


def config_path(name: str = TINY_CONFIG) -> Path:
    """Path of a shipped config (inside the wheel, or the checkout's ``configs/`` in editable installs)."""
    packaged = Path(__file__).resolve().parents[1] / "configs" / name
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs" / name


def tiny_model_arguments() -> dict:
    """``model.init_args`` of ``configs/isstad_tiny.yaml``."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(config_path())
    return OmegaConf.to_container(config.model.init_args, resolve=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="isstad-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None,
                        help="MVTec-layout root holding <category>/; default: generate the demo set")
    parser.add_argument("--category", default=None, help=f"category folder (default: {DEMO_CATEGORY})")
    parser.add_argument("--output", type=Path, default=Path("results/isstad-demo"), help="results folder")
    parser.add_argument("--stage1-epochs", type=int, default=None, help="override the tiny config")
    parser.add_argument("--stage2-epochs", type=int, default=None, help="override the tiny config")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    args = parse_args(argv)
    if args.data_root is None:
        root = args.output / "data"
        category = args.category or DEMO_CATEGORY
        print(f"Generating the demo data set in {make_demo_dataset(root, category)}")
    else:
        root = args.data_root
        category = args.category or "bottle"
        folder = root / category
        if not (folder / "train" / "good").is_dir():
            print(f"error: {folder / 'train' / 'good'} not found; --data-root must hold <category>/train/good "
                  "in MVTec AD layout.", file=sys.stderr)
            return 2

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from isstad_plugin import Isstad

    seed_everything(args.seed, workers=True)
    model_args = tiny_model_arguments()
    for stage in ("stage1_epochs", "stage2_epochs"):
        if getattr(args, stage) is not None:
            model_args[stage] = getattr(args, stage)
    model = Isstad(**model_args)
    datamodule = MVTecAD(root=root, category=category, train_batch_size=16, eval_batch_size=16, num_workers=2)
    engine = Engine(default_root_dir=args.output, accelerator="auto", devices=1, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    results = engine.test(model=model, datamodule=datamodule)

    print("\nTest metrics")
    for name, value in sorted(results[0].items()):
        print(f"  {name:<14} {value:.4f}")
    images = sorted(Path(engine.trainer.default_root_dir).rglob("images/**/*.png"))
    if not images:
        print("error: no anomaly-map pictures were written.", file=sys.stderr)
        return 1
    print(f"\n{len(images)} anomaly-map pictures (image | ground truth | anomaly map | prediction), e.g.:")
    for path in images[:5]:
        print(f"  {path}")
    print(f"  ... all under {os.path.commonpath(images)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
