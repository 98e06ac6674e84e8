"""Bad inputs and faults, each run through the real command a user types; the table of ``docs/reliability.md``.

Every case prepares its fault in a fresh folder, runs ``anomalib ...`` (or ``isstad-predict``) in a subprocess
and expects: a non-zero exit, a message that names the file or option and the fix within the **last 5 lines** of
the output, and nothing half-written left behind. ``tests/test_bad_inputs.py`` runs every case;
``python -m tests.bad_inputs`` runs them all and writes the table of ``docs/reliability.md`` from what the
commands actually printed (the text above the table's marker is kept).

Faults that need a live process to interrupt (SIGKILL in each stage, then resume; an interrupted export) are
tested elsewhere and listed in :data:`OTHER_TESTS`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from tests.conftest import REPO, TINY_MODEL, make_slice
from tests.warm_commands import PROGRAMS as WARM_PROGRAMS
from tests.warm_commands import WarmCommands

BIN = Path(sys.executable).parent
TAIL_LINES = 5
MESSAGE_START = re.compile(r"^(\w*(Error|Exception)\b|error:)")  # where the printed message begins
PAGE = REPO / "docs" / "reliability.md"
MARKER = "<!-- The table below is written by `python -m tests.bad_inputs`; edit the cases, not the table. -->"
MODEL_FLAGS = [arg for key, value in TINY_MODEL.items() for arg in (f"--model.{key}", str(value))]


def data_flags(root: Path, category: str = "magnetic_tile") -> list[str]:
    return ["--data", "anomalib.data.MVTecAD", "--data.root", str(root), "--data.category", category,
            "--data.num_workers", "0", "--data.train_batch_size", "4", "--data.eval_batch_size", "4"]


def train(root: Path, out: Path, *extra: str) -> list[str]:
    """``anomalib train`` of the tiny ISSTAD for 1 + 1 epochs on ``root``."""
    return [str(BIN / "anomalib"), "train", "--model", "isstad", *MODEL_FLAGS, "--model.stage1_epochs", "1",
            "--model.stage2_epochs", "1", *data_flags(root), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--default_root_dir", str(out), *extra]


def test_command(root: Path, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    """``anomalib test`` of the tiny ISSTAD from ``checkpoint``."""
    return [str(BIN / "anomalib"), "test", "--model", "isstad", *MODEL_FLAGS, *extra, "--ckpt_path", str(checkpoint),
            *data_flags(root), "--trainer.accelerator", "cpu", "--default_root_dir", str(out)]


def tiny_checkpoint(path: Path, **options: object) -> Path:
    """A Lightning checkpoint of an untrained tiny ISSTAD (the keys and hyper-parameters a trained one has)."""
    import lightning
    import torch

    from isstad_plugin import Isstad

    model = Isstad(**{**TINY_MODEL, **options})
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "epoch": 0,
                "global_step": 0, "pytorch-lightning_version": lightning.__version__}, path)
    return path


@dataclass
class Case:
    """One bad input: ``prepare(work) -> command`` sets up the fault under ``work`` and returns the command."""

    name: str
    fault: str
    prepare: Callable[[Path], list[str]]
    expect: str  # regex the last TAIL_LINES lines must match (whitespace-normalised)
    leftovers: Callable[[Path], list[Path]] = field(default=lambda work: [])  # what must not exist afterwards
    env: dict[str, str] = field(default_factory=dict)
    file_size_limit: int | None = None  # bytes: files may not grow larger (writes fail part-way, as on a full disk)


def _checkpoints(work: Path) -> list[Path]:
    return [p for p in (work / "out").rglob("*") if p.suffix in {".ckpt", ".tmp", ".partial"}] \
        if (work / "out").exists() else []


# ---------------------------------------------------------------------------------------------------- data faults
def _missing_root(work: Path) -> list[str]:
    return train(work / "no-such-folder", work / "out")


def _offline_download(work: Path) -> list[str]:
    return [*train(work / "datasets", work / "out")[:-len(data_flags(work))], *data_flags(work / "datasets", "bottle")]


def _empty_train(work: Path) -> list[str]:
    root = make_slice(work / "data", n_train=2, n_good=1, defects={"crack": 1})
    for image in (root / "magnetic_tile" / "train" / "good").glob("*.png"):
        image.unlink()
    return train(root, work / "out")


def _truncated_image(work: Path) -> list[str]:
    root = make_slice(work / "data", n_train=4, n_good=1, defects={"crack": 1})
    image = sorted((root / "magnetic_tile" / "train" / "good").glob("*.png"))[1]
    image.write_bytes(image.read_bytes()[:200])
    return train(root, work / "out")


def _not_an_image(work: Path) -> list[str]:
    root = make_slice(work / "data", n_train=4, n_good=1, defects={"crack": 1})
    (root / "magnetic_tile" / "train" / "good" / "notes.png").write_text("not an image\n")
    return train(root, work / "out")


def _missing_mask(work: Path) -> list[str]:
    root = make_slice(work / "data", n_train=4, n_good=1, defects={"crack": 2})
    next((root / "magnetic_tile" / "ground_truth" / "crack").glob("*.png")).unlink()
    return train(root, work / "out")


def _mask_other_size(work: Path) -> list[str]:
    root = make_slice(work / "data", n_train=4, n_good=1, defects={"crack": 1})
    mask = next((root / "magnetic_tile" / "ground_truth" / "crack").glob("*.png"))
    cv2.imwrite(str(mask), np.zeros((10, 12), np.uint8))
    return train(root, work / "out")


def _rgba_transparent(work: Path) -> list[str]:
    root = make_slice(work / "data", n_train=4, n_good=1, defects={"crack": 1})
    image = min((root / "magnetic_tile" / "train" / "good").glob("*.png"))
    gray = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)
    alpha = np.full_like(gray, 255)
    alpha[: gray.shape[0] // 2] = 0
    cv2.imwrite(str(image), np.dstack([gray, gray, gray, alpha]))
    return train(root, work / "out")


def _sixteen_bit(work: Path) -> list[str]:
    root = make_slice(work / "data", n_train=4, n_good=1, defects={"crack": 1})
    image = min((root / "magnetic_tile" / "test" / "good").glob("*.png"))
    cv2.imwrite(str(image), cv2.imread(str(image), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 257)
    return train(root, work / "out")


def _float_image(work: Path) -> list[str]:
    from PIL import Image

    root = make_slice(work / "data", n_train=4, n_good=1, defects={"crack": 1})
    image = min((root / "magnetic_tile" / "train" / "good").glob("*.png"))
    Image.fromarray(np.random.default_rng(0).random((40, 40), np.float32), mode="F").save(image, format="TIFF")
    return train(root, work / "out")


def _not_png(work: Path) -> list[str]:
    root = make_slice(work / "data", n_train=4, n_good=1, defects={"crack": 1})
    image = min((root / "magnetic_tile" / "train" / "good").glob("*.png"))
    cv2.imwrite(str(image.with_suffix(".jpg")), cv2.imread(str(image)))
    return train(root, work / "out")


def _decompression_bomb(work: Path) -> list[str]:
    import struct
    import zlib

    root = make_slice(work / "data", n_train=4, n_good=1, defects={"crack": 1})
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)  # 30000 x 30000 8-bit grayscale: 900 Mpx
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (root / "magnetic_tile" / "train" / "good" / "huge.png").write_bytes(png)
    return train(root, work / "out")


# ---------------------------------------------------------------------------------------------------- Folder faults
def folder_train(root: Path, out: Path, **folders: str) -> list[str]:
    """``anomalib train`` of the tiny ISSTAD on anomalib's ``Folder`` at ``root`` with ``folders`` (normal_dir=...)."""
    flags = [arg for name, value in folders.items() for arg in (f"--data.{name}", value)]
    return [str(BIN / "anomalib"), "train", "--model", "isstad", *MODEL_FLAGS, "--model.stage1_epochs", "1",
            "--model.stage2_epochs", "1", "--data", "anomalib.data.Folder", "--data.name", "parts", "--data.root",
            str(root), *flags, "--data.num_workers", "0", "--data.train_batch_size", "4", "--data.eval_batch_size",
            "4", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--default_root_dir",
            str(out)]


