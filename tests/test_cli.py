"""The installed package through the real ``anomalib`` console command: fresh interpreters where the start-up
hook or the first screen is checked, processes forked from a warm interpreter elsewhere."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, command_env
from tests.warm_commands import WarmCommands

BIN = Path(sys.executable).parent
MODEL_FLAGS = [arg for key, value in TINY_MODEL.items() for arg in (f"--model.{key}", str(value))]


def run(*command: str | Path, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                            check=False)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


COMMAND_NUMBER = itertools.count()


def warm_anomalib(warm: WarmCommands, *arguments: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """``anomalib *arguments`` in a process forked from the warm interpreter (``tests/warm_commands.py``), for tests of
    what a command does; it must succeed. Tests of what a fresh interpreter does (the start-up hook, the first
    screen) start the installed console script with :func:`run`."""
    argv = ["anomalib", *map(str, arguments)]
    result = warm.run(argv, cwd, command_env(), cwd / "output" / str(next(COMMAND_NUMBER)))
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def python(code: str) -> str:
    return run(sys.executable, "-c", code).stdout.strip()


def data_flags(root: Path) -> list[str]:
    return ["--data", "anomalib.data.MVTecAD", "--data.root", str(root), "--data.category", "magnetic_tile",
            "--data.num_workers", "0", "--data.train_batch_size", "8", "--data.eval_batch_size", "8"]


@pytest.fixture(scope="module")
def trained_checkpoint(tile_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``anomalib train --model isstad`` end to end; returns the checkpoint it wrote."""
    out = tmp_path_factory.mktemp("cli-train")
    result = run(BIN / "anomalib", "train", "--model", "isstad", *MODEL_FLAGS, "--model.stage1_epochs", "1",
                 "--model.stage2_epochs", "1", *data_flags(tile_root), "--trainer.accelerator", "cpu",
                 "--trainer.enable_progress_bar", "false", "--default_root_dir", out, cwd=out)
    for metric in ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score", "pixel_AUPRO"):
        assert metric in result.stdout + result.stderr
    checkpoints = {path.name: path for path in out.rglob("*.ckpt")}
    assert sorted(checkpoints) == ["model.ckpt", "stage1.ckpt"]  # the trained model, and the MAE after stage 1
    assert f"checkpoint written: {checkpoints['model.ckpt'].resolve()}" in result.stdout + result.stderr
    # the first screen names the network, data, stages and budget; no warning about anomalib's or Lightning's internals
    assert re.search(r"ISSTAD: vit_tiny at 64 px .* stage 1: 1 epochs .* stage 2: 1 epochs .* 2 epochs in all",
                     result.stdout + result.stderr)
    for noise in ("max_epochs` was not set", "timm.models.layers is deprecated", "dinov2 package is deprecated",
                  "LeafSpec", "passed to Trainer: ModelCheckpoint", "weights_only` was not set"):
        assert noise not in result.stdout + result.stderr, noise
    return checkpoints["model.ckpt"]


@pytest.mark.parametrize("spelling", ["Isstad", "isstad_plugin.Isstad"])
def test_model_spellings_resolve_in_the_cli(spelling: str, tile_root: Path, tmp_path: Path,
                                           warm: WarmCommands) -> None:
    """Forked from the warm interpreter, whose start-up hook ran when it imported anomalib (a fresh interpreter's
    hook: :func:`test_get_model_after_import_anomalib_alone`)."""
    result = warm_anomalib(warm, "train", "--model", spelling, *MODEL_FLAGS, *data_flags(tile_root), "--print_config",
                           cwd=tmp_path)
    assert "class_path: isstad_plugin" in result.stdout
    assert "backbone: vit_tiny" in result.stdout


