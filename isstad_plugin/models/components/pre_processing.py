"""Resize-only pre-processing for models that normalise inside their torch model.

Both plugin models corrupt or augment [0, 1] images while training and normalise inside the network, so the
pre-processor must only resize. :func:`resize_only` builds it; :func:`refuse_normalize` fails a run whose
pre-processor normalises anyway (anomalib's helpers do not walk nested ``Compose`` trees, so
:func:`transform_leaves` does).
"""

from __future__ import annotations

from anomalib.pre_processing import PreProcessor
from torch import nn
from torchvision.transforms.v2 import Compose, Normalize, Resize


def resize_only(image_size: tuple[int, int]) -> PreProcessor:
    """anomalib's ``PreProcessor`` that resizes images to ``image_size`` (antialiased) and does nothing else."""
    return PreProcessor(transform=Compose([Resize(image_size, antialias=True)]))


def transform_leaves(transform: nn.Module | None) -> list[nn.Module]:
    """The individual transforms of ``transform`` in order, nested compositions flattened; ``[]`` for None."""
    if transform is None:
        return []
    children = getattr(transform, "transforms", None)
    if not children:
        return [transform]
    return [leaf for child in children for leaf in transform_leaves(child)]


def refuse_normalize(pre_processor: nn.Module | None, model_name: str) -> None:
    """Fail when ``pre_processor``'s transform normalises: ``model_name`` normalises inside its torch model."""
    transform = getattr(pre_processor, "transform", None)
    if any(isinstance(t, Normalize) for t in transform_leaves(transform)):
        msg = (f"{model_name} normalises inside its torch model (its training corrupts [0, 1] images); "
               "remove Normalize from the pre_processor transform.")
        raise ValueError(msg)
