"""Write docs/images/cutpaste_samples.png: CutPaste and CutPaste-scar samples on real magnetic_tile images.

Run by hand from the repository root: ``python docs/make_cutpaste_figure.py``. Rows are training images of
``/work/shared/data/magnetic_tile/train/good`` (override with ``ISSTAD_SHARED_DATA``) resized to 256 px, the
paper's size; columns: the image, its CutPaste copy, its scar copy (pasted regions outlined in red), a 4x
close-up of the scar, and the 3-way task on one random 32 px crop (the patch-level training sample).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812

from isstad_plugin.models.cutpaste.augmentation import CutPaste, random_crops  # noqa: E402

SIZE = 256
PATCH = 32
ROWS = 4
DATA = Path(os.environ.get("ISSTAD_SHARED_DATA", "/work/shared/data")) / "magnetic_tile" / "train" / "good"
OUTPUT = Path(__file__).resolve().parent / "images" / "cutpaste_samples.png"


def load_images(n: int) -> torch.Tensor:
    """``n`` evenly spaced training images, RGB in [0, 1], resized to SIZE x SIZE."""
    from torchvision.io import ImageReadMode, read_image

    files = sorted(DATA.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no images in {DATA}")
    files = files[:: max(1, len(files) // n)][:n]
    return torch.cat([
        F.interpolate(read_image(str(f), ImageReadMode.RGB)[None].float() / 255, size=(SIZE, SIZE),
                      mode="bilinear", antialias=True).clamp(0, 1)
        for f in files
    ])


def zoom(image: torch.Tensor, mask: torch.Tensor, side: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``side x side`` window of ``image [3, H, W]`` and ``mask [H, W]`` centred on the mask (clipped to the image)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    cy, cx = int(ys.float().mean()), int(xs.float().mean())
    top = min(max(cy - side // 2, 0), mask.shape[0] - side)
    left = min(max(cx - side // 2, 0), mask.shape[1] - side)
    return image[:, top:top + side, left:left + side], mask[top:top + side, left:left + side]


def show(ax: plt.Axes, image: torch.Tensor, mask: torch.Tensor | None = None, title: str | None = None) -> None:
    ax.imshow(image.permute(1, 2, 0).numpy(), vmin=0, vmax=1, interpolation="nearest")
    if mask is not None and mask.any():
        ax.contour(mask.numpy(), levels=[0.5], colors="red", linewidths=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def main() -> None:
    images = load_images(ROWS)
    augment = CutPaste(seed=3)
    cutpaste, cutpaste_mask = augment.cutpaste(images)
    scar, scar_mask = augment.scar(images)
    crops = random_crops(images, PATCH, augment.generator(images.device))
    crop_cutpaste, crop_cutpaste_mask = augment.cutpaste(crops)
    crop_scar, crop_scar_mask = augment.scar(crops, scale=1.0)

    titles = ["image (256 px)", "CutPaste", "CutPaste-scar", "scar, 4x", "32 px crop", "crop: CutPaste",
              "crop: scar"]
    fig, axes = plt.subplots(ROWS, len(titles), figsize=(1.6 * len(titles), 1.7 * ROWS), dpi=110)
    for r in range(ROWS):
        row = axes[r]
        show(row[0], images[r], title=titles[0] if r == 0 else None)
        show(row[1], cutpaste[r], cutpaste_mask[r, 0], titles[1] if r == 0 else None)
        show(row[2], scar[r], scar_mask[r, 0], titles[2] if r == 0 else None)
        show(row[3], *zoom(scar[r], scar_mask[r, 0]), titles[3] if r == 0 else None)
        show(row[4], crops[r], title=titles[4] if r == 0 else None)
        show(row[5], crop_cutpaste[r], crop_cutpaste_mask[r, 0], titles[5] if r == 0 else None)
        show(row[6], crop_scar[r], crop_scar_mask[r, 0], titles[6] if r == 0 else None)
    fig.suptitle("CutPaste training samples on magnetic_tile (pasted regions outlined in red)", fontsize=9)
    fig.tight_layout()
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUTPUT)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
