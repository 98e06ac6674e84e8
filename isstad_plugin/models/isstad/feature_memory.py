"""An image score from ISSTAD's own encoder: how far a test image's patch tokens lie from the training images'.

PatchCore's idea on the features of the network ISSTAD already runs: the stage-1 encoder's patch tokens of the
normal training images are kept in a memory bank (a greedy coreset, anomalib's ``KCenterGreedy``, when there are
more than ``size``), and an image scores the largest distance of any of its patch tokens to its nearest bank token
(anomalib's ``PatchcoreModel.euclidean_dist``: matmuls only, so the score exports with the rest of the graph).

The bank is a buffer of fixed shape ``[size, D]`` (saved in checkpoints, part of the export); it is filled from the
training images when validation starts, as the map calibration is (:func:`.anomaly_map.calibrate_on_training_images`).

Example:
    >>> memory = PatchFeatureMemory(size=64, dim=192)
    >>> memory.fit(torch.randn(500, 192))
    >>> memory(torch.randn(2, 49, 192)).shape
    torch.Size([2])
"""

from __future__ import annotations

import torch
from anomalib.models.components.sampling import KCenterGreedy
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from torch import nn


class PatchFeatureMemory(nn.Module):
    """A memory bank of normal patch tokens ``[size, dim]`` and the image score it gives.

    Args:
        size: Tokens kept (a coreset of the training tokens when there are more; all of them, repeated to fill the
            buffer, when there are fewer: repeats change no nearest-neighbour distance).
        dim: Token width (the encoder's embedding width).
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            msg = f"feature_memory_size must be >= 1, got {size}."
            raise ValueError(msg)
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, tokens: torch.Tensor) -> None:
        """Fill the bank from ``[N, dim]`` normal patch tokens."""
        size = self.bank.shape[0]
        tokens = tokens.reshape(-1, self.bank.shape[1]).to(self.bank)
        if len(tokens) > size:
            tokens = tokens[KCenterGreedy(tokens, sampling_ratio=size / len(tokens)).select_coreset_idxs()]
        repeats = -(-size // len(tokens))
        self.bank.copy_(tokens.repeat(repeats, 1)[:size])
        self.fitted.fill_(True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, dim]`` patch tokens -> ``[B]``: the largest nearest-bank-token distance of each image."""
        b, length, dim = tokens.shape
        distances = PatchcoreModel.euclidean_dist(tokens.reshape(b * length, dim), self.bank)
        return distances.amin(dim=1).reshape(b, length).amax(dim=1)
