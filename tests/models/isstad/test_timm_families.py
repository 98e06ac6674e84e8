"""Weights of timm's ViT families in ISSTAD's encoder: ``position_embedding: learned``, parity with timm on the real
ImageNet ViT-Tiny, and each family a user would bring (state dicts in timm's exact key format, random values),
loaded or refused naming what differs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from isstad_plugin import Isstad
from isstad_plugin.models.isstad.optim import weight_decay_groups
from isstad_plugin.models.isstad.torch_model import IsstadModel, sincos_position_embedding
from isstad_plugin.models.isstad.weights import load_weights
from tests.conftest import SHARED_DATA

IMAGENET_VIT_TINY = SHARED_DATA.parent / "weights" / "vit_tiny_patch16_224_in1k" / "model.safetensors"
TAG = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
SYMMETRIC = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # the file's input scaling ([-1, 1])
TOKENS_TOLERANCE = 1e-5
SMALL_DECODER = {"decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 4}


def imagenet_vit_tiny() -> Path:
    """The shared ImageNet ViT-Tiny/16 (``../shared/weights``); a test that needs it fails (never skips) without it."""
    if not IMAGENET_VIT_TINY.is_file():
        pytest.fail(f"The offline ImageNet ViT-Tiny is not at {IMAGENET_VIT_TINY}: put the shared folder beside the "
                    "checkout (../shared, its weights/README.md).")
    return IMAGENET_VIT_TINY


def learned_model(size: int, backbone: str = "vit_tiny", **kwargs) -> IsstadModel:
    return IsstadModel(backbone, image_size=(size, size), position_embedding="learned", **SMALL_DECODER,
                       **kwargs).eval()


def real_images(size: int) -> torch.Tensor:
    """Four real images of the shared data sets, ``[4, 3, size, size]`` in [0, 1]."""
    from anomalib.data.utils import read_image
    from torchvision.transforms.v2.functional import resize

    files = [*sorted((SHARED_DATA / "magnetic_tile" / "test").rglob("*.png"))[:2],
             *sorted((SHARED_DATA / "kolektorsdd" / "test").rglob("*.png"))[:1],
             *sorted((SHARED_DATA / "bsdata_pitting" / "test").rglob("*.png"))[:1]]
    assert len(files) == 4, files
    return torch.stack([resize(read_image(file, as_tensor=True), [size, size], antialias=True) for file in files])


def our_tokens(model: IsstadModel, images: torch.Tensor) -> torch.Tensor:
    """The encoder's tokens ``[B, 1 + L, E]`` of ``[B, 3, H, W]`` images in [0, 1]."""
    with torch.no_grad():
        return model.forward_encoder(model.normalize(images))[0]


def timm_tokens(network: nn.Module, model: IsstadModel, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return network.forward_features(model.normalize(images))


def timm_family(name: str, size: int, **kwargs) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """A timm state dict of ``name`` at 224 px (random values, learned-looking positions), and timm's own network at
    ``size`` px with that state loaded as timm loads a pretrained file (``checkpoint_filter_fn`` resamples)."""
    torch.manual_seed(0)
    state = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    state["pos_embed"] = 0.02 * torch.randn_like(state["pos_embed"])
    network = timm.create_model(name, pretrained=False, img_size=size, **kwargs).eval()
    network.load_state_dict(checkpoint_filter_fn(dict(state), network))
    return state, network


def load_logged(model: IsstadModel, weights: str | Path, caplog: pytest.LogCaptureFixture) -> tuple[object, str]:
    with caplog.at_level(logging.INFO, logger="isstad_plugin.models.isstad"):
        report = load_weights(model, weights)
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("ISSTAD weights")]
    assert len(lines) == 1, lines
    return report, lines[0]


# ---------------------------------------------------------------------- the real ImageNet file
@pytest.mark.parametrize("size", [224, 128])
def test_the_imagenet_vit_tiny_computes_timms_tokens_and_classes(size: int, caplog: pytest.LogCaptureFixture) -> None:
    """At 224 px the file's own grid (14 x 14) is copied; at 128 px it is resampled to 8 x 8 as timm resamples it
    for ``img_size=128``. Either way our tokens are timm's ``forward_features`` and, through the file's ImageNet head
    on our cls token, the classes timm's network gives."""
    file = imagenet_vit_tiny()
    model = learned_model(size, **SYMMETRIC)
    report, line = load_logged(model, f"timm:{TAG}@{file}", caplog)
    grid = size // 16
    expected = ("learned position embedding pos_embed copied (file grid 14x14)" if size == 224 else
                f"learned position embedding pos_embed resampled from the file's 14x14 grid to {grid}x{grid} "
                "(timm's resample_abs_pos_embed, bicubic)")
    assert expected in line
    assert "pos_embed" in report.loaded and report.ignored == ["head.weight", "head.bias"]
    network = timm.create_model(TAG, pretrained=True, img_size=size, pretrained_cfg_overlay={"file": str(file)}).eval()
    images = real_images(size)
    ours = our_tokens(model, images)
    torch.testing.assert_close(ours, timm_tokens(network, model, images), rtol=0, atol=TOKENS_TOLERANCE)
    head = load_file(file)
    with torch.no_grad():
        logits = torch.nn.functional.linear(ours[:, 0], head["head.weight"], head["head.bias"])
        reference = network(model.normalize(images))
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4)
    assert torch.equal(logits.argmax(1), reference.argmax(1))


