"""Tests of the ISSTAD stage-2 synthetic corruption."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from isstad_plugin.models.isstad import corruption as corruption_module
from isstad_plugin.models.isstad.corruption import (
    MVTEC_AD_PRESETS,
    CorruptionPreset,
    SyntheticCorruption,
    draw_shape_masks,
    foreground_boxes,
    perlin_masks,
    preset_for_category,
    remove_dark,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """The tensors here are small: one intra-op thread avoids OpenMP waits on a busy, shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _object_images(objects: list[tuple[int, int, int, int]], height: int = 96, width: int = 128,
                   seed: int = 0) -> torch.Tensor:
    """Dark noisy background with one bright coloured rectangle (x, y, w, h) per image: [B, 3, H, W]."""
    g = torch.Generator().manual_seed(seed)
    images = 0.05 + 0.1 * torch.rand(len(objects), 3, height, width, generator=g)
    for i, (x, y, w, h) in enumerate(objects):
        colour = torch.tensor([0.9, 0.7, 0.5]).view(3, 1, 1)
        images[i, :, y:y + h, x:x + w] = colour + 0.1 * torch.rand(3, h, w, generator=g)
    return images.clamp(0, 1)


def _padded(x: int, y: int, w: int, h: int, width: int, height: int) -> tuple[int, int, int, int]:
    return max(x - w // 10, 0), max(y - h // 5, 0), min(x + w + w // 10, width), min(y + h + h // 5, height)


def _opencv_box(image: torch.Tensor) -> tuple[int, int, int, int]:
    """Upstream reference: Otsu + largest external contour + boundingRect + padding, on uint8 RGB."""
    rgb = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    _, binary = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    x, y, w, h = cv2.boundingRect(max(contours, key=cv2.contourArea))
    return _padded(x, y, w, h, gray.shape[1], gray.shape[0])


def _check_invariants(images: torch.Tensor, corrupted: torch.Tensor, mask: torch.Tensor) -> None:
    assert corrupted.shape == images.shape and corrupted.dtype == images.dtype
    assert mask.shape == (images.shape[0], 1, *images.shape[2:]) and mask.dtype == images.dtype
    assert torch.all((mask == 0) | (mask == 1))
    outside = (mask == 0).expand_as(images)
    assert torch.equal(corrupted[outside], images[outside])  # bit-identical outside the mask
    assert corrupted.min() >= 0 and corrupted.max() <= 1


def test_presets_table() -> None:
    assert len(MVTEC_AD_PRESETS) == 15
    for name, preset in MVTEC_AD_PRESETS.items():
        assert preset.max_shapes == (1 if name in ("capsule", "carpet") else 3)
        assert preset.restrict_to_foreground == (name not in ("capsule", "carpet", "zipper"))
        assert preset.remove_dark == (name in ("carpet", "zipper"))
    assert preset_for_category("carpet") == CorruptionPreset(1, False, True)
    assert preset_for_category("bottle") == CorruptionPreset(3, True, False)
    assert preset_for_category("Zipper") == CorruptionPreset(3, False, True)
    assert preset_for_category("magnetic_tile") == CorruptionPreset() == preset_for_category(None)
    assert CorruptionPreset() == CorruptionPreset(max_shapes=3, restrict_to_foreground=True, remove_dark=False)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"probability": -0.1}, "probability"),
        ({"probability": 1.5}, "probability"),
        ({"max_shapes": 0}, "max_shapes"),
        ({"transforms": ("color", "blur")}, "transforms"),
        ({"transforms": ()}, "transforms"),
        ({"shapes": ("star",)}, "shapes"),
        ({"blur_sigma_fraction": (0.0, 0.01)}, "blur_sigma_fraction"),
        ({"blur_sigma_fraction": (0.02, 0.01)}, "blur_sigma_fraction"),
        ({"masks": "circles"}, "masks"),
    ],
)
def test_invalid_arguments_name_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SyntheticCorruption(**kwargs)


