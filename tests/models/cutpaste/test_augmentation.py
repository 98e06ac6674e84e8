"""CutPaste / scar generator: geometry within the paper's ranges, exact pastes, untouched surroundings, seeding."""

from __future__ import annotations

import math

import pytest
import torch

from isstad_plugin.models.cutpaste.augmentation import (
    AREA_RATIO,
    ASPECT_RATIO,
    CutPaste,
    color_jitter,
    paste,
    random_crops,
    sample_cutpaste,
    sample_scar,
    scar_size_range,
)


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("h", "w"), [(256, 256), (96, 160)])
def test_cutpaste_area_and_aspect_within_range(h: int, w: int) -> None:
    p = sample_cutpaste(4000, h, w, torch.Generator().manual_seed(0))
    pw, ph = p.width.double(), p.height.double()
    # sides are whole pixels: the drawn (area, aspect) is met up to half a pixel on each side
    assert ((pw - 0.5) * (ph - 0.5) <= AREA_RATIO[1] * h * w).all()
    assert ((pw + 0.5) * (ph + 0.5) >= AREA_RATIO[0] * h * w).all()
    assert ((pw - 0.5) / (ph + 0.5) <= ASPECT_RATIO[1]).all()
    assert ((pw + 0.5) / (ph - 0.5) >= ASPECT_RATIO[0]).all()
    area = pw * ph / (h * w)
    assert area.min() < 0.03 and area.max() > 0.13  # the whole range is used
    aspect = pw / ph
    assert (aspect < 0.4).any() and (aspect > 2.5).any() and ((aspect < 1).float().mean() - 0.5).abs() < 0.05
    assert (p.angle == 0).all()
    # source and pasted rectangles lie inside the image
    assert (p.source_x >= 0).all() and (p.source_x + p.width <= w).all()
    assert (p.source_y >= 0).all() and (p.source_y + p.height <= h).all()
    assert (p.target_x - pw / 2 >= 0).all() and (p.target_x + pw / 2 <= w).all()
    assert (p.target_y - ph / 2 >= 0).all() and (p.target_y + ph / 2 <= h).all()


def test_cutpaste_pastes_the_jittered_source_rectangle_and_nothing_else() -> None:
    x = images(16, 64, 80)
    augment = CutPaste(jitter=0.1, seed=7)
    out, mask = augment.cutpaste(x)
    # the same stream, step by step: geometry first, then the jitter
    gen = torch.Generator().manual_seed(7)
    p = sample_cutpaste(16, 64, 80, gen)
    jittered = color_jitter(x, 0.1, gen)
    assert not torch.equal(jittered, x)
    for i in range(16):
        w, h = int(p.width[i]), int(p.height[i])
        tx, ty = int(p.target_x[i] - w / 2), int(p.target_y[i] - h / 2)
        sx, sy = int(p.source_x[i]), int(p.source_y[i])
        expected = torch.zeros(64, 80)
        expected[ty:ty + h, tx:tx + w] = 1
        assert torch.equal(mask[i, 0], expected)  # the pasted region is exactly the w x h rectangle
        torch.testing.assert_close(out[i][:, ty:ty + h, tx:tx + w], jittered[i][:, sy:sy + h, sx:sx + w],
                                   rtol=0, atol=1e-5)
    assert torch.equal(out[mask.expand_as(out) == 0], x[mask.expand_as(x) == 0])  # outside: bit-identical


def test_scar_geometry_at_paper_size() -> None:
    p = sample_scar(4000, 256, 256, generator=torch.Generator().manual_seed(1))
    assert scar_size_range(1.0) == ((2, 16), (10, 25))
    assert p.width.min() == 2 and p.width.max() == 16
    assert p.height.min() == 10 and p.height.max() == 25
    degrees = torch.rad2deg(p.angle)
    assert degrees.min() >= -45 and degrees.max() <= 45 and degrees.min() < -40 and degrees.max() > 40


def test_scar_sizes_scale_with_the_image_side() -> None:
    assert scar_size_range(0.5) == ((1, 8), (5, 13))
    p = sample_scar(2000, 128, 128, generator=torch.Generator().manual_seed(2))  # default scale 128 / 256
    assert p.width.min() >= 1 and p.width.max() <= 8
    assert p.height.min() >= 5 and p.height.max() <= 13
    p = sample_scar(500, 32, 32, scale=1.0, generator=torch.Generator().manual_seed(2))  # a crop of a 256 image
    assert p.height.max() == 25


