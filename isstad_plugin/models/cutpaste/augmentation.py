"""CutPaste and CutPaste-scar: the synthetic defects of CutPaste's self-supervised task, batched on the device.

Both cut a rectangle out of an image, colour-jitter it and paste it back at another place of the same image:

- **CutPaste**: a rectangle of 2-15 % of the image area with aspect ratio (width / height) log-uniform in
  [0.3, 3.3], pasted axis-aligned.
- **CutPaste-scar**: a thin rectangle 2-16 px wide and 10-25 px long (the paper's sizes at 256 px, scaled by
  ``scale``), rotated by -45..45 degrees before it is pasted.

Every step is a tensor operation over the whole batch (per-sample parameters as ``[B]`` tensors, one bilinear
``grid_sample`` for the paste), on the images' device; all randomness comes from one ``torch.Generator`` per
device (torch's global RNG when no seed is given). Images are ``[B, 3, H, W]`` in [0, 1].

Example:
    >>> augment = CutPaste(seed=0)
    >>> images, labels = augment(torch.rand(4, 3, 64, 64))  # normal, CutPaste, scar copies of every image
    >>> images.shape, labels.tolist()
    (torch.Size([12, 3, 64, 64]), [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from kornia.enhance import adjust_contrast_with_mean_subtraction, adjust_hue, adjust_saturation
from torch import Tensor

from isstad_plugin.models.components.seeding import SeededAugmentation, check_images

AREA_RATIO = (0.02, 0.15)  # CutPaste rectangle area / image area
ASPECT_RATIO = (0.3, 3.3)  # CutPaste rectangle width / height (log-uniform)
SCAR_WIDTH = (2, 16)  # pixels at PAPER_SIZE
SCAR_LENGTH = (10, 25)  # pixels at PAPER_SIZE
SCAR_ANGLE = (-45.0, 45.0)  # degrees
PAPER_SIZE = 256  # the image side the paper's scar sizes refer to

NORMAL, CUTPASTE, SCAR = 0, 1, 2  # class labels of the 3-way task


class PasteParams(NamedTuple):
    """Per-sample geometry of one paste (all ``[B]`` tensors on the images' device).

    The source is the axis-aligned ``width x height`` rectangle with top-left pixel ``(source_x, source_y)``;
    it is rotated by ``angle`` (radians, counter-clockwise on screen) about its centre and pasted with its
    centre at ``(target_x, target_y)`` (continuous pixel coordinates, pixel ``i`` covering ``[i, i + 1)``).
    """

    width: Tensor
    height: Tensor
    angle: Tensor
    source_x: Tensor
    source_y: Tensor
    target_x: Tensor
    target_y: Tensor


def _uniform(b: int, low: float, high: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(b, generator=generator, device=device)


def _randint(high: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform int64 in ``[0, high]`` (inclusive, elementwise; negative ``high`` counts as 0)."""
    high = high.clamp_min(0)
    u = torch.rand(high.shape, generator=generator, device=high.device)
    return torch.minimum((u * (high + 1)).long(), high)


def _place(params_wh: tuple[Tensor, Tensor], angle: Tensor, height: int, width: int,
           generator: torch.Generator | None) -> PasteParams:
    """Draw a source inside the image and a target whose rotated bounding box lies inside it (when it fits)."""
    w, h = params_wh
    source_x = _randint(width - w, generator)
    source_y = _randint(height - h, generator)
    cos, sin = angle.cos().abs(), angle.sin().abs()
    box_w = (cos * w + sin * h).clamp(max=width)  # rotated bounding box
    box_h = (sin * w + cos * h).clamp(max=height)
    # integer offset of the box, so an unrotated paste lands on whole pixels
    target_x = _randint(width - torch.ceil(box_w - 1e-4).long(), generator) + box_w / 2
    target_y = _randint(height - torch.ceil(box_h - 1e-4).long(), generator) + box_h / 2
    return PasteParams(w, h, angle, source_x, source_y, target_x, target_y)


def sample_cutpaste(b: int, height: int, width: int, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> PasteParams:
    """CutPaste geometry: area 2-15 % of ``height * width``, aspect log-uniform in [0.3, 3.3], no rotation.

    Sides are rounded to whole pixels (so the realised area and aspect are exact up to that rounding) and
    clipped to the image.
    """
    device = torch.device(device)
    area = _uniform(b, *AREA_RATIO, generator, device) * (height * width)
    aspect = torch.exp(_uniform(b, math.log(ASPECT_RATIO[0]), math.log(ASPECT_RATIO[1]), generator, device))
    w = (area * aspect).sqrt().round().long().clamp(1, width)
    h = (area / aspect).sqrt().round().long().clamp(1, height)
    return _place((w, h), torch.zeros(b, device=device), height, width, generator)


def scar_size_range(scale: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((min_width, max_width), (min_length, max_length))`` in pixels for a scar ``scale`` (1.0 = 256 px)."""
    def scaled(bounds: tuple[int, int]) -> tuple[int, int]:
        return max(1, int(bounds[0] * scale + 0.5)), max(1, int(bounds[1] * scale + 0.5))

    return scaled(SCAR_WIDTH), scaled(SCAR_LENGTH)


def sample_scar(b: int, height: int, width: int, scale: float | None = None,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> PasteParams:
    """CutPaste-scar geometry: width 2-16 px, length 10-25 px (times ``scale``), angle -45..45 degrees.

    Args:
        scale: size factor relative to the paper's 256 px images; ``None``: ``min(height, width) / 256``.
    """
    device = torch.device(device)
    scale = min(height, width) / PAPER_SIZE if scale is None else scale
    (w_lo, w_hi), (l_lo, l_hi) = scar_size_range(scale)
    w = (w_lo + _randint(torch.full((b,), w_hi - w_lo, device=device), generator)).clamp(max=width)
    h = (l_lo + _randint(torch.full((b,), l_hi - l_lo, device=device), generator)).clamp(max=height)
    angle = torch.deg2rad(_uniform(b, *SCAR_ANGLE, generator, device))
    return _place((w, h), angle, height, width, generator)


def paste(images: Tensor, patches_from: Tensor, params: PasteParams) -> tuple[Tensor, Tensor]:
    """Paste the (rotated) source rectangle of ``patches_from`` into ``images``.

    Every output pixel is mapped back through the inverse rotation into the source rectangle and sampled
    bilinearly from ``patches_from``; pixels whose pre-image falls outside the rectangle keep ``images``.

    Args:
        images: ``[B, 3, H, W]`` images to paste into.
        patches_from: ``[B, 3, H, W]`` images the rectangles are cut from (e.g. a colour-jittered copy).
        params: per-sample geometry.

    Returns:
        ``(pasted [B, 3, H, W], mask [B, 1, H, W])``, the mask 1 on pasted pixels, in the images' dtype.
    """
    b, _, height, width = images.shape
    device, dtype = images.device, images.dtype
    w, h = params.width.to(dtype).view(b, 1, 1), params.height.to(dtype).view(b, 1, 1)
    cos, sin = params.angle.cos().to(dtype).view(b, 1, 1), params.angle.sin().to(dtype).view(b, 1, 1)
    px = torch.arange(width, device=device, dtype=dtype).view(1, 1, width) + 0.5  # pixel centres
    py = torch.arange(height, device=device, dtype=dtype).view(1, height, 1) + 0.5
    dx = px - params.target_x.to(dtype).view(b, 1, 1)
    dy = py - params.target_y.to(dtype).view(b, 1, 1)
    qx = cos * dx + sin * dy  # [B, H, W] position in the unrotated rectangle, relative to its centre
    qy = cos * dy - sin * dx
    inside = (qx >= -w / 2) & (qx < w / 2) & (qy >= -h / 2) & (qy < h / 2)
    src_x = params.source_x.to(dtype).view(b, 1, 1) + w / 2 + qx
    src_y = params.source_y.to(dtype).view(b, 1, 1) + h / 2 + qy
    grid = torch.stack([2 * src_x / width - 1, 2 * src_y / height - 1], dim=-1)  # align_corners=False
    sampled = F.grid_sample(patches_from, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mask = inside.unsqueeze(1).to(dtype)
    return images * (1 - mask) + sampled * mask, mask


def color_jitter(images: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample brightness, contrast, saturation and hue jitter (torchvision ``ColorJitter(s, s, s, s)``).

    Factors are drawn in ``[1 - s, 1 + s]`` (hue shift in ``[-s, s]`` turns) and applied in that fixed order.
    ``strength`` 0 returns the images unchanged.
    """
    if strength <= 0:
        return images
    b, device = images.shape[0], images.device
    factors = [_uniform(b, max(0.0, 1 - strength), 1 + strength, generator, device) for _ in range(3)]
    hue = _uniform(b, -min(strength, 0.5), min(strength, 0.5), generator, device)
    out = (images * factors[0].view(b, 1, 1, 1)).clamp(0, 1)  # brightness
    out = adjust_contrast_with_mean_subtraction(out, factors[1]).clamp(0, 1)
    out = adjust_saturation(out, factors[2]).clamp(0, 1)
    return adjust_hue(out, hue * 2 * math.pi).clamp(0, 1)


def random_crops(images: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """One random ``size x size`` crop per image, as a batched gather.

    Returns:
        ``[B, C, size, size]``.
    """
    b, c, height, width = images.shape
    if not 0 < size <= min(height, width):
        raise ValueError(f"crop size {size} must be in [1, {min(height, width)}] for {height}x{width} images")
    device = images.device
    x0 = _randint(torch.full((b,), width - size, device=device), generator)
    y0 = _randint(torch.full((b,), height - size, device=device), generator)
    offsets = torch.arange(size, device=device)
    rows = (y0[:, None] + offsets).view(b, size, 1)
    cols = (x0[:, None] + offsets).view(b, 1, size)
    index = (rows * width + cols).view(b, 1, size * size).expand(b, c, -1)
    return images.flatten(2).gather(2, index).view(b, c, size, size)


class CutPaste(SeededAugmentation):
    """The 3-way CutPaste task: every image, its CutPaste copy and its scar copy, labelled 0 / 1 / 2.

    Args:
        jitter: colour-jitter strength of the pasted rectangle (0.1 as in public implementations).
        seed: seed of the generator; ``None`` uses torch's global RNG.
    """

    def __init__(self, jitter: float = 0.1, seed: int | None = None) -> None:
        super().__init__(seed)
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.jitter = float(jitter)


    @torch.no_grad()
    def cutpaste(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """CutPaste every image. Returns ``(images [B, 3, H, W], mask [B, 1, H, W])``."""
        check_images(images)
        b, _, height, width = images.shape
        gen = self.generator(images.device)
        params = sample_cutpaste(b, height, width, gen, images.device)
        return paste(images, color_jitter(images, self.jitter, gen), params)

    @torch.no_grad()
    def scar(self, images: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
        """CutPaste-scar every image (``scale``: see :func:`sample_scar`). Returns ``(images, mask)``."""
        check_images(images)
        b, _, height, width = images.shape
        gen = self.generator(images.device)
        params = sample_scar(b, height, width, scale, gen, images.device)
        return paste(images, color_jitter(images, self.jitter, gen), params)

    def forward(self, images: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
        """The 3-way batch.

        Args:
            images: ``[B, 3, H, W]`` in [0, 1].
            scale: scar size factor (``None``: image side / 256); pass the full image's factor for crops.

        Returns:
            ``(images [3B, 3, H, W], labels int64 [3B])``: the originals, their CutPaste copies, their scar copies.
        """
        b = images.shape[0]
        augmented = torch.cat([images, self.cutpaste(images)[0], self.scar(images, scale)[0]])
        labels = torch.arange(3, device=images.device).repeat_interleave(b)
        return augmented, labels
