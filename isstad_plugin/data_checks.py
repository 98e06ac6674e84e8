"""Check a data split before training or testing starts, so bad files fail early with their names.

anomalib's datasets read images with ``PIL.Image.open(path).convert("RGB")`` when a batch is loaded, which
means a truncated file fails mid-epoch inside a worker, a 16-bit image is silently clipped to 255, and a
ground-truth mask of the wrong size is silently stretched by the resize. :func:`check_split` looks at every
file of a split once (headers and checksums, no full decode for 8-bit images) and raises one error that names
each bad file and says what to do.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

# Modes PIL converts to RGB without losing information.
SAFE_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L", "I"}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I"}
ALPHA_MODES = {"RGBA", "LA", "PA"}  # accepted when every pixel is opaque
MVTEC_SUFFIXES = {".png", ".PNG"}  # the files anomalib's MVTec AD dataset reads
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class DataCheckError(ValueError):
    """One or more files of a split cannot be used; the message lists them."""


def _image_problem(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """``(problem or None, (width, height) or None)`` for one image file."""
    if not path.is_file():
        return "file does not exist", None
    try:
        with Image.open(path) as image:
            mode, size = image.mode, image.size
            transparency = "transparency" in image.info
            image.verify()  # checksums / truncation, without decoding
        if mode not in SAFE_MODES:
            return f"unsupported pixel mode {mode!r}; save it as 8-bit RGB or grayscale", size
        if mode in SIXTEEN_BIT_MODES:
            with Image.open(path) as image:
                peak = int(np.asarray(image).max())
            if peak > 255:
                return (f"16-bit image with values up to {peak}: anomalib's reader would clip them to 255; "
                        "convert it to 8-bit (scale by 255/65535) first"), size
        if mode in ALPHA_MODES or (mode == "P" and transparency):
            with Image.open(path) as image:
                alpha = np.asarray(image.convert("RGBA").getchannel("A"))
            if int(alpha.min()) < 255:
                return (f"transparent pixels ({(alpha < 255).mean():.0%} of the image): anomalib's reader drops "
                        "the alpha channel, so the model would see what lies under them; flatten the image onto "
                        "its background and save it as RGB or grayscale"), size
    except Image.DecompressionBombError as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        count = f"{int(pixels.group(1)) / 1e6:.0f} megapixels" if pixels else "too many pixels"
        return (f"{count}, over Pillow's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} "
                "megapixels that anomalib's reader enforces; downscale the image (or check that it is not "
                "corrupt)"), None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"cannot be read ({error.__class__.__name__}: {error}); the file is corrupt or truncated", None
    return None, size


def unreadable_reason(path: Path) -> str | None:
    """Why an image file cannot be read at all (header and checksums, no full decode), or ``None``.

    The prediction check: a large image is readable (``isstad-predict`` reads with OpenCV, without Pillow's
    decompression-bomb limit), and 16-bit or transparent images are converted there, not refused.
    """
    try:
        with Image.open(path) as image:
            image.verify()
    except Image.DecompressionBombError:
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"cannot be read ({error.__class__.__name__}: {error}); the file is corrupt or truncated"
    return None


def check_split(image_paths: Iterable[str], mask_paths: Iterable[str | None], split: str,
                folder: Path | None = None) -> int:
    """Check every image (and its mask, where given) of one split; returns the number of images checked.

    Args:
        image_paths: the split's image files.
        mask_paths: each image's mask file, or ``None``/empty for images without one.
        split: the split's name, for messages.
        folder: where the split's images should be, for the message of an empty split.

    Raises:
        DataCheckError: listing every file that is unreadable, truncated, too large to decode, of an unsafe
            pixel format or with transparent pixels, or whose mask is missing or has a different size than its
            image; or when the split is empty.
    """
    images = [Path(p) for p in image_paths]
    masks = [Path(m) if isinstance(m, str) and m else None for m in mask_paths]
    if not images:
        where = f" ({folder})" if folder is not None else ""
        msg = (f"The {split} split has no images{where}: put the images there, or point --data.root at the "
               "folder that holds them.")
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
        # the summary closes the message, so the last lines of a long traceback still say what to do
        msg = (f"{len(problems)} bad file(s) in the {split} split:\n  {shown}{more}\n"
               f"Fix or remove the file(s) named above; nothing was trained or tested on the {split} split.")
        raise DataCheckError(msg)
    logger.info("Checked %d %s images.", len(images), split)
    return len(images)


def check_dataset(dataset: object, split: str) -> int | None:
    """:func:`check_split` for an anomalib dataset (anything with a ``samples`` frame); ``None`` if it has none."""
    samples = getattr(dataset, "samples", None)
    if samples is None or "image_path" not in getattr(samples, "columns", ()):
        return None
    masks = samples["mask_path"] if "mask_path" in samples.columns else [None] * len(samples)
    root = getattr(dataset, "root_category", None)
    folder = None if root is None else Path(root) / ("train/good" if split == "train" else "test")
    return check_split(samples["image_path"], masks, split, folder)


def check_mvtec_layout(folder: Path) -> None:
    """Every defective test image of an MVTec-layout category has its mask, every mask its image, and every image
    is a ``.png`` (the only files anomalib's MVTec AD reads; other files are listed in a warning).

    anomalib pairs ``test/<defect>/<name>.png`` with ``ground_truth/<defect>/<name>_mask.png`` (or ``<name>.png``)
    by sorted order, so one missing file shifts every pairing after it or fails inside pandas.

    Raises:
        DataCheckError: naming every image without a mask, every mask without an image and every non-PNG image.
    """
    problems, ignored = [], []
    for split in sorted(p for p in [folder / "train" / "good", *(folder / "test").glob("*"),
                                    *(folder / "ground_truth").glob("*")] if p.is_dir()):
        for file in sorted(split.iterdir()):
            if file.suffix in MVTEC_SUFFIXES or file.is_dir():
                continue
            if file.suffix.lower() in IMAGE_SUFFIXES:
                problems.append(f"{file}: anomalib's MVTec AD reads only .png files and would skip it; convert it "
                                "to PNG (or use anomalib.data.Folder, which reads other formats)")
            else:
                ignored.append(file)
    if ignored:
        logger.warning("Not images, ignored by anomalib's MVTec AD: %s", ", ".join(map(str, ignored)))
    for defect in sorted(p for p in (folder / "test").glob("*") if p.is_dir() and p.name != "good"):
        truth = folder / "ground_truth" / defect.name
        images = {p.stem: p for p in defect.iterdir() if p.suffix in MVTEC_SUFFIXES}
        masks = {p.stem.removesuffix("_mask"): p for p in truth.glob("*") if p.suffix in MVTEC_SUFFIXES}
        problems += [f"{truth / (stem + '_mask.png')} is missing (the mask of {images[stem]})"
                     for stem in sorted(images.keys() - masks.keys())]
        problems += [f"{masks[stem]} has no image {defect / (stem + '.png')}" for stem in sorted(masks.keys() - images.keys())]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        msg = (f"{len(problems)} file(s) of {folder} that anomalib would misread:\n  {shown}{more}\n"
               "Every test/<defect>/<name>.png needs ground_truth/<defect>/<name>_mask.png, and every image must be "
               "a .png: fix or remove the files named above.")
        raise DataCheckError(msg)


def _folder_images(folder: Path, extensions: Iterable[str]) -> list[Path]:
    """The images anomalib's ``Folder`` reads from ``folder`` (recursively, by extension, any case), sorted by path."""
    wanted = {extension.lower() for extension in extensions}
    return sorted((f for f in folder.glob("**/*") if f.suffix.lower() in wanted and f.is_file()), key=str)


def _mask_names(image: Path) -> set[str]:
    """The mask stems that name ``image``: ``<stem>`` or ``<stem>_mask``."""
    return {image.stem, f"{image.stem}_mask"}


def check_folder_layout(datamodule: object) -> None:
    """Fail before anomalib reads a ``Folder`` data set whose folders it would misread.

    anomalib's ``Folder`` needs ``normal_dir`` and reads ``abnormal_dir``, ``normal_test_dir`` and ``mask_dir`` when
    given; it pairs each defective image with a mask by *sorted position*, so a missing or extra mask shifts every
    pairing after it (or fails inside pandas), and a mask given without defective images is silently unused.

    Raises:
        FileNotFoundError: a named folder does not exist.
        DataCheckError: a folder holds no image anomalib reads; masks given without ``abnormal_dir``; a defective
            image without its mask, a mask naming no defective image, or a pairing by position that differs from the
            pairing by name (``<name>.<ext>`` with ``<name>.png`` or ``<name>_mask.png``).
    """
    from anomalib.data.utils.path import validate_and_resolve_path
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = getattr(datamodule, "root", None)
    extensions = tuple(getattr(datamodule, "extensions", None) or IMG_EXTENSIONS)
    folders: dict[str, Path] = {}
    for option in ("normal_dir", "abnormal_dir", "normal_test_dir", "mask_dir"):
        value = getattr(datamodule, option, None)
        if value is None:
            continue
        if not isinstance(value, str | Path):
            return  # several folders per option: anomalib's own checks only
        path = Path(root) / value if root is not None and not Path(value).is_absolute() else Path(value)
        if not path.is_dir():
            msg = (f"--data.{option} {path} does not exist (data root {root}); point --data.{option} at the folder "
                   f"of {'masks' if option == 'mask_dir' else 'images'} (relative to --data.root, or absolute).")
            raise FileNotFoundError(msg)
        folders[option] = Path(validate_and_resolve_path(value, root))
    if "normal_dir" not in folders:
        msg = "anomalib's Folder needs --data.normal_dir: the folder of good images to train on."
        raise DataCheckError(msg)
    images = {option: _folder_images(path, extensions) for option, path in folders.items()}
    problems = [f"--data.{option} {folders[option]} holds no image anomalib reads ({', '.join(extensions)}); put "
                "the images there or fix the path" for option, found in images.items() if not found]
    if "mask_dir" in folders and "abnormal_dir" not in folders:
        problems.append(f"--data.mask_dir {folders['mask_dir']} is given without --data.abnormal_dir: masks belong to "
                        "defective images; add the folder of defective images, or leave the masks out")
    elif "mask_dir" in folders and images["mask_dir"] and images["abnormal_dir"]:
        defective, masks = images["abnormal_dir"], images["mask_dir"]
        named = {mask.stem: mask for mask in masks}
        for image in defective:
            if not _mask_names(image) & named.keys():
                problems.append(f"{image} has no mask in {folders['mask_dir']} (expected {image.stem}.png or "
                                f"{image.stem}_mask.png)")
        stems = {name for image in defective for name in _mask_names(image)}
        problems += [f"{mask} is a mask of no image in {folders['abnormal_dir']}" for mask in masks
                     if mask.stem not in stems]
        if not problems and len(masks) == len(defective):
            problems += [f"anomalib pairs masks by sorted position: {image} would get {mask}; rename the masks to "
                         f"<image name>.png or <image name>_mask.png so that both folders sort alike"
                         for image, mask in zip(defective, masks, strict=True) if mask.stem not in _mask_names(image)]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        msg = (f"{len(problems)} problem(s) with the Folder data set:\n  {shown}{more}\n"
               "Fix the folders named above; nothing was read.")
        raise DataCheckError(msg)


def check_data_folder(datamodule: object) -> None:
    """Fail before anomalib reads or downloads anything when a folder-layout datamodule's data is unusable.

    anomalib's ``Folder``: :func:`check_folder_layout`. Otherwise checks the ``<root>/<category>`` folder of any
    datamodule that has ``root`` and ``category`` (MVTec AD, Visa, ...). A missing folder of a category anomalib can download (MVTec AD) is left to anomalib's download
    only when the download host answers; offline (``HF_HUB_OFFLINE=1``, or no answer within 3 s) it fails here
    instead of after a long wait. For MVTec AD, :func:`check_mvtec_layout` then pairs images and masks.

    Raises:
        FileNotFoundError: the category folder is missing (and cannot be downloaded here).
        DataCheckError: see :func:`check_mvtec_layout`.
    """
    if type(datamodule).__name__ == "Folder":
        check_folder_layout(datamodule)
        return
    root, category = getattr(datamodule, "root", None), getattr(datamodule, "category", None)
    if root is None or category is None:
        return
    folder = Path(root) / str(category)
    layout = "<root>/<category>/train/good, test/<defect>, ground_truth/<defect>"
    if not folder.is_dir():
        url = _download_url(datamodule)
        if url is not None and _reachable(url):
            logger.warning("%s not found: anomalib will download the data set into %s.", folder, root)
            return
        offline = f" and cannot be downloaded here ({urlparse(url).netloc} unreachable)" if url else ""
        msg = (f"Data folder {folder} does not exist{offline}. Point --data.root at the folder that contains "
               f"{category!r}, in MVTec AD layout ({layout}).")
        raise FileNotFoundError(msg)
    if type(datamodule).__name__ == "MVTecAD":
        check_mvtec_layout(folder)


def _download_url(datamodule: object) -> str | None:
    """The URL anomalib would download ``datamodule``'s data set from, if it can download it."""
    if type(datamodule).__name__ != "MVTecAD":
        return None
    from anomalib.data.datamodules.image import mvtecad
    from anomalib.data.datasets.image.mvtecad import CATEGORIES

    return mvtecad.DOWNLOAD_INFO.url if getattr(datamodule, "category", None) in CATEGORIES else None


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether ``url``'s host accepts a connection within ``timeout`` seconds (never under ``HF_HUB_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return False
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
