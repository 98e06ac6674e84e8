"""Synthetic corruption for ISSTAD stage 2 (pixel-level self-supervised learning).

A random union of rectangles, ellipses and polygons, drawn inside the object's foreground box, is filled with a
transformed copy of the image (colour jitter / grayscale / blur, flips, or a blend with noise); the shape mask is the
pixel label. Beyond the paper (options, off by default): Perlin-noise masks (anomalib's noise, as DRAEM draws them)
and fills taken from the image itself shifted and rotated, or from another image of the batch. Everything runs as
torch code on the input's device, batched except the Perlin masks (anomalib's function draws one image at a time);
all randomness comes from one ``torch.Generator`` per device (or torch's global RNG when no seed is given).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data.utils.generators.perlin import generate_perlin_noise
from kornia.color import rgb_to_grayscale
from kornia.contrib import connected_components
from kornia.filters import gaussian_blur2d
from torch import Tensor

from isstad_plugin.models.components.seeding import SeededAugmentation, check_images

SHAPES = ("rectangle", "ellipse", "polygon")
PAPER_TRANSFORMS = ("color", "flip", "noise")
TRANSFORMS = (*PAPER_TRANSFORMS, "shift", "other")
MASK_KINDS = ("shapes", "perlin", "mixed")
Fill = Literal["color", "flip", "noise", "shift", "other"]
MaskKind = Literal["shapes", "perlin", "mixed"]
_GRID = 32  # the foreground mask is labelled on a grid of at most _GRID x _GRID cells
_MAX_VERTICES = 8


@dataclass(frozen=True)
class CorruptionPreset:
    """Per-category corruption settings (upstream ISSTAD MVTec AD presets)."""

    max_shapes: int = 3
    restrict_to_foreground: bool = True
    remove_dark: bool = False


_MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                     "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
MVTEC_AD_PRESETS: dict[str, CorruptionPreset] = {
    name: CorruptionPreset(max_shapes=1 if name in ("capsule", "carpet") else 3,
                           restrict_to_foreground=name not in ("capsule", "carpet", "zipper"),
                           remove_dark=name in ("carpet", "zipper"))
    for name in _MVTEC_CATEGORIES
}


def preset_for_category(category: str | None) -> CorruptionPreset:
    """The MVTec AD preset of ``category`` (case-insensitive), else the default ``CorruptionPreset()``."""
    if category is None:
        return CorruptionPreset()
    return MVTEC_AD_PRESETS.get(category.strip().lower(), CorruptionPreset())


def _randint(low: Tensor, high: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform int64 in [low, high] (inclusive, elementwise; high < low counts as high = low)."""
    high = torch.maximum(high, low)
    u = torch.rand(low.shape, generator=generator, device=low.device)
    return torch.minimum(low + (u * (high - low + 1).float()).long(), high)


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None,
             device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def _whole_image_boxes(b: int, h: int, w: int, device: torch.device) -> Tensor:
    """int64 [b, 4] boxes (0, 0, w, h), filled on the device (no host-to-device copy)."""
    boxes = torch.zeros(b, 4, dtype=torch.long, device=device)
    boxes[:, 2], boxes[:, 3] = w, h
    return boxes


def _shift_hue(x: Tensor, turns: Tensor) -> Tensor:
    """Rotate the HSV hue of ``x`` [B, 3, H, W] in [0, 1] by ``turns`` [B] (as kornia's adjust_hue, cheaper)."""
    maxc, argmax = x.max(1, keepdim=True)
    chroma = maxc - x.min(1, keepdim=True).values
    r, g, b = x.split(1, 1)
    safe = torch.where(chroma > 0, chroma, 1.0)
    hue = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4))
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # R, G, B: 5, 3, 1
    k = torch.remainder(offsets + hue + 6 * turns.view(-1, 1, 1, 1), 6)  # hue in sextants
    return maxc - chroma * torch.minimum(k, 4 - k).clamp(0, 1)


