"""INT8 exports that keep the anomaly map: NNCF quantization with the scoring tail left in floating point.

anomalib's ``--compression_type int8_ptq`` / ``int8_acq`` quantize the whole OpenVINO graph with NNCF's defaults.
For ISSTAD that includes the Gaussian smoothing of the score map: its single-channel convolutions, quantized to 8
bits, flatten the map's fine differences. Measured on magnetic_tile's test half with the CPU recipe's model
(``docs/benchmarks/int8.md``, ``python -m benchmarks.int8``): pixel AUROC 0.648 in FP32, 0.593 with anomalib's
quantization (map correlation with FP32 0.90), 0.650 with the smoothing kept in FP32 and NNCF's transformer scheme
(correlation 0.96); image AUROC 0.670 / 0.664 / 0.660. :func:`quantize` therefore

- keeps every single-channel convolution (the smoothing of a one-channel map: ISSTAD's and CutPaste's) in FP32,
  found from the weights' shapes, not from node names (which differ from one export to the next);
- uses NNCF's transformer scheme for transformer models (``model_type``), which keeps softmax and normalisation
  inputs unquantized;
- calibrates, as anomalib does, on the datamodule's validation images, resized to the graph's input.

CutPaste's INT8 graph is about twice as fast, but post-training quantization alone loses 0.016 image AUROC and moves
its maps (correlation 0.61) whichever way; accuracy control (below) brings it within 0.003 of FP32 at 1.83x by keeping
32 of its 134 quantized operations in floating point (the Gaussian's centring and whitening among them).

``int8_acq`` (:func:`quantize_with_accuracy_control`) then keeps in floating point what it takes for neither image
nor pixel AUROC on the validation images to drop by more than ``max_drop`` (anomalib: image F1 on the test images).

:class:`SafeFilesMixin` routes anomalib's two quantization steps here (it overrides the ``ExportMixin`` static methods
of anomalib 2.7 that run them); everything else about the export is anomalib's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from isstad_plugin.signal_stack import keep_signal_stack

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def smoothing_convolutions(model: Any) -> list[str]:  # noqa: ANN401
    """Names of the OpenVINO ``model``'s convolutions with one input and one output channel (map smoothing)."""
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in {"Convolution", "GroupConvolution"}:
            continue
        weights = op.input_value(1).get_partial_shape()
        if weights.is_static and weights[0].get_length() == 1 and weights[1].get_length() == 1:
            names.append(op.get_friendly_name())
    return names


def quantization_options(model: Any, transformer: bool) -> dict[str, Any]:  # noqa: ANN401
    """``nncf.quantize`` keyword arguments: the smoothing convolutions ignored (kept in floating point), the
    transformer scheme if asked."""
    import nncf

    kept = smoothing_convolutions(model)
    logger.info("INT8: %d smoothing convolution(s) kept in floating point%s.", len(kept),
                ", NNCF transformer scheme" if transformer else "")
    options: dict[str, Any] = {"ignored_scope": nncf.IgnoredScope(names=kept, validate=False)}
    if transformer:
        options["model_type"] = nncf.ModelType.TRANSFORMER
    return options


def calibration_batches(model: Any, datamodule: Any) -> Iterable:  # noqa: ANN401
    """The datamodule's validation loader (set up for fitting, batch size fixed when the graph's is static)."""
    if datamodule is None:
        msg = "INT8 compression calibrates on data: pass a datamodule (--data ... on the anomalib command line)."
        raise ValueError(msg)
    datamodule.setup("fit")
    batch = model.input(0).partial_shape[0]
    if batch.is_static:
        datamodule.train_batch_size = datamodule.eval_batch_size = batch.get_length()
    loader = datamodule.val_dataloader()
    if len(loader.dataset) < 300:
        logger.warning("INT8: %d calibration images (>= 300 recommended).", len(loader.dataset))
    return loader


def quantize(model: Any, datamodule: Any, transformer: bool) -> Any:  # noqa: ANN401
    """Post-training INT8 quantization of the OpenVINO ``model`` (see the module docstring)."""
    import nncf

    dataset = nncf.Dataset(calibration_batches(model, datamodule), lambda batch: batch["image"])
    return nncf.quantize(model, dataset, **quantization_options(model, transformer))


def predictions(compiled: Any, batches: Iterable) -> Iterator[tuple[Any, Any]]:  # noqa: ANN401
    """Each batch with the compiled OpenVINO graph's outputs on its images (indexed by output name: ``pred_score``,
    ``anomaly_map``, ...)."""
    for batch in batches:
        yield batch, compiled(batch["image"])


