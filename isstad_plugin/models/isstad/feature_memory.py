"""An image score from ISSTAD's own encoder: how far a test image's patch tokens lie from the training images'.

PatchCore's idea on the features of the network ISSTAD already runs: the stage-1 encoder's patch tokens of the
normal training images are kept in a memory bank (a greedy coreset, anomalib's ``KCenterGreedy``, when there are
more than ``size``), and an image scores the largest distance of any of its patch tokens to its nearest bank token
(anomalib's ``PatchcoreModel.euclidean_dist``: matmuls only, so the score exports with the rest of the graph).

The coreset's greedy selection is anomalib's, with one change (:class:`LeanKCenterGreedy`): each step's distances
to the new centre come from a matrix-vector product and the tokens' squared norms, computed once, instead of anomalib's
``[N, d]`` difference per step: thousands of such temporaries fragment glibc's heap (a 4096-token coreset of 59k
tokens grows past 20 GB), while the lean update holds ``[N]`` vectors only.

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


class LeanKCenterGreedy(KCenterGreedy):
    """anomalib's greedy coreset with an ``O(N)`` distance update: ``|f - c|^2 = |f|^2 - 2 f.c + |c|^2``."""

    def update_distances(self, cluster_center: int | torch.Tensor | None) -> None:
        """Fold the distances ``[N, 1]`` of every projected token to the centre into ``min_distances``."""
        if cluster_center is None:
            return
        if getattr(self, "_squared_norms", None) is None or len(self._squared_norms) != len(self.features):
            self._squared_norms = self.features.pow(2).sum(dim=1)
        center = self.features[cluster_center].reshape(-1)
        squared = self._squared_norms - 2 * (self.features @ center) + center.dot(center)
        distances = squared.clamp_min_(0).sqrt_().unsqueeze(1)
        self.min_distances = distances if self.min_distances is None else torch.minimum(self.min_distances, distances)

    def reset_distances(self) -> None:
        """Forget the distances and the squared norms (the features may have been recomputed)."""
        super().reset_distances()
        self._squared_norms = None


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
            sampler = LeanKCenterGreedy(tokens, sampling_ratio=size / len(tokens))
            sampler.coreset_size = size  # exactly: int(N * size / N) can round down to size - 1
            tokens = tokens[sampler.select_coreset_idxs()]
        repeats = -(-size // len(tokens))
        self.bank.copy_(tokens.repeat(repeats, 1)[:size])
        self.fitted.fill_(True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, dim]`` patch tokens -> ``[B]``: the largest nearest-bank-token distance of each image."""
        b, length, dim = tokens.shape
        distances = PatchcoreModel.euclidean_dist(tokens.reshape(b * length, dim), self.bank)
        return distances.amin(dim=1).reshape(b, length).amax(dim=1)
