"""What every plugin model shares on top of anomalib's ``AnomalibModule``: the contract and the file checks.

:class:`PluginModel` is listed before ``AnomalibModule`` in a model's bases (anomalib finds models among the
*direct* subclasses of ``AnomalibModule``). It provides:

- the anomalib contract of a one-class model that normalises inside its network: resize-only pre-processing,
  image and pixel metrics (:func:`.evaluation.image_and_pixel_evaluator`), thresholds that stay meaningful on good
  images alone (:mod:`.thresholds`), no sanity validation;
- checks before anything runs: the data folder (before anomalib reads or downloads it), the output folder and
  every file of the splits used, a pre-processor that normalises;
- safe files: atomic checkpoints and exports with named load errors (:mod:`.checkpoints`, :mod:`.export`), the
  plugin version in every checkpoint, a checkpoint of another network shape refused naming the option;
- anomalib's train-then-test of a resumed fit reporting the trained model (:mod:`.resume`);
- outside a fit, a checkpoint's options adopted where the model has its defaults (:meth:`adopt_checkpoint_options`),
  so ``anomalib test|predict|export --model <name> --ckpt_path CKPT`` needs nothing else;
- guard rails: a warning before a fit of many hours, DataLoader workers fitted to the cores (:mod:`.guard_rails`);
  the checkpoint, pictures and exports say where they were written.

A model defines :meth:`build_network` (its torch model from ``hparams``), sets :attr:`DEFAULT_IMAGE_SIZE`,
:attr:`NETWORK_OPTIONS` and :attr:`CPU_CONFIG`, calls ``super()`` in the hooks it overrides and may override
:meth:`require_network` and :meth:`load_plugin_state`.

Example:
    >>> class MyModel(PluginModel, AnomalibModule):
    ...     DEFAULT_IMAGE_SIZE = 224
    ...     NETWORK_OPTIONS = ("backbone", "image_size")
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.metrics import Evaluator
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from isstad_plugin.data_checks import check_data_folder, check_dataset
from isstad_plugin.errors import input_error

from .checkpoints import (
    VERSION_KEY,
    check_compatible,
    check_model_checkpoint,
    check_writable,
    plugin_version,
    use_safe_checkpoint_io,
)
from .evaluation import image_and_pixel_evaluator
from .export import SafeFilesMixin
from .guard_rails import RunTimeEstimate, fit_workers_to_cores
from .pre_processing import refuse_normalize, resize_only
from .resume import keep_trained_network, remember_fit
from .thresholds import DEFAULT_FALSE_ALARM_RATE, FalseAlarmPostProcessor

logger = logging.getLogger(__name__)

LIGHTNING_DEFAULT_MAX_EPOCHS = 1000  # a trainer with this max_epochs and no max_steps was given no budget


def user_epoch_budget(trainer: Any) -> int | None:
    """The trainer's ``max_epochs`` when the user gave a budget, ``None`` when they gave neither ``max_epochs`` nor
    ``max_steps`` (Lightning then holds its default of 1000 epochs): the one rule both plugin models follow to train
    for their own epochs. (Before the trainer exists, :func:`isstad_plugin.patches.model_epoch_budget` applies the
    same rule to the Engine's cached arguments, where "not given" is ``None``.)"""
    if trainer.max_epochs == LIGHTNING_DEFAULT_MAX_EPOCHS and trainer.max_steps == -1:
        return None
    return trainer.max_epochs


def describe_data(datamodule: Any) -> str:  # noqa: ANN401
    """``MVTecAD magnetic_tile (300 training images)`` for a fit's first log line; ``the loaders`` without one."""
    if datamodule is None:
        return "the loaders"
    name = f"{type(datamodule).__name__} {getattr(datamodule, 'category', '') or ''}".strip()
    return f"{name} ({len(getattr(datamodule, 'train_data', None) or [])} training images)"


class PluginModel(SafeFilesMixin):
    """Shared anomalib plumbing of the plugin's models (see the module docstring)."""

    DEFAULT_IMAGE_SIZE: int = 224
    NETWORK_OPTIONS: tuple[str, ...] = ()  # hyper-parameters that shape the network's tensors
    CPU_CONFIG: str = "a smaller configuration"  # named when a run would take hours here (.guard_rails)
    CHECKPOINT_MARKER: tuple[str, str] | None = None  # (a state key prefix only this model has, what else to do)
    BUDGET_OPTIONS: tuple[str, ...] = ()  # hyper-parameters whose sum is the epochs trained without a trainer budget

    # ------------------------------------------------------------------ anomalib contract
    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize only: training works on [0, 1] images and the torch model normalises itself."""
        return resize_only(tuple(image_size) if image_size else (cls.DEFAULT_IMAGE_SIZE,) * 2)

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image AUROC and F1; pixel AUROC, F1 and AUPRO (on a test split without defective images, the
        false-alarm rates instead: :class:`.thresholds.DefinedMetricsEvaluator`)."""
        return image_and_pixel_evaluator()

    def configure_post_processor(self) -> FalseAlarmPostProcessor:
        """anomalib's F1-adaptive thresholds and min-max normalisation; on a validation split of good images only,
        thresholds at the model's ``false_alarm_rate`` (:class:`.thresholds.FalseAlarmPostProcessor`)."""
        return FalseAlarmPostProcessor(false_alarm_rate=self.hparams.get("false_alarm_rate", DEFAULT_FALSE_ALARM_RATE))

    @property
    def learning_type(self) -> LearningType:
        """Trained on normal images only."""
        return LearningType.ONE_CLASS

    @property
    def planned_epochs(self) -> int | None:
        """The epochs this model trains when the trainer is given no budget (the sum of ``BUDGET_OPTIONS``); the
        Engine's trainer gets it as ``max_epochs`` then (:func:`isstad_plugin.patches.model_epoch_budget`)."""
        return sum(int(self.hparams[name]) for name in self.BUDGET_OPTIONS) if self.BUDGET_OPTIONS else None

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation (the scoring is not ready before training); the epoch budget stays the user's."""
        return {"num_sanity_val_steps": 0}

    def configure_callbacks(self) -> Any:  # noqa: ANN401
        """anomalib's component callbacks and a warning for runs of many hours (:mod:`.guard_rails`), after
        checking the data folder (before anomalib reads or downloads it)."""
        check_data_folder(getattr(self._trainer, "datamodule", None) if self._trainer is not None else None)
        return [*super().configure_callbacks(), RunTimeEstimate(self.CPU_CONFIG)]

    # ------------------------------------------------------------------ checks
    def setup(self, stage: str) -> None:
        """Atomic checkpoints with named load errors; for fit, a writable output folder and usable train and
        validation files."""
        if self._trainer is None:
            return
        use_safe_checkpoint_io(self.trainer)
        if stage == "fit":
            check_writable(getattr(self.trainer.checkpoint_callback, "dirpath", None) or self.trainer.default_root_dir)
            self.check_data("train", "val")
        if self.trainer.datamodule is not None:
            fit_workers_to_cores(self.trainer.datamodule, type(self).__name__)

    def check_data(self, *splits: str) -> None:
        """Check every file of the datamodule's named splits (on rank 0), before the first batch."""
        datamodule = self.trainer.datamodule
        for split in splits:
            dataset = getattr(datamodule, f"{split}_data", None)
            if dataset is not None and self.global_rank == 0:
                check_dataset(dataset, split)

    def require_network(self) -> None:
        """Fail before a run when the network cannot be ready (e.g. its weights file is missing); nothing here."""

    def on_fit_start(self) -> None:
        """The network is ready; refuse a normalising pre-processor; remember the checkpoint the fit resumed from."""
        self.require_network()
        refuse_normalize(self.pre_processor, type(self).__name__)
        remember_fit(self, finished=False)

    def on_fit_end(self) -> None:
        """Remember that the fit finished (see :mod:`.resume`); say where the checkpoint is."""
        remember_fit(self, finished=True)
        checkpoint = self.trainer.checkpoint_callback
        written = getattr(checkpoint, "best_model_path", "") or getattr(checkpoint, "dirpath", None)
        if written:
            logger.info("%s: checkpoint written: %s", type(self).__name__, Path(written).resolve())

    def on_test_end(self) -> None:
        """Say where the pictures went."""
        self.report_pictures("test")

    def on_predict_end(self) -> None:
        """Say where the pictures went."""
        self.report_pictures("predict")

    def report_pictures(self, run: str) -> None:
        """Log the folder anomalib's visualizer wrote this ``run``'s pictures to (nothing without pictures)."""
        folder = getattr(self.visualizer, "output_dir", None)
        if folder is not None and Path(folder).is_dir():
            logger.info("%s: %s pictures written under %s", type(self).__name__, run, Path(folder).resolve())

    def on_validation_start(self) -> None:
        """The network is ready."""
        self.require_network()

    def on_validation_batch_end(self, outputs: Any, *_args: Any) -> None:  # noqa: ANN401
        """Scores that are NaN or infinite fail here, naming the images (see :func:`refuse_non_finite`)."""
        refuse_non_finite(outputs, type(self).__name__, "validation")

    def on_test_batch_end(self, outputs: Any, *_args: Any) -> None:  # noqa: ANN401
        """Scores that are NaN or infinite fail here, naming the images (see :func:`refuse_non_finite`)."""
        refuse_non_finite(outputs, type(self).__name__, "test")

    def on_predict_batch_end(self, outputs: Any, *_args: Any) -> None:  # noqa: ANN401
        """Scores that are NaN or infinite fail here, naming the images (see :func:`refuse_non_finite`)."""
        refuse_non_finite(outputs, type(self).__name__, "predict")

    def on_test_start(self) -> None:
        """The network is ready; the test files are usable."""
        self.require_network()
        self.check_data("test")

    def on_predict_start(self) -> None:
        """The network is ready."""
        self.require_network()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the plugin version that wrote the checkpoint."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[VERSION_KEY] = plugin_version()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another network shape, naming the option; keep the trained network when anomalib
        tests a resumed fit with the checkpoint it resumed from (:mod:`.resume`); then :meth:`load_plugin_state`.
        With :attr:`CHECKPOINT_MARKER`, another model's checkpoint is refused first, naming what it looks like.
        Outside a fit the checkpoint's options are adopted first (:meth:`adopt_checkpoint_options`)."""
        if self.CHECKPOINT_MARKER is not None:
            check_model_checkpoint(checkpoint, type(self).__name__, *self.CHECKPOINT_MARKER)
        kept = keep_trained_network(self, checkpoint)  # the state is then the trained model's own
        if not kept and self._trainer is not None and self.trainer.state.fn != TrainerFn.FITTING:
            self.adopt_checkpoint_options(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in getattr(self.model, "RETIRED_STATE_KEYS", ()):  # written by earlier versions, rebuilt now
            state.pop(f"model.{key}", None)
        check_compatible(self, checkpoint, self.NETWORK_OPTIONS,
                         path=self._trainer.ckpt_path if self._trainer is not None else None)
        super().on_load_checkpoint(checkpoint)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and self.trainer.state.fn != TrainerFn.FITTING:
            # the datamodule resized its subsets for the pre-processor as it was before the checkpoint restored it
            datamodule.setup(self.trainer.state.stage)
        self.load_plugin_state(checkpoint, trained_network_kept=kept)

    def adopt_checkpoint_options(self, checkpoint: dict[str, Any]) -> None:
        """Take the options ``checkpoint`` was trained with wherever this model has its constructor's defaults, and
        rebuild the network (:meth:`build_network`) with them, so ``anomalib test|predict --model <name> --ckpt_path
        CKPT`` needs no other option. An option given with another value than the checkpoint's fails, naming both.

        Not while fitting: a resumed fit keeps the options it was given (the network shape must still match).
        """
        saved = checkpoint.get("hyper_parameters") or {}
        parameters = inspect.signature(type(self).__init__).parameters
        defaults = {name: parameter.default for name, parameter in parameters.items()
                    if name not in COMPONENTS and parameter.default is not inspect.Parameter.empty}
        adopted, conflicts = {}, []
        for name in defaults.keys() & saved.keys():
            current = self.hparams.get(name, defaults[name])
            if _plain(saved[name]) == _plain(current):
                continue
            if _plain(current) == _plain(defaults[name]):
                adopted[name] = saved[name]
            else:
                conflicts.append(f"{name}={saved[name]!r} (given: {current!r})")
        path = self._trainer.ckpt_path if self._trainer is not None else None
        if conflicts:
            msg = (f"The checkpoint {path or ''} was trained with {', '.join(sorted(conflicts))}: leave these options "
                   "out (the checkpoint provides every option it was trained with) or pass the checkpoint's values.")
            raise input_error(msg)
        if adopted:
            self.hparams.update(adopted)
            self.model = self.build_network().to(self.device)
            logger.info("%s: options from the checkpoint %s: %s.", type(self).__name__, path or "",
                        ", ".join(f"{name}={value!r}" for name, value in sorted(adopted.items())))

    def build_network(self) -> nn.Module:
        """The torch model of the options in ``hparams`` (each model defines it)."""
        raise NotImplementedError

    def load_plugin_state(self, checkpoint: dict[str, Any], trained_network_kept: bool) -> None:
        """The model's own entries of ``checkpoint`` (none here); ``trained_network_kept``: the network is the
        trained one, not the checkpoint's."""

    @classmethod
    def sized_pre_processor(cls, pre_processor: Any, image_size: int) -> Any:  # noqa: ANN401
        """``pre_processor``, or for ``True`` (the default) the resize-only one at ``image_size``."""
        return cls.configure_pre_processor((image_size, image_size)) if pre_processor is True else pre_processor


COMPONENTS = {"pre_processor", "post_processor", "evaluator", "visualizer"}  # never hyper-parameters


def refuse_non_finite(outputs: Any, model: str, run: str) -> None:  # noqa: ANN401
    """Fail when a batch's image scores or anomaly maps hold NaN or infinite values, naming the images.

    A NaN score sorts anywhere, so AUROC, thresholds and labels built on it mean nothing, and a NaN map turns into
    garbage pixels when drawn (NumPy's "invalid value encountered in cast"): nothing downstream may see one.
    """
    for field in ("pred_score", "anomaly_map"):
        values = getattr(outputs, field, None)
        if values is None or bool(torch.isfinite(values).all()):
            continue
        bad = ~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
        paths = [str(path) for path, flag in zip(getattr(outputs, "image_path", None) or [], bad.tolist(),
                                                  strict=False) if flag]
        where = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "") if paths else (
            f"{int(bad.sum())} image(s) of the batch")
        msg = (f"{model}: the {field} of {where} holds NaN or infinite values ({run}). The network or its fitted "
               "statistics are broken (a NaN weight, a degenerate fit, images with NaN values): retrain, or check "
               "the images named.")
        raise FloatingPointError(msg)


def _plain(value: Any) -> Any:  # noqa: ANN401
    """``value`` with tuples as lists (a YAML list and the same tuple default compare equal)."""
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value