def foreground_boxes(images: Tensor) -> Tensor:
    """Padded bounding boxes of the largest Otsu-foreground component.

    Args:
        images: ``[B, 3, H, W]`` in [0, 1].

    Returns:
        int64 ``[B, 4]`` boxes ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive, padded by ``w // 10`` left and right and
        ``h // 5`` top and bottom and clipped to the image; the whole image where there is no foreground.

    Note:
        Components are labelled on a grid of at most 32 x 32 cells (the box itself is exact to the pixel), so
        fragments closer than a cell merge: on fragmented (texture) foregrounds the box can exceed OpenCV's.
    """
    check_images(images)
    b, _, h, w = images.shape
    device = images.device
    gray = (rgb_to_grayscale(images) * 255).round().clamp(0, 255).long().view(b, h * w)
    stat = torch.float32 if device.type == "mps" else torch.float64
    hist = torch.zeros(b, 256, dtype=stat, device=device).scatter_add_(1, gray, torch.ones_like(gray, dtype=stat))
    p = hist / (h * w)
    omega = p.cumsum(1)
    mu = (p * torch.arange(256, dtype=stat, device=device)).cumsum(1)
    den = omega * (1 - omega)
    between = torch.where(den > 0, (mu[:, -1:] * omega - mu) ** 2 / den.clamp_min(1e-30), 0)
    fg = (gray > between.argmax(1, keepdim=True)).view(b, 1, h, w)  # THRESH_BINARY: foreground above threshold

    # Largest 8-connected component, labelled on a coarse grid (each cell: "any foreground"), weighted by pixels.
    s = max(1, math.ceil(max(h, w) / _GRID))
    gh, gw = math.ceil(h / s), math.ceil(w / s)
    cells = F.pad(fg.float(), (0, gw * s - w, 0, gh * s - h)).view(b, 1, gh, s, gw, s).sum((3, 5))
    labels = connected_components((cells > 0).float(), num_iterations=gh + gw)
    sizes = torch.zeros(b * gh * gw + 1, dtype=cells.dtype, device=device)
    sizes = sizes.scatter_add_(0, labels.flatten(), cells.flatten())[1:].view(b, gh * gw)
    best = sizes.argmax(1)
    has_fg = sizes.amax(1) > 0
    target = best + 1 + torch.arange(b, device=device) * (gh * gw)  # kornia label = 1 + raster index in batch
    comp = (labels == target.view(b, 1, 1, 1))[:, :, :, None, :, None].expand(b, 1, gh, s, gw, s)
    comp = comp.reshape(b, 1, gh * s, gw * s)[..., :h, :w] & fg  # exact pixels of the chosen cells

    cols, rows = comp.any(2).view(b, w).to(torch.uint8), comp.any(3).view(b, h).to(torch.uint8)
    x0, x1 = cols.argmax(1), w - cols.flip(1).argmax(1)
    y0, y1 = rows.argmax(1), h - rows.flip(1).argmax(1)
    pad_x, pad_y = (x1 - x0) // 10, (y1 - y0) // 5
    boxes = torch.stack([(x0 - pad_x).clamp_min(0), (y0 - pad_y).clamp_min(0),
                         (x1 + pad_x).clamp_max(w), (y1 + pad_y).clamp_max(h)], 1)
    return torch.where(has_fg[:, None], boxes, _whole_image_boxes(b, h, w, device))


def remove_dark(images: Tensor) -> Tensor:
    """Replace pixels whose gray value is <= the image's mean gray by the mean colour of the other pixels.

    Args:
        images: ``[B, 3, H, W]`` in [0, 1].

    Returns:
        ``[B, 3, H, W]``; an image without brighter-than-mean pixels is returned unchanged.
    """
    check_images(images)
    gray = rgb_to_grayscale(images)
    dark = gray <= gray.mean((2, 3), keepdim=True)
    bright = (~dark).to(images.dtype)
    count = bright.sum((2, 3), keepdim=True)
    mean_colour = (images * bright).sum((2, 3), keepdim=True) / count.clamp_min(1)
    return torch.where(dark & (count > 0), mean_colour, images)


