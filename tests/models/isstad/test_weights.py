"""Pretrained and reference weights: every upstream file format, the report, mismatches, Lightning round trips,
and the loaded network against an independent re-implementation of the method page.

Nothing is downloaded: each test writes small files with the key names, nesting and dtypes of the real ones
(official MAE release, the ISSTAD authors' stage-1 and stage-2 files, timm state dicts, our checkpoints),
built here from the MAE module definitions rather than from our model.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback
from torch import nn

from isstad_plugin import Isstad
from isstad_plugin.models.isstad.torch_model import IMAGENET_MEAN, IMAGENET_STD, IsstadModel
from isstad_plugin.models.isstad.weights import (
    WeightsFile,
    WeightsNotFoundError,
    apply_state,
    load_weights,
    summarize_keys,
)

PATCH = 16
TINY_DIM, TINY_DEPTH, TINY_HEADS = 192, 12, 3  # vit_tiny
DEC_DIM, DEC_DEPTH, DEC_HEADS = 64, 3, 4  # scaled-down ISSTAD decoder (upstream 512 wide, 12 blocks, 16 heads)
TINY = {"backbone": "vit_tiny", "image_size": 64, "decoder_embed_dim": DEC_DIM, "decoder_depth": DEC_DEPTH,
        "decoder_num_heads": DEC_HEADS}
# Engine runs here are about weights, not metrics: one stage-2 epoch, no visualiser or evaluator (faster).
LIGHT = TINY | {"stage1_epochs": 0, "stage2_epochs": 1, "visualizer": False, "evaluator": False}
FILE_GRID = 14  # official files are made at 224 px: a 14x14 grid, 197 position-embedding rows
WEIGHTS_LOGGER = "isstad_plugin.models.isstad"


# ---------------------------------------------------------------------- official formats, from the MAE definitions
def mae_sincos(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> np.ndarray:
    """MAE's ``get_2d_sincos_pos_embed`` (numpy): first half encodes the column, second half the row."""

    def one_dim(d: int, positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    embedding = np.concatenate([one_dim(dim // 2, cols), one_dim(dim // 2, rows)], axis=1)
    if cls_token:
        embedding = np.concatenate([np.zeros([1, dim]), embedding], axis=0)
    return embedding


def block_shapes(dim: int) -> dict[str, tuple[int, ...]]:
    """timm ``Block(dim, heads, mlp_ratio=4, qkv_bias=True)`` as used by MAE."""
    return {
        "norm1.weight": (dim,), "norm1.bias": (dim,),
        "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
        "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
        "norm2.weight": (dim,), "norm2.bias": (dim,),
        "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
        "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,),
    }


def mae_shapes(dim: int, depth: int, dec_dim: int | None = None, dec_depth: int = 0, mask_pred: bool = False,
               grid: int = FILE_GRID) -> dict[str, tuple[int, ...]]:
    """Key set and shapes of ``MaskedAutoencoderViT.state_dict()`` (facebookresearch/mae ``models_mae.py``),
    in its order; encoder only is what ``mae_pretrain_vit_*.pth`` holds. ``mask_pred`` is ISSTAD's stage-2 head."""
    tokens = grid * grid + 1
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, dim), "pos_embed": (1, tokens, dim)}
    if dec_dim:
        shapes |= {"mask_token": (1, 1, dec_dim), "decoder_pos_embed": (1, tokens, dec_dim)}
    shapes |= {"patch_embed.proj.weight": (dim, 3, PATCH, PATCH), "patch_embed.proj.bias": (dim,)}
    shapes |= {f"blocks.{i}.{k}": s for i in range(depth) for k, s in block_shapes(dim).items()}
    shapes |= {"norm.weight": (dim,), "norm.bias": (dim,)}
    if dec_dim:
        shapes |= {"decoder_embed.weight": (dec_dim, dim), "decoder_embed.bias": (dec_dim,)}
        shapes |= {f"decoder_blocks.{i}.{k}": s for i in range(dec_depth) for k, s in block_shapes(dec_dim).items()}
        shapes |= {"decoder_norm.weight": (dec_dim,), "decoder_norm.bias": (dec_dim,),
                   "decoder_pred.weight": (PATCH * PATCH * 3, dec_dim), "decoder_pred.bias": (PATCH * PATCH * 3,)}
        if mask_pred:
            shapes |= {"mask_pred.weight": (PATCH * PATCH * 2, dec_dim), "mask_pred.bias": (PATCH * PATCH * 2,)}
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0, grid: int = FILE_GRID) -> dict[str, torch.Tensor]:
    """float32 tensors: fixed sin-cos position embeddings, non-trivial norms, fan-in scaled weights."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key in {"pos_embed", "decoder_pos_embed"}:
            value = torch.from_numpy(mae_sincos(shape[-1], grid, grid)).float().unsqueeze(0)
        elif "norm" in key and key.endswith(".weight"):
            value = 1 + 0.2 * torch.randn(shape, generator=generator)
        elif len(shape) >= 2 and key != "cls_token" and key != "mask_token":
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        else:
            value = 0.1 * torch.randn(shape, generator=generator)
        state[key] = value.float()
    return state


def authors_extras(dec_dim: int = DEC_DIM) -> dict[str, torch.Tensor]:
    """The unused modules of the authors' stage-2 ``MaskedAutoencoderViT`` (upstream 512 wide), as real modules."""
    modules = nn.Module()
    modules.cross_decoder = nn.TransformerDecoderLayer(d_model=dec_dim, nhead=DEC_HEADS, batch_first=True)
    modules.multihead_attn = nn.MultiheadAttention(dec_dim, DEC_HEADS, batch_first=True)
    for i in (1, 2, 3):
        setattr(modules, f"linear_matt_{i}", nn.Linear(dec_dim, dec_dim))
    modules.mtt_norm = nn.LayerNorm(dec_dim, eps=1e-6)
    modules.self_attn = nn.MultiheadAttention(dec_dim, DEC_HEADS, batch_first=True)
    modules.linear_att_1 = nn.Linear(dec_dim, dec_dim)
    modules.linear_att_2 = nn.Linear(dec_dim, dec_dim)
    modules.linear_att_3 = nn.Linear(dec_dim, PATCH * PATCH * 3)
    modules.att_norm = nn.LayerNorm(dec_dim, eps=1e-6)
    modules.img_pos_embed = nn.Parameter(torch.zeros(1, FILE_GRID * FILE_GRID, dec_dim), requires_grad=False)
    return dict(modules.state_dict())


def stage2_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The authors' ``net_ad.pth``: a bare state dict, MAE keys + ``mask_pred`` + unused extra modules."""
    state = random_state(mae_shapes(TINY_DIM, TINY_DEPTH, DEC_DIM, DEC_DEPTH, mask_pred=True), seed)
    return state | authors_extras()


def stage1_checkpoint(dec_depth: int = 2) -> dict:
    """The authors' stage-1 ``checkpoint-0.75.pth``: ``misc.save_model`` output with the MAE state under ``model``."""
    return {
        "model": random_state(mae_shapes(TINY_DIM, TINY_DEPTH, DEC_DIM, dec_depth), seed=1),
        "optimizer": {"state": {}, "param_groups": [{"lr": 7.8e-5, "betas": (0.9, 0.95), "params": [0, 1]}]},
        "epoch": 300,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "_growth_tracker": 0},
        "args": argparse.Namespace(batch_size=20, epochs=305, model="mae_vit_large_patch16", mask_ratio=0.75,
                                   blr=1e-3, finetune="mae_visualize_vit_large.pth", distributed=False),
    }


