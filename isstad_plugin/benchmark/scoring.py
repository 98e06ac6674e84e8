"""Metrics at every image's original resolution, one code path for every model (the benchmark's like-for-like scoring).

anomalib's ``Evaluator`` scores each anomaly map against the ground-truth mask *after* both went through the model's
pre-processor (ISSTAD's 128 px, CutPaste's 224 px, PatchCore's 256 px), so models of different input sizes are
scored on different masks, and a defect a few pixels wide can shrink to nothing. Here, for any anomalib model:

- the model's **raw** output is used (``module.model`` on the pre-processed batch: before the post-processor's min-max
  normalisation, which clamps values outside the validation range and so ties them);
- each anomaly map ``[h, w]`` is resized (bilinear) to its image's size on disk ``[H, W]`` and compared with the mask
  as stored on disk (``anomalib.data.utils.read_mask``; an all-zero mask for good images);
- thresholds (image F1, pixel F1) are F1-adaptive on the validation half, as anomalib's post-processor does, but on
  the raw scores at original resolution; the test half is scored with them;
- the metrics are anomalib's: ``AUROC``, ``F1AdaptiveThreshold`` and ``AUPRO`` (its PRO curve over the connected
  defect regions of every image, computed here for images of different sizes), and ``F1Score``.

Example:
    >>> metrics = score_at_original_resolution(module.model, module.pre_processor.transform,
    ...                                        datamodule.val_dataloader(), datamodule.test_dataloader())
    >>> metrics["pixel_AUPRO"]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from anomalib.data.utils import read_mask
from anomalib.metrics import AUPRO, AUROC, F1AdaptiveThreshold, F1Score
from anomalib.utils.cv import connected_components_cpu
from PIL import Image
from torch import Tensor

from isstad_plugin.errors import input_error


@dataclass
class OriginalSizeOutputs:
    """A split's raw model outputs at original resolution: ``scores``/``labels`` ``[N]``; ``maps``/``masks`` one
    ``[H_i, W_i]`` tensor per image (float map, bool mask); ``masks`` is empty when some defective image has none."""

    scores: Tensor
    labels: Tensor
    maps: list[Tensor] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)

    @property
    def has_pixel_truth(self) -> bool:
        return bool(self.masks)


def original_size(image_path: str) -> tuple[int, int]:
    """``(H, W)`` of the image file as stored (its header only)."""
    with Image.open(image_path) as image:
        return image.height, image.width


def original_mask(mask_path: str | None, label: int, size: tuple[int, int]) -> Tensor | None:
    """The ground-truth mask ``[H, W]`` (bool) as stored; all False for a good image; None for a defective image
    without a mask. A mask of another size than its image fails, naming both."""
    if not mask_path:
        return torch.zeros(size, dtype=torch.bool) if label == 0 else None
    mask = read_mask(mask_path, as_tensor=True).bool()
    if tuple(mask.shape[-2:]) != size:
        msg = (f"Mask {mask_path} is {mask.shape[-1]} x {mask.shape[-2]} px but its image is {size[1]} x {size[0]} px; "
               "masks must have their image's size.")
        raise input_error(msg)
    return mask.reshape(size)


def mask_path_table(loader: Iterable) -> dict[str, str]:
    """``{image path: mask path}`` of an anomalib dataloader's dataset (no entry for an image without a mask)."""
    samples = getattr(getattr(loader, "dataset", None), "samples", None)
    if samples is None or "mask_path" not in samples:
        return {}
    return {str(image): str(mask) for image, mask in zip(samples.image_path, samples.mask_path, strict=True)
            if isinstance(mask, str | Path) and str(mask)}


def original_size_outputs(
    predict: Callable[[Tensor], object], transform: Callable[[Tensor], Tensor] | None, loader: Iterable,
    with_maps: bool = True,
) -> OriginalSizeOutputs:
    """Run ``predict`` (a torch model returning ``pred_score [B]`` and ``anomaly_map [B, 1, h, w]``) on every batch
    of ``loader`` after ``transform`` (the pre-processor's), and bring its maps to each image's original size
    (``with_maps=False``: image scores and labels only)."""
    scores, labels, maps, masks = [], [], [], []
    missing_mask = False
    # from the dataset's table: a batch's collate drops ``mask_path`` altogether when its first image has none
    mask_paths = mask_path_table(loader)
    parameters = predict.parameters() if isinstance(predict, torch.nn.Module) else iter(())
    device = next((parameter.device for parameter in parameters), torch.device("cpu"))
    with torch.inference_mode():
        for batch in loader:
            images = batch.image.to(device, non_blocking=True)
            output = predict(transform(images) if transform is not None else images)
            anomaly_map = output.anomaly_map.float().reshape(len(images), 1, *output.anomaly_map.shape[-2:])
            scores.append(output.pred_score.float().reshape(-1).cpu())
            labels.append(batch.gt_label.reshape(-1).int().cpu())
            if not with_maps:
                continue
            for index, image_path in enumerate(batch.image_path):
                size = original_size(image_path)
                mask = original_mask(mask_paths.get(str(image_path)), int(batch.gt_label[index]), size)
                missing_mask |= mask is None
                resized = F.interpolate(anomaly_map[index : index + 1], size=size, mode="bilinear", align_corners=False)
                maps.append(resized[0, 0].cpu())
                if mask is not None:
                    masks.append(mask)
    if not scores:
        msg = "The split to score holds no image."
        raise input_error(msg)
    return OriginalSizeOutputs(torch.cat(scores), torch.cat(labels), maps, [] if missing_mask or not with_maps else masks)


