"""Check a data split before training or testing starts, so bad files fail early with their names.

anomalib's datasets read images with ``PIL.Image.open(path).convert("RGB")`` when a batch is loaded, which
means a truncated file fails mid-epoch inside a worker, a 16-bit image is silently clipped to 255, and a
ground-truth mask of the wrong size is silently stretched by the resize. :func:`check_split` looks at every
file of a split once (headers and checksums, no full decode for 8-bit images) and raises one error that names
each bad file and says what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

# Modes PIL converts to RGB without losing information.
SAFE_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L", "I"}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I"}


class DataCheckError(ValueError):
    """One or more files of a split cannot be used; the message lists them."""


def _image_problem(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """``(problem or None, (width, height) or None)`` for one image file."""
    if not path.is_file():
        return "file does not exist", None
    try:
        with Image.open(path) as image:
            mode, size = image.mode, image.size
            image.verify()  # checksums / truncation, without decoding
        if mode not in SAFE_MODES:
            return f"unsupported pixel mode {mode!r}; save it as 8-bit RGB or grayscale", size
        if mode in SIXTEEN_BIT_MODES:
            with Image.open(path) as image:
                peak = int(np.asarray(image).max())
            if peak > 255:
                return (f"16-bit image with values up to {peak}: anomalib's reader would clip them to 255; "
                        "convert it to 8-bit (scale by 255/65535) first"), size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"cannot be read ({error.__class__.__name__}: {error}); the file is corrupt or truncated", None
    return None, size


def check_split(image_paths: Iterable[str], mask_paths: Iterable[str | None], split: str) -> int:
    """Check every image (and its mask, where given) of one split; returns the number of images checked.

    Raises:
        DataCheckError: listing every file that is unreadable, truncated, of an unsafe pixel format, or whose
            mask is missing or has a different size than its image; or when the split is empty.
    """
    images = [Path(p) for p in image_paths]
    masks = [Path(m) if isinstance(m, str) and m else None for m in mask_paths]
    if not images:
        msg = f"The {split} split has no images; check that its folder exists and holds image files."
        raise DataCheckError(msg)
    problems = []
    for image_path, mask_path in zip(images, masks, strict=True):
        problem, size = _image_problem(image_path)
        if problem:
            problems.append(f"{image_path}: {problem}")
            continue
        if mask_path is None:
            continue
        mask_problem, mask_size = _image_problem(mask_path)
        if mask_problem:
            problems.append(f"{mask_path} (mask of {image_path.name}): {mask_problem}")
        elif mask_size != size:
            problems.append(f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
                            f"{size[0]}x{size[1]}; masks must match their images pixel for pixel")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        msg = f"{len(problems)} bad file(s) in the {split} split:\n  {shown}{more}"
        raise DataCheckError(msg)
    logger.info("Checked %d %s images.", len(images), split)
    return len(images)


def check_dataset(dataset: object, split: str) -> int | None:
    """:func:`check_split` for an anomalib dataset (anything with a ``samples`` frame); ``None`` if it has none."""
    samples = getattr(dataset, "samples", None)
    if samples is None or "image_path" not in getattr(samples, "columns", ()):
        return None
    masks = samples["mask_path"] if "mask_path" in samples.columns else [None] * len(samples)
    return check_split(samples["image_path"], masks, split)