def folder_parts(work: Path) -> Path:
    """``work/parts`` from real tiles: good/ (JPEG), defect/ (PNG) and masks/ (``<name>_mask.png``)."""
    tiles = make_slice(work / "tiles", n_train=6, n_good=1, defects={"crack": 2}) / "magnetic_tile"
    parts = work / "parts"
    for folder in ("good", "defect", "masks"):
        (parts / folder).mkdir(parents=True)
    for image in (tiles / "train" / "good").glob("*.png"):
        cv2.imwrite(str(parts / "good" / f"{image.stem}.jpg"), cv2.imread(str(image)))
    for image in (tiles / "test" / "crack").glob("*.png"):
        image.rename(parts / "defect" / f"crack{image.name}")
        (tiles / "ground_truth" / "crack" / f"{image.stem}_mask.png").rename(
            parts / "masks" / f"crack{image.stem}_mask.png")
    return parts


def _folder_normal_missing(work: Path) -> list[str]:
    return folder_train(folder_parts(work), work / "out", normal_dir="goood")


def _folder_normal_empty(work: Path) -> list[str]:
    parts = folder_parts(work)
    (parts / "empty").mkdir()
    return folder_train(parts, work / "out", normal_dir="empty")


def _folder_masks_without_defects(work: Path) -> list[str]:
    return folder_train(folder_parts(work), work / "out", normal_dir="good", mask_dir="masks")