def tiny_model(**overrides) -> IsstadModel:
    torch.manual_seed(0)
    args = {"image_size": (64, 64), "decoder_embed_dim": DEC_DIM, "decoder_depth": DEC_DEPTH,
            "decoder_num_heads": DEC_HEADS} | overrides
    return IsstadModel("vit_tiny", **args)


def save(tmp_path: Path, name: str, obj: object) -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def eval_outputs(model: IsstadModel, images: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        pixel = model.pixel_outputs(images)
        scored = model(images)
    return {"reconstruction": pixel.reconstruction, "block_logits": pixel.block_logits,
            "anomaly_map": scored.anomaly_map, "pred_score": scored.pred_score}


def assert_same_outputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def assert_accounted(report, file_keys: set[str], model: IsstadModel) -> None:
    """Every file key is loaded (possibly renamed), recomputed or ignored; every model key loaded, new or fixed."""
    renamed_back = {dst: src for src, dst in report.renamed.items()}
    consumed = {renamed_back.get(k, k) for k in report.loaded} | set(report.recomputed) | set(report.ignored)
    assert consumed == file_keys
    assert len(report.loaded) + len(report.recomputed) + len(report.ignored) == len(file_keys)
    fixed = {"pos_embed", "decoder_pos_embed"}
    assert set(report.loaded) | set(report.new) | fixed == set(model.state_dict())
    assert not set(report.loaded) & set(report.new)


# ---------------------------------------------------------------------- official MAE release
def test_mae_pretrain_encoder_only_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = random_state(mae_shapes(TINY_DIM, TINY_DEPTH))
    assert sorted({k.split(".")[0] for k in state}) == ["blocks", "cls_token", "norm", "patch_embed", "pos_embed"]
    path = save(tmp_path, "mae_pretrain_vit_tiny.pth", {"model": state})
    model = tiny_model()
    before = snapshot(model)
    with caplog.at_level(logging.INFO, logger=WEIGHTS_LOGGER):
        report = load_weights(model, path)
    assert_accounted(report, set(state), model)
    assert report.ignored == [] and report.renamed == {}
    decoder = {k for k in before if k.startswith(("mask_token", "decoder_", "mask_pred"))} - {"decoder_pos_embed"}
    assert set(report.new) == decoder
    after = model.state_dict()
    for key in report.loaded:
        assert torch.equal(after[key], state[key]), key
    for key in report.new:
        assert torch.equal(after[key], before[key]), key  # new parts keep their initialisation
    # the 14x14 file grid is checked, never copied: the model keeps its own 4x4 sin-cos grid
    assert report.recomputed == {"pos_embed": "file grid 14x14, sin-cos verified"}
    assert torch.equal(after["pos_embed"], before["pos_embed"])
    torch.testing.assert_close(after["pos_embed"][0].double(), torch.from_numpy(mae_sincos(TINY_DIM, 4, 4)))
    # one INFO line says it all
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ISSTAD weights")]
    assert len(lines) == 1
    line = lines[0]
    assert f"loaded {len(state) - 1} tensors [cls_token (1), patch_embed (2), blocks.0-11 (144), norm (2)]" in line
    assert "new (kept initialised) 45 tensors [mask_token (1), decoder_embed (2), decoder_blocks.0-2 (36)" in line
    assert "mask_pred (2)" in line and "ignored 0 tensors []" in line and "4x4 grid" in line


def test_mae_visualize_file_with_shallower_decoder(tmp_path: Path) -> None:
    """Encoder + 2-block decoder (as mae_visualize_*, scaled down) into a 3-block decoder: block 2 and the
    pixel-status head start initialised, everything else is the file's."""
    state = random_state(mae_shapes(TINY_DIM, TINY_DEPTH, DEC_DIM, dec_depth=2))
    path = save(tmp_path, "mae_visualize_vit_tiny.pth", {"model": state})
    model = tiny_model()
    before = snapshot(model)
    report = load_weights(model, path)
    assert_accounted(report, set(state), model)
    assert set(report.new) == {k for k in before if k.startswith(("decoder_blocks.2.", "mask_pred."))}
    assert set(report.recomputed) == {"pos_embed", "decoder_pos_embed"}
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in report.loaded)
    assert all(torch.equal(after[k], before[k]) for k in report.new)
    assert "decoder_blocks.2 (12), mask_pred (2)" in report.message()