def test_a_sincos_model_refuses_learned_positions_naming_the_option() -> None:
    with pytest.raises(ValueError, match=r"pos_embed .* is not MAE's fixed 2-D sin-cos embedding for a 14x14 grid"
                                         r".*position_embedding: learned \(--model\.position_embedding learned\)"):
        load_weights(IsstadModel("vit_tiny", image_size=(64, 64), **SMALL_DECODER),
                     f"timm:{TAG}@{imagenet_vit_tiny()}")


# ---------------------------------------------------------------------- families a user would bring
FAMILIES = {  # name: (timm model, kwargs, our backbone, how our tokens relate to timm's forward_features)
    "deit": ("deit_tiny_patch16_224", {}, "vit_tiny"),
    "dino": ("vit_small_patch16_224", {"num_classes": 0}, "vit_small"),  # timm's .dino tags: this architecture
    "no_embed_class": ("vit_tiny_patch16_224", {"no_embed_class": True}, "vit_tiny"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plain_vit_families_compute_timms_tokens_at_another_size(family: str, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """DeiT, DINO (headless) and a ViT without a cls position, saved as timm's state dicts, loaded at 64 px."""
    name, kwargs, backbone = FAMILIES[family]
    state, network = timm_family(name, 64, **kwargs)
    path = tmp_path / f"{family}.pth"
    torch.save(state, path)
    model = learned_model(64, backbone)
    report, line = load_logged(model, path, caplog)
    assert "resampled from the file's 14x14 grid to 4x4" in line
    assert ("the file has no cls position" in line) == (family == "no_embed_class")
    assert not [key for key in report.ignored if not key.startswith("head")]
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(our_tokens(model, images), timm_tokens(network, model, images), rtol=0,
                               atol=TOKENS_TOLERANCE)


def test_a_global_pool_vit_gives_its_fc_norm_as_the_final_norm(tmp_path: Path) -> None:
    """timm's ``global_pool='avg'`` ViT has no final norm (``norm`` is an identity) and normalises the pooled token
    with ``fc_norm``: our tokens are ``fc_norm`` applied to each of timm's."""
    state, network = timm_family("vit_tiny_patch16_224", 64, global_pool="avg")
    assert "fc_norm.weight" in state and "norm.weight" not in state
    torch.save(state, tmp_path / "gap.pth")
    model = learned_model(64)
    report = load_weights(model, tmp_path / "gap.pth")
    assert report.renamed == {"fc_norm.weight": "norm.weight", "fc_norm.bias": "norm.bias"}
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = network.fc_norm(timm_tokens(network, model, images))
    torch.testing.assert_close(our_tokens(model, images), expected, rtol=0, atol=TOKENS_TOLERANCE)


def test_deit_distilled_drops_its_distillation_token_and_says_so(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """DeiT's distillation token (second prefix token, with its position) has no place in ISSTAD's encoder: it is
    dropped, listed as ignored and named in the log line; the cls and patch positions come from their own slots."""
    state, _ = timm_family("deit_tiny_distilled_patch16_224", 224)
    assert state["pos_embed"].shape[1] == 2 + 14 * 14
    torch.save(state, tmp_path / "deit_distilled.pth")
    model = learned_model(224)
    report, line = load_logged(model, tmp_path / "deit_distilled.pth", caplog)
    assert "dropped dist_token (DeiT's distillation token: this encoder has the cls token only) and its position" \
        in line
    assert {"dist_token", "head_dist.weight", "head_dist.bias"} <= set(report.ignored)
    expected = torch.cat([state["pos_embed"][:, :1], state["pos_embed"][:, 2:]], dim=1)
    assert torch.equal(model.pos_embed.detach(), expected)
    assert torch.equal(model.cls_token.detach(), state["cls_token"])


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"reg_tokens": 4, "no_embed_class": True}, r"register tokens \(reg_token \(1\)\)"),
    ({"init_values": 1e-5}, r"LayerScale \(ls1/ls2\) \(blocks\.0-11 \(24\)\)"),
    ({"qk_norm": True}, r"QK-norm \(blocks\.0-11 \(48\)\)"),
    ({"pre_norm": True}, r"a pre-norm before the blocks \(norm_pre\) \(norm_pre \(2\)\)"),
], ids=["register-tokens", "layer-scale", "qk-norm", "pre-norm"])
def test_families_with_parts_the_encoder_lacks_are_refused_naming_them(kwargs: dict, named: str,
                                                                       tmp_path: Path) -> None:
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).state_dict(), tmp_path / "f.pth")
    model = learned_model(64)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"come from a ViT family with encoder parts that ISSTAD's network .* does "
                                         rf"not have: {named}"):
        load_weights(model, tmp_path / "f.pth")
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())  # untouched