def _folder_mask_missing(work: Path) -> list[str]:
    parts = folder_parts(work)
    min((parts / "masks").glob("*.png")).unlink()
    return folder_train(parts, work / "out", normal_dir="good", abnormal_dir="defect", mask_dir="masks")


def _folder_mask_of_no_image(work: Path) -> list[str]:
    parts = folder_parts(work)
    mask = min((parts / "masks").glob("*.png"))
    mask.rename(mask.with_name("scratch_mask.png"))
    return folder_train(parts, work / "out", normal_dir="good", abnormal_dir="defect", mask_dir="masks")


def _folder_pairing_by_position(work: Path) -> list[str]:
    parts = folder_parts(work)
    first, second = sorted((parts / "defect").glob("*.png"))
    first.rename(first.with_name("a.png"))
    second.rename(second.with_name("a1.png"))
    masks = sorted((parts / "masks").glob("*.png"))
    masks[0].rename(masks[0].with_name("a_mask.png"))
    masks[1].rename(masks[1].with_name("a1_mask.png"))
    return folder_train(parts, work / "out", normal_dir="good", abnormal_dir="defect", mask_dir="masks")


def _folder_truncated_jpeg(work: Path) -> list[str]:
    parts = folder_parts(work)
    image = sorted((parts / "good").glob("*.jpg"))[1]
    image.write_bytes(image.read_bytes()[:300])
    return folder_train(parts, work / "out", normal_dir="good")


def _folder_mask_other_size(work: Path) -> list[str]:
    parts = folder_parts(work)
    cv2.imwrite(str(min((parts / "masks").glob("*.png"))), np.zeros((10, 12), np.uint8))
    return folder_train(parts, work / "out", normal_dir="good", abnormal_dir="defect", mask_dir="masks")


# ---------------------------------------------------------------------------------------------------- options
def _patch_does_not_divide(work: Path) -> list[str]:
    return [*train(make_slice(work / "data", 2, 1, {"crack": 1}), work / "out"), "--model.image_size", "72"]


def _nan_learning_rate(work: Path) -> list[str]:
    return [*train(make_slice(work / "data", 2, 1, {"crack": 1}), work / "out"), "--model.stage2_lr", ".nan"]


def _negative_epochs(work: Path) -> list[str]:
    return [*train(make_slice(work / "data", 2, 1, {"crack": 1}), work / "out"), "--model.stage2_epochs", "-3"]


def _unknown_backbone(work: Path) -> list[str]:
    return [*train(make_slice(work / "data", 2, 1, {"crack": 1}), work / "out"), "--model.backbone", "vit_giant"]


def _missing_weights(work: Path) -> list[str]:
    return [*train(make_slice(work / "data", 2, 1, {"crack": 1}), work / "out"),
            "--model.weights", str(work / "mae_pretrain_vit_base.pth")]


def _foreign_weights(work: Path) -> list[str]:
    import torch

    torch.save({"model": {"conv1.weight": torch.zeros(8, 3, 3, 3)}}, work / "resnet.pth")
    return [*train(make_slice(work / "data", 2, 1, {"crack": 1}), work / "out"), "--model.weights",
            str(work / "resnet.pth")]