class OriginalSizeAUPRO(AUPRO):
    """anomalib's ``AUPRO`` (its PRO curve, FPR limit and normalised area) for images of different sizes: each
    image's mask is labelled into connected regions on its own, the labels are made unique across images, and the
    flattened maps and labels go to anomalib's ``compute_pro``."""

    def _compute(self) -> tuple[Tensor, Tensor]:
        labels, offset = [], 0
        for target in self.target:
            regions = connected_components_cpu(target.reshape(1, 1, *target.shape[-2:]).float()).reshape(-1).long()
            labels.append(torch.where(regions > 0, regions + offset, regions))
            offset += int(regions.max())
        preds = torch.cat([pred.reshape(-1).float() for pred in self.preds])
        return self.compute_pro(cca=torch.cat(labels), preds=preds)


def _metric(metric_class: type, *values: Tensor, **options: object) -> float:
    """``metric_class`` (an anomalib metric over fields ``a``, ``b``, built with ``options``) on ``values``."""
    metric = metric_class(fields=("a", "b")[: len(values)], **options)
    metric.update(SimpleNamespace(**dict(zip(("a", "b"), values, strict=False))))
    return float(metric.compute())


# torchmetrics' ROC passes scores outside [0, 1] through a sigmoid, which saturates raw scores (PatchCore's distances,
# CutPaste's log-densities) into ties; anomalib's own threshold and AUPRO never squash. Raw scores go in as they are.
RAW_SCORES = {"normalization": None}


def _threshold(preds: Tensor, target: Tensor) -> float:
    """anomalib's F1-adaptive threshold of ``preds`` against ``target`` (as its post-processor learns it)."""
    return _metric(F1AdaptiveThreshold, preds, target)


def _pixels(outputs: OriginalSizeOutputs) -> tuple[Tensor, Tensor]:
    return torch.cat([m.reshape(-1) for m in outputs.maps]), torch.cat([m.reshape(-1) for m in outputs.masks]).int()


def metrics_at_original_resolution(validation: OriginalSizeOutputs, test: OriginalSizeOutputs) -> dict[str, float]:
    """Image AUROC and F1, pixel AUROC, F1 and AUPRO of ``test``; the F1 thresholds are learnt on ``validation``.
    Pixel metrics are left out when either split lacks a mask for a defective image."""
    image_threshold = _threshold(validation.scores, validation.labels)
    result = {
        "image_AUROC": _metric(AUROC, test.scores, test.labels, **RAW_SCORES),
        "image_F1": _metric(F1Score, (test.scores > image_threshold).int(), test.labels),
    }
    if validation.has_pixel_truth and test.has_pixel_truth:
        pixel_threshold = _threshold(*_pixels(validation))
        test_maps, test_masks = _pixels(test)
        result["pixel_AUROC"] = _metric(AUROC, test_maps, test_masks, **RAW_SCORES)
        result["pixel_F1"] = _metric(F1Score, (test_maps > pixel_threshold).int(), test_masks)
        aupro = OriginalSizeAUPRO(fields=("a", "b"))
        for pred, mask in zip(test.maps, test.masks, strict=True):
            aupro.update(SimpleNamespace(a=pred, b=mask.int()))
        result["pixel_AUPRO"] = float(aupro.compute())
    return result


def score_at_original_resolution(
    predict: Callable[[Tensor], object], transform: Callable[[Tensor], Tensor] | None,
    validation_loader: Iterable, test_loader: Iterable,
) -> dict[str, float]:
    """The benchmark's metrics of one trained model (see the module docstring)."""
    validation = original_size_outputs(predict, transform, validation_loader)
    test = original_size_outputs(predict, transform, test_loader)
    return metrics_at_original_resolution(validation, test)


def score_module(module: object, datamodule: object) -> dict[str, float]:
    """:func:`score_at_original_resolution` of an anomalib model (``module.model`` after its pre-processor's
    transform) on ``datamodule``'s validation and test halves."""
    module.eval()
    transform = getattr(getattr(module, "pre_processor", None), "transform", None)
    return score_at_original_resolution(module.model, transform, datamodule.val_dataloader(),
                                        datamodule.test_dataloader())


