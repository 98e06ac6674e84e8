"""Keep the trained network when anomalib tests a resumed training with the checkpoint it resumed from.

``anomalib train --ckpt_path X`` (``Engine.train(..., ckpt_path=X)``) resumes the fit from ``X`` and then calls
``trainer.test(..., ckpt_path=X)``: Lightning loads ``X`` again and the printed metrics are those of the old
checkpoint, not of the model the training produced. The plugin's models call :func:`remember_fit` when a fit
starts and ends and :func:`keep_trained_network` from ``on_load_checkpoint``: when a test, validation or prediction
asks for exactly the checkpoint the finished fit resumed from, the network (and everything else in the model's
state: thresholds, normalisation) stays the trained one, and the log says so. Any other checkpoint loads as usual.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn

logger = logging.getLogger(__name__)


def _resolved(path: str | Path | None) -> Path | None:
    return Path(path).resolve() if path else None


def remember_fit(module: LightningModule, finished: bool) -> None:
    """Record the checkpoint a fit resumed from (at its start) and that the fit finished (at its end)."""
    if not finished:
        module._resumed_from = _resolved(module.trainer.ckpt_path)
        module._finished_fit_resumed_from = None
    else:
        module._finished_fit_resumed_from = getattr(module, "_resumed_from", None)


def keep_trained_network(module: LightningModule, checkpoint: dict[str, Any]) -> bool:
    """In ``on_load_checkpoint``: replace the checkpoint's state by the model's own when the checkpoint is the one
    the model's finished fit resumed from (anomalib's train-then-test); returns whether it did."""
    resumed_from = getattr(module, "_finished_fit_resumed_from", None)
    trainer = module._trainer
    if resumed_from is None or trainer is None or trainer.state.fn == TrainerFn.FITTING:
        return False
    if _resolved(trainer.ckpt_path) != resumed_from:
        return False
    checkpoint["state_dict"] = {name: value.detach().clone() for name, value in module.state_dict().items()}
    # anomalib's pre/post-processors are callbacks too: Lightning would restore their old state (thresholds,
    # normalisation) from the checkpoint's callback states after this hook, so those are the current ones as well
    states = checkpoint.get("callbacks") or {}
    for callback in trainer.callbacks:
        if callback.state_key in states:
            states[callback.state_key] = callback.state_dict()
    logger.info("%s: %s asked for %s, which this training resumed from; %s the trained model, not the checkpoint.",
                type(module).__name__, trainer.state.fn.value, resumed_from, trainer.state.fn.value)
    return True
