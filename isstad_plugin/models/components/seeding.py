"""Seedable random augmentation modules (one ``torch.Generator`` per device, created on first use), and the check
of the image batches they take."""

import torch
from torch import Tensor, nn


def check_images(images: Tensor) -> None:
    """Refuse anything but a floating-point ``[B, 3, H, W]`` batch (values in [0, 1])."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a [B, 3, H, W] tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor in [0, 1], got dtype {images.dtype}")


class SeededAugmentation(nn.Module):
    """Base for augmentation modules whose randomness all flows through :meth:`generator`.

    Args:
        seed: seed of the generators; ``None`` uses torch's global RNG (so ``seed_everything`` governs it).
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart the random stream from ``seed`` (None: use torch's global RNG)."""
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def reseed_for_rank(self, seed: int | None, rank: int, world_size: int) -> None:
        """Give each process of a distributed run its own stream: ``seed + rank``; without a seed, the global seed
        + rank when there are several ranks (they share one global seed), else torch's global RNG."""
        if seed is not None:
            self.reseed(seed + rank)
        elif world_size > 1:
            self.reseed(torch.initial_seed() + rank)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The generator for ``device`` (created on first use), or None without a seed."""
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]