# ---------------------------------------------------------------------------------------------------- checkpoints
def _checkpoint_missing(work: Path) -> list[str]:
    return test_command(make_slice(work / "data", 2, 1, {"crack": 1}), work / "out", work / "model.ckpt")


def _checkpoint_truncated(work: Path) -> list[str]:
    checkpoint = tiny_checkpoint(work / "model.ckpt")
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    return test_command(make_slice(work / "data", 2, 1, {"crack": 1}), work / "out", checkpoint)


def _checkpoint_other_model(work: Path) -> list[str]:
    import lightning
    import torch
    from anomalib.models import Padim

    padim = Padim(backbone="resnet18", pre_trained=False, layers=["layer1"], n_features=32)
    torch.save({"state_dict": padim.state_dict(), "hyper_parameters": dict(padim.hparams), "epoch": 0,
                "global_step": 0, "pytorch-lightning_version": lightning.__version__}, work / "padim.ckpt")
    return test_command(make_slice(work / "data", 2, 1, {"crack": 1}), work / "out", work / "padim.ckpt")


def _checkpoint_other_size(work: Path) -> list[str]:
    checkpoint = tiny_checkpoint(work / "model.ckpt", image_size=96)
    return test_command(make_slice(work / "data", 2, 1, {"crack": 1}), work / "out", checkpoint)


def _checkpoint_other_version(work: Path) -> list[str]:
    import torch

    checkpoint = tiny_checkpoint(work / "model.ckpt")
    content = torch.load(checkpoint, weights_only=False)
    content["state_dict"] = {k.replace("model.decoder_blocks.", "model.decoder.blocks."): v
                             for k, v in content["state_dict"].items()}  # a layout this version does not have
    torch.save(content, checkpoint)
    return test_command(make_slice(work / "data", 2, 1, {"crack": 1}), work / "out", checkpoint)


# ---------------------------------------------------------------------------------------------------- outputs
def _unwritable_output(work: Path) -> list[str]:
    # permission bits do not stop root, so the folder is made impossible instead: its parent is a regular file
    (work / "results").write_text("a file, not a folder\n")
    return train(make_slice(work / "data", 4, 1, {"crack": 1}), work / "results" / "out")


