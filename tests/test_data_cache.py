"""Training images decoded once: the same items as anomalib's dataset, only when that is safe and fits."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from torchvision.transforms.v2 import Compose, RandomHorizontalFlip, Resize

from isstad_plugin.data_cache import InMemoryDataset, cache_train_data, release_train_cache


def prepared(root: Path, **kwargs) -> MVTecAD:
    datamodule = MVTecAD(root=root, category="magnetic_tile", train_batch_size=4, eval_batch_size=4, num_workers=0,
                         **kwargs)
    datamodule.setup("fit")
    datamodule.train_data.augmentations = datamodule.train_augmentations or Resize((48, 48), antialias=True)
    return datamodule


def test_cached_items_equal_the_decoded_ones_and_batches_keep_their_shape(tile_root: Path) -> None:
    datamodule = prepared(tile_root)
    original = datamodule.train_data
    fresh = [original[i] for i in range(len(original))]
    message = cache_train_data(datamodule, budget_gb=1.0)
    assert message.startswith("16 training images decoded once and kept in memory at 48x48 (")
    cached = datamodule.train_data
    assert isinstance(cached, InMemoryDataset) and cached.category == original.category  # attributes pass through
    for expected, actual in zip(fresh, cached, strict=True):
        assert actual.image_path == expected.image_path
        torch.testing.assert_close(actual.image, expected.image, rtol=0, atol=0)
    loader = datamodule.train_dataloader()
    assert loader.num_workers == 0
    batch = next(iter(loader))
    assert batch.image.shape == (4, 3, 48, 48)
    # another model size next fit: anomalib's setup sets its resize on the subset; the cache is made again
    datamodule.train_data.augmentations = Resize((32, 32), antialias=True)
    assert "at 32x32" in cache_train_data(datamodule, budget_gb=1.0)
    assert next(iter(datamodule.train_dataloader())).image.shape == (4, 3, 32, 32)
    release_train_cache(datamodule)  # after the fit: the datamodule as anomalib made it
    assert datamodule.train_data is original and "train_dataloader" not in vars(datamodule)
    assert datamodule.train_dataloader().num_workers == datamodule.num_workers
    pickle.dumps(datamodule)


def test_random_augmentations_or_a_small_budget_keep_decoding_every_epoch(tile_root: Path) -> None:
    datamodule = prepared(tile_root, train_augmentations=Compose([RandomHorizontalFlip(), Resize((48, 48))]))
    assert "['RandomHorizontalFlip'] are more than a resize" in cache_train_data(datamodule, budget_gb=1.0)
    assert not isinstance(datamodule.train_data, InMemoryDataset)
    datamodule = prepared(tile_root)
    assert "more than train_cache_gb=1e-06" in cache_train_data(datamodule, budget_gb=1e-6)
    assert cache_train_data(datamodule, budget_gb=0) == "training images decoded every epoch (train_cache_gb=0)."
    assert not isinstance(datamodule.train_data, InMemoryDataset)


class OwnLoader(MVTecAD):
    """A datamodule with its own train loader (e.g. a sampler): the cache must leave it alone."""

    def train_dataloader(self):  # noqa: ANN201
        return super().train_dataloader()


def test_a_datamodule_with_its_own_train_loader_is_left_alone(tile_root: Path) -> None:
    datamodule = OwnLoader(root=tile_root, category="magnetic_tile", train_batch_size=4, num_workers=0)
    datamodule.setup("fit")
    assert "has its own train_dataloader" in cache_train_data(datamodule, budget_gb=1.0)
    assert not isinstance(datamodule.train_data, InMemoryDataset)
