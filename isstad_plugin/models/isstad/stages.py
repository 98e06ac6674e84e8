"""ISSTAD's two training stages in one Lightning run: the plan (data), and the callback that applies it.

Stage 1 trains the whole MAE on masked normal images; stage 2 freezes the encoder and trains the decoder
and heads on synthetically corrupted images. :class:`StagePlan` is plain data and arithmetic (epochs per stage,
when to validate and checkpoint, how to fit a shorter budget). :class:`TwoStageSchedule` (a callback the model
provides through ``configure_callbacks``) is the one owner of the plan during a run: it fits the plan to the
trainer's epoch budget, switches stage at the planned epoch (the model freezes, the optimiser and scheduler are
rebuilt), writes the stage and plan into every checkpoint and restores them when a fit resumes with
``ckpt_path``, so the run continues in the right stage with the right schedule.

Validation and checkpoints happen when they mean something: :class:`TwoStageSchedule` skips validation in
stage 1 (untrained pixel heads) and runs it in stage 2 at the model's ``val_every_n_epochs`` cadence and after
the last epoch, unless the user chose a cadence (``trainer.check_val_every_n_epoch`` or ``val_check_interval``);
:class:`StageCheckpoint` replaces anomalib's default every-epoch ``model.ckpt`` with one written at the end of
each stage (plus ``stage1.ckpt``) and every ``checkpoint_every_n_epochs``. A user's own ``ModelCheckpoint`` is
left as it is.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from anomalib.callbacks.checkpoint import ModelCheckpoint
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, Timer
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from isstad_plugin.models.components.base import describe_data, user_epoch_budget
from isstad_plugin.patches import ddp_allow_unused_parameters

logger = logging.getLogger(__name__)

STAGE_KEY, PLAN_KEY = "isstad_stage", "isstad_stage_plan"  # checkpoint entries


class StagedModel(Protocol):
    """What :class:`TwoStageSchedule` needs of the model (``Isstad``)."""

    hparams: Any
    stage: int
    stage_plan: StagePlan

    def enter_stage(self, stage: int) -> None:
        """Make ``stage`` current (freeze or unfreeze the encoder)."""


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

    def validates_after(self, epoch: int, every_n_epochs: int, last_epoch: int | None = None) -> bool:
        """Whether validation (thresholds, metrics) runs after ``epoch`` (0-based).

        Never in stage 1 (the pixel-status heads are untrained then, so scores mean nothing); in stage 2 every
        ``every_n_epochs`` epochs counted from the stage's start (0: none before the end); always after the last
        epoch of the run (``last_epoch``, default the plan's last; a run resumed with a shorter budget ends sooner).
        """
        last = self.total_epochs - 1 if last_epoch is None else min(last_epoch, self.total_epochs - 1)
        if epoch >= last:
            return True
        if self.stage_at(epoch) == 1 or every_n_epochs <= 0:
            return False
        return (epoch + 1 - self.stage1_epochs) % every_n_epochs == 0

    def checkpoints_after(self, epoch: int, every_n_epochs: int, last_epoch: int | None = None) -> bool:
        """Whether a checkpoint is written after ``epoch``: at the end of stage 1, after the run's last epoch
        (``last_epoch``, as in :meth:`validates_after`) and every ``every_n_epochs``."""
        last = self.total_epochs - 1 if last_epoch is None else min(last_epoch, self.total_epochs - 1)
        done = epoch + 1
        return done == self.stage1_epochs or epoch >= last or (every_n_epochs > 0 and done % every_n_epochs == 0)

    def to_dict(self) -> dict[str, float]:
        """Plain data for the checkpoint."""
        return asdict(self)

    @classmethod
    def from_options(cls, hparams: Any) -> StagePlan:  # noqa: ANN401
        """The configured plan of ``Isstad``'s hyper-parameters."""
        return cls(hparams["stage1_epochs"], hparams["stage2_epochs"], hparams["stage1_warmup_epochs"],
                   hparams["stage2_cosine_epochs"])

    def fitted_to(self, budget: int | None) -> tuple[StagePlan, str | None]:
        """This (configured) plan scaled to a shorter epoch ``budget``; returns the plan and a message when scaled.

        A budget of at least the configured total (or none) keeps the configured epochs. A shorter budget
        shrinks both stages in proportion; stage 2 (which trains the scoring heads) keeps at least one epoch.
        """
        total = self.total_epochs
        if budget is None or budget < 0 or budget >= total:
            return self, None
        if budget == 0:
            msg = "max_epochs=0 leaves no epoch for ISSTAD's stage 2; give at least 1."
            raise ValueError(msg)
        stage2 = max(1, round(budget * self.stage2_epochs / total)) if self.stage2_epochs else 0
        stage1 = budget - stage2
        ratio1 = stage1 / self.stage1_epochs if self.stage1_epochs else 0.0
        ratio2 = stage2 / self.stage2_epochs if self.stage2_epochs else 0.0
        plan = StagePlan(
            stage1_epochs=stage1,
            stage2_epochs=stage2,
            stage1_warmup_epochs=self.stage1_warmup_epochs * ratio1,
            stage2_cosine_epochs=max(1, round(self.stage2_cosine_epochs * ratio2)),
        )
        message = (
            f"ISSTAD: trainer budget max_epochs={budget} is shorter than stage1_epochs + stage2_epochs = "
            f"{self.stage1_epochs} + {self.stage2_epochs}; scaled both stages to {plan.stage1_epochs} + "
            f"{plan.stage2_epochs} epochs (stage-1 warm-up {plan.stage1_warmup_epochs:.2f}, stage-2 cosine period "
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
    """Fits the stage plan to the trainer's budget, switches ISSTAD from stage 1 to stage 2, paces validation."""

    def __init__(self) -> None:
        self._user_val_limit: int | float | None = None  # set while this callback paces validation

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Plan the stages (fit only), cap ``max_epochs`` at the plan's end, take over validation pacing."""
        if stage != "fit":
            return
        # Stage 1 leaves the pixel-status head unused and stage 2 freezes the encoder: DDP must accept
        # parameters that get no gradient (set before the strategy wraps the model).
        ddp_allow_unused_parameters(trainer.strategy)
        model: StagedModel = pl_module  # type: ignore[assignment]
        plan, message = plan_for_trainer(trainer, model.hparams)
        if message:
            logger.info(message)
        logger.info(describe_fit(trainer, model.hparams, plan))
        self._use_plan(trainer, model, plan)
        model.enter_stage(plan.stage_at(0))
        if paces_validation(trainer):
            self._user_val_limit = trainer.limit_val_batches
            every = model.hparams.get("val_every_n_epochs", 0)
            logger.info("ISSTAD validates in stage 2 only: %s (set trainer.check_val_every_n_epoch to choose).",
                        f"every {every} epochs and after the last" if every else "after the last epoch")

    @staticmethod
    def _use_plan(trainer: Trainer, model: StagedModel, plan: StagePlan) -> None:
        model.stage_plan = plan
        if trainer.max_epochs is None or trainer.max_epochs < 0 or trainer.max_epochs > plan.total_epochs:
            trainer.fit_loop.max_epochs = plan.total_epochs

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Record the current stage and the plan."""
        del trainer
        checkpoint[STAGE_KEY] = pl_module.stage
        checkpoint[PLAN_KEY] = pl_module.stage_plan.to_dict()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """A fit resumed with ``ckpt_path`` continues with the recorded plan, in the recorded stage."""
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if PLAN_KEY in checkpoint:
            self._use_plan(trainer, pl_module, StagePlan(**checkpoint[PLAN_KEY]))
        if STAGE_KEY in checkpoint:
            pl_module.enter_stage(checkpoint[STAGE_KEY])

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Switch stage when the plan says so (freeze the encoder, rebuild optimiser and scheduler); switch
        validation on for the epochs the plan validates after, off for the others."""
        model: StagedModel = pl_module  # type: ignore[assignment]
        epoch = trainer.current_epoch
        if self._user_val_limit is not None:
            every = model.hparams.get("val_every_n_epochs", 0)
            validate = model.stage_plan.validates_after(epoch, every, last_epoch(trainer))
            trainer.limit_val_batches = self._user_val_limit if validate else 0
        wanted = model.stage_plan.stage_at(epoch)
        if wanted == model.stage:
            return
        model.enter_stage(wanted)
        trainer.strategy.setup_optimizers(trainer)
        logger.info("ISSTAD: entering stage %d at epoch %d.", wanted, epoch)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Give the trainer its validation limit back (a later ``validate``/``test`` call sees the user's)."""
        del pl_module, stage
        self._restore(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """The same after a failed fit (Lightning runs no callback ``teardown`` then)."""
        del pl_module, exception
        self._restore(trainer)

    def _restore(self, trainer: Trainer) -> None:
        if self._user_val_limit is not None:
            trainer.limit_val_batches = self._user_val_limit
            self._user_val_limit = None


def paces_validation(trainer: Trainer) -> bool:
    """Whether ISSTAD may pace validation: nobody else chose when it runs or what it is for.

    Lightning's defaults (every epoch, once per epoch) cannot be told from an explicit 1; any other cadence, a
    step or time budget (the run may end before the plan), or a callback that reads validation metrics
    (EarlyStopping, a monitored checkpoint) leave validation to Lightning, every epoch as configured.
    """
    readers = [c for c in trainer.callbacks
               if isinstance(c, (EarlyStopping, Timer)) or (isinstance(c, LightningModelCheckpoint) and c.monitor)]
    return (trainer.check_val_every_n_epoch == 1 and trainer.val_check_interval == 1.0 and trainer.max_steps == -1
            and not readers)


def last_epoch(trainer: Trainer) -> int | None:
    """The run's last epoch (0-based) under the trainer's epoch budget, or None without one."""
    max_epochs = trainer.fit_loop.max_epochs
    return None if max_epochs is None or max_epochs < 0 else max_epochs - 1


def describe_fit(trainer: Trainer, hparams: dict, plan: StagePlan) -> str:
    """One line for the first screen of a fit: the network, the data, the stages and the epoch budget."""
    blocks, scale = hparams["stage2_encoder_blocks"], hparams["stage2_encoder_lr_scale"]
    encoder = f"its last {blocks} encoder blocks at {scale}x" if blocks else "encoder frozen"
    return (f"ISSTAD: {hparams['backbone']} at {hparams['image_size']} px (patch {hparams['patch_size']}), decoder "
            f"{hparams['decoder_embed_dim']} x {hparams['decoder_depth']}, on {describe_data(trainer.datamodule)}; "
            f"stage 1: {plan.stage1_epochs} epochs of masked reconstruction (mask ratio {hparams['mask_ratio']}), "
            f"then stage 2: {plan.stage2_epochs} epochs of pixel-level training ({encoder}); {plan.total_epochs} "
            "epochs in all.")


def plan_for_trainer(trainer: Trainer, hparams: dict) -> tuple[StagePlan, str | None]:
    """The stage plan for this trainer's epoch budget (none given: the stages decide the length)."""
    return StagePlan.from_options(hparams).fitted_to(user_epoch_budget(trainer))


class StageCheckpoint(ModelCheckpoint):
    """anomalib's ``model.ckpt``, written at the end of each stage and every ``every_n_epochs`` (0: stage ends only).

    The end of stage 1 also leaves ``stage1.ckpt`` beside it: the MAE on its own, from which stage-2 variants
    can start (``weights=.../stage1.ckpt, stage1_epochs=0``). The last write is the trained model, after the
    final validation, so ``test``, ``predict`` and ``export`` use it as they use anomalib's default.
    """

    def __init__(self, dirpath: str | Path, every_n_epochs: int = 0) -> None:
        super().__init__(dirpath=dirpath, filename="model", auto_insert_metric_name=False, save_on_train_epoch_end=True)
        self.stage_every_n_epochs = every_n_epochs

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save only when the plan says so (see :meth:`StagePlan.checkpoints_after`)."""
        plan: StagePlan = pl_module.stage_plan  # type: ignore[assignment]
        epoch = trainer.current_epoch
        if not plan.checkpoints_after(epoch, self.stage_every_n_epochs, last_epoch(trainer)):
            return
        if epoch + 1 == plan.stage1_epochs and self.dirpath and not self._should_skip_saving_checkpoint(trainer):
            trainer.save_checkpoint(Path(self.dirpath) / "stage1.ckpt", weights_only=False)  # before model.ckpt
        super().on_train_epoch_end(trainer, pl_module)

    @staticmethod
    def replaces(trainer: Trainer) -> ModelCheckpoint | None:
        """anomalib Engine's own default checkpoint among the trainer's callbacks (the only one), else None.

        The Engine adds ``ModelCheckpoint(dirpath=<root>/weights/lightning, filename="model")`` when the user
        gave no anomalib ``ModelCheckpoint``; that one (and only that one) is ours to replace, and only while ISSTAD
        paces validation (:func:`paces_validation`): with another cadence anomalib's saves after each validation.
        """
        if not paces_validation(trainer):
            return None
        checkpoints = [c for c in trainer.callbacks if isinstance(c, LightningModelCheckpoint)]
        if len(checkpoints) != 1:
            return None
        (checkpoint,) = checkpoints
        is_default = (
            type(checkpoint) is ModelCheckpoint
            and checkpoint.filename == "model"
            and checkpoint.monitor is None
            and not checkpoint.save_last
            and checkpoint.save_top_k == 1
            and checkpoint.dirpath is not None
            and Path(checkpoint.dirpath).parts[-2:] == ("weights", "lightning")
        )
        return checkpoint if is_default else None


def stage_callbacks(trainer: Trainer | None, checkpoint_every_n_epochs: int) -> list[Callback]:
    """The callbacks ISSTAD's stages need: :class:`TwoStageSchedule`, and a :class:`StageCheckpoint` in place of
    anomalib Engine's every-epoch default (taken off the trainer here, so Lightning has nothing to override and says
    nothing); a user's own checkpoint callback is kept."""
    callbacks: list[Callback] = [TwoStageSchedule()]
    default = StageCheckpoint.replaces(trainer) if trainer is not None else None
    if default is not None:
        trainer.callbacks.remove(default)
        callbacks.append(StageCheckpoint(default.dirpath, checkpoint_every_n_epochs))
    return callbacks