def test_an_option_that_disagrees_with_the_checkpoint_fails_in_one_line(trained_checkpoint: Path, tile_root: Path,
                                                                       tmp_path: Path, warm: WarmCommands) -> None:
    """The checkpoint provides every option (the README's test/predict/export lines rely on it and run in
    ``tests/test_doc_commands.py``); an option given with another value fails, its last line naming both values."""
    result = warm.run(["anomalib", "test", "--model", "isstad", "--model.image_size", "96", "--ckpt_path",
                       str(trained_checkpoint), *map(str, data_flags(tile_root)), "--trainer.accelerator", "cpu",
                       "--default_root_dir", str(tmp_path / "conflict")], tmp_path, command_env(), tmp_path / "output",
                      timeout=300)
    assert result.returncode != 0
    last = (result.stdout + result.stderr).strip().splitlines()[-1]
    assert "trained with image_size=64 (given: 96)" in last, last


def test_get_model_after_import_anomalib_alone() -> None:
    """One fresh interpreter that imports only anomalib: both spellings of ``get_model`` find the plugin."""
    out = python("import json, anomalib.models as M; m = M.get_model('isstad', backbone='vit_tiny', image_size=64, "
                 "decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4); print(type(m).__module__, m.name); "
                 "m = M.get_model({'class_path': 'isstad_plugin.Isstad', 'init_args': {'backbone': 'vit_tiny', "
                 "'image_size': 64, 'decoder_embed_dim': 64, 'decoder_depth': 1, 'decoder_num_heads': 4}}); "
                 "print(m.name); print(json.dumps(sorted(M.ALLOWED_MODULES)))")
    by_name, name, allowed = out.splitlines()[-3:]
    assert by_name.endswith("Isstad")
    assert name == "Isstad"
    # only our own package was added to anomalib's import allow-list
    added = {module for module in json.loads(allowed) if not module.startswith("anomalib.")}
    assert {"isstad_plugin", "isstad_plugin.models.isstad"} <= added
    assert all(module == "isstad_plugin" or module.startswith("isstad_plugin.models") for module in added)


def test_startup_hook_costs_nothing_without_anomalib() -> None:
    """A process that never imports anomalib loads only the tiny hook module: no torch, no plugin."""
    out = python("import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
                 "{'isstad_plugin', 'isstad_plugin_hook', 'torch', 'anomalib', 'importlib_metadata'}))")
    assert out == "['isstad_plugin_hook']"


def printed_metrics(output: str) -> dict[str, float]:
    """The metrics of anomalib's printed test table (``│ image_AUROC │ 0.53 │``)."""
    return {name: float(value) for name, value in re.findall(r"│\s*(\w+_\w+)\s*│\s*([-0-9.e]+)\s*│", output)}


def test_seed_everything_takes_effect_for_our_models(tile_root: Path, tmp_path: Path, warm: WarmCommands) -> None:
    """anomalib 2.7 parses seed_everything but never applies it; with our models it is applied: the same seed
    gives the same metrics (MAE masks, crops and corruption all follow it), another seed other metrics."""
    def train(seed: int, name: str) -> dict[str, float]:
        result = warm_anomalib(warm, "train", "--model", "isstad", *MODEL_FLAGS, "--model.stage1_epochs", "1",
                               "--model.stage2_epochs", "1", *data_flags(tile_root), "--trainer.accelerator", "cpu",
                               "--trainer.enable_progress_bar", "false", "--seed_everything", str(seed),
                               "--default_root_dir", tmp_path / name, cwd=tmp_path)
        metrics = printed_metrics(result.stdout)
        assert set(metrics) >= {"image_AUROC", "pixel_AUROC", "pixel_AUPRO"}, result.stdout[-2000:]
        return metrics

    first, again, other = train(3, "a"), train(3, "b"), train(4, "c")
    assert first == again
    assert first != other


