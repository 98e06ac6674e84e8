"""Decode and resize the training images once per fit, not once per epoch.

anomalib datamodules decode every PNG and resize it (the model's ``Resize`` is appended to each subset's
augmentations) in every epoch, in DataLoader workers that are started again each epoch. For ISSTAD's hundreds of
epochs over a few hundred images that is most of the data cost. :func:`cache_train_data` reads the training
subset once (through the datamodule's own workers), keeps anomalib's items in memory and gives the datamodule a
train loader over them with no workers. It wraps anomalib's dataset (every attribute still answers) and changes
nothing when the subset's augmentations are random (a cache would freeze them) or the items would not fit in the
memory budget; the log line says which, and how much memory the cache took.

Stage 1's random crops and stage 2's corruption run on the batch, every step, on the batch's device, as before.
"""

from __future__ import annotations

import logging
from types import MethodType
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import Resize
from tqdm import tqdm

from isstad_plugin.models.components.pre_processing import transform_leaves

logger = logging.getLogger(__name__)


class InMemoryDataset(Dataset):
    """anomalib's dataset with every item decoded once; any other attribute is the wrapped dataset's."""

    def __init__(self, dataset: Dataset, items: list[Any]) -> None:
        self.dataset = dataset
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:  # noqa: ANN401
        return self.items[index]

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        if name in {"dataset", "items"}:  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _tensor_fields(item: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
    """The tensor-valued fields of an anomalib item (a dataclass)."""
    names = item.__dataclass_fields__ if hasattr(item, "__dataclass_fields__") else vars(item)
    return {name: value for name in names if isinstance(value := getattr(item, name), torch.Tensor)}


def _item_bytes(item: Any) -> int:  # noqa: ANN401
    return sum(value.nbytes for value in _tensor_fields(item).values())


def _own_memory(item: Any) -> Any:  # noqa: ANN401
    """``item`` with its tensors copied out of the worker's shared memory (one file descriptor each otherwise:
    thousands of kept items would exhaust the process's limit)."""
    for name, value in _tensor_fields(item).items():
        if value.is_shared():
            setattr(item, name, value.clone())
    return item


def _cached_train_dataloader(self: Any) -> DataLoader:  # noqa: ANN401
    """The datamodule's train loader over decoded items: same shuffling and batches, no worker processes."""
    return DataLoader(
        dataset=self.train_data,
        shuffle=True,
        batch_size=self.train_batch_size,
        num_workers=0,
        collate_fn=getattr(self, "external_collate_fn", None) or self.train_data.collate_fn,
    )


def release_train_cache(datamodule: Any) -> None:  # noqa: ANN401
    """Give ``datamodule`` its own training subset and train loader back (after a fit, or before a new cache); no
    datamodule: nothing to do."""
    if datamodule is None:
        return
    dataset = getattr(datamodule, "train_data", None)
    if isinstance(dataset, InMemoryDataset):
        # anomalib's datamodule.setup may have set a model's resize on the wrapper since: pass it on.
        if "augmentations" in vars(dataset):
            dataset.dataset.augmentations = vars(dataset)["augmentations"]
        datamodule.train_data = dataset.dataset
    vars(datamodule).pop("train_dataloader", None)


def cache_train_data(datamodule: Any, budget_gb: float) -> str:  # noqa: ANN401
    """Keep ``datamodule.train_data`` decoded in memory for this fit if it fits in ``budget_gb``; say what was done.

    The cache lives for one fit (``release_train_cache`` undoes it at its end): the datamodule object is left as
    anomalib made it, for other models, pickling and copies. A datamodule with its own ``train_dataloader`` (a
    sampler, ``drop_last``...) is left alone.
    """
    from anomalib.data import AnomalibDataModule

    release_train_cache(datamodule)
    dataset = getattr(datamodule, "train_data", None)
    if dataset is None or budget_gb <= 0:
        return "training images decoded every epoch (train_cache_gb=0)."
    if type(datamodule).train_dataloader is not AnomalibDataModule.train_dataloader:
        return f"training images decoded every epoch: {type(datamodule).__name__} has its own train_dataloader."
    leaves = transform_leaves(getattr(dataset, "augmentations", None))
    others = [type(t).__name__ for t in leaves if not isinstance(t, Resize)]
    if others:  # only a plain resize is known to be deterministic: a cache could freeze random augmentations
        return (f"training images decoded every epoch: train augmentations {others} are more than a resize "
                "(a cache would freeze random ones).")
    if len(dataset) == 0:
        return "training images: none to cache."
    estimate = _item_bytes(dataset[0]) * len(dataset)
    if estimate > budget_gb * 1e9:
        return (f"training images decoded every epoch: {len(dataset)} images need ~{estimate / 1e9:.1f} GB, more than "
                f"train_cache_gb={budget_gb:g}.")
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=getattr(datamodule, "num_workers", 0))
    items = [_own_memory(item) for item in tqdm(loader, total=len(dataset), leave=False, disable=None,
                                                 desc="ISSTAD: decoding training images once")]
    datamodule.train_data = InMemoryDataset(dataset, items)
    # An instance attribute: this datamodule object's train loader, for this process only; its class is untouched.
    datamodule.train_dataloader = MethodType(_cached_train_dataloader, datamodule)
    size = tuple(items[0].image.shape[-2:])
    return (f"{len(items)} training images decoded once and kept in memory at {size[0]}x{size[1]} "
            f"({sum(_item_bytes(i) for i in items) / 1e6:.0f} MB); train loader without worker processes.")
