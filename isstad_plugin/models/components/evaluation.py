"""The evaluator every plugin model uses: image AUROC and F1, pixel AUROC, F1 and AUPRO."""

from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score


def image_and_pixel_evaluator() -> Evaluator:
    """anomalib's default metrics plus pixel AUPRO (present from the start, so checkpoints load strictly)."""
    return Evaluator(test_metrics=[
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
    ])