def test_authors_stage1_checkpoint_with_args_namespace(tmp_path: Path) -> None:
    checkpoint = stage1_checkpoint()
    path = save(tmp_path, "checkpoint-0.75.pth", checkpoint)
    model = tiny_model()
    report = load_weights(model, path)
    assert_accounted(report, set(checkpoint["model"]), model)
    assert report.unused_entries == ["optimizer", "epoch", "scaler", "args"]
    assert "checkpoint entries not used: optimizer, epoch, scaler, args" in report.message()


def test_pickled_objects_other_than_the_allow_list_are_refused(tmp_path: Path) -> None:
    path = save(tmp_path, "evil.pth", {"model": random_state(mae_shapes(TINY_DIM, 1)), "hook": Callback()})
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_weights(tiny_model(), path)


# ---------------------------------------------------------------------- the authors' stage-2 network
@pytest.mark.parametrize("data_parallel", [False, True], ids=["plain", "DataParallel"])
def test_authors_stage2_net_ad_reports_extra_modules(tmp_path: Path, data_parallel: bool) -> None:
    state = stage2_state()
    extras = authors_extras()
    saved = {f"module.{k}": v for k, v in state.items()} if data_parallel else state
    path = save(tmp_path, "net_ad.pth", saved)
    model = tiny_model()
    report = load_weights(model, path)
    assert_accounted(report, set(state), model)
    assert report.new == []
    assert sorted(report.ignored) == sorted(extras)
    assert ("DataParallel 'module.' prefix removed" in report.kind) == data_parallel
    message = report.message()
    assert f"ignored {len(extras)} tensors [" in message
    for prefix in ("cross_decoder", "multihead_attn", "self_attn", "linear_att_3", "linear_matt_1", "mtt_norm",
                   "att_norm", "img_pos_embed (1)"):
        assert prefix in message
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in report.loaded)


