"""From a folder of a user's own parts to a deployed detector, through the real commands: ``anomalib train`` on
anomalib's ``Folder`` (JPEG and BMP, grayscale and RGB, two sizes), ``anomalib export --export_type openvino`` from
the checkpoint alone, ``isstad-predict`` on a new folder of mixed formats; for both models, with good images only
and with defective images and masks. Plus the ``Folder`` layout checks, each failing with the file and the fix."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from PIL import Image

from isstad_plugin.data_checks import DataCheckError, check_folder_layout
from tests.conftest import command_env, shared_category
from tests.warm_commands import WarmCommands

TINY = {
    "isstad": ["--model", "isstad", "--model.backbone", "vit_tiny", "--model.image_size", "64",
               "--model.decoder_embed_dim", "64", "--model.decoder_depth", "1", "--model.decoder_num_heads", "4",
               "--model.stage1_epochs", "1", "--model.stage2_epochs", "1", "--model.train_cache_gb", "0"],
    "cutpaste": ["--model", "cutpaste", "--model.backbone", "efficientnet_lite0.pypi_in1k", "--model.pretrained",
                 "false", "--model.image_size", "64", "--model.patch_size", "32", "--model.patch_stride", "16",
                 "--model.score_sigma", "4", "--model.max_epochs", "1"],
}


def own_parts(root: Path) -> Path:
    """``root/parts``: good/ (JPEG grayscale at the tiles' sizes, BMP RGB at 160 x 120), defect/ (PNG and JPEG cracks)
    and masks/ (``<name>_mask.png``), from real magnetic_tile images."""
    tiles = shared_category("magnetic_tile")
    parts = root / "parts"
    for folder in ("good", "defect", "masks"):
        (parts / folder).mkdir(parents=True)
    for index, path in enumerate(sorted((tiles / "train" / "good").glob("*.png"))[:16]):
        with Image.open(path) as image:
            if index % 2:
                image.convert("RGB").resize((160, 120)).save(parts / "good" / f"part{index:02d}.bmp")
            else:
                image.save(parts / "good" / f"part{index:02d}.jpg", quality=95)
    for index, path in enumerate(sorted((tiles / "test" / "crack").glob("*.png"))[:4]):
        name = f"crack{index}"
        with Image.open(path) as image:
            image.save(parts / "defect" / (f"{name}.jpg" if index % 2 else f"{name}.png"))
        with Image.open(tiles / "ground_truth" / "crack" / f"{path.stem}_mask.png") as mask:
            mask.save(parts / "masks" / f"{name}_mask.png")
    return parts


def new_images(root: Path) -> Path:
    """A folder of new images to predict on: PNG, JPEG, BMP and TIFF, grayscale and RGB."""
    tiles = shared_category("magnetic_tile")
    folder = root / "incoming"
    folder.mkdir()
    files = [*sorted((tiles / "test" / "good").glob("*.png"))[:2], *sorted((tiles / "test" / "blowhole").glob("*.png"))[:2]]
    for path, suffix in zip(files, (".png", ".jpg", ".bmp", ".tif"), strict=True):
        with Image.open(path) as image:
            (image.convert("RGB") if suffix == ".bmp" else image).save(folder / f"{path.parent.name}_{path.stem}{suffix}")
    return folder


def run(warm: WarmCommands, argv: list[str], cwd: Path, name: str) -> str:
    result = warm.run(argv, cwd, command_env(), cwd / "output" / name)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{argv}\n{output[-4000:]}"
    return output


@pytest.mark.parametrize(("model", "with_defects"), [("isstad", True), ("cutpaste", False)])
def test_from_a_folder_of_parts_to_predictions(model: str, with_defects: bool, tmp_path: Path,
                                               warm: WarmCommands) -> None:
    parts = own_parts(tmp_path)
    data = ["--data", "anomalib.data.Folder", "--data.name", "parts", "--data.root", str(parts),
            "--data.normal_dir", "good", "--data.train_batch_size", "4", "--data.eval_batch_size", "4",
            "--data.num_workers", "0"]
    if with_defects:
        data += ["--data.abnormal_dir", "defect", "--data.mask_dir", "masks"]
    output = run(warm, ["anomalib", "train", *TINY[model], *data, "--trainer.accelerator", "cpu",
                        "--trainer.enable_progress_bar", "false", "--default_root_dir", str(tmp_path / "results")],
                 tmp_path, "train")
    if with_defects:
        for metric in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
            assert metric in output
    else:  # nothing undefined printed as 0.0; the thresholds say how they were set, the test what is defined
        assert "image_AUROC" not in output and "No positive samples" not in output
        assert "set for a false-alarm rate of at most 1.0 % of held-out good images" in output
        assert "holds no defective image: AUROC, F1 and AUPRO are not defined" in output
        assert re.search(r"image_false_alarm_rate\s*│\s*[0-9.]+", output), output[-3000:]
    checkpoint = Path(re.search(r"checkpoint written: (/\S+)", output).group(1))
    exported = run(warm, ["anomalib", "export", "--model", model, "--ckpt_path", str(checkpoint), "--export_type",
                          "openvino", "--default_root_dir", str(tmp_path / "results")], tmp_path, "export")
    xml = next(Path(match) for match in re.findall(r"Exported (/\S+)", exported) if match.endswith(".xml"))
    predicted = run(warm, ["isstad-predict", str(xml), str(new_images(tmp_path)), "--output",
                           str(tmp_path / "predictions")], tmp_path, "predict")
    assert "4 images" in predicted
    with (tmp_path / "predictions" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(Path(row["image"]).suffix for row in rows) == [".bmp", ".jpg", ".png", ".tif"]
    for row in rows:
        assert float(row["pred_score"]) == float(row["pred_score"])  # a number, never NaN
        assert row["pred_label"] in {"0", "1"} and Path(row["overlay"]).is_file()


# ------------------------------------------------------------------ the layout checks, before anomalib reads
class Layout:
    """What ``check_folder_layout`` reads of anomalib's ``Folder`` datamodule."""

    def __init__(self, root: Path, **folders: str) -> None:
        self.root, self.extensions = root, None
        self.normal_dir = folders.get("normal_dir")
        self.abnormal_dir = folders.get("abnormal_dir")
        self.normal_test_dir = folders.get("normal_test_dir")
        self.mask_dir = folders.get("mask_dir")


def failure(layout: Layout) -> str:
    with pytest.raises((DataCheckError, FileNotFoundError)) as error:
        check_folder_layout(layout)
    return str(error.value)


def test_folder_layout_problems_name_the_file_and_the_fix(tmp_path: Path) -> None:
    parts = own_parts(tmp_path)
    check_folder_layout(Layout(parts, normal_dir="good", abnormal_dir="defect", mask_dir="masks"))  # all well
    assert "--data.normal_dir" in failure(Layout(parts, normal_dir="missing"))
    (parts / "empty").mkdir()
    message = failure(Layout(parts, normal_dir="empty"))
    assert "holds no image anomalib reads" in message and str(parts / "empty") in message
    assert "without --data.abnormal_dir" in failure(Layout(parts, normal_dir="good", mask_dir="masks"))
    (parts / "masks" / "crack0_mask.png").rename(parts / "masks" / "other_mask.png")
    message = failure(Layout(parts, normal_dir="good", abnormal_dir="defect", mask_dir="masks"))
    assert f"{parts / 'defect' / 'crack0.png'} has no mask" in message
    assert f"{parts / 'masks' / 'other_mask.png'} is a mask of no image" in message
    assert message.strip().splitlines()[-1].startswith("Fix the folders named above")


def test_a_pairing_by_position_that_differs_from_the_names_is_refused(tmp_path: Path) -> None:
    # anomalib pairs masks by sorted position: "a1" sorts before "a_" among masks but after "a" among images
    root = tmp_path / "parts"
    for folder, names in (("good", ["g"]), ("defect", ["a", "a1"]), ("masks", ["a_mask", "a1_mask"])):
        (root / folder).mkdir(parents=True)
        for name in names:
            Image.new("L", (8, 8)).save(root / folder / f"{name}.png")
    message = failure(Layout(root, normal_dir="good", abnormal_dir="defect", mask_dir="masks"))
    assert f"{root / 'defect' / 'a.png'} would get {root / 'masks' / 'a1_mask.png'}" in message
