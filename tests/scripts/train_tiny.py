"""Train a tiny ISSTAD in its own process (used by the DDP and kill-and-resume tests).

Prints ``EPOCH_START <epoch> <stage>`` lines (flushed) and writes a JSON report with the per-step
(epoch, stage, lr) trace, the final stage/epoch and the test metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from anomalib.callbacks.checkpoint import ModelCheckpoint
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything

from isstad_plugin import Isstad


class Trace(Callback):
    def __init__(self) -> None:
        self.rows: list[list[float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        if trainer.global_rank == 0:
            print(f"EPOCH_START {trainer.current_epoch} {pl_module.stage}", flush=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.rows.append([trainer.current_epoch, pl_module.stage, trainer.optimizers[0].param_groups[0]["lr"]])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage1-epochs", type=int, default=1)
    parser.add_argument("--stage2-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument("--test", action="store_true")
    args = parser.parse_args()

    seed_everything(0, workers=True)
    model = Isstad(backbone="vit_tiny", image_size=64, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                   stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs, stage1_warmup_epochs=1,
                   stage2_cosine_epochs=2)
    datamodule = MVTecAD(root=args.root, category="magnetic_tile", train_batch_size=args.batch_size,
                         eval_batch_size=8, num_workers=0)
    trace = Trace()
    checkpoints = ModelCheckpoint(dirpath=args.out / "ckpt", filename="{epoch}", save_last=True, save_top_k=-1,
                                  every_n_epochs=1)
    engine = Engine(default_root_dir=args.out, accelerator="cpu", devices=args.devices, strategy=args.strategy,
                    logger=False, enable_progress_bar=False, callbacks=[trace, checkpoints])
    engine.fit(model=model, datamodule=datamodule, ckpt_path=args.ckpt_path)
    encoder = model.model.blocks[0].attn.qkv.weight
    report = {"trace": trace.rows, "stage": model.stage, "epoch": engine.trainer.current_epoch,
              "encoder_requires_grad": any(p.requires_grad for p in model.model.encoder_parameters()),
              "encoder_checksum": float(encoder.double().sum()), "rank": engine.trainer.global_rank}
    if args.test:
        report["metrics"] = engine.test(model=model, datamodule=datamodule)[0]
    (args.out / f"report_{engine.trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
