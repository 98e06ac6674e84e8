"""Cutpaste through the real anomalib Engine: epoch budget, cosine schedule, weights at fit start, GDE fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from isstad_plugin import Cutpaste

TINY = {"pretrained": False, "image_size": 64, "patch_size": 16, "patch_stride": 8, "score_sigma": 2.0,
        "head_layers": (64, 32)}


def datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="magnetic_tile", train_batch_size=8, eval_batch_size=8, num_workers=0)


class Recorder(Callback):
    """Learning rate per batch, and the backbone's first conv weights when training starts."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.conv1_at_start: torch.Tensor | None = None

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.conv1_at_start = pl_module.model.backbone.conv1.weight.detach().clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_budget_weights_and_gaussians_through_the_engine(tile_root: Path, tmp_path: Path) -> None:
    """No trainer budget: the model's max_epochs; weights file loaded at fit start; GDE on all training images."""
    torch.manual_seed(3)
    reference = timm.create_model("resnet18", pretrained=False, num_classes=0)
    weights = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), str(weights))
    seed_everything(0)
    model = Cutpaste(**TINY, backbone_weights=str(weights), max_epochs=2, augmentation_seed=0)
    assert not torch.equal(model.model.backbone.conv1.weight, reference.conv1.weight)  # not in __init__
    recorder = Recorder()
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False, callbacks=[recorder], limit_train_batches=1,
                    limit_val_batches=1)
    engine.fit(model=model, datamodule=datamodule(tile_root))

    assert engine.trainer.current_epoch == 2  # Lightning's 1000-epoch default replaced by the model's 2
    torch.testing.assert_close(recorder.conv1_at_start, reference.conv1.weight, rtol=0, atol=0)
    # one cosine over the 2 steps actually run: 0.03, then 0.03 * (1 + cos(pi / 2)) / 2
    assert recorder.lrs == pytest.approx([0.03, 0.015])
    assert engine.trainer.lr_scheduler_configs[0].scheduler.T_max == 2

    # the Gaussians: every training image (16), no augmentation, final weights, each image resized to 64 px on its
    # own as anomalib resizes the images it scores (magnetic_tile's differ in size: a batch collated at its largest
    # image's size and then resized gives other embeddings)
    assert bool(model.model.image_density.fitted) and bool(model.model.patch_density.fitted)
    dm = datamodule(tile_root)
    dm.setup()
    assert len(dm.train_data) == 16
    assert len({tuple(item.image.shape) for item in dm.train_data}) > 1
    dm.train_data.augmentations = model.pre_processor.transform
    loader = DataLoader(dm.train_data, batch_size=8, collate_fn=dm.train_data.collate_fn)
    model.model.eval()
    with torch.no_grad():
        images = [batch.image for batch in loader]
        embeddings = torch.cat([model.model.embed(batch) for batch in images]).double()
        patch_count = model.model.patch_embeddings(images[0]).shape[1:3].numel()
    torch.testing.assert_close(model.model.image_density.mean.double(), embeddings.mean(0), rtol=1e-5, atol=1e-6)
    assert patch_count == 49

    # the fit is in the checkpoint
    state = model.state_dict()
    assert {"model.image_density.mean", "model.image_density.whitening", "model.patch_density.mean"} <= set(state)


def test_an_explicit_shorter_trainer_budget_is_kept(tile_root: Path, tmp_path: Path) -> None:
    model = Cutpaste(**TINY, max_epochs=5)
    recorder = Recorder()
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False, callbacks=[recorder], max_epochs=1, limit_train_batches=2,
                    limit_val_batches=1)
    engine.fit(model=model, datamodule=datamodule(tile_root))
    assert engine.trainer.current_epoch == 1
    assert engine.trainer.lr_scheduler_configs[0].scheduler.T_max == 2  # the schedule spans the 1 epoch run
    assert len(recorder.lrs) == 2
    assert bool(model.model.image_density.fitted)


def dummy_category(root: Path) -> Path:
    """anomalib's integration-test data set in miniature: each good image one flat random colour (so CutPaste's
    patches of it are all alike), defective ones a faint Perlin blotch on such a colour, with masks."""
    import numpy as np
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
    from PIL import Image

    rng, perlin = np.random.default_rng(0), PerlinAnomalyGenerator()
    category = root / "dummy"

    def flat() -> np.ndarray:
        return np.broadcast_to(rng.integers(0, 255, 3).astype(np.uint8), (64, 64, 3)).copy()

    for split, count in (("train/good", 6), ("test/good", 4), ("test/bad", 4)):
        (category / split).mkdir(parents=True)
        for index in range(count):
            image = flat()
            if split == "test/bad":
                perturbation, mask = perlin.generate_perturbation(height=64, width=64)
                mask = mask.numpy()
                image = (image * (1 - mask) + 0.2 * perturbation.numpy() * 255 + 0.8 * image * mask).astype(np.uint8)
                (category / "ground_truth/bad").mkdir(parents=True, exist_ok=True)
                Image.fromarray((mask.squeeze() * 255).astype(np.uint8)).save(
                    category / "ground_truth/bad" / f"{index:03d}_mask.png")
            Image.fromarray(image).save(category / split / f"{index:03d}.png")
    return root


@pytest.mark.filterwarnings("error::RuntimeWarning")  # NumPy's "invalid value encountered in cast": a NaN drawn
def test_an_untrained_backbone_on_flat_colour_images_scores_and_draws_no_nan(tmp_path: Path) -> None:
    seed_everything(0)
    root = dummy_category(tmp_path / "data")
    data = MVTecAD(root=root, category="dummy", train_batch_size=2, eval_batch_size=4, num_workers=0)
    model = Cutpaste(**{**TINY, "patch_size": 32, "patch_stride": 16})
    engine = Engine(default_root_dir=tmp_path / "out", accelerator="cpu", devices=1, max_epochs=1, logger=False,
                    enable_progress_bar=False)
    engine.fit(model=model, datamodule=data)
    engine.test(model=model, datamodule=data)  # draws every test image's map
    predictions = engine.predict(model=model, datamodule=data)
    for batch in predictions:
        assert torch.isfinite(batch.anomaly_map).all() and torch.isfinite(batch.pred_score).all()


def test_a_nan_score_or_map_fails_naming_the_images() -> None:
    from anomalib.data import InferenceBatch

    from isstad_plugin.models.components.base import refuse_non_finite

    class Outputs:
        pred_score = torch.tensor([0.1, 0.2])
        anomaly_map = torch.zeros(2, 1, 4, 4)
        image_path = ["a.png", "b.png"]

    refuse_non_finite(Outputs(), "Cutpaste", "test")  # finite: nothing happens
    Outputs.anomaly_map = Outputs.anomaly_map.clone()
    Outputs.anomaly_map[1, 0, 2, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"Cutpaste: the anomaly_map of b\.png holds NaN .*\(test\)"):
        refuse_non_finite(Outputs(), "Cutpaste", "test")
    with pytest.raises(FloatingPointError, match=r"pred_score of 1 image\(s\) of the batch"):
        refuse_non_finite(InferenceBatch(pred_score=torch.tensor([float("inf")]), anomaly_map=None), "Isstad", "predict")