def test_scar_mask_is_the_rotated_rectangle_inside_the_image() -> None:
    x = images(64, 128, 128, seed=3)
    augment = CutPaste(seed=5)
    out, mask = augment.scar(x, scale=1.0)
    p = sample_scar(64, 128, 128, scale=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out[mask.expand_as(out) == 0], x[mask.expand_as(x) == 0])
    ys, xs = torch.meshgrid(torch.arange(128.0) + 0.5, torch.arange(128.0) + 0.5, indexing="ij")
    for i in range(64):
        m = mask[i, 0].bool()
        w, h, a = float(p.width[i]), float(p.height[i]), float(p.angle[i])
        # area: the rectangle's, up to the pixels along its outline
        assert abs(m.sum().item() - w * h) <= 2 * (w + h) + 4
        # every masked pixel centre lies in the rectangle rotated by `angle` about the target centre
        dx, dy = xs[m] - p.target_x[i], ys[m] - p.target_y[i]
        qx, qy = math.cos(a) * dx + math.sin(a) * dy, math.cos(a) * dy - math.sin(a) * dx
        assert (qx.abs() <= w / 2 + 1e-4).all() and (qy.abs() <= h / 2 + 1e-4).all()
        # orientation: the long axis of the masked pixels is the rectangle's rotated length axis
        if h >= 2 * w and h >= 12:
            cx, cy = xs[m] - xs[m].mean(), ys[m] - ys[m].mean()
            axis = 0.5 * math.atan2(2 * (cx * cy).mean(), ((cy**2).mean() - (cx**2).mean()))
            assert abs(math.degrees(axis) + math.degrees(a)) < 6  # y points down: screen angle is -axis


def test_pasted_region_is_inside_the_image_for_every_kind() -> None:
    x = images(200, 48, 48)
    augment = CutPaste(seed=0)
    for out, mask in (augment.cutpaste(x), augment.scar(x, scale=1.0)):
        assert out.shape == x.shape and mask.shape == (200, 1, 48, 48)
        assert (mask.sum((1, 2, 3)) > 0).all()
        assert out.min() >= 0 and out.max() <= 1


def test_paste_without_jitter_copies_pixels_exactly() -> None:
    x = images(8, 32, 32)
    p = sample_cutpaste(8, 32, 32, torch.Generator().manual_seed(4))
    out, mask = paste(x, x, p)
    for i in range(8):
        w, h = int(p.width[i]), int(p.height[i])
        tx, ty = int(p.target_x[i] - w / 2), int(p.target_y[i] - h / 2)
        sx, sy = int(p.source_x[i]), int(p.source_y[i])
        torch.testing.assert_close(out[i][:, ty:ty + h, tx:tx + w], x[i][:, sy:sy + h, sx:sx + w], rtol=0, atol=1e-5)


def test_three_way_batch_labels_and_seeding() -> None:
    x = images(5, 64, 64)
    batch, labels = CutPaste(seed=11)(x)
    assert batch.shape == (15, 3, 64, 64)
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert torch.equal(batch[:5], x)
    assert torch.equal(batch, CutPaste(seed=11)(x)[0])  # reproducible
    assert not torch.equal(batch, CutPaste(seed=12)(x)[0])
    augment = CutPaste(seed=11)
    first = augment(x)[0]
    assert not torch.equal(first, augment(x)[0])  # the stream moves on
    augment.reseed(11)
    assert torch.equal(first, augment(x)[0])


def test_random_crops_are_windows_of_their_images() -> None:
    x = images(6, 40, 50)
    crops = random_crops(x, 16, torch.Generator().manual_seed(0))
    assert crops.shape == (6, 3, 16, 16)
    windows = x.unfold(2, 16, 1).unfold(3, 16, 1)  # [B, 3, 25, 35, 16, 16]
    for i in range(6):
        match = (windows[i] == crops[i][:, None, None]).all(0).all(-1).all(-1)
        assert match.sum() == 1
    with pytest.raises(ValueError, match="crop size 41"):
        random_crops(x, 41)


def test_color_jitter_keeps_range_and_zero_strength_is_identity() -> None:
    x = images(4, 16, 16)
    assert torch.equal(color_jitter(x, 0.0), x)
    y = color_jitter(x, 0.5, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y)


def test_invalid_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        CutPaste().cutpaste(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="floating-point"):
        CutPaste().scar(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
