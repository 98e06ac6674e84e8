"""The accuracy bound of INT8_ACQ scores graphs by AUROC: it must rank unnormalised scores correctly."""

from __future__ import annotations

import numpy as np
import torch
from anomalib.data import ImageBatch
from sklearn.metrics import roc_auc_score

from isstad_plugin.models.components.quantization import auroc_on


def test_auroc_of_unnormalised_scores_and_maps() -> None:
    """Mahalanobis-like scores in the tens to hundreds (a graph exported without the post-processor's normalisation):
    torchmetrics would squash them through a saturating sigmoid and tie them; the AUROC must be sklearn's."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 1, 0])
    scores = (30 + 100 * torch.rand(8, generator=generator) + 60 * labels).numpy()
    masks = torch.rand(8, 1, 8, 8, generator=generator) > 0.8
    maps = (50 + 80 * torch.rand(8, 1, 8, 8, generator=generator) + 40 * masks).numpy()
    batches = [ImageBatch(image=torch.full((4, 3, 8, 8), float(i)), gt_label=labels[4 * i:4 * i + 4],
                          gt_mask=masks[4 * i:4 * i + 4, 0]) for i in range(2)]

    def graph(images: torch.Tensor) -> dict[str, np.ndarray]:
        """Stands in for a compiled OpenVINO graph: the scores and maps of the batch its images came from."""
        i = int(images[0, 0, 0, 0])
        return {"pred_score": scores[4 * i:4 * i + 4], "anomaly_map": maps[4 * i:4 * i + 4]}

    values = auroc_on(graph, batches)
    assert abs(values["image AUROC"] - roc_auc_score(labels.numpy(), scores)) < 1e-6  # torchmetrics' float32
    assert abs(values["pixel AUROC"] - roc_auc_score(masks.numpy().ravel(), maps.ravel())) < 1e-6
    assert values["image AUROC"] > 0.7  # the data separate, so a tie at 0.5 would be caught too