# ---------------------------------------------------------------------- timm
@functools.cache
def _timm_state(**kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).state_dict()
    # timm's MAE tags carry MAE's fixed sin-cos position embedding in the (learnable-shaped) pos_embed
    state["pos_embed"] = torch.from_numpy(mae_sincos(TINY_DIM, FILE_GRID, FILE_GRID)).float().unsqueeze(0)
    return state


def timm_state(**kwargs) -> dict[str, torch.Tensor]:
    """A timm ViT-Ti/16 state dict (cached: building timm models is slow on a small CPU)."""
    return dict(_timm_state(**kwargs))


def test_timm_tag_with_local_file(tmp_path: Path) -> None:
    """timm reads the file strictly for the tag's architecture (1000-class head here: reported as ignored)."""
    state = timm_state()
    path = save(tmp_path, "vit_tiny.pth", state)
    model = tiny_model()
    report = load_weights(model, f"timm:vit_tiny_patch16_224@{path}")
    assert report.kind == "timm vit_tiny_patch16_224 from local file"
    assert_accounted(report, set(state), model)
    assert report.ignored == ["head.weight", "head.bias"]
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in report.loaded)
    headless = save(tmp_path, "vit_tiny_headless.pth", timm_state(num_classes=0))
    with pytest.raises(ValueError, match=r"(?s)timm could not load .* as 'vit_tiny_patch16_224'.*head\.weight"):
        load_weights(model, f"timm:vit_tiny_patch16_224@{headless}")


def test_timm_style_state_dict_with_fc_norm_as_a_plain_file(tmp_path: Path) -> None:
    """A global-pool timm ViT keeps the encoder's final LayerNorm as fc_norm: used as norm, and said so."""
    state = timm_state(num_classes=0, global_pool="avg")
    assert "fc_norm.weight" in state and "norm.weight" not in state
    path = save(tmp_path, "vit_tiny_gap.pth", state)
    model = tiny_model()
    report = load_weights(model, path)
    assert report.kind.startswith("bare state dict")
    assert report.renamed == {"fc_norm.weight": "norm.weight", "fc_norm.bias": "norm.bias"}
    assert_accounted(report, set(state), model)
    assert torch.equal(model.norm.weight, state["fc_norm.weight"])
    assert "renamed fc_norm.weight -> norm.weight" in report.message()


def test_learned_position_embeddings_are_refused(tmp_path: Path) -> None:
    state = timm_state(num_classes=0)
    state["pos_embed"] = 0.02 * torch.randn_like(state["pos_embed"])  # a supervised ViT's learned positions
    path = save(tmp_path, "vit_tiny_learned.pth", state)
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"pos_embed .* is not MAE's fixed 2-D sin-cos embedding for a 14x14 grid"):
        load_weights(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_timm_spelling_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"timm has no model 'vit_nonexistent'"):
        load_weights(tiny_model(), "timm:vit_nonexistent")
    with pytest.raises(ValueError, match=r"Invalid pretrained tag"):
        load_weights(tiny_model(), "timm:vit_base_patch16_224.nonexistent_tag")
    with pytest.raises(WeightsNotFoundError, match=r"not found"):
        load_weights(tiny_model(), f"timm:vit_tiny_patch16_224@{tmp_path / 'absent.safetensors'}")
    with pytest.raises(WeightsNotFoundError, match=r"not found"):
        load_weights(tiny_model(), tmp_path / "absent.pth")