def test_a_patch_14_vit_is_refused_naming_the_patch_size(tmp_path: Path) -> None:
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_size=14).state_dict(),
               tmp_path / "p14.pth")
    with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight \[192, 3, 14, 14\] vs \[192, 3, 16, 16\].*"
                                         r"backbone='vit_tiny', patch_size=14"):
        load_weights(learned_model(64), tmp_path / "p14.pth")


# ---------------------------------------------------------------------- learned positions in training and files
def test_learned_positions_train_in_stage_1_freeze_in_stage_2_without_weight_decay() -> None:
    model = learned_model(64)
    assert isinstance(model.pos_embed, nn.Parameter)
    torch.testing.assert_close(model.pos_embed.detach(), sincos_position_embedding(192, (4, 4)))  # its start
    assert any(parameter is model.pos_embed for parameter in model.encoder_parameters())
    model.freeze_encoder(frozen=True)
    assert not model.pos_embed.requires_grad
    model.freeze_encoder(frozen=True, trainable_blocks=12)  # the whole encoder trains
    assert model.pos_embed.requires_grad
    model.freeze_encoder(frozen=False)
    groups = weight_decay_groups(model, 0.05, lambda _: True)
    no_decay = next(group for group in groups if group["weight_decay"] == 0.0)
    assert any(parameter is model.pos_embed for parameter in no_decay["params"])
    fixed = IsstadModel("vit_tiny", image_size=(64, 64), **SMALL_DECODER)
    assert "pos_embed" in dict(fixed.named_buffers()) and "pos_embed" not in dict(fixed.named_parameters())


def test_learned_positions_travel_through_the_checkpoint_onnx_and_openvino(tmp_path: Path) -> None:
    """A learned embedding unlike any sin-cos one: restored by ``Isstad.load_from_checkpoint`` from a file in the
    layout Lightning writes (the option comes back from the hyper-parameters, the values from the state), and the
    ONNX file and its OpenVINO conversion (what ``to_openvino`` converts) give the torch model's map and score."""
    import lightning
    import numpy as np
    import onnxruntime
    import openvino as ov

    from isstad_plugin.deploy import openvino_config

    options = {"backbone": "vit_tiny", "image_size": 64, "position_embedding": "learned", **SMALL_DECODER}
    model = Isstad(**options, post_processor=False, visualizer=False, evaluator=False).eval()
    with torch.no_grad():
        shape = model.model.pos_embed.shape
        model.model.pos_embed.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    saved = Isstad(**options)  # the default components, as a training run saves them
    saved.model.load_state_dict(model.model.state_dict())
    torch.save({"state_dict": saved.state_dict(), "hyper_parameters": dict(saved.hparams),
                "pytorch-lightning_version": lightning.__version__}, tmp_path / "model.ckpt")
    restored = Isstad.load_from_checkpoint(tmp_path / "model.ckpt", map_location="cpu").model
    assert restored.position_embedding == "learned" and isinstance(restored.pos_embed, nn.Parameter)
    assert torch.equal(restored.pos_embed, model.model.pos_embed)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(images)
        sincos = Isstad(**(options | {"position_embedding": "sincos"}), post_processor=False, visualizer=False,
                        evaluator=False).eval()
        sincos.load_state_dict({k: v for k, v in model.state_dict().items() if k != "model.pos_embed"}, strict=False)
        assert not torch.allclose(sincos(images).anomaly_map, expected.anomaly_map, atol=1e-3)  # positions matter
    onnx_path = model.to_onnx(tmp_path)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    onnx_outputs = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
    compiled = ov.Core().compile_model(ov.convert_model(onnx_path), "CPU", openvino_config("f32"))
    ov_outputs = {output.get_any_name(): value for output, value in compiled(images.numpy()).items()}
    for outputs in (onnx_outputs, ov_outputs):
        np.testing.assert_allclose(outputs["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)
        np.testing.assert_allclose(outputs["pred_score"], expected.pred_score.numpy(), atol=1e-4)