def draw_shape_masks(boxes: Tensor, height: int, width: int, max_shapes: int, generator: torch.Generator | None,
                     shapes: Sequence[str] = SHAPES, min_size_fraction: float = 10 / 1024,
                     edge_margin_fraction: float = 50 / 1024) -> Tensor:
    """Union of 1..``max_shapes`` random rectangles / ellipses / polygons per box.

    Sizes follow upstream at 1024 px, scaled per axis: corners at most ``edge_margin_fraction`` of the side before
    the box's far edge, sides at least ``min_size_fraction`` of the side; every pixel is clipped to its box.

    Args:
        boxes: int64 ``[B, 4]`` ``(x0, y0, x1, y1)``, exclusive ends.
        height, width: the image size.
        max_shapes: the largest number of shapes per sample (>= 1).
        generator: the random generator on ``boxes.device``, or None for torch's global RNG.
        shapes: the shape kinds to choose from.

    Returns:
        float32 ``[B, 1, height, width]`` with values in {0, 1}.
    """
    if max_shapes < 1:
        raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
    if not shapes or any(s not in SHAPES for s in shapes):
        raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got {tuple(shapes)}")
    device, b = boxes.device, boxes.shape[0]
    x0, y0, x1, y1 = boxes.long().unbind(1)
    min_w, min_h = max(1, round(min_size_fraction * width)), max(1, round(min_size_fraction * height))
    x_hi = x1 - max(1, round(edge_margin_fraction * width))  # last allowed corner (clamped to x0 when negative)
    y_hi = y1 - max(1, round(edge_margin_fraction * height))
    xs = torch.arange(width, device=device).view(1, 1, width)
    ys = torch.arange(height, device=device).view(1, height, 1)
    px, py = xs + 0.5, ys + 0.5  # pixel centres

    count = _randint(torch.ones(b, dtype=torch.long, device=device), torch.full_like(x0, max_shapes), generator)
    mask = torch.zeros(b, height, width, dtype=torch.bool, device=device)
    for slot in range(max_shapes):
        kind = _randint(torch.zeros_like(x0), torch.full_like(x0, len(shapes) - 1), generator).view(b, 1, 1)
        # Rectangle / ellipse: top-left corner, then a size reaching at most the box's far edge.
        left, top = _randint(x0, x_hi, generator), _randint(y0, y_hi, generator)
        right = torch.minimum(left + _randint(torch.full_like(x0, min_w), x1 - left, generator), x1)
        bottom = torch.minimum(top + _randint(torch.full_like(y0, min_h), y1 - top, generator), y1)
        left, top, right, bottom = (t.view(b, 1, 1) for t in (left, top, right, bottom))
        candidates = {}
        if "rectangle" in shapes:
            candidates["rectangle"] = (xs >= left) & (xs < right) & (ys >= top) & (ys < bottom)
        if "ellipse" in shapes:
            cx, cy = (left + right) / 2, (top + bottom) / 2
            ax, ay = (right - left) / 2, (bottom - top) / 2
            candidates["ellipse"] = ((px - cx) / ax) ** 2 + ((py - cy) / ay) ** 2 <= 1
        if "polygon" in shapes:
            candidates["polygon"] = _polygon(x0, y0, x_hi, y_hi, xs, ys, generator)
        shape = candidates[shapes[-1]]
        for index, name in enumerate(shapes[:-1]):
            shape = torch.where(kind == index, candidates[name], shape)
        mask |= shape & (slot < count).view(b, 1, 1)
    inside = (xs >= x0.view(b, 1, 1)) & (xs < x1.view(b, 1, 1)) & (ys >= y0.view(b, 1, 1)) & (ys < y1.view(b, 1, 1))
    return (mask & inside).unsqueeze(1).float()


