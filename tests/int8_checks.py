"""Scoring exported OpenVINO graphs on the real test slice as INT8_ACQ's evaluations see it (shared by the ISSTAD and
CutPaste INT8 tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def openvino_scores(paths: dict[str, Path], tile_root: Path, size: int) -> dict[str, dict[str, np.ndarray | float]]:
    """For each named graph: image scores, maps ``[N, size * size]``, and image / pixel AUROC on the test images of
    ``tile_root``'s ``magnetic_tile`` slice, read and resized as the datamodule does for ACQ's evaluations
    (anomalib's readers, torchvision's resize), through anomalib's ``OpenVINOInferencer`` at FP32 precision."""
    from anomalib.data.utils import read_image, read_mask
    from anomalib.deploy import OpenVINOInferencer
    from sklearn.metrics import roc_auc_score
    from torchvision.transforms.v2.functional import resize
    from torchvision.tv_tensors import Mask

    from isstad_plugin.deploy import openvino_config

    images = sorted((tile_root / "magnetic_tile" / "test").rglob("*.png"))
    labels = [image.parent.name != "good" for image in images]
    truth = tile_root / "magnetic_tile" / "ground_truth"
    inputs = [resize(read_image(image, as_tensor=True), [size, size], antialias=True)[None].numpy() for image in images]
    masks = np.stack([resize(Mask(read_mask(truth / image.parent.name / f"{image.stem}_mask.png", as_tensor=True)),
                             [size, size]).numpy() > 0 if label else np.zeros((size, size), bool)
                      for image, label in zip(images, labels, strict=True)])
    results = {}
    for name, path in paths.items():
        inferencer = OpenVINOInferencer(path=path, device="CPU", config=openvino_config("f32"))
        outputs = [inferencer.predict(array) for array in inputs]
        scores = np.array([float(np.asarray(output.pred_score).ravel()[0]) for output in outputs])
        maps = np.stack([np.asarray(output.anomaly_map).ravel() for output in outputs])
        results[name] = {"scores": scores, "maps": maps, "image AUROC": roc_auc_score(labels, scores),
                         "pixel AUROC": roc_auc_score(masks.ravel(), maps.ravel())}
    return results
