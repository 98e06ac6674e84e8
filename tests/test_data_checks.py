"""Bad input files are named before anything trains."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from isstad_plugin.data_checks import DataCheckError, check_split


def write(path: Path, array: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), array)
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write(tmp_path / "good.png", np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))


def test_valid_grayscale_opaque_rgba_and_small_16_bit_images_are_accepted(tmp_path: Path, good: Path) -> None:
    gray = write(tmp_path / "gray.png", np.full((40, 30), 100, np.uint8))
    rgba = write(tmp_path / "rgba.png", np.dstack([np.full((40, 30, 3), 100, np.uint8), np.full((40, 30), 255, np.uint8)]))
    small16 = write(tmp_path / "small16.png", np.full((40, 30), 200, np.uint16))
    mask = write(tmp_path / "mask.png", np.zeros((40, 30), np.uint8))
    assert check_split([good, gray, rgba, small16], [None, str(mask), None, None], "train") == 4


def test_every_bad_file_is_named_with_what_to_do(tmp_path: Path, good: Path) -> None:
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    wide16 = write(tmp_path / "wide16.png", np.full((40, 30), 4000, np.uint16))
    wrong_mask = write(tmp_path / "wrong_mask.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(DataCheckError) as error:
        check_split([truncated, not_an_image, wide16, good, good],
                    [None, None, None, str(wrong_mask), str(tmp_path / "missing_mask.png")], "test")
    message = str(error.value)
    assert message.startswith("5 bad file(s) in the test split")
    assert f"{truncated}: cannot be read" in message and "corrupt or truncated" in message
    assert f"{not_an_image}: cannot be read" in message
    assert f"{wide16}: 16-bit image with values up to 4000" in message and "convert it to 8-bit" in message
    assert f"{wrong_mask}: mask is 30x20 but its image {good} is 30x40" in message
    assert "missing_mask.png (mask of good.png): file does not exist" in message


def test_empty_split_is_refused() -> None:
    with pytest.raises(DataCheckError, match="The train split has no images"):
        check_split([], [], "train")


def test_transparent_pixels_are_refused(tmp_path: Path) -> None:
    """anomalib's reader drops the alpha channel: what lies under transparent pixels would be scored."""
    alpha = np.full((40, 30), 255, np.uint8)
    alpha[:10] = 0
    rgba = write(tmp_path / "rgba.png", np.dstack([np.full((40, 30, 3), 100, np.uint8), alpha]))
    with pytest.raises(DataCheckError, match=r"rgba\.png: transparent pixels \(25% of the image\)"):
        check_split([rgba], [None], "train")
