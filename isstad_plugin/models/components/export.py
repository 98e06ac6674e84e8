"""Exports that never leave a half-written model looking complete.

anomalib's ``to_onnx``/``to_openvino``/``to_torch`` write straight into ``<export_root>/weights/<type>/``: an export
killed or failing part-way (full disk, SIGKILL) can leave a ``model.bin`` without its ``model.xml``, or a new
``model.bin`` beside an old ``model.xml``. :func:`export_atomically` runs anomalib's export into a hidden staging
folder inside ``export_root`` and then moves the files into place, the model file (``.xml``/``.onnx``/``.pt``)
last and only after the old one was removed, so a folder with a model file always holds a complete export.

:class:`SafeFilesMixin` gives both plugin models these exports and a ``load_from_checkpoint`` that names a truncated
file.

Example:
    >>> class Isstad(SafeFilesMixin, AnomalibModule): ...
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchvision.transforms.v2 import Compose

from isstad_plugin.models.components.checkpoints import check_checkpoint_file
from isstad_plugin.models.components.quantization import (
    is_anomalib_default_metric,
    quantize,
    quantize_with_accuracy_control,
)

logger = logging.getLogger(__name__)
_depth = 0  # exports in progress: to_openvino runs to_onnx inside itself


class ExportError(OSError):
    """An export failed part-way; nothing of it was left in the export folder."""


def export_atomically(export: Callable[..., Path], export_root: str | Path, *args: Any, **kwargs: Any) -> Path:  # noqa: ANN401
    """Run ``export(staging_root, *args, **kwargs)`` and move its output under ``export_root``.

    Returns:
        The exported model file, at its final place (``<export_root>/weights/<type>/<name>.<ext>``).

    Raises:
        ExportError: when the export fails on a file-system error, naming ``export_root``; nothing of this export
            is left there.
    """
    global _depth  # noqa: PLW0603
    export_root = Path(export_root)
    export_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", suffix=".partial", dir=export_root))
    _depth += 1
    try:
        try:
            staged_model = Path(export(staging, *args, **kwargs))
        except OSError as error:
            if _depth > 1:
                raise  # a nested export (to_openvino's ONNX step into a temporary folder): the outer one reports
            msg = (f"Export into {export_root} failed ({error.strerror or error}): nothing was written there; free "
                   "disk space or choose another --default_root_dir, and export again.")
            raise ExportError(msg) from error
        relative = staged_model.parent.relative_to(staging)
        target = export_root / relative
        target.mkdir(parents=True, exist_ok=True)
        final_model = target / staged_model.name
        final_model.unlink(missing_ok=True)  # a model file must never sit beside another export's weights
        for file in sorted(staged_model.parent.iterdir()):
            if file != staged_model:
                os.replace(file, target / file.name)
        os.replace(staged_model, final_model)
        if _depth == 1:
            logger.info("Exported %s (with the files beside it in %s).", final_model.resolve(), target.resolve())
        return final_model
    finally:
        _depth -= 1
        shutil.rmtree(staging, ignore_errors=True)


def resize_like(datamodule: Any, pre_processor: Any) -> None:  # noqa: ANN401
    """Append ``pre_processor``'s transform (a resize) to each split's augmentations of an anomalib ``datamodule``.

    anomalib does this itself when a trainer runs the model; its INT8 export calibrates on ``val_dataloader()``
    without one, so the images would reach the fixed-size graph at their file size.
    """
    transform = getattr(pre_processor, "transform", None)
    if transform is None:
        return
    for split in ("train", "val", "test"):
        name = f"{split}_augmentations"
        if hasattr(datamodule, name):
            current = getattr(datamodule, name)
            setattr(datamodule, name, Compose([current, transform]) if current is not None else transform)


class SafeFilesMixin:
    """For an ``AnomalibModule`` (listed before it in the bases): anomalib's exports written atomically, INT8 exports
    that keep the anomaly map (:mod:`.quantization`), and ``load_from_checkpoint`` (used by ``anomalib export``)
    failing with the file's name on a truncated file."""

    QUANTIZE_AS_TRANSFORMER: bool = False  # NNCF's transformer scheme for INT8 (ViT models)

    def to_torch(self, export_root: str | Path, *args: Any, **kwargs: Any) -> Path:  # noqa: ANN401
        """anomalib's ``to_torch``, written atomically."""
        return export_atomically(super().to_torch, export_root, *args, **kwargs)

    def to_onnx(self, export_root: str | Path, *args: Any, **kwargs: Any) -> Path:  # noqa: ANN401
        """anomalib's ``to_onnx``, written atomically."""
        return export_atomically(super().to_onnx, export_root, *args, **kwargs)

    def to_openvino(self, export_root: str | Path, *args: Any, **kwargs: Any) -> Path:  # noqa: ANN401
        """anomalib's ``to_openvino``, written atomically; with INT8 compression, the calibration datamodule's images
        are resized as the model's pre-processor does (the exported graph has the training size).

        The ONNX file it converts is an intermediate, so the ONNX exporter's own graph optimiser (onnxscript's
        rewrite passes) is skipped unless ``onnx_kwargs`` asks for it: OpenVINO's conversion and compilation optimise
        the graph themselves (``docs/benchmarks/openvino-export.md``: export time, and the OpenVINO model's latency and
        outputs, both ways). An ``--export_type onnx`` file, the deliverable itself, is still optimised.
        """
        arguments = inspect.signature(super().to_openvino).bind_partial(export_root, *args, **kwargs).arguments
        arguments["onnx_kwargs"] = {"optimize": False, **(arguments.get("onnx_kwargs") or {})}
        if arguments.get("compression_type") is not None and arguments.get("datamodule") is not None:
            resize_like(arguments["datamodule"], getattr(self, "pre_processor", None))
        del arguments["export_root"]
        return export_atomically(super().to_openvino, export_root, **arguments)

    # anomalib 2.7's ExportMixin runs --compression_type int8_ptq / int8_acq through these two static methods
    def _post_training_quantization_ov(self, model: Any, datamodule: Any = None) -> Any:  # noqa: ANN401
        """INT8 with the map smoothing kept in floating point (:func:`.quantization.quantize`)."""
        return quantize(model, datamodule, self.QUANTIZE_AS_TRANSFORMER)

    def _accuracy_control_quantization_ov(self, model: Any, datamodule: Any = None, metric: Any = None,  # noqa: ANN401
                                          task: Any = None, max_drop: float = 0.01) -> Any:  # noqa: ANN401
        """As above, with NNCF's accuracy control (:func:`.quantization.quantize_with_accuracy_control`); anomalib's
        ``Engine.export`` passes its default metric (image F1) when the user gave none, which is replaced by the
        image and pixel AUROC bound."""
        del task
        if is_anomalib_default_metric(metric):
            logger.info("INT8_ACQ: bounding image and pixel AUROC instead of anomalib's default image F1 (give "
                        "another metric to bound that one).")
            metric = None
        return quantize_with_accuracy_control(model, datamodule, self.QUANTIZE_AS_TRANSFORMER, metric, max_drop)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        """Lightning's ``load_from_checkpoint``, after checking that a local file is a complete checkpoint."""
        if isinstance(checkpoint_path, str | Path) and "://" not in str(checkpoint_path):
            check_checkpoint_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
