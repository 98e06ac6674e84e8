"""Seedable random augmentation modules: one ``torch.Generator`` per device, created on first use."""

import torch
from torch import nn


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

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The generator for ``device`` (created on first use), or None without a seed."""
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]