# ---------------------------------------------------------------------- files that do not fit
def test_mismatch_names_keys_shapes_and_the_fitting_settings() -> None:
    """A ViT-S/16 MAE (encoder 384 wide, 12 blocks; decoder 512 wide, 8 blocks) into the tiny model."""
    shapes = mae_shapes(384, 12, dec_dim=512, dec_depth=8)
    state = {key: torch.zeros(shape) for key, shape in shapes.items()}
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        apply_state(model, WeightsFile(source="mae_visualize_vit_small.pth", kind="test", state=state))
    message = str(info.value)
    assert "First mismatching keys, file vs model: cls_token [1, 1, 384] vs [1, 1, 192]" in message
    assert "pos_embed [1, 197, 384] vs [1, 17, 192]" in message
    assert "patch_embed.proj.weight [384, 3, 16, 16] vs [192, 3, 16, 16]" in message
    assert "The file holds an encoder 384 wide with 12 blocks: backbone='vit_small', patch_size=16." in message
    assert "Its decoder is 512 wide with 8 blocks: decoder_embed_dim=512, decoder_depth>=8" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_deeper_decoder_or_unknown_encoder_does_not_fit() -> None:
    state = random_state(mae_shapes(TINY_DIM, TINY_DEPTH, DEC_DIM, dec_depth=5))
    with pytest.raises(ValueError, match=r"decoder_blocks\.3\.norm1\.weight \[64\] vs absent.*decoder_depth>=5"):
        apply_state(tiny_model(), WeightsFile(source="deep.pth", kind="test", state=state))
    shallow = random_state(mae_shapes(TINY_DIM, 6))
    with pytest.raises(ValueError, match=r"blocks\.6\.norm1\.weight absent vs \[192\].*no built-in backbone fits"):
        apply_state(tiny_model(), WeightsFile(source="shallow.pth", kind="test", state=shallow))
    with pytest.raises(ValueError, match=r"No tensor in 'other.pth'.*first keys in the file: encoder.weight"):
        apply_state(tiny_model(), WeightsFile(source="other.pth", kind="test", state={"encoder.weight": torch.ones(1)}))


def test_summarize_keys() -> None:
    keys = ["cls_token", "blocks.0.a", "blocks.1.a", "blocks.3.a", "norm.weight", "norm.bias"]
    assert summarize_keys(keys) == "cls_token (1), blocks.0-1,3 (3), norm (2)"