def with_file_size_limit(command: list[str], limit: int) -> list[str]:
    """``anomalib`` ``command`` in a fresh process that may not write files over ``limit`` bytes: writes then fail
    part-way with ``EFBIG``, as they would on a full disk (a warm server's child sets the same limit itself)."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from anomalib.cli.cli import main; sys.argv = sys.argv[1:]; main()")
    return [sys.executable, "-c", code, "anomalib", *command[1:]]


def _disk_full(work: Path) -> list[str]:
    # a checkpoint is ~20 MB; the case's file_size_limit is 200 kB
    return train(make_slice(work / "data", 4, 1, {"crack": 1}), work / "out")


def _export_interrupted(work: Path) -> list[str]:
    # the weights are ~20 MB, the case's file_size_limit 1 MB: the export fails part-way, as on a full disk
    checkpoint = tiny_checkpoint(work / "model.ckpt")
    return [str(BIN / "anomalib"), "export", "--model", "isstad", *MODEL_FLAGS, "--ckpt_path", str(checkpoint),
            "--export_type", "openvino", "--default_root_dir", str(work / "export")]


def _partial_export(work: Path) -> list[Path]:
    return [p for p in (work / "export").rglob("*") if p.is_file()] if (work / "export").exists() else []


def _predict_into_used_folder(work: Path) -> list[str]:
    root = make_slice(work / "data", 1, 1, {"crack": 1})
    (work / "overlays").mkdir()
    (work / "overlays" / "predictions.csv").write_text("image,score\n")
    (work / "model.onnx").write_bytes(b"")
    return [str(BIN / "isstad-predict"), str(work / "model.onnx"), str(root / "magnetic_tile" / "test"), "--output",
            str(work / "overlays")]


def _predict_missing_model(work: Path) -> list[str]:
    root = make_slice(work / "data", 1, 1, {"crack": 1})
    return [str(BIN / "isstad-predict"), str(work / "model.xml"), str(root / "magnetic_tile" / "test"), "--output",
            str(work / "overlays")]


def _predict_unreadable_files(work: Path) -> list[str]:
    """A shift's folder with a truncated PNG and a text file named ``.png`` among readable images: both are named
    in one message, before the model is even read (an empty model file)."""
    shift = make_slice(work / "data", 1, 2, {"crack": 1}) / "magnetic_tile" / "test" / "good"
    good = min(shift.glob("*.png"))
    (shift / "truncated.png").write_bytes(good.read_bytes()[:300])
    (shift / "text.png").write_text("not an image\n")
    (work / "model.xml").write_bytes(b"")
    return [str(BIN / "isstad-predict"), str(work / "model.xml"), str(shift), "--output", str(work / "overlays")]


def _no_partial_predict(work: Path) -> list[Path]:
    return [p for p in work.glob("overlays*") if p.name != "overlays" or any(p.iterdir()) is False]


CASES: list[Case] = [
    Case("data-root-missing", "`--data.root` names a folder that does not exist", _missing_root,
         r"no-such-folder/magnetic_tile does not exist.*--data\.root"),
    Case("mvtec-download-offline", "a known MVTec AD category that is not on disk, with no network",
         _offline_download, r"datasets/bottle does not exist.*cannot be downloaded", env={"HF_HUB_OFFLINE": "1"}),
    Case("train-folder-empty", "`train/good` holds no images", _empty_train,
         r"no images \(.*train/good\)"),
    Case("image-truncated", "a truncated training image", _truncated_image, r"001\.png: cannot be read"),
    Case("image-not-an-image", "a text file saved as `.png`", _not_an_image, r"notes\.png: cannot be read"),
    Case("mask-missing", "a defective test image without its mask file", _missing_mask,
         r"ground_truth/crack/\w+_mask\.png.*missing"),
    Case("mask-other-size", "a mask of another size than its image", _mask_other_size,
         r"_mask\.png: mask is 12x10 but its image"),
    Case("image-rgba-transparent", "an RGBA image with transparent pixels", _rgba_transparent,
         r"000\.png: transparent pixels"),
    Case("image-16-bit", "a 16-bit image with values above 255", _sixteen_bit, r"16-bit image .* convert it to 8-bit"),
    Case("image-float", "a 32-bit float image (TIFF data under a `.png` name)", _float_image,
         r"000\.png: unsupported pixel mode 'F'"),
    Case("image-not-png", "a `.jpg` among the `.png` files (anomalib's MVTec AD reads only `.png`)", _not_png,
         r"000\.jpg.*only \.png"),
    Case("image-decompression-bomb", "a PNG header claiming 30000 x 30000 pixels", _decompression_bomb,
         r"huge\.png: .*900 megapixels"),
    Case("folder-normal-missing", "`Folder`: `--data.normal_dir` names a folder that does not exist",
         _folder_normal_missing, r"--data\.normal_dir .*parts/goood does not exist"),
    Case("folder-normal-empty", "`Folder`: the good-image folder holds no image", _folder_normal_empty,
         r"--data\.normal_dir .*parts/empty holds no image anomalib reads"),
    Case("folder-masks-without-defects", "`Folder`: `--data.mask_dir` without `--data.abnormal_dir`",
         _folder_masks_without_defects, r"--data\.mask_dir .*without --data\.abnormal_dir"),
    Case("folder-mask-missing", "`Folder`: a defective image without its mask", _folder_mask_missing,
         r"defect/crack\w+\.png has no mask"),
    Case("folder-mask-of-no-image", "`Folder`: a mask whose name matches no defective image",
         _folder_mask_of_no_image, r"scratch_mask\.png is a mask of no image"),
    Case("folder-pairing-by-position", "`Folder`: names that anomalib's pairing by sorted position would mismatch",
         _folder_pairing_by_position, r"defect/a1\.png would get .*masks/a_mask\.png"),
    Case("folder-image-truncated", "`Folder`: a truncated JPEG among the good images", _folder_truncated_jpeg,
         r"good/\w+\.jpg: cannot be read"),
    Case("folder-mask-other-size", "`Folder`: a mask of another size than its image", _folder_mask_other_size,
         r"_mask\.png: mask is 12x10 but its image"),
    Case("image-size-patch", "`--model.image_size 72` with 16 px patches", _patch_does_not_divide,
         r"image_size=72 is not a multiple of patch_size=16"),
    Case("learning-rate-nan", "`--model.stage2_lr .nan`", _nan_learning_rate, r"stage2_lr must be a finite number > 0"),
    Case("epochs-negative", "`--model.stage2_epochs -3`", _negative_epochs, r"stage2_epochs >= 1, got .*-3"),
    Case("backbone-unknown", "`--model.backbone vit_giant`", _unknown_backbone, r"backbone 'vit_giant'.*one of"),
    Case("weights-missing", "`--model.weights` names a file that does not exist", _missing_weights,
         r"mae_pretrain_vit_base\.pth"),
    Case("weights-foreign", "`--model.weights` is a ResNet state dict", _foreign_weights, r"resnet\.pth"),
    Case("checkpoint-missing", "`--ckpt_path` names a file that does not exist", _checkpoint_missing,
         r"(not found: |file ).*model\.ckpt"),
    Case("checkpoint-truncated", "a truncated checkpoint (an interrupted copy)", _checkpoint_truncated,
         r"model\.ckpt.*(truncated|cannot be read)"),
    Case("checkpoint-other-model", "a checkpoint of anomalib's Padim", _checkpoint_other_model,
         r"not written by Isstad"),
    Case("checkpoint-other-size", "a checkpoint trained at `image_size` 96, tested at 64", _checkpoint_other_size,
         r"image_size.*96.*64"),
    Case("checkpoint-other-version", "a checkpoint whose network layout another version wrote",
         _checkpoint_other_version, r"model\.ckpt.*(layout|keys)"),
    Case("output-unwritable", "`--default_root_dir` cannot be created (anomalib's own message)", _unwritable_output,
         r"Not a directory: .*results/out", leftovers=_checkpoints),
    Case("disk-full", "the disk fills while a checkpoint is written", _disk_full,
         r"\.ckpt.*(disk|File too large)", leftovers=_checkpoints, file_size_limit=200_000),
    Case("export-interrupted", "`anomalib export` fails part-way (the disk fills)", _export_interrupted,
         r"Export into <work>/export failed.*nothing was written there", leftovers=_partial_export,
         file_size_limit=1_000_000),
    Case("predict-output-used", "`isstad-predict` into a folder that holds an earlier run", _predict_into_used_folder,
         r"overlays.*--overwrite"),
    Case("predict-model-missing", "`isstad-predict` with a model file that does not exist", _predict_missing_model,
         r"model\.xml does not exist"),
    Case("predict-unreadable-files", "`isstad-predict` on a folder with a truncated PNG and a text file named .png",
         _predict_unreadable_files, r"2 unreadable image file.*text\.png.*truncated\.png.*--skip-unreadable"),
]

OTHER_TESTS = [
    ("SIGKILL in stage 1 and in stage 2, then `--ckpt_path` to resume", "resumes in the recorded stage and epoch",
     "tests/test_reliability.py::test_sigkill_in_stage_1_and_stage_2_then_resume"),
    ("a NaN loss (learning rate far too high)", "stops at once, naming the step, the stage and the likely causes",
     "tests/test_reliability.py::test_nan_loss_stops_training_with_step_and_cause"),
    ("`isstad-predict` on folders holding non-image files", "lists every skipped file",
     "tests/test_export.py"),
    ("`isstad-predict --skip-unreadable` on a folder with unreadable files",
     ("scores the rest; each unreadable file is a row of predictions.csv (`status` `unreadable: <why>`) and a card "
      "of report.html, never dropped"),
     "tests/test_export.py::test_the_report_shows_every_image_in_score_order_in_a_real_browser"),
    ("a broken plugin install (`import isstad_plugin` fails)", "anomalib works as stock (`anomalib train --model Patchcore --print_config`, "
     "`get_model('patchcore')`); one warning names the error and the fix",
     "tests/test_patches.py::test_a_broken_plugin_leaves_anomalib_working_with_one_warning"),
    ("a library whose internal that a patch changes has moved", "that patch is skipped with one warning naming what "
     "is lost; the library stays stock", "tests/test_patches.py::test_a_patch_whose_target_moved_warns_and_changes_nothing"),
]


@dataclass
class Outcome:
    case: Case
    returncode: int
    tail: list[str]
    leftovers: list[Path]
    seconds: float

    @property
    def ok(self) -> bool:
        # whitespace-insensitive: Rich wraps long tokens (paths) anywhere, so the pattern's spaces are dropped too
        text = "".join("".join(self.tail).split())
        return self.returncode != 0 and not self.leftovers and re.search(self.case.expect.replace(" ", ""), text) is not None


def tail(output: str, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` non-blank lines of ``output``."""
    return [line.rstrip() for line in output.splitlines() if line.strip()][-lines:]


