"""Cutpaste through the real ``anomalib`` command, anomalib's model look-ups, and ONNX / OpenVINO export parity."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from torchvision.io import ImageReadMode, read_image

from isstad_plugin import Cutpaste
from isstad_plugin.deploy import openvino_config
from tests.conftest import REPO, command_env
from tests.parity import assert_decisions_agree
from tests.warm_commands import WarmCommands

BIN = Path(sys.executable).parent
METRICS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score", "pixel_AUPRO")
SIZE = 64
TINY_FLAGS = ["--model.image_size", str(SIZE), "--model.patch_size", "16", "--model.patch_stride", "8",
              "--model.max_epochs", "1"]


def run(*command: str | Path, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                            check=False)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def data_flags(root: Path) -> list[str]:
    return ["--data.root", str(root), "--data.num_workers", "0", "--data.train_batch_size", "8",
            "--data.eval_batch_size", "8"]


@pytest.fixture(scope="module")
def trained_checkpoint(tile_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``anomalib train -c configs/cutpaste_tiny.yaml --model cutpaste`` at 64 px for one epoch; its checkpoint."""
    out = tmp_path_factory.mktemp("cutpaste-cli")
    result = run(BIN / "anomalib", "train", "-c", REPO / "configs" / "cutpaste_tiny.yaml", "--model", "cutpaste",
                 *TINY_FLAGS, *data_flags(tile_root), "--trainer.enable_progress_bar", "false",
                 "--default_root_dir", out, cwd=out)
    log = result.stdout + result.stderr
    for metric in METRICS:
        assert metric in log
    # no trainer budget in the config: the model's is used, and Lightning announces no default of 1000 epochs
    assert re.search(r"CutPaste: .* 1 epochs", log) and "max_epochs` was not set" not in log
    assert "Gaussians fitted on 16 images" in log
    checkpoints = list(out.rglob("*.ckpt"))
    assert len(checkpoints) == 1
    return checkpoints[0]


def test_cli_train_and_test_report_all_metrics(trained_checkpoint: Path) -> None:
    state = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert bool(state["model.image_density.fitted"]) and bool(state["model.patch_density.fitted"])


@pytest.mark.parametrize("spelling", ["Cutpaste", "isstad_plugin.Cutpaste"])
def test_model_spellings_resolve_in_the_cli(spelling: str, tile_root: Path, tmp_path: Path,
                                           warm: WarmCommands) -> None:
    """The real ``anomalib`` command, forked from the warm interpreter (the start-up hook ran when it imported
    anomalib; a fresh interpreter's hook: ``test_get_model_finds_cutpaste_after_import_anomalib_alone``)."""
    argv = ["anomalib", "train", "--model", spelling, *map(str, TINY_FLAGS), "--data", "anomalib.data.MVTecAD",
            "--data.category", "magnetic_tile", *map(str, data_flags(tile_root)), "--print_config"]
    result = warm.run(argv, tmp_path, command_env(), tmp_path / "output")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "class_path: isstad_plugin.Cutpaste" in result.stdout
    assert "patch_stride: 8" in result.stdout


@pytest.mark.parametrize("name", ["cutpaste.yaml", "cutpaste_tiny.yaml", "cutpaste_cpu.yaml"])
def test_configs_list_every_constructor_option(name: str) -> None:
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    assert config["model"]["class_path"] == "isstad_plugin.Cutpaste"
    init_args = config["model"]["init_args"]
    options = set(inspect.signature(Cutpaste).parameters) - {"pre_processor", "post_processor", "evaluator",
                                                            "visualizer"}
    assert set(init_args) == options
    assert "max_epochs" not in config.get("trainer", {})  # the model's budget applies unless the user sets one
    Cutpaste(**init_args)  # constructs offline, pretrained or not


def test_get_model_finds_cutpaste_after_import_anomalib_alone() -> None:
    code = ("import anomalib.models; m = anomalib.models.get_model('cutpaste', pretrained=False, image_size=64, "
            "patch_size=16); print(type(m).__module__, m.name)")
    assert run(sys.executable, "-c", code).stdout.strip().endswith("Cutpaste")


def real_images(root: Path, n: int = 6) -> torch.Tensor:
    """Test images (good and defective) of the slice, RGB in [0, 1], resized to the model size."""
    files = sorted((root / "magnetic_tile" / "test").rglob("*.png"))[::2][:n]
    return torch.cat([
        F.interpolate(read_image(str(f), ImageReadMode.RGB)[None].float() / 255, size=(SIZE, SIZE),
                      mode="bilinear", antialias=True).clamp(0, 1)
        for f in files
    ])


def assert_parity(outputs: dict[str, np.ndarray], reference: object) -> None:
    """Scores and maps within 1e-4 relative; labels and masks equal except on the threshold itself."""
    for name in ("pred_score", "anomaly_map"):
        expected = getattr(reference, name).numpy()
        np.testing.assert_allclose(outputs[name], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    expected = {name: getattr(reference, name).numpy() for name in ("pred_score", "anomaly_map", "pred_label",
                                                                    "pred_mask")}
    assert_decisions_agree(outputs, expected, margin=1e-4)


def test_checkpoint_from_before_the_separable_smoothing_loads(trained_checkpoint: Path, tile_root: Path,
                                                               tmp_path: Path) -> None:
    """Checkpoints written before the separable smoothing hold anomalib's 2-D blur kernel (``model.blur.kernel``):
    ``load_from_checkpoint`` (what ``anomalib test|export --ckpt_path`` runs) must load them and score as before."""
    from anomalib.models.components import GaussianBlur2d

    checkpoint = torch.load(trained_checkpoint, map_location="cpu", weights_only=False)  # the fixture's own file
    sigma = checkpoint["hyper_parameters"]["score_sigma"]
    checkpoint["state_dict"]["model.blur.kernel"] = GaussianBlur2d(sigma=sigma, channels=1).kernel
    old = tmp_path / "before-separable.ckpt"
    torch.save(checkpoint, old)
    images = real_images(tile_root)
    with torch.no_grad():
        expected = Cutpaste.load_from_checkpoint(trained_checkpoint, map_location="cpu").eval()(images)
        loaded = Cutpaste.load_from_checkpoint(old, map_location="cpu").eval()(images)
    torch.testing.assert_close(loaded.anomaly_map, expected.anomaly_map)
    torch.testing.assert_close(loaded.pred_score, expected.pred_score)


def test_onnx_and_openvino_exports_match_torch(trained_checkpoint: Path, tile_root: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    import openvino as ov

    model = Cutpaste.load_from_checkpoint(trained_checkpoint, map_location="cpu").eval()  # offline reload
    images = real_images(tile_root)
    with torch.no_grad():
        reference = model(images)  # pre-processor, model, post-processor: what the exported graph holds
    engine = Engine()

    onnx_path = engine.export(model, ExportType.ONNX, export_root=tmp_path, input_size=(SIZE, SIZE))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    values = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    assert_parity({o.name: v for o, v in zip(session.get_outputs(), values, strict=True)}, reference)

    xml_path = engine.export(model, ExportType.OPENVINO, export_root=tmp_path, input_size=(SIZE, SIZE))
    compiled = ov.Core().compile_model(str(xml_path), "CPU", openvino_config("f32"))
    result = compiled(images.numpy())
    assert_parity({port.get_any_name(): result[port] for port in compiled.outputs}, reference)
