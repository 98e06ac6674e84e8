"""Helpers of the ISSTAD Engine tests: a small real datamodule, a quiet CPU engine, and callbacks that watch the
stages."""

from __future__ import annotations

from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback

from isstad_plugin import Isstad

METRICS = {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score", "pixel_AUPRO"}


def datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="magnetic_tile", train_batch_size=8, eval_batch_size=8, num_workers=0)


def engine(tmp_path: Path, **kwargs) -> Engine:
    return Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                  enable_progress_bar=False, **kwargs)


class Recorder(Callback):
    """Records, per training batch, the epoch, the model's stage and the learning rate in use."""

    def __init__(self) -> None:
        self.trace: list[tuple[int, int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.trace.append((trainer.current_epoch, pl_module.stage, lr))


class EncoderWatch(Callback):
    """Snapshots the encoder when stage 2 starts and checks that no encoder gradient ever appears in stage 2."""

    def __init__(self) -> None:
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.stage2_backwards = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if pl_module.stage == 2 and self.snapshot is None:
            self.snapshot = {k: v.detach().clone() for k, v in encoder_state(pl_module).items()}

    def on_after_backward(self, trainer, pl_module) -> None:  # noqa: ANN001
        if pl_module.stage == 2:
            self.stage2_backwards += 1
            assert all(p.grad is None for p in pl_module.model.encoder_parameters())


def encoder_state(model: Isstad) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.model.state_dict().items() if k.startswith(("patch_embed", "blocks", "norm.", "cls_token"))}