def run_case(case: Case, work: Path, timeout: int = 300, warm: WarmCommands | None = None) -> Outcome:
    """Prepare and run one case in ``work`` (a fresh folder); an ``anomalib`` or ``isstad-predict`` command of a case
    with no environment of its own runs in a child of the ``warm`` interpreter if one is given (the same process,
    less the imports: :mod:`tests.warm_commands`)."""
    work.mkdir(parents=True, exist_ok=True)
    command = case.prepare(work)
    env = {**os.environ, "COLUMNS": "120", **case.env}
    start = time.perf_counter()
    program = Path(command[0])
    if warm is not None and not case.env and program.parent == BIN and program.name in WARM_PROGRAMS:
        result = warm.run([program.name, *command[1:]], work, env, work.with_name(f"{work.name}-output"), timeout,
                          case.file_size_limit)
    else:
        if case.file_size_limit is not None:
            command = with_file_size_limit(command, case.file_size_limit)
        result = subprocess.run(command, capture_output=True, text=True, cwd=work, env=env, timeout=timeout,
                                check=False)
    seconds = time.perf_counter() - start
    out = work / "out"
    if out.exists():
        out.chmod(0o755)
    output = (result.stdout + result.stderr).replace(str(work), "<work>")
    return Outcome(case, result.returncode, tail(output), case.leftovers(work), seconds)