def _polygon(x0: Tensor, y0: Tensor, x_hi: Tensor, y_hi: Tensor, xs: Tensor, ys: Tensor,
             generator: torch.Generator | None) -> Tensor:
    """[B, H, W] polygons of 3..8 vertices in [x0, x_hi] x [y0, y_hi], sorted by angle, even-odd filled."""
    b, n = x0.shape[0], _MAX_VERTICES
    n_vertices = _randint(torch.full_like(x0, 3), torch.full_like(x0, n), generator)
    vx = _randint(x0[:, None].expand(b, n), x_hi[:, None].expand(b, n), generator).float() + 0.5
    vy = _randint(y0[:, None].expand(b, n), y_hi[:, None].expand(b, n), generator).float() + 0.5
    valid = torch.arange(n, device=x0.device) < n_vertices[:, None]
    cx = (vx * valid).sum(1, keepdim=True) / n_vertices[:, None]
    cy = (vy * valid).sum(1, keepdim=True) / n_vertices[:, None]
    angle = torch.where(valid, torch.atan2(vy - cy, vx - cx), 10.0)  # unused vertices sort last
    order = angle.argsort(1)
    vx, vy = vx.gather(1, order), vy.gather(1, order)
    vx, vy = torch.where(valid, vx, vx[:, :1]), torch.where(valid, vy, vy[:, :1])  # padding: zero-length edges
    # Even-odd rule per row: x of every edge crossing the row's pixel centre line (-inf where none); a pixel is
    # inside when an odd number of crossings lie at or left of it (each row has an even number of crossings).
    py = (ys + 0.5).view(1, -1, 1)  # [1, H, 1]
    ax, ay, bx, by = (v[:, None, :] for v in (vx, vy, vx.roll(-1, 1), vy.roll(-1, 1)))  # edges [B, 1, n]
    crosses = (ay > py) != (by > py)
    x_cross = ax + (py - ay) * (bx - ax) / torch.where(by == ay, 1.0, by - ay)
    x_cross = torch.where(crosses, x_cross, -torch.inf).sort(-1).values  # [B, H, n]
    px = (xs + 0.5).expand(b, ys.shape[1], -1).contiguous()
    inside = (torch.searchsorted(x_cross, px, right=True, out_int32=True) & 1).bool()
    # Keep degenerate (collinear) polygons non-empty: the pixel of the first vertex is always set.
    return inside | ((xs == vx[:, :1, None].floor()) & (ys == vy[:, :1, None].floor()))


def perlin_masks(boxes: Tensor, height: int, width: int, generator: torch.Generator | None) -> Tensor:
    """Perlin-noise blobs (anomalib's ``generate_perlin_noise`` above 0.5, random scale), clipped to each box.

    DRAEM's mask family: irregular, often several disjoint blobs. A mask may come out empty (noise below the
    threshold inside the box); that sample then stays clean with an all-normal label, as in DRAEM.

    Args:
        boxes: int64 ``[B, 4]`` ``(x0, y0, x1, y1)``, exclusive ends.
        height, width: the image size.
        generator: the random generator on ``boxes.device``; anomalib's function draws from torch's global RNG, so
            with a generator each mask is drawn under a seed taken from it (reproducible, global RNG untouched).

    Returns:
        float32 ``[B, 1, height, width]`` with values in {0, 1}.
    """
    device, b = boxes.device, boxes.shape[0]
    masks = []
    for _ in range(b):
        if generator is None:
            noise = generate_perlin_noise(height, width, device=device)
        else:
            seed = int(torch.randint(2**62, (1,), generator=generator, device=device))
            accelerators = [] if device.index is None else [device.index]  # the host's RNG is always forked
            with torch.random.fork_rng(devices=accelerators, device_type=device.type):
                torch.manual_seed(seed)
                noise = generate_perlin_noise(height, width, device=device)
        masks.append(noise > 0.5)
    xs = torch.arange(width, device=device).view(1, 1, width)
    ys = torch.arange(height, device=device).view(1, height, 1)
    x0, y0, x1, y1 = (t.view(b, 1, 1) for t in boxes.long().unbind(1))
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return (torch.stack(masks) & inside).unsqueeze(1).float()


def _apply_per_choice(
    x: Tensor,
    choice: Tensor,
    functions: Sequence[Callable[[Tensor, torch.Generator | None], Tensor]],
    gen: torch.Generator | None,
) -> Tensor:
    """``out[i] = functions[choice[i]](x[i])``, each function run once on the samples that chose it."""
    out = x.clone()
    for index, function in enumerate(functions):
        rows = (choice == index).nonzero().squeeze(1)
        if rows.numel():
            out.index_copy_(0, rows, function(x.index_select(0, rows), gen))
    return out