def test_int8_export_keeps_the_map_smoothing_in_float(trained_checkpoint: Path, tile_root: Path, tmp_path: Path,
                                                      warm: WarmCommands) -> None:
    """``anomalib export --compression_type INT8_PTQ`` with a datamodule: the graph is quantized (FakeQuantize before
    the network's matrix products) except the single-channel smoothing convolutions, and its anomaly maps follow the
    floating-point model's. ``INT8_ACQ`` keeps image and pixel AUROC on the validation images (here the test images:
    anomalib's default ``same_as_test``) within its ``max_drop`` of 0.01.

    The floating-point reference is the checkpoint's torch model, not a third (FP32 OpenVINO) export: the two give
    the same maps within 1e-4 (``tests/test_export.py``), far inside these bounds."""
    import numpy as np
    import openvino as ov
    import torch
    from anomalib.data.utils import read_image, read_mask
    from anomalib.deploy import OpenVINOInferencer
    from sklearn.metrics import roc_auc_score
    from torchvision.transforms.v2.functional import resize
    from torchvision.tv_tensors import Mask

    from isstad_plugin import Isstad
    from isstad_plugin.deploy import openvino_config

    paths = {}
    for name, extra in (("int8", ["--compression_type", "INT8_PTQ", *data_flags(tile_root)]),
                        ("acq", ["--compression_type", "INT8_ACQ", *data_flags(tile_root)])):
        result = warm_anomalib(warm, "export", "--model", "isstad", "--ckpt_path", trained_checkpoint,
                               "--export_type", "openvino", "--default_root_dir", tmp_path / name, *extra, cwd=tmp_path)
        paths[name] = tmp_path / name / "weights" / "openvino" / "model.xml"
    # anomalib's export substitutes image F1 for a missing metric; ours bounds both AUROCs instead
    assert "INT8_ACQ: bounding image and pixel AUROC" in result.stdout + result.stderr
    graph = ov.Core().read_model(paths["int8"])
    quantized = {op.get_friendly_name(): [i.get_source_output().get_node().get_type_name() for i in op.inputs()]
                 for op in graph.get_ordered_ops() if op.get_type_name() in {"MatMul", "Convolution"}}
    smoothing = [name for name, op in ((op.get_friendly_name(), op) for op in graph.get_ordered_ops())
                 if op.get_type_name() == "Convolution" and op.input_value(1).get_partial_shape()[0].get_length() == 1]
    assert sum("FakeQuantize" in inputs for inputs in quantized.values()) >= 10
    assert smoothing and all("FakeQuantize" not in quantized[name] for name in smoothing)
    images = sorted((tile_root / "magnetic_tile" / "test").rglob("*.png"))
    labels = [image.parent.name != "good" for image in images]
    # read and resized as the datamodule does for ACQ's evaluations (anomalib's readers, torchvision's resize)
    truth = tile_root / "magnetic_tile" / "ground_truth"
    inputs = [resize(read_image(image, as_tensor=True), [64, 64], antialias=True)[None].numpy() for image in images]
    masks = np.stack([resize(Mask(read_mask(truth / image.parent.name / f"{image.stem}_mask.png", as_tensor=True)),
                             [64, 64]).numpy() > 0 if label else np.zeros((64, 64), bool)
                      for image, label in zip(images, labels, strict=True)])
    inferencers = {name: OpenVINOInferencer(path=path, device="CPU", config=openvino_config("f32"))
                   for name, path in paths.items()}  # compiled once per model, not once per image
    outputs = {name: [inferencer.predict(array) for array in inputs] for name, inferencer in inferencers.items()}
    scores = {name: [float(np.asarray(p.pred_score).ravel()[0]) for p in predictions]
              for name, predictions in outputs.items()}
    maps = {name: np.stack([np.asarray(p.anomaly_map).ravel() for p in predictions])
            for name, predictions in outputs.items()}
    reference = Isstad.load_from_checkpoint(trained_checkpoint, map_location="cpu").eval()
    with torch.no_grad():
        batches = [reference(torch.from_numpy(array)) for array in inputs]  # the export's graph: pre/post-processing
    scores["fp32"] = [float(batch.pred_score.ravel()[0]) for batch in batches]
    maps["fp32"] = np.stack([batch.anomaly_map.numpy().ravel() for batch in batches])
    auroc = {name: (roc_auc_score(labels, scores[name]), roc_auc_score(masks.ravel(), maps[name].ravel()))
             for name in maps}
    assert np.corrcoef(maps["fp32"].ravel(), maps["int8"].ravel())[0, 1] > 0.9
    assert auroc["acq"][0] >= auroc["fp32"][0] - 0.01 - 1e-6, auroc  # ACQ's bound, on its own validation images
    assert auroc["acq"][1] >= auroc["fp32"][1] - 0.01 - 1e-6, auroc