def pinned_by(case: Case) -> str:
    """The pytest id of ``case``'s test."""
    return f"tests/test_bad_inputs.py::test_bad_input_fails_clearly[{case.name}]"


def write_page(outcomes: list[Outcome], page: Path = PAGE) -> None:
    """Write the table of ``page`` (below :data:`MARKER`): one row per case, in :data:`CASES` order, from
    ``outcomes``; cases not run this time keep their row from the page (so ``--only`` updates some rows)."""
    text = page.read_text() if page.exists() else "# Reliability\n\n"
    head, _, table = text.partition(MARKER)
    earlier = {case.name: line.split(" | ", 2)[2].rsplit(" | ", 1)[0] for line in table.splitlines()
               for case in CASES if f"`{pinned_by(case)}`" in line}
    measured = {outcome.case.name: outcome for outcome in outcomes}
    rows = ["| # | fault | what the user sees: the message ending the output (`<work>`: the case's folder) | test |",
            "|---|---|---|---|"]
    for i, case in enumerate(CASES, 1):
        outcome = measured.get(case.name)
        if outcome is None and case.name not in earlier:
            continue
        if outcome is None:
            status, seen = "", earlier[case.name]
        else:
            starts = [j for j, line in enumerate(outcome.tail) if MESSAGE_START.match(line)]
            message = outcome.tail[starts[-1] if starts else 0:]
            seen = " ".join(" ".join(message).split()).replace("|", "\\|")
            status = "" if outcome.ok else " **(FAILS)**"
        rows.append(f"| {i} | {case.fault}{status} | {seen} | `{pinned_by(case)}` |")
    for j, (fault, seen, test) in enumerate(OTHER_TESTS, len(rows) - 1):
        rows.append(f"| {j} | {fault} | {seen} | `{test}` |")
    page.write_text(f"{head}{MARKER}\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="case names to run (default: all)")
    parser.add_argument("--publish", action="store_true",
                        help=f"write the table of {PAGE.relative_to(REPO)} (rows of cases not run are kept)")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.only or c.name in args.only]
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            outcome = run_case(case, Path(tmp) / case.name)
            outcomes.append(outcome)
            print(f"{'ok  ' if outcome.ok else 'FAIL'} {case.name} (rc {outcome.returncode}, {outcome.seconds:.0f} s)"
                  + "".join(f"\n     | {line}" for line in outcome.tail)
                  + (f"\n     leftovers: {outcome.leftovers}" if outcome.leftovers else ""), flush=True)
    if args.publish:
        write_page(outcomes)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