class SyntheticCorruption(SeededAugmentation):
    """Paste a transformed copy of each image through a random shape mask (ISSTAD stage 2).

    Args:
        probability: chance that a sample is corrupted; the others keep their image and an all-zero mask.
        max_shapes: the most shapes in one mask.
        restrict_to_foreground: draw shapes inside :func:`foreground_boxes` instead of the whole image.
        remove_dark: make the transformed copy from :func:`remove_dark` of the image.
        transforms: the fills to choose from: the paper's "color", "flip", "noise"; beyond it "shift" (the image
            itself, rolled by a random offset and rotated by a multiple of 90 degrees) and "other" (the next
            corrupted image of the batch, shifted likewise).
        shapes: the shape kinds to choose from ("rectangle", "ellipse", "polygon").
        masks: "shapes" (the paper's union of shapes), "perlin" (:func:`perlin_masks`) or "mixed" (either, 50 %).
        blur_sigma_fraction: the range of the Gaussian blur sigma as a fraction of the image side.
        seed: seed of the generator; None uses torch's global RNG.
    """

    def __init__(self, probability: float = 2 / 3, max_shapes: int = 3, restrict_to_foreground: bool = True,
                 remove_dark: bool = False, transforms: Sequence[str] = PAPER_TRANSFORMS,
                 shapes: Sequence[str] = SHAPES, blur_sigma_fraction: tuple[float, float] = (15 / 1024, 20 / 1024),
                 seed: int | None = None, masks: MaskKind = "shapes") -> None:
        super().__init__(seed)
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
            raise ValueError(f"max_shapes must be an integer >= 1, got {max_shapes!r}")
        if isinstance(transforms, str) or not transforms or any(t not in TRANSFORMS for t in transforms):
            raise ValueError(f"transforms must be a non-empty subset of {TRANSFORMS}, got {transforms!r}")
        if isinstance(shapes, str) or not shapes or any(s not in SHAPES for s in shapes):
            raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got {shapes!r}")
        if masks not in MASK_KINDS:
            raise ValueError(f"masks must be one of {MASK_KINDS}, got {masks!r}")
        if len(blur_sigma_fraction) != 2 or not 0 < blur_sigma_fraction[0] <= blur_sigma_fraction[1]:
            raise ValueError(f"blur_sigma_fraction must be (low, high) with 0 < low <= high, got {blur_sigma_fraction}")
        self.probability = float(probability)
        self.max_shapes = max_shapes
        self.restrict_to_foreground = restrict_to_foreground
        self.remove_dark = remove_dark
        self.transforms = tuple(transforms)
        self.shapes = tuple(shapes)
        self.masks = masks
        self.blur_sigma_fraction = (float(blur_sigma_fraction[0]), float(blur_sigma_fraction[1]))

    @classmethod
    def with_preset_options(cls, max_shapes: int | None, restrict_to_foreground: bool | None,
                            remove_dark: bool | None, **kwargs: Any) -> SyntheticCorruption:  # noqa: ANN401
        """A corruption whose ``None`` options follow the category's preset (see :meth:`use_category`); until then
        they take the defaults (3 shapes, inside the foreground, dark pixels kept)."""
        corruption = cls(max_shapes=max_shapes or 3,
                         restrict_to_foreground=True if restrict_to_foreground is None else restrict_to_foreground,
                         remove_dark=bool(remove_dark), **kwargs)
        corruption.options = {"max_shapes": max_shapes, "restrict_to_foreground": restrict_to_foreground,
                              "remove_dark": remove_dark}
        return corruption

    def use_category(self, category: str | None) -> str:
        """Apply ``category``'s MVTec AD preset (the defaults for other categories) to the options given as
        ``None`` to :meth:`with_preset_options`; returns a log line with the settings used."""
        preset = preset_for_category(category)
        options = getattr(self, "options", {})
        for name in ("max_shapes", "restrict_to_foreground", "remove_dark"):
            if name in options:
                setattr(self, name, getattr(preset, name) if options[name] is None else options[name])
        known = category is not None and category.strip().lower() in MVTEC_AD_PRESETS
        source = (f"MVTec AD preset for {category!r}" if known else
                  f"defaults: {category or 'this data set'!r} is not an MVTec AD category, so no preset applies; "
                  "--model.max_shapes, --model.restrict_to_foreground and --model.remove_dark change them")
        return (f"ISSTAD corruption ({source}; config overrides applied): max_shapes={self.max_shapes}, "
                f"restrict_to_foreground={self.restrict_to_foreground}, remove_dark={self.remove_dark}, "
                f"probability={self.probability:.3f}.")

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Corrupt a batch.

        Args:
            images: float ``[B, 3, H, W]`` in [0, 1].

        Returns:
            ``(corrupted [B, 3, H, W] in [0, 1], mask [B, 1, H, W] in {0, 1})``, the mask in the images' dtype.
        """
        check_images(images)
        with torch.autocast(images.device.type, enabled=False):  # exact pixel arithmetic under mixed precision
            return self._corrupt(images)

    def _corrupt(self, images: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = images.shape
        gen = self.generator(images.device)
        corrupt = torch.rand(b, generator=gen, device=images.device) < self.probability
        mask = torch.zeros(b, 1, h, w, dtype=images.dtype, device=images.device)
        # Work only on the samples that are corrupted (one small index read per batch, no image copies to host).
        chosen = corrupt.nonzero().squeeze(1)
        if chosen.numel() == 0:
            return images.clone(), mask
        picked = images.index_select(0, chosen)
        if self.restrict_to_foreground:
            boxes = foreground_boxes(picked)
        else:
            boxes = _whole_image_boxes(len(chosen), h, w, images.device)
        picked_mask = self._masks(boxes, h, w, gen).to(images.dtype)
        source = remove_dark(picked) if self.remove_dark else picked
        transformed = self._transform(source, gen).clamp(0, 1)
        corrupted = images.index_copy(0, chosen, picked * (1 - picked_mask) + transformed * picked_mask)
        return corrupted, mask.index_copy(0, chosen, picked_mask)

    def _masks(self, boxes: Tensor, h: int, w: int, gen: torch.Generator | None) -> Tensor:
        """``[B, 1, h, w]`` masks of the configured family inside ``boxes``."""
        if self.masks == "shapes":
            return draw_shape_masks(boxes, h, w, self.max_shapes, gen, self.shapes)
        if self.masks == "perlin":
            return perlin_masks(boxes, h, w, gen)
        use_perlin = torch.rand(len(boxes), generator=gen, device=boxes.device) < 0.5
        shapes = draw_shape_masks(boxes, h, w, self.max_shapes, gen, self.shapes)
        return torch.where(use_perlin.view(-1, 1, 1, 1), perlin_masks(boxes, h, w, gen), shapes)

    def _transform(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        """One randomly chosen transform of ``self.transforms`` per sample, computed only where chosen."""
        choice = torch.randint(len(self.transforms), (x.shape[0],), generator=gen, device=x.device)
        return _apply_per_choice(x, choice, [getattr(self, f"_{name}") for name in self.transforms], gen)

    def _color(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        """Jitter, grayscale, blur, jitter+grayscale, jitter+blur or grayscale+blur."""
        jitter, blur = self._jitter, self._blur

        def gray(y: Tensor, _: torch.Generator | None) -> Tensor:
            return rgb_to_grayscale(y).expand_as(y)

        combos = [(jitter,), (gray,), (blur,), (jitter, gray), (jitter, blur), (gray, blur)]

        def chain(ops: tuple) -> Callable[[Tensor, torch.Generator | None], Tensor]:
            def run(y: Tensor, g: torch.Generator | None) -> Tensor:
                for op in ops:
                    y = op(y, g)
                return y

            return run

        choice = torch.randint(len(combos), (x.shape[0],), generator=gen, device=x.device)
        return _apply_per_choice(x, choice, [chain(ops) for ops in combos], gen)

    def _jitter(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        """ColorJitter(0.8, 0.8, 0.8, 0.4) with torchvision's semantics and a random op order per sample."""
        b = x.shape[0]
        factor = _uniform((b, 3), 0.2, 1.8, gen, x.device).to(x.dtype)
        hue = _uniform((b,), -0.4, 0.4, gen, x.device).to(x.dtype)  # in turns
        order = torch.rand(b, 4, generator=gen, device=x.device).argsort(1).view(b, 4, 1, 1, 1)
        hue_step = (order == 3).long().argmax(1)  # ops: 0 brightness, 1 contrast, 2 saturation, 3 hue
        # Hue (the costly op) is computed once: the cheap ops ordered before it, hue, then those after it.
        for step in range(3):
            x = self._cheap_jitter_op(x, torch.where(step < hue_step, order[:, step], 3), factor)
        x = _shift_hue(x, hue)
        for step in range(1, 4):
            x = self._cheap_jitter_op(x, torch.where(step > hue_step, order[:, step], 3), factor)
        return x

    @staticmethod
    def _cheap_jitter_op(x: Tensor, op: Tensor, factor: Tensor) -> Tensor:
        """Per sample: brightness (op 0), contrast (1), saturation (2) as in torchvision, or identity (3).

        ``x`` is ``[B, 3, H, W]``, ``op`` int64 ``[B, 1, 1, 1]``, ``factor`` ``[B, 3]`` (one factor per op).

        All three are ``clamp(a * x + b * gray + c)``: brightness blends with black, contrast with the mean gray,
        saturation with the grayscale image.
        """
        gray = rgb_to_grayscale(x)
        a = torch.where(op == 3, 1.0, factor.gather(1, op.view(-1, 1).clamp(max=2)).view_as(op))
        b = torch.where(op == 2, 1 - a, 0.0)
        c = torch.where(op == 1, (1 - a) * gray.mean((1, 2, 3), keepdim=True), 0.0)
        return (a * x + b * gray + c).clamp(0, 1)

    def _blur(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        """Gaussian blur (kornia's ``gaussian_blur2d``, one sigma per sample), sigma = side * fraction drawn per sample
        in ``blur_sigma_fraction``, reflect borders; each axis's kernel spans 3 sigma of the largest fraction, at most
        ``2 * side - 1`` taps."""
        b, _, h, w = x.shape
        low, high = self.blur_sigma_fraction
        fraction = _uniform((b, 1), low, high, gen, x.device).to(x.dtype)

        def taps(side: int) -> int:
            return min(2 * math.ceil(3 * high * side) + 1, 2 * side - 1)

        sigma = torch.cat([fraction * h, fraction * w], dim=1)  # [B, 2]: (y, x)
        return gaussian_blur2d(x, (taps(h), taps(w)), sigma, border_type="reflect")

    def _flip(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        """Horizontal, vertical or both, per sample."""
        b = x.shape[0]
        zeros = torch.zeros(b, dtype=torch.long, device=x.device)
        kind = _randint(zeros, zeros + 2, gen).view(b, 1, 1, 1)
        x = torch.where(kind != 1, x.flip(-1), x)
        return torch.where(kind != 0, x.flip(-2), x)

    def _noise(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        """50 % blend with uniform noise."""
        return 0.5 * x + 0.5 * torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)

    def _shift(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        """The image itself, rolled by 1/4..3/4 of each side and rotated by 0/90/180/270 degrees (square images;
        others by 0/180), so a region is filled with the same texture from elsewhere."""
        b, _, h, w = x.shape
        dy = _randint(torch.full((b,), h // 4, device=x.device), torch.full((b,), 3 * h // 4, device=x.device), gen)
        dx = _randint(torch.full((b,), w // 4, device=x.device), torch.full((b,), 3 * w // 4, device=x.device), gen)
        rows = (torch.arange(h, device=x.device).view(1, h) - dy.view(b, 1)) % h  # [B, H]
        cols = (torch.arange(w, device=x.device).view(1, w) - dx.view(b, 1)) % w  # [B, W]
        x = x.gather(2, rows.view(b, 1, h, 1).expand(b, x.shape[1], h, w))
        x = x.gather(3, cols.view(b, 1, 1, w).expand(b, x.shape[1], h, w))
        turns = (0, 1, 2, 3) if h == w else (0, 2)
        choice = _randint(torch.zeros(b, dtype=torch.long, device=x.device),
                          torch.full((b,), len(turns) - 1, device=x.device), gen)
        # each rotation computed only for the samples that drew it
        return _apply_per_choice(x, choice, [lambda y, _, k=k: y.rot90(k, (2, 3)) for k in turns], gen)

    def _other(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        """Another image: the next of the samples that chose this fill (itself when alone), shifted as
        :meth:`_shift`."""
        return self._shift(x.roll(1, 0), gen)