# ---------------------------------------------------------------------- the network against the method page
class MethodPageNetwork:
    """The ISSTAD network exactly as docs/isstad-method.md describes it, from torch primitives only.

    How equivalence is established: this class shares no code with ``IsstadModel`` or timm. It reads the
    same state dict by the official MAE key names and computes, in float64: patch embedding as a matrix
    product over MAE-ordered (channel, row, column) patch pixels; fixed 2-D sin-cos position embeddings from
    MAE's numpy definition for the model's own grid (never the file's); pre-norm blocks with hand-written
    LayerNorm (eps 1e-6), multi-head softmax attention with qkv bias, exact-erf GELU MLP; the final encoder
    LayerNorm; the linear decoder embedding plus its sin-cos embedding; ``mask_pred`` on every decoder block's
    output BEFORE the decoder LayerNorm and ``decoder_pred`` after it; the cls token dropped; tokens
    un-patchified with MAE's ``nhwpqc->nchpwq`` convention. Loading random (not initial) weights from an
    authors'-format file into ``IsstadModel`` and comparing every block's logits and the reconstruction on a
    non-square grid to 1e-5 therefore checks key mapping, patch and pixel order, the orientation of the
    position embeddings, block order and head placement at once: any swap or misplacement changes the result
    by far more than the tolerance.
    """

    def __init__(self, state: dict[str, torch.Tensor], image_size: tuple[int, int], heads: int, dec_heads: int):
        self.s = {k: v.double() for k, v in state.items()}
        self.heads, self.dec_heads = heads, dec_heads
        self.gh, self.gw = image_size[0] // PATCH, image_size[1] // PATCH
        self.depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        self.dec_depth = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
        dim, dec_dim = state["cls_token"].shape[-1], state["mask_token"].shape[-1]
        self.pos = torch.from_numpy(mae_sincos(dim, self.gh, self.gw)).unsqueeze(0)
        self.dec_pos = torch.from_numpy(mae_sincos(dec_dim, self.gh, self.gw)).unsqueeze(0)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ self.s[f"{name}.weight"].T + self.s[f"{name}.bias"]

    def layer_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-6) * self.s[f"{name}.weight"] + self.s[f"{name}.bias"]

    def block(self, x: torch.Tensor, name: str, heads: int) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.linear(self.layer_norm(x, f"{name}.norm1"), f"{name}.attn.qkv")
        q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // heads), dim=-1)
        x = x + self.linear((attention @ v).transpose(1, 2).reshape(b, n, c), f"{name}.attn.proj")
        hidden = self.linear(self.layer_norm(x, f"{name}.norm2"), f"{name}.mlp.fc1")
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        return x + self.linear(hidden, f"{name}.mlp.fc2")

    def unpatchify(self, tokens: torch.Tensor, channels: int) -> torch.Tensor:
        b = tokens.shape[0]
        x = tokens.reshape(b, self.gh, self.gw, PATCH, PATCH, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, self.gh * PATCH, self.gw * PATCH)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
        x = (images.double() - mean) / std
        b = x.shape[0]
        patches = x.reshape(b, 3, self.gh, PATCH, self.gw, PATCH).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, self.gh * self.gw, 3 * PATCH * PATCH)
        weight = self.s["patch_embed.proj.weight"].reshape(-1, 3 * PATCH * PATCH)
        tokens = patches @ weight.T + self.s["patch_embed.proj.bias"] + self.pos[:, 1:]
        cls = (self.s["cls_token"] + self.pos[:, :1]).expand(b, -1, -1)
        h = torch.cat([cls, tokens], dim=1)
        for i in range(self.depth):
            h = self.block(h, f"blocks.{i}", self.heads)
        h = self.layer_norm(h, "norm")
        d = self.linear(h, "decoder_embed") + self.dec_pos
        logits = []
        for i in range(self.dec_depth):
            d = self.block(d, f"decoder_blocks.{i}", self.dec_heads)
            logits.append(self.unpatchify(self.linear(d[:, 1:], "mask_pred"), 2))
        reconstruction = self.unpatchify(self.linear(self.layer_norm(d, "decoder_norm"), "decoder_pred")[:, 1:], 3)
        return x, reconstruction, torch.stack(logits)


def test_loaded_network_equals_the_method_page_network(tmp_path: Path) -> None:
    state = stage2_state(seed=3)
    path = save(tmp_path, "net_ad.pth", state)
    image_size = (48, 80)  # a 3x5 grid: rows and columns cannot be confused
    model = tiny_model(image_size=image_size)
    load_weights(model, path)
    images = torch.rand(2, 3, *image_size, generator=torch.Generator().manual_seed(0))
    ours = eval_outputs(model, images)
    reference = MethodPageNetwork(state, image_size, heads=TINY_HEADS, dec_heads=DEC_HEADS)
    normalized, reconstruction, block_logits = reference(images)
    assert block_logits.shape == (DEC_DEPTH, 2, 2, *image_size)
    assert block_logits.std() > 0.1 and reconstruction.std() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(ours["reconstruction"].double(), reconstruction, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["block_logits"].double(), block_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.normalize(images).double(), normalized, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- the Isstad argument through Lightning
def datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="magnetic_tile", train_batch_size=8, eval_batch_size=8, num_workers=0)