@pytest.mark.parametrize(
    "images", [torch.rand(3, 16, 16), torch.rand(2, 1, 16, 16), torch.randint(0, 255, (2, 3, 16, 16))]
)
def test_invalid_input(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="images"):
        SyntheticCorruption(seed=0)(images)


def test_module_does_not_hard_code_a_device() -> None:
    source = inspect.getsource(corruption_module)
    assert "'cpu'" not in source and '"cpu"' not in source and "cuda" not in source


@pytest.mark.parametrize("restrict", [False, True])
def test_outside_mask_unchanged_and_mask_binary(restrict: bool) -> None:
    images = torch.rand(8, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    corrupted, mask = SyntheticCorruption(probability=1.0, restrict_to_foreground=restrict, seed=3)(images)
    _check_invariants(images, corrupted, mask)
    assert torch.all(mask.flatten(1).sum(1) > 0)
    inside = mask.bool().expand_as(images)
    assert (corrupted[inside] != images[inside]).float().mean() > 0.5  # the pasted copy actually differs


def test_probability_zero_leaves_everything_clean() -> None:
    images = torch.rand(6, 3, 48, 48)
    corrupted, mask = SyntheticCorruption(probability=0.0, seed=0)(images)
    assert torch.equal(corrupted, images)
    assert not mask.any()


def test_probability_one_gives_non_empty_masks() -> None:
    module = SyntheticCorruption(probability=1.0, seed=7)
    objects = [(10 + 7 * i, 5 + 3 * i, 30 + 5 * i, 20 + 4 * i) for i in range(8)]
    for seed in range(3):
        images = _object_images(objects, seed=seed)
        corrupted, mask = module(images)
        _check_invariants(images, corrupted, mask)
        assert torch.all(mask.flatten(1).amax(1) == 1)


def test_default_probability_is_two_thirds() -> None:
    images = torch.rand(600, 3, 16, 16)
    _, mask = SyntheticCorruption(restrict_to_foreground=False, seed=0)(images)
    fraction = mask.flatten(1).amax(1).mean().item()
    assert abs(fraction - 2 / 3) < 0.06  # ~3 standard deviations of a binomial(600, 2/3) fraction


def test_same_seed_same_output_and_different_seed_differs() -> None:
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    first = SyntheticCorruption(seed=11)(images)
    second = SyntheticCorruption(seed=11)(images)
    other = SyntheticCorruption(seed=12)(images)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])
    # reseed restarts the stream; consecutive calls differ
    module = SyntheticCorruption(seed=11)
    a = module(images)
    b = module(images)
    module.reseed(11)
    c = module(images)
    assert not torch.equal(a[1], b[1])
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


def test_seed_none_uses_the_global_rng() -> None:
    images = torch.rand(4, 3, 48, 48)
    module = SyntheticCorruption(probability=1.0)
    torch.manual_seed(5)
    a = module(images)
    torch.manual_seed(5)
    b = module(images)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_foreground_box_of_a_bright_object_matches_truth_and_opencv() -> None:
    height, width = 96, 128
    objects = [(30, 20, 50, 40), (0, 0, 40, 30), (100, 70, 28, 26), (5, 40, 100, 10)]
    images = _object_images(objects, height, width)
    images[0, :, 85:88, 2:5] = 0.95  # a small far-away speck: the largest component wins
    boxes = foreground_boxes(images)
    assert boxes.dtype == torch.int64 and boxes.shape == (4, 4)
    for i, obj in enumerate(objects):
        assert tuple(boxes[i].tolist()) == _padded(*obj, width, height)
        assert np.abs(np.subtract(boxes[i].tolist(), _opencv_box(images[i]))).max() <= 2


