"""A per-sample PIL/OpenCV implementation of ISSTAD's corruption at the original resolution.

This is how the authors' pipeline works (one image at a time on the CPU, in the data loader); it exists only
as the baseline that ``benchmarks/training.py`` compares our batched tensor generator against. Written from
the method page, not from the authors' code.
"""

from __future__ import annotations

import random

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from torchvision import transforms


def foreground_box(image: Image.Image) -> tuple[int, int, int, int]:
    """Otsu threshold, largest external contour, padded box ``(x0, y0, x1, y1)``."""
    gray = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
    _, binary = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    width, height = image.size
    if not contours:
        return 0, 0, width, height
    x, y, w, h = cv2.boundingRect(max(contours, key=cv2.contourArea))
    x0, y0 = max(0, x - w // 10), max(0, y - h // 5)
    return x0, y0, min(width, x0 + w + 2 * (w // 10)), min(height, y0 + h + 2 * (h // 5))


def shape_mask(size: tuple[int, int], box: tuple[int, int, int, int], max_shapes: int) -> Image.Image:
    x0, y0, x1, y1 = box
    margin = max(1, round(50 * size[0] / 1024))
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(random.randint(1, max_shapes)):
        kind = random.choice(["rectangle", "ellipse", "polygon"])
        left, top = random.randint(x0, max(x0, x1 - margin)), random.randint(y0, max(y0, y1 - margin))
        if kind == "polygon":
            points = [(random.randint(x0, max(x0, x1 - margin)), random.randint(y0, max(y0, y1 - margin)))
                      for _ in range(random.randint(3, 8))]
            draw.polygon(points, fill=255)
            continue
        right = left + random.randint(min(10, x1 - left), max(10, x1 - left))
        bottom = top + random.randint(min(10, y1 - top), max(10, y1 - top))
        (draw.rectangle if kind == "rectangle" else draw.ellipse)((left, top, right, bottom), fill=255)
    return mask


def transformed_copy(image: Image.Image) -> Image.Image:
    jitter = transforms.ColorJitter(0.8, 0.8, 0.8, 0.4)
    blur = lambda im: im.filter(ImageFilter.GaussianBlur(radius=random.uniform(15, 20)))  # noqa: E731
    gray = lambda im: ImageOps.grayscale(im).convert("RGB")  # noqa: E731
    choice = random.choice(["color", "flip", "noise"])
    if choice == "color":
        ops = random.choice([[jitter], [gray], [blur], [jitter, gray], [jitter, blur], [gray, blur]])
        for op in ops:
            image = op(image)
        return image
    if choice == "flip":
        flips = random.choice([[ImageOps.mirror], [ImageOps.flip], [ImageOps.mirror, ImageOps.flip]])
        for op in flips:
            image = op(image)
        return image
    noise = Image.fromarray(np.random.randint(0, 256, (image.size[1], image.size[0], 3), dtype=np.uint8))
    return Image.blend(image, noise, 0.5)


def corrupt(image: Image.Image, max_shapes: int = 3, restrict: bool = True) -> tuple[Image.Image, Image.Image]:
    """One image: with probability 2/3 paste a transformed copy through a random shape mask."""
    if random.random() >= 2 / 3:
        return image, Image.new("L", image.size, 0)
    box = foreground_box(image) if restrict else (0, 0, *image.size)
    mask = shape_mask(image.size, box, max_shapes)
    return Image.composite(transformed_copy(image), image, mask), mask
