"""Walking torchvision transform trees (``Compose`` inside ``Compose``...), which anomalib's helpers do not recurse."""

from __future__ import annotations

from torch import nn


def transform_leaves(transform: nn.Module | None) -> list[nn.Module]:
    """The individual transforms of ``transform`` in order, nested compositions flattened; ``[]`` for None."""
    if transform is None:
        return []
    children = getattr(transform, "transforms", None)
    if not children:
        return [transform]
    return [leaf for child in children for leaf in transform_leaves(child)]