def test_foreground_box_of_discs_matches_opencv() -> None:
    size = 112
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = 0.1 * torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    for i, (cx, cy, r) in enumerate([(56, 56, 30), (30, 70, 20), (80, 25, 15)]):
        images[i, :, (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 0.8
    boxes = foreground_boxes(images)
    for i in range(3):
        assert np.abs(np.subtract(boxes[i].tolist(), _opencv_box(images[i]))).max() <= 2


def test_foreground_box_without_foreground_is_the_whole_image() -> None:
    images = torch.zeros(2, 3, 40, 50)
    assert foreground_boxes(images).tolist() == [[0, 0, 50, 40]] * 2


def test_masks_stay_inside_the_foreground_box() -> None:
    objects = [(40, 30, 30, 20), (10, 50, 20, 30), (90, 5, 30, 15), (50, 40, 12, 12)]
    images = _object_images(objects)
    corrupted, mask = SyntheticCorruption(probability=1.0, seed=4)(images)
    _check_invariants(images, corrupted, mask)
    for i, obj in enumerate(objects):
        x0, y0, x1, y1 = _padded(*obj, 128, 96)
        outside = torch.ones(96, 128, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert mask[i, 0].sum() > 0 and not mask[i, 0][outside].any()


def test_draw_shape_masks_inside_boxes_including_tiny_ones() -> None:
    boxes = torch.tensor([[0, 0, 64, 48], [10, 5, 13, 7], [60, 40, 64, 48], [20, 10, 50, 30]] * 2)
    for shapes in [("rectangle",), ("ellipse",), ("polygon",), ("rectangle", "ellipse", "polygon")]:
        masks = draw_shape_masks(boxes, 48, 64, 3, torch.Generator().manual_seed(0), shapes=shapes)
        assert masks.shape == (8, 1, 48, 64) and masks.dtype == torch.float32
        assert torch.all((masks == 0) | (masks == 1))
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            inside = torch.zeros(48, 64, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert masks[i, 0].sum() > 0 and not masks[i, 0][~inside].any(), (shapes, i)


@pytest.mark.parametrize("shape", ["rectangle", "ellipse"])
def test_shape_sizes_at_1024_px(shape: str) -> None:
    boxes = torch.tensor([[0, 0, 1024, 1024], [300, 200, 700, 500]]).repeat(4, 1)
    masks = draw_shape_masks(boxes, 1024, 1024, 1, torch.Generator().manual_seed(1), shapes=(shape,))
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        ys, xs = torch.nonzero(masks[i, 0], as_tuple=True)
        assert xs.max() - xs.min() + 1 >= 10 and ys.max() - ys.min() + 1 >= 10  # at least 10 px wide and high
        assert xs.min() >= x0 and ys.min() >= y0 and xs.max() < x1 and ys.max() < y1
        assert xs.min() <= x1 - 50 and ys.min() <= y1 - 50  # the top-left corner keeps the 50 px margin


def test_polygon_placement_and_union_of_more_shapes() -> None:
    boxes = torch.tensor([[0, 0, 96, 96]]).repeat(16, 1)
    masks = draw_shape_masks(boxes, 96, 96, 1, torch.Generator().manual_seed(3), shapes=("polygon",))
    # one polygon with vertices in [0, 96 - 5]: fits in that square, and is mostly larger than a few pixels
    assert not masks[:, :, 92:, :].any() and not masks[:, :, :, 92:].any()
    assert (masks.flatten(1).sum(1) > 20).float().mean() > 0.7
    more = draw_shape_masks(boxes, 96, 96, 3, torch.Generator().manual_seed(3), shapes=("rectangle",))
    assert more.mean() > draw_shape_masks(boxes, 96, 96, 1, torch.Generator().manual_seed(3), ("rectangle",)).mean()


def test_remove_dark_matches_numpy_reference() -> None:
    images = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(8))
    result = remove_dark(images).numpy()
    for image, out in zip(images.numpy().astype(np.float64), result):
        gray = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
        dark = gray <= gray.mean()
        ambiguous = np.abs(gray - gray.mean()) < 1e-5
        mean_colour = image[:, ~dark].mean(1)
        expected = np.where(dark[None], mean_colour[:, None, None], image)
        np.testing.assert_allclose(out[:, ~ambiguous], expected[:, ~ambiguous], atol=1e-6)
        assert np.array_equal(out[:, ~dark & ~ambiguous], image[:, ~dark & ~ambiguous].astype(np.float32))
    constant = torch.full((1, 3, 8, 8), 0.5)
    assert torch.equal(remove_dark(constant), constant)  # no brighter-than-mean pixel: unchanged


def test_remove_dark_option_pastes_from_the_brightened_copy() -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    module = SyntheticCorruption(probability=1.0, restrict_to_foreground=False, remove_dark=True,
                                 transforms=("flip",), seed=0)
    corrupted, mask = module(images)
    _check_invariants(images, corrupted, mask)
    source = remove_dark(images)
    inside = mask.bool().expand_as(images)
    candidates = [source.flip(-1), source.flip(-2), source.flip(-1).flip(-2)]
    for i in range(4):
        assert any(torch.equal(corrupted[i][inside[i]], c[i][inside[i]]) for c in candidates)


def test_flip_and_noise_transforms() -> None:
    images = torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    corrupted, mask = SyntheticCorruption(1.0, restrict_to_foreground=False, transforms=("flip",), seed=1)(images)
    inside = mask.bool().expand_as(images)
    candidates = [images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)]
    for i in range(6):
        assert any(torch.equal(corrupted[i][inside[i]], c[i][inside[i]]) for c in candidates)
    corrupted, mask = SyntheticCorruption(1.0, restrict_to_foreground=False, transforms=("noise",), seed=1)(images)
    noise = (2 * corrupted - images)[mask.bool().expand_as(images)]  # the uniform noise that was blended in
    assert noise.min() >= -1e-6 and noise.max() <= 1 + 1e-6 and abs(noise.mean().item() - 0.5) < 0.05


def test_shift_fill_is_the_image_rolled_and_rotated() -> None:
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    module = SyntheticCorruption(1.0, restrict_to_foreground=False, transforms=("shift",), seed=4)
    shifted = module._shift(images, module.generator(images.device))
    for i in range(6):
        candidates = [images[i].roll((dy, dx), (1, 2)).rot90(k, (1, 2))
                      for dy in range(8, 25) for dx in range(8, 25) for k in range(4)]
        assert any(torch.equal(shifted[i], c) for c in candidates)
    assert not torch.equal(shifted, images)
    wide = torch.rand(4, 3, 32, 48)  # not square: half turns only, the shape is kept
    assert module._shift(wide, module.generator(wide.device)).shape == wide.shape
    corrupted, mask = module(images)
    _check_invariants(images, corrupted, mask)


def test_other_fill_comes_from_another_image_of_the_batch() -> None:
    images = torch.stack([torch.full((3, 32, 32), value) for value in (0.1, 0.5, 0.9)])
    corrupted, mask = SyntheticCorruption(1.0, restrict_to_foreground=False, transforms=("other",), seed=0)(images)
    _check_invariants(images, corrupted, mask)
    for i in range(3):
        pasted = corrupted[i][mask[i].bool().expand(3, -1, -1)]
        assert torch.all(pasted == images[(i - 1) % 3, 0, 0, 0])  # the previous image of the batch


def test_perlin_masks_are_blobs_inside_their_boxes_and_seeded() -> None:
    boxes = torch.tensor([[0, 0, 64, 64], [8, 16, 40, 48], [0, 0, 64, 64], [20, 20, 21, 21]])
    first = perlin_masks(boxes, 64, 64, torch.Generator().manual_seed(0))
    again = perlin_masks(boxes, 64, 64, torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    other = perlin_masks(boxes, 64, 64, torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), state)  # a seeded draw leaves the global RNG alone
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == (4, 1, 64, 64) and torch.all((first == 0) | (first == 1))
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[16:48, 8:40] = False
    assert first[1, 0][outside].sum() == 0 and first[3].sum() <= 1
    many = perlin_masks(boxes[:1].expand(32, 4), 64, 64, torch.Generator().manual_seed(2))
    coverage = many.mean((1, 2, 3))
    assert 0.005 < coverage.mean() < 0.5 and (coverage > 0).float().mean() > 0.5  # blobs, mostly non-empty


@pytest.mark.parametrize("masks", ["perlin", "mixed"])
def test_perlin_and_mixed_mask_families(masks: str) -> None:
    images = _object_images([(10, 10, 100, 70)] * 8)
    module = SyntheticCorruption(1.0, masks=masks, seed=3)
    corrupted, mask = module(images)
    _check_invariants(images, corrupted, mask)
    x0, y0, x1, y1 = _padded(10, 10, 100, 70, 128, 96)
    inside = torch.zeros(96, 128, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert mask[..., ~inside].sum() == 0  # restricted to the foreground box
    assert torch.equal(SyntheticCorruption(1.0, masks=masks, seed=3)(images)[1], mask)


def test_color_transform_grayscale_and_blur_variants() -> None:
    images = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    corrupted, mask = SyntheticCorruption(1.0, restrict_to_foreground=False, transforms=("color",), seed=2)(images)
    _check_invariants(images, corrupted, mask)
    inside = mask.bool().expand_as(images)
    grayish = [bool((c[:, m[0]].std(0) < 1e-6).all()) for c, m in zip(corrupted, mask.bool())]
    assert any(grayish) and not all(grayish)  # grayscale (alone or combined) for some samples only
    # blurring / jitter change the pixel statistics inside the mask: the copy is never the input
    assert (corrupted[inside] - images[inside]).abs().mean() > 0.05


def test_colour_jitter_ops_match_torchvision() -> None:
    import torchvision.transforms.functional as tf
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    factor = torch.tensor([[0.2, 1.8, 0.5], [1.7, 0.3, 1.2], [1.0, 0.6, 1.8], [0.4, 1.1, 0.2]])
    reference = [tf.adjust_brightness, tf.adjust_contrast, tf.adjust_saturation]
    for op in range(4):
        ops = torch.full((4, 1, 1, 1), op)
        out = SyntheticCorruption._cheap_jitter_op(images, ops, factor)
        for i in range(4):
            expected = images[i] if op == 3 else reference[op](images[i], factor[i, op].item())
            torch.testing.assert_close(out[i], expected, atol=2e-3, rtol=0)
    hue = torch.tensor([-0.4, -0.1, 0.25, 0.4])
    out = corruption_module._shift_hue(images, hue)
    for i in range(4):
        torch.testing.assert_close(out[i], tf.adjust_hue(images[i], hue[i].item()), atol=1e-4, rtol=0)


def test_real_magnetic_tile_images(magnetic_tile: Path) -> None:
    from torchvision.io import ImageReadMode, read_image

    files = sorted((magnetic_tile / "train" / "good").glob("*.png"))[:6]
    assert len(files) == 6, f"fewer than 6 training images in {magnetic_tile}"
    images = torch.cat([
        F.interpolate(read_image(str(f), ImageReadMode.RGB)[None].float() / 255, size=(96, 96), mode="bilinear",
                      antialias=True).clamp(0, 1)
        for f in files
    ])
    boxes = foreground_boxes(images)
    assert torch.all(boxes[:, :2] >= 0) and torch.all(boxes[:, 2] <= 96) and torch.all(boxes[:, 3] <= 96)
    assert torch.all(boxes[:, 2:] - boxes[:, :2] >= 1)
    for module in (SyntheticCorruption(probability=1.0, seed=0), SyntheticCorruption(seed=1, remove_dark=True)):
        corrupted, mask = module(images)
        _check_invariants(images, corrupted, mask)
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            assert mask[i, 0, :y0].sum() == 0 and mask[i, 0, y1:].sum() == 0
            assert mask[i, 0, :, :x0].sum() == 0 and mask[i, 0, :, x1:].sum() == 0


def test_device_and_dtype_follow_the_input() -> None:
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    corrupted, mask = SyntheticCorruption(probability=1.0, seed=0)(images)
    assert corrupted.device == images.device and mask.device == images.device
    assert corrupted.dtype == torch.float64 and mask.dtype == torch.float64
    _check_invariants(images, corrupted, mask)
    assert foreground_boxes(images).device == images.device