def engine(tmp_path: Path, **kwargs) -> Engine:
    return Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                  enable_progress_bar=False, **kwargs)


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def stage2_run(tile_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An Isstad given the authors' net_ad.pth, tested twice through the Engine, then saved as a checkpoint."""
    tmp = tmp_path_factory.mktemp("weights")
    net_ad = save(tmp, "net_ad.pth", stage2_state(seed=5))
    model = Isstad(**LIGHT, weights=str(net_ad))
    logger = logging.getLogger(WEIGHTS_LOGGER)
    handler, level = LogLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        eng = engine(tmp)
        eng.test(model=model, datamodule=datamodule(tile_root))
        eng.test(model=model, datamodule=datamodule(tile_root))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    checkpoint = tmp / "isstad.ckpt"
    eng.trainer.save_checkpoint(checkpoint)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return {"net_ad": net_ad, "checkpoint": checkpoint, "images": images, "lines": handler.lines,
            "outputs": eval_outputs(model.model, images), "root": tile_root, "tmp": tmp}


def test_weights_load_once_when_testing_starts(stage2_run: dict) -> None:
    loads = [line for line in stage2_run["lines"] if line.startswith("ISSTAD weights from")]
    assert len(loads) == 1  # two test runs, one load
    assert f"ignored {len(authors_extras())} tensors [img_pos_embed (1), cross_decoder (18)," in loads[0]
    assert "new (kept initialised) 0 tensors []" in loads[0]
    # the outputs are the authors' weights, not the initialisation
    direct = tiny_model()
    load_weights(direct, stage2_run["net_ad"])
    assert_same_outputs(eval_outputs(direct, stage2_run["images"]), stage2_run["outputs"])


def test_construction_never_reads_the_file(tmp_path: Path) -> None:
    model = Isstad(**TINY, weights=str(tmp_path / "absent.pth"))  # fine offline and without the file
    assert model.hparams.weights == str(tmp_path / "absent.pth")


def test_round_trip_through_our_checkpoint_without_the_weights_file(stage2_run: dict, tmp_path: Path) -> None:
    moved = stage2_run["net_ad"].rename(stage2_run["tmp"] / "moved.pth")  # the file is gone from its path
    try:
        reloaded = Isstad.load_from_checkpoint(stage2_run["checkpoint"])
        assert reloaded.hparams.weights == str(stage2_run["net_ad"])
        assert_same_outputs(eval_outputs(reloaded.model, stage2_run["images"]), stage2_run["outputs"])
        engine(tmp_path).test(model=reloaded, datamodule=datamodule(stage2_run["root"]))  # no reload, no error
        assert_same_outputs(eval_outputs(reloaded.model, stage2_run["images"]), stage2_run["outputs"])

        fresh = Isstad(**LIGHT, weights=str(stage2_run["net_ad"]))
        engine(tmp_path).test(model=fresh, datamodule=datamodule(stage2_run["root"]),
                              ckpt_path=stage2_run["checkpoint"])
        assert_same_outputs(eval_outputs(fresh.model, stage2_run["images"]), stage2_run["outputs"])

        orphan = Isstad(**LIGHT, weights=str(stage2_run["net_ad"]))
        with pytest.raises(FileNotFoundError, match=r"net_ad.pth' not found.*No Lightning checkpoint was restored"):
            engine(tmp_path).test(model=orphan, datamodule=datamodule(stage2_run["root"]))
    finally:
        moved.rename(stage2_run["net_ad"])


def test_our_checkpoint_as_weights_equals_the_authors_file(stage2_run: dict) -> None:
    model = Isstad(**TINY, weights=str(stage2_run["checkpoint"]))
    model.setup("test")
    assert_same_outputs(eval_outputs(model.model, stage2_run["images"]), stage2_run["outputs"])
    report = load_weights(tiny_model(), stage2_run["checkpoint"])
    assert report.kind == "Lightning checkpoint, 'model.' prefix" and report.new == []
    assert {key.split(".")[0] for key in report.ignored} <= {"post_processor", "evaluator", "pre_processor"}
    assert "state_dict" not in report.unused_entries and "hyper_parameters" in report.unused_entries


class TrainingWatch(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
        self.batches += 1


def test_unfit_file_fails_before_training(tile_root: Path, tmp_path: Path) -> None:
    state = random_state(mae_shapes(TINY_DIM, TINY_DEPTH, dec_dim=32, dec_depth=2))
    path = save(tmp_path, "narrow_decoder.pth", {"model": state})
    watch = TrainingWatch()
    model = Isstad(**LIGHT, weights=str(path))
    with pytest.raises(ValueError, match=r"decoder_embed\.weight \[32, 192\] vs \[64, 192\].*decoder_embed_dim=32"):
        engine(tmp_path, callbacks=[watch]).fit(model=model, datamodule=datamodule(tile_root))
    assert watch.batches == 0
