"""ISSTAD's fused scoring: pixel-status probabilities times reconstruction error, Gaussian-smoothed.

Used by the torch model's eval ``forward`` and therefore by every export: torch ops only, no branching on
tensor values, constants (the Gaussian kernel) built once as buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def gaussian_kernel_1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian taps exactly as ``scipy.ndimage.gaussian_filter`` builds them.

    Returns:
        Tensor ``[2 * radius + 1]`` with ``radius = int(truncate * sigma + 0.5)`` (33 taps for sigma 4).
    """
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).float()


class GaussianSmoothing(nn.Module):
    """Separable Gaussian blur with scipy's default ``reflect`` borders (``d c b a | a b c d | d c b a``).

    anomalib's ``GaussianBlur2d`` pads with torch's ``reflect`` (scipy's ``mirror``), which differs at the
    borders, so the method's numbers (scipy, sigma 4, truncate 4) need this variant.

    Args:
        sigma: Standard deviation in pixels.
        truncate: Kernel radius in standard deviations (scipy's default 4.0).
    """

    def __init__(self, sigma: float, truncate: float = 4.0) -> None:
        super().__init__()
        if sigma <= 0 or not math.isfinite(sigma):
            msg = f"score_sigma must be a positive number of pixels, got {sigma}."
            raise ValueError(msg)
        kernel = gaussian_kernel_1d(sigma, truncate)
        self.radius = kernel.numel() // 2
        self.register_buffer("kernel_x", kernel.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("kernel_y", kernel.view(1, 1, -1, 1), persistent=False)

    def _pad_symmetric(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        r = self.radius
        head = x.narrow(dim, 0, r).flip(dim)
        tail = x.narrow(dim, x.shape[dim] - r, r).flip(dim)
        return torch.cat([head, x, tail], dim=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blur ``x`` of shape ``[B, H, W]`` (returned ``[B, H, W]``); H and W must exceed the radius."""
        x = x.unsqueeze(1)
        x = F.conv2d(self._pad_symmetric(x, 3), self.kernel_x.to(x.dtype))
        x = F.conv2d(self._pad_symmetric(x, 2), self.kernel_y.to(x.dtype))
        return x.squeeze(1)


class AnomalyMapGenerator(nn.Module):
    """Fuse per-block pixel-status logits and the reconstruction error into a map and an image score.

    ``p = mean_blocks softmax(logits)[anomalous]``, ``r = mean_channels (reconstruction - input)^2``;
    anomaly map ``G(p * minmax(r))`` (min-max per image), image score ``mean G(G(p) * G(r))``.

    Args:
        sigma: Gaussian sigma in pixels (4 in the method).
        eps: Guards the min-max division for a constant error map.
    """

    def __init__(self, sigma: float = 4.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.blur = GaussianSmoothing(sigma)
        self.eps = eps

    @staticmethod
    def anomalous_probability(block_logits: torch.Tensor) -> torch.Tensor:
        """``[D, B, 2, H, W]`` logits -> ``[B, H, W]`` mean anomalous-class probability over the D blocks."""
        return block_logits.softmax(dim=2)[:, :, 1].mean(dim=0)

    def forward(
        self,
        reconstruction: torch.Tensor,
        image: torch.Tensor,
        block_logits: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a batch.

        Args:
            reconstruction: ``[B, 3, H, W]`` network reconstruction (normalised space).
            image: ``[B, 3, H, W]`` network input (same space).
            block_logits: ``[D, B, 2, H, W]`` pixel-status logits of every decoder block.

        Returns:
            ``(anomaly_map [B, 1, H, W], pred_score [B])``.
        """
        probability = self.anomalous_probability(block_logits)
        error = (reconstruction - image).pow(2).mean(dim=1)
        low = error.amin(dim=(-2, -1), keepdim=True)
        high = error.amax(dim=(-2, -1), keepdim=True)
        error_01 = (error - low) / (high - low + self.eps)
        anomaly_map = self.blur(probability * error_01).unsqueeze(1)
        pred_score = self.blur(self.blur(probability) * self.blur(error)).mean(dim=(-2, -1))
        return anomaly_map, pred_score
