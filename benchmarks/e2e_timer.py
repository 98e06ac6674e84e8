"""A Lightning callback that writes wall-clock stamps of every training epoch (for benchmarks/training_e2e.py).

A top-level module (imported with ``benchmarks/`` on ``PYTHONPATH``) so that any checkout of the plugin, this one
or an older ``main``, can be timed with the same callback through ``anomalib train``'s config.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class EpochTimer(Callback):
    """Appends ``{"event", "epoch", "stage", "time", "images"}`` JSON lines to ``output``.

    An epoch spans from its start to the next epoch's start (or the end of training): data loading, the steps,
    validation and checkpoint writing all count, as they do for a user.
    """

    def __init__(self, output: str) -> None:
        self.output = Path(output)

    def _write(self, event: str, trainer: Trainer, pl_module: LightningModule) -> None:
        dataloader = trainer.train_dataloader
        images = len(dataloader.dataset) if dataloader is not None and hasattr(dataloader, "dataset") else None
        row = {"event": event, "epoch": trainer.current_epoch, "stage": getattr(pl_module, "stage", None),
               "time": time.time(), "images": images}
        with self.output.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write("epoch_start", trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write("train_end", trainer, pl_module)
