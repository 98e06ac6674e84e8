"""ISSTAD's two training stages in one Lightning run: the plan, the switch, and the learning-rate shapes.

Stage 1 trains the whole MAE on masked normal images; stage 2 freezes the encoder and trains the decoder
and heads on synthetically corrupted images. :class:`TwoStageSchedule` (a callback the model provides
through ``configure_callbacks``) fits the plan to the trainer's epoch budget, switches stage at the planned
epoch (freeze, new optimiser and scheduler) and the model keeps the stage and plan in its checkpoint, so a
run resumed with ``ckpt_path`` continues in the right stage with the right schedule.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy

if TYPE_CHECKING:
    from .lightning_model import Isstad

logger = logging.getLogger(__name__)

LIGHTNING_DEFAULT_MAX_EPOCHS = 1000


@dataclass(frozen=True)
class StagePlan:
    """How many epochs each stage runs (stage 1 first), and the stage-specific epoch constants."""

    stage1_epochs: int
    stage2_epochs: int
    stage1_warmup_epochs: float
    stage2_cosine_epochs: int

    @property
    def total_epochs(self) -> int:
        """Epochs of both stages together."""
        return self.stage1_epochs + self.stage2_epochs

    def stage_at(self, epoch: int) -> int:
        """Stage (1 or 2) that trains during ``epoch`` (0-based)."""
        return 1 if epoch < self.stage1_epochs else 2

    def to_dict(self) -> dict[str, float]:
        """Plain data for the checkpoint."""
        return asdict(self)

    @classmethod
    def fit_budget(
        cls,
        stage1_epochs: int,
        stage2_epochs: int,
        stage1_warmup_epochs: float,
        stage2_cosine_epochs: int,
        budget: int | None,
    ) -> tuple[StagePlan, str | None]:
        """Scale both stages to a shorter epoch ``budget``; returns the plan and a message when scaled.

        A budget of at least the configured total (or none) keeps the configured epochs. A shorter budget
        shrinks both stages in proportion; stage 2 (which trains the scoring heads) keeps at least one epoch.
        """
        configured = cls(stage1_epochs, stage2_epochs, stage1_warmup_epochs, stage2_cosine_epochs)
        total = configured.total_epochs
        if budget is None or budget < 0 or budget >= total:
            return configured, None
        if budget == 0:
            msg = "max_epochs=0 leaves no epoch for ISSTAD's stage 2; give at least 1."
            raise ValueError(msg)
        stage2 = max(1, round(budget * stage2_epochs / total)) if stage2_epochs else 0
        stage1 = budget - stage2
        ratio1 = stage1 / stage1_epochs if stage1_epochs else 0.0
        ratio2 = stage2 / stage2_epochs if stage2_epochs else 0.0
        plan = cls(
            stage1_epochs=stage1,
            stage2_epochs=stage2,
            stage1_warmup_epochs=stage1_warmup_epochs * ratio1,
            stage2_cosine_epochs=max(1, round(stage2_cosine_epochs * ratio2)),
        )
        message = (
            f"ISSTAD: trainer budget max_epochs={budget} is shorter than stage1_epochs + stage2_epochs = "
            f"{stage1_epochs} + {stage2_epochs}; scaled both stages to {plan.stage1_epochs} + {plan.stage2_epochs} "
            f"epochs (stage-1 warm-up {plan.stage1_warmup_epochs:.2f}, stage-2 cosine period "
            f"{plan.stage2_cosine_epochs})."
        )
        return plan, message


def warmup_cosine_factor(step: int, warmup_steps: float, total_steps: int) -> float:
    """MAE's per-step learning-rate factor: linear warm-up, then a half-cycle cosine down to 0."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class TwoStageSchedule(Callback):
    """Fits the stage plan to the trainer's budget and switches ISSTAD from stage 1 to stage 2."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Plan the stages (fit only) and cap ``max_epochs`` at the plan's end."""
        if stage != "fit":
            return
        if isinstance(trainer.strategy, DDPStrategy):
            # Stage 1 leaves the pixel-status head unused and stage 2 freezes the encoder: DDP must accept
            # parameters that get no gradient (set before the strategy wraps the model).
            trainer.strategy._ddp_kwargs.setdefault("find_unused_parameters", True)  # noqa: SLF001
        model: Isstad = pl_module  # type: ignore[assignment]
        budget = trainer.max_epochs
        if budget == LIGHTNING_DEFAULT_MAX_EPOCHS and trainer.max_steps == -1:
            budget = None  # Lightning's default, not a user's choice: the stages decide the length.
        plan, message = StagePlan.fit_budget(
            model.hparams.stage1_epochs,
            model.hparams.stage2_epochs,
            model.hparams.stage1_warmup_epochs,
            model.hparams.stage2_cosine_epochs,
            budget,
        )
        if message:
            logger.info(message)
        model.stage_plan = plan
        if trainer.max_epochs is None or trainer.max_epochs < 0 or trainer.max_epochs > plan.total_epochs:
            trainer.fit_loop.max_epochs = plan.total_epochs
        model.enter_stage(plan.stage_at(0))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Switch stage when the plan says so: freeze the encoder and rebuild optimiser and scheduler."""
        model: Isstad = pl_module  # type: ignore[assignment]
        wanted = model.stage_plan.stage_at(trainer.current_epoch)
        if wanted == model.stage:
            return
        model.enter_stage(wanted)
        trainer.strategy.setup_optimizers(trainer)
        logger.info("ISSTAD: entering stage %d at epoch %d.", wanted, trainer.current_epoch)
