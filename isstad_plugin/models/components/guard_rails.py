"""Guard rails for runs sized for another machine: a long run is announced, and data loading fits the cores.

- :class:`RunTimeEstimate` times the first training steps and, when the whole fit would take hours at that pace
  (e.g. the paper's ViT-L on a CPU), logs one warning with the estimate and the model's CPU-sized configuration.
- :func:`fit_workers_to_cores` lowers a datamodule's DataLoader workers to the cores this process may use (a
  config written for a workstation asks for 8; on 2 cores they only contend with training).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

logger = logging.getLogger(__name__)

LONG_RUN_HOURS = 2.0


def available_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fit_workers_to_cores(datamodule: Any, model_name: str) -> None:  # noqa: ANN401
    """Lower ``datamodule.num_workers`` to :func:`available_cores` when it asks for more, saying so."""
    workers, cores = getattr(datamodule, "num_workers", None), available_cores()
    if isinstance(workers, int) and workers > cores:
        logger.info("%s: %d DataLoader workers asked for, %d cores here: using %d (--data.num_workers to choose).",
                    model_name, workers, cores, cores)
        datamodule.num_workers = cores


class RunTimeEstimate(Callback):
    """After ``steps`` timed training steps (the first one, warm-up, not counted), estimate the whole fit; warn
    when it exceeds :data:`LONG_RUN_HOURS`, naming ``alternative`` (a configuration sized for this machine)."""

    def __init__(self, alternative: str, steps: int = 5) -> None:
        self.alternative = alternative
        self.steps = steps
        self._start: float | None = None
        self.estimate_hours: float | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:  # noqa: ANN401
        """Start the clock after the first step; estimate after ``steps`` more (once per fit)."""
        del args
        step = trainer.global_step
        if step == 1 and self._start is None:
            self._start = time.perf_counter()
        elif self._start is not None and self.estimate_hours is None and step >= 1 + self.steps:
            seconds_per_step = (time.perf_counter() - self._start) / (step - 1)
            total = trainer.estimated_stepping_batches
            self.estimate_hours = seconds_per_step * max(0, total - step) / 3600
            if self.estimate_hours > LONG_RUN_HOURS:
                logger.warning(
                    "%s: at the pace of its first steps (%.1f s each on %s), this fit's %d steps take about %.0f h. "
                    "Sized for this machine: %s.", type(pl_module).__name__, seconds_per_step,
                    pl_module.device.type.upper(), total, self.estimate_hours, self.alternative)
