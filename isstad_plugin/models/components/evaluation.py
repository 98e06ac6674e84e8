"""The evaluator every plugin model uses: image AUROC and F1, pixel AUROC, F1 and AUPRO."""

from anomalib.metrics import AUPRO, AUROC, F1Score

from .thresholds import DefinedMetricsEvaluator


def image_and_pixel_evaluator() -> DefinedMetricsEvaluator:
    """anomalib's default metrics plus pixel AUPRO (present from the start, so checkpoints load strictly); on a test
    split without defective images, the false-alarm rates instead (:class:`.thresholds.DefinedMetricsEvaluator`)."""
    return DefinedMetricsEvaluator(test_metrics=[
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
    ])
