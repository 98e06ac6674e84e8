"""Write docs/images/corruption_samples.png: examples of the ISSTAD stage-2 synthetic corruption.

Run by hand from the repository root: ``python docs/make_corruption_figure.py``. Three categories, rows of
(image, corrupted image, mask): real magnetic_tile images (default preset) when the data set is present, and two
synthetic stand-ins made here: a "bottle"-like bright disc on a dark background (bottle preset) and a random texture
(carpet preset).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812

from isstad_plugin.models.isstad.corruption import SyntheticCorruption, preset_for_category  # noqa: E402

SIZE = 224
SAMPLES = 3  # rows per category
MAGNETIC_TILE = Path("/work/shared/data/magnetic_tile/train/good")
OUTPUT = Path(__file__).resolve().parent / "images" / "corruption_samples.png"


def magnetic_tile_images(n: int) -> torch.Tensor:
    """The first ``n`` magnetic_tile training images, RGB in [0, 1], resized to SIZE."""
    from torchvision.io import ImageReadMode, read_image

    files = sorted(MAGNETIC_TILE.glob("*.png"))[:n]
    if not files:
        raise FileNotFoundError(f"no images in {MAGNETIC_TILE}")
    return torch.cat([
        F.interpolate(read_image(str(f), ImageReadMode.RGB)[None].float() / 255, size=(SIZE, SIZE),
                      mode="bilinear", antialias=True).clamp(0, 1)
        for f in files
    ])


def bottle_like_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """A bright, shaded disc (a bottle seen from above) with a dark ring inside, on a dark noisy background."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images = 0.05 + 0.05 * torch.rand(n, 3, SIZE, SIZE, generator=generator)
    for i in range(n):
        cx, cy = (SIZE / 2 + 20 * (torch.rand(2, generator=generator) - 0.5)).tolist()
        radius = SIZE * (0.3 + 0.08 * torch.rand((), generator=generator).item())
        dist = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()
        shade = (1 - 0.5 * dist / radius).clamp(0, 1)
        colour = torch.tensor([0.55, 0.75, 0.5]).view(3, 1, 1)
        disc = (colour * (0.6 + 0.6 * shade)).clamp(0, 1)
        images[i] = torch.where(dist <= radius, disc, images[i])
        ring = (dist - 0.45 * radius).abs() < 0.06 * radius
        images[i][:, ring] *= 0.35
    return images.clamp(0, 1)


def texture_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """A carpet-like texture: a woven sinusoidal pattern plus blurred colour noise."""
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")
    images = []
    for _ in range(n):
        period = 8 + 4 * torch.rand((), generator=generator).item()
        weave = 0.5 + 0.25 * torch.sin(2 * math.pi * xx / period) * torch.sin(2 * math.pi * yy / period)
        noise = F.avg_pool2d(torch.rand(1, 3, SIZE, SIZE, generator=generator), 5, 1, 2)[0]
        base = torch.rand(3, 1, 1, generator=generator) * 0.4 + 0.3
        images.append((base * weave * 1.4 + 0.3 * (noise - 0.5)).clamp(0, 1))
    return torch.stack(images)


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    groups = []
    if MAGNETIC_TILE.is_dir():
        groups.append(("magnetic_tile", magnetic_tile_images(SAMPLES)))
    groups.append(("bottle (synthetic)", bottle_like_images(SAMPLES, generator)))
    groups.append(("carpet (synthetic)", texture_images(SAMPLES, generator)))

    rows = []
    for seed, (title, images) in enumerate(groups):
        preset = preset_for_category(title.split()[0])
        corruption = SyntheticCorruption(probability=1.0, max_shapes=preset.max_shapes,
                                         restrict_to_foreground=preset.restrict_to_foreground,
                                         remove_dark=preset.remove_dark, seed=seed)
        corrupted, mask = corruption(images)
        for i in range(images.shape[0]):
            label = (f"{title}\nshapes<={preset.max_shapes}, fg box {'on' if preset.restrict_to_foreground else 'off'},"
                     f"\nremove dark {'on' if preset.remove_dark else 'off'}")
            rows.append((label, images[i], corrupted[i], mask[i, 0]))

    fig, axes = plt.subplots(len(rows), 3, figsize=(6.0, 2.0 * len(rows)), dpi=72)
    for r, (label, image, corrupted, mask) in enumerate(rows):
        for c, (panel, name) in enumerate([(image, "image"), (corrupted, "corrupted"), (mask, "mask (label)")]):
            ax = axes[r, c]
            ax.imshow(panel.permute(1, 2, 0).numpy() if panel.ndim == 3 else panel.numpy(), cmap="gray",
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.tight_layout()
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUTPUT)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
