"""Thresholds and metrics when the validation or test split holds no defective image (a folder of good parts only).

anomalib learns its thresholds by F1 on the validation split. With good images only there is no F1 to maximise:
anomalib falls back to the highest validation score, and the test run prints AUROC and F1 of 0.0 (with
torchmetrics' "no positive samples" warnings), which look like a broken model. Here instead:

- :class:`FalseAlarmPostProcessor`: when the validation split holds no defective image, the image threshold is set
  so that at most ``false_alarm_rate`` of those held-out good images score above it (and the pixel threshold so that
  at most that fraction of their pixels does); the log says so and what rate was reached. The thresholds are the
  post-processor's buffers, so they travel in the checkpoint and inside the exported graph (``isstad-predict`` and
  ``OpenVINOInferencer`` label with them). With defective images it learns anomalib's F1 thresholds, unchanged.
- :class:`DefinedMetricsEvaluator`: when the test split holds no defective image, metrics that need one (AUROC,
  F1, AUPRO) are not computed; the run says why and logs what is defined: ``image_false_alarm_rate`` (the share of
  good test images labelled anomalous) and ``pixel_false_alarm_rate``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from anomalib.metrics import Evaluator
from anomalib.post_processing import PostProcessor
from torchmetrics.utilities.data import dim_zero_cat

logger = logging.getLogger(__name__)

DEFAULT_FALSE_ALARM_RATE = 0.01


def false_alarm_threshold(scores: torch.Tensor, rate: float) -> torch.Tensor:
    """The smallest observed score with at most ``rate`` of ``scores`` above it (``[]``: any shape, flattened)."""
    values = scores.flatten().float()
    k = min(values.numel(), max(1, math.ceil((1.0 - rate) * values.numel())))
    return torch.kthvalue(values.cpu(), k).values


class FalseAlarmPostProcessor(PostProcessor):
    """anomalib's ``PostProcessor``; without a defective validation image, thresholds at a false-alarm rate.

    Args:
        false_alarm_rate: Share of held-out good images (and pixels) allowed above the thresholds when the
            validation split holds no defective image; in [0, 1).
        **kwargs: anomalib's ``PostProcessor`` options.
    """

    def __init__(self, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE, **kwargs: Any) -> None:  # noqa: ANN401
        if not 0.0 <= false_alarm_rate < 1.0:
            msg = f"false_alarm_rate={false_alarm_rate} must be in [0, 1) (e.g. 0.01: 1 % of good images flagged)."
            raise ValueError(msg)
        super().__init__(**kwargs)
        self.false_alarm_rate = false_alarm_rate
        self._good_maps: list[torch.Tensor] = []  # maps of good images that came without masks (no pixel metric)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any,  # noqa: ANN401
                                **kwargs: Any) -> None:  # noqa: ANN401
        """anomalib's updates; also keeps the maps of good images without masks (a folder of good images is read as
        a classification data set), so a good-only validation split still yields a pixel threshold."""
        super().on_validation_batch_end(trainer, pl_module, outputs, *args, **kwargs)
        labels, maps = getattr(outputs, "gt_label", None), getattr(outputs, "anomaly_map", None)
        if (self.enable_thresholding and getattr(outputs, "gt_mask", None) is None and maps is not None
                and labels is not None and not bool(labels.any())):
            self._good_maps.append(maps.detach().flatten().cpu())

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        """F1 thresholds where the validation split has defective images; false-alarm thresholds where it has none."""
        chosen = {}
        good_maps, self._good_maps = self._good_maps, []
        if self.enable_thresholding:
            for level, metric in (("image", self._image_threshold_metric), ("pixel", self._pixel_threshold_metric)):
                if metric.update_called and not metric._has_anomalous_samples():  # noqa: SLF001 (anomalib's own test)
                    scores = dim_zero_cat(metric.preds)
                    chosen[level] = (false_alarm_threshold(scores, self.false_alarm_rate), scores)
                    metric.reset()  # anomalib's fallback (the highest score) is not computed
            if "image" in chosen and not self._pixel_threshold_metric.update_called and good_maps:
                scores = torch.cat(good_maps)
                chosen["pixel"] = (false_alarm_threshold(scores, self.false_alarm_rate), scores)
        super().on_validation_epoch_end(trainer, pl_module)
        for level, (threshold, scores) in chosen.items():
            getattr(self, f"_{level}_threshold").copy_(threshold)
            reached = float((scores.flatten().float().cpu() > threshold).float().mean())
            what = "held-out good images" if level == "image" else "the held-out good images' pixels"
            logger.info("%s threshold %.4g: the validation split holds no defective image, so it is set for a "
                        "false-alarm rate of at most %.1f %% of %s (reached: %.2f %% of %d); "
                        "change it with --model.false_alarm_rate.", level.capitalize(), float(threshold),
                        100 * self.false_alarm_rate, what, 100 * reached, scores.numel())


class DefinedMetricsEvaluator(Evaluator):
    """anomalib's ``Evaluator``; on a test split without defective images, only the metrics defined there."""

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        self._defective = False
        self._good_images = self._good_flagged = 0
        self._good_pixels = self._good_pixels_flagged = 0

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,  # noqa: ANN401
                          dataloader_idx: int = 0) -> None:
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        labels = getattr(batch, "gt_label", None)
        if labels is None:
            return
        good = labels == 0
        self._defective |= bool((~good).any())
        self._good_images += int(good.sum())
        if getattr(batch, "pred_label", None) is not None:
            self._good_flagged += int(batch.pred_label.reshape(-1)[good].sum())
        if getattr(batch, "pred_mask", None) is not None:
            masks = batch.pred_mask.reshape(len(labels), -1)[good]
            self._good_pixels += masks.numel()
            self._good_pixels_flagged += int(masks.sum())

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        if getattr(self, "_defective", True):
            super().on_test_epoch_end(trainer, pl_module)
            return
        for metric in self.test_metrics:
            metric.reset()
        logger.warning("The test split holds no defective image: AUROC, F1 and AUPRO are not defined and are not "
                       "reported. Reported instead: the share of good test images (and of their pixels) the "
                       "thresholds flag (image_false_alarm_rate, pixel_false_alarm_rate). Add defective images "
                       "(--data.abnormal_dir) to measure detection.")
        if self._good_images:
            pl_module.log("image_false_alarm_rate", self._good_flagged / self._good_images)
        if self._good_pixels:
            pl_module.log("pixel_false_alarm_rate", self._good_pixels_flagged / self._good_pixels)
