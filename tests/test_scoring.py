"""The benchmark's like-for-like scoring: maps brought to each image's size on disk, anomalib's metrics on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from anomalib.data import MVTecAD
from anomalib.data.dataclasses import InferenceBatch
from anomalib.metrics import AUPRO
from PIL import Image
from sklearn.metrics import roc_auc_score
from torchvision.transforms.v2 import Resize

from isstad_plugin.benchmark.scoring import (
    OriginalSizeAUPRO,
    metrics_at_original_resolution,
    original_size_outputs,
    score_at_original_resolution,
)

INPUT_SIZE = (16, 16)
SIZES = [(40, 120), (48, 100)]  # (H, W): two sizes, neither the input size nor square


def brightness(images: torch.Tensor) -> InferenceBatch:
    """A deterministic 'model': the anomaly map is the image's brightness at the input size."""
    anomaly_map = images.mean(dim=1, keepdim=True)
    return InferenceBatch(pred_score=anomaly_map.amax(dim=(1, 2, 3)), anomaly_map=anomaly_map)


def write_category(root: Path) -> Path:
    """An MVTec-layout category whose defects are 1 px lines: bright on a textured dark background."""
    rng = np.random.default_rng(0)
    category = root / "lines"
    for split, count in (("train/good", 4), ("test/good", 6), ("test/line", 6)):
        (category / split).mkdir(parents=True)
        for index in range(count):
            height, width = SIZES[index % 2]
            image = (rng.random((height, width)) * 90).astype(np.uint8)
            if split == "test/line":
                mask = np.zeros((height, width), np.uint8)
                row = 5 + 4 * index
                mask[row, 10 + index : width - 20] = 255
                image[mask > 0] = 200 + index * 5
                (category / "ground_truth/line").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(category / "ground_truth/line" / f"{index:03d}_mask.png")
            Image.fromarray(image).save(category / split / f"{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory: pytest.TempPathFactory) -> MVTecAD:
    root = write_category(tmp_path_factory.mktemp("scoring"))
    module = MVTecAD(root=root, category="lines", train_batch_size=4, eval_batch_size=4, num_workers=0,
                     val_split_mode="from_test", val_split_ratio=0.5, seed=42)
    module.setup()
    return module


def test_maps_are_scored_at_each_images_size_on_disk(datamodule: MVTecAD) -> None:
    outputs = original_size_outputs(brightness, Resize(INPUT_SIZE, antialias=True), datamodule.test_dataloader())
    paths = [path for batch in datamodule.test_dataloader() for path in batch.image_path]
    expected = [Image.open(path).size[::-1] for path in paths]
    assert [tuple(m.shape) for m in outputs.maps] == expected
    assert [tuple(m.shape) for m in outputs.masks] == expected
    assert {tuple(m.shape) for m in outputs.maps} == set(SIZES)


def test_pixel_auroc_is_that_of_the_original_masks_not_of_the_input_size(datamodule: MVTecAD) -> None:
    transform = Resize(INPUT_SIZE, antialias=True)
    metrics = score_at_original_resolution(brightness, transform, datamodule.val_dataloader(),
                                           datamodule.test_dataloader())
    at_original, at_input = [], []
    samples = datamodule.test_data.samples
    mask_paths = {image: mask for image, mask in zip(samples.image_path, samples.mask_path, strict=True) if mask}
    for batch in datamodule.test_dataloader():
        images, masks = transform(batch.image, batch.gt_mask)
        maps = brightness(images).anomaly_map
        for index, path in enumerate(batch.image_path):
            mask_path = mask_paths.get(path)
            size = Image.open(path).size[::-1]
            truth = np.array(Image.open(mask_path)) > 0 if mask_path else np.zeros(size, bool)
            upsampled = F.interpolate(maps[index : index + 1], size=size, mode="bilinear", align_corners=False)
            at_original.append((upsampled.flatten().numpy(), truth.flatten()))
            at_input.append((maps[index].flatten().numpy(), masks[index].flatten().numpy() > 0))

    def auroc(pairs: list) -> float:
        return roc_auc_score(np.concatenate([t for _, t in pairs]), np.concatenate([p for p, _ in pairs]))

    assert metrics["pixel_AUROC"] == pytest.approx(auroc(at_original), abs=1e-6)
    # the check can tell the two apart: scored at the input size the same maps give another figure
    assert abs(auroc(at_input) - auroc(at_original)) > 1e-3  # 250x the tolerance above
    assert set(metrics) == {"image_AUROC", "image_F1", "pixel_AUROC", "pixel_F1", "pixel_AUPRO"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())


def test_aupro_of_images_of_different_sizes_equals_anomalibs_on_the_images_side_by_side() -> None:
    # two images of different widths, regions away from the shared edge; side by side they are one 30 x 70 image
    # made of exactly their pixels, which anomalib's own AUPRO can score
    generator = torch.Generator().manual_seed(0)
    masks = [torch.zeros(30, 50, dtype=torch.int), torch.zeros(30, 20, dtype=torch.int)]
    masks[0][3:9, 4:30] = 1
    masks[0][20:24, 40:45] = 1
    masks[1][5:15, 2:6] = 1
    preds = [torch.rand(mask.shape, generator=generator) + mask * 0.4 for mask in masks]
    ours = OriginalSizeAUPRO(fields=("anomaly_map", "gt_mask"))
    for pred, mask in zip(preds, masks, strict=True):
        ours.update(_batch(pred, mask))
    reference = AUPRO(fields=("anomaly_map", "gt_mask"))
    reference.update(_batch(torch.cat(preds, dim=1)[None], torch.cat(masks, dim=1)[None]))
    assert float(ours.compute()) == pytest.approx(float(reference.compute()), abs=1e-6)
    assert 0.2 < float(ours.compute()) < 1.0


def _batch(anomaly_map: torch.Tensor, gt_mask: torch.Tensor) -> object:
    return type("Batch", (), {"anomaly_map": anomaly_map, "gt_mask": gt_mask})


def test_pixel_metrics_are_absent_when_a_defective_image_has_no_mask(datamodule: MVTecAD) -> None:
    transform = Resize(INPUT_SIZE, antialias=True)
    validation = original_size_outputs(brightness, transform, datamodule.val_dataloader())
    test = original_size_outputs(brightness, transform, datamodule.test_dataloader())
    test.masks = []
    assert set(metrics_at_original_resolution(validation, test)) == {"image_AUROC", "image_F1"}


def test_scores_outside_zero_one_are_ranked_as_they_are(datamodule: MVTecAD) -> None:
    # raw scores of PatchCore or CutPaste are distances or log-densities: no sigmoid may squash them into ties
    transform = Resize(INPUT_SIZE, antialias=True)

    def shifted(images: torch.Tensor) -> InferenceBatch:
        output = brightness(images)
        return InferenceBatch(pred_score=output.pred_score * 1000 + 500, anomaly_map=output.anomaly_map * 1000 + 500)

    loaders = datamodule.val_dataloader(), datamodule.test_dataloader()
    in_range = score_at_original_resolution(brightness, transform, *loaders)
    assert score_at_original_resolution(shifted, transform, *loaders) == pytest.approx(in_range, abs=1e-6)