def auroc_on(compiled: Any, batches: Iterable) -> dict[str, float]:  # noqa: ANN401
    """Image AUROC (``pred_score`` against ``gt_label``) and, where the batches have masks, pixel AUROC
    (``anomaly_map`` against ``gt_mask``) of the compiled OpenVINO graph on ``batches``."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    scores, labels, maps, masks = [], [], [], []
    for batch, output in predictions(compiled, batches):
        scores.append(torch.from_numpy(output["pred_score"]).reshape(-1))
        labels.append(batch.gt_label.reshape(-1).int())
        if "anomaly_map" in output and getattr(batch, "gt_mask", None) is not None:
            maps.append(torch.from_numpy(output["anomaly_map"]).reshape(-1))
            masks.append(batch.gt_mask.reshape(-1).int())
    values = {"image AUROC": float(binary_auroc(unit_range(torch.cat(scores)), torch.cat(labels)))}
    if maps:
        values["pixel AUROC"] = float(binary_auroc(unit_range(torch.cat(maps)), torch.cat(masks)))
    return values


def unit_range(values: torch.Tensor) -> torch.Tensor:
    """``values`` scaled into [0, 1], order kept. torchmetrics' AUROC passes scores outside [0, 1] through a sigmoid,
    which saturates on unnormalised scores (a Mahalanobis distance of 20 and one of 200 both become 1.0) and ties
    them: a graph exported without the post-processor's normalisation would be scored near 0.5."""
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else values.zero_()


def is_anomalib_default_metric(metric: Any) -> bool:  # noqa: ANN401
    """Whether ``metric`` is what anomalib 2.7's ``Engine.export`` substitutes for INT8_ACQ when none is given:
    ``F1Score(fields=["pred_label", "gt_label"])``."""
    from anomalib.metrics import F1Score

    return isinstance(metric, F1Score) and list(getattr(metric, "fields", [])) == ["pred_label", "gt_label"]


class WorstAurocDrop:
    """NNCF's accuracy-control metric: 1 minus the larger of the image and pixel AUROC drops against the FP32
    graph's (so NNCF's "drop" is the worse metric's drop; the FP32 graph scores 1)."""

    def __init__(self, reference: dict[str, float]) -> None:
        self.reference = reference

    def __call__(self, compiled: Any, batches: Iterable) -> float:  # noqa: ANN401
        values = auroc_on(compiled, batches)
        drops = {name: self.reference[name] - value for name, value in values.items()}
        logger.info("INT8_ACQ: %s", ", ".join(f"{name} {values[name]:.4f} (FP32 {self.reference[name]:.4f})"
                                               for name in values))
        return 1.0 - max(drops.values())


def quantize_with_accuracy_control(model: Any, datamodule: Any, transformer: bool, metric: Any = None,  # noqa: ANN401
                                   max_drop: float = 0.01) -> Any:  # noqa: ANN401
    """As :func:`quantize`, then NNCF's accuracy control: quantized operations go back to floating point until
    neither image nor pixel AUROC (or the given anomalib ``metric``) drops by more than ``max_drop`` against the FP32
    graph.

    Three choices differ from anomalib 2.7's ``int8_acq``, all so that the INT8 graph keeps what the user measures:
    the metrics are measured on the datamodule's *validation* images (anomalib uses its test images, which the
    reported metrics are then computed on); by default both image and pixel AUROC are bounded (anomalib's default,
    image F1 of ``pred_label``, moves only where a score crosses the threshold, and says nothing of the maps); and a
    given metric is reset before each evaluation (anomalib's accumulates over NNCF's repeated evaluations).
    """
    import nncf
    import openvino as ov
    import torch
    from anomalib.data import ImageBatch

    if not 0 <= max_drop <= 1:
        msg = f"max_drop must be between 0 and 1, got {max_drop}."
        raise ValueError(msg)
    loader = calibration_batches(model, datamodule)
    if not (loader.dataset.has_normal and loader.dataset.has_anomalous):
        msg = ("INT8_ACQ measures accuracy on the validation images, which need normal and anomalous ones: set "
               "--data.val_split_mode from_test (or same_as_test).")
        raise ValueError(msg)
    calibration = nncf.Dataset(loader, lambda batch: batch["image"])
    validation = nncf.Dataset(loader)

    if metric is None:
        with keep_signal_stack():  # OpenVINO's compiled models must not leave the thread a freed signal stack
            reference = auroc_on(ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), loader)
        score = WorstAurocDrop(reference)
    else:
        def score(compiled: Any, batches: Iterable) -> float:  # noqa: ANN401
            metric.reset()
            for batch, output in predictions(compiled, batches):
                metric.update(ImageBatch(
                    image=batch["image"], gt_label=batch["gt_label"],
                    pred_score=torch.from_numpy(output["pred_score"]).reshape(-1),
                    pred_label=torch.from_numpy(output["pred_label"]).reshape(-1),
                    anomaly_map=torch.from_numpy(output["anomaly_map"]) if "anomaly_map" in output else None,
                    pred_mask=torch.from_numpy(output["pred_mask"]) if "pred_mask" in output else None,
                    gt_mask=batch.gt_mask[:, None] if getattr(batch, "gt_mask", None) is not None else None))
            return float(metric.compute())

    with keep_signal_stack():  # NNCF compiles and releases several models here
        return nncf.quantize_with_accuracy_control(model, calibration, validation, score, max_drop=max_drop,
                                                   **quantization_options(model, transformer))
