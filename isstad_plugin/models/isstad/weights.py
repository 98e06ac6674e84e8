"""Pretrained and reference weights for :class:`IsstadModel`: one loader for every upstream format.

The ``weights`` spelling (``Isstad(weights=...)``, ``model.init_args.weights`` in a config):

- ``path/to/file`` — a local checkpoint; its format is recognised from its content:

  - an official MAE release file (``mae_pretrain_vit_*.pth``: encoder only; ``mae_visualize_vit_*.pth``:
    encoder + 8-block decoder) or the ISSTAD authors' stage-1 checkpoint: ``{'model': state, ...}``;
  - the ISSTAD authors' stage-2 network ``net_ad.pth``: a bare state dict with ``mask_pred`` (its extra,
    unused modules are reported as ignored; a ``module.`` prefix from ``DataParallel`` is stripped);
  - a timm-style bare state dict (e.g. a ViT's ``state_dict()`` saved with ``torch.save``);
  - one of our own Lightning checkpoints (``state_dict`` with the ``model.`` prefix): the network only; use
    ``ckpt_path`` / ``Isstad.load_from_checkpoint`` to restore a whole run with its thresholds.

- ``timm:<tag>`` — timm's weights for ``<tag>`` (e.g. ``timm:vit_base_patch16_224.mae``), fetched through
  timm from the Hugging Face Hub (or its local cache).
- ``timm:<tag>@<file>`` — the same weights from a local file (e.g. the Hub's ``model.safetensors``), read by
  timm itself (``pretrained_cfg_overlay=dict(file=...)``), so nothing is downloaded.

Pickled files are read with ``torch.load(..., weights_only=True)`` only, allow-listing anomalib's own
checkpoint types and ``argparse.Namespace`` (the authors' stage-1 files keep their command line under ``args``).

Rules: every tensor of the file is loaded, or reported as ignored (with counts and key prefixes) in one INFO
log line that also lists what stayed initialised.

- Position embeddings. Fixed sin-cos ones (``decoder_pos_embed``, and ``pos_embed`` of a
  ``position_embedding="sincos"`` model) are never copied: the model computes them for its own grid; the file's
  are checked to be MAE's sin-cos embedding for their grid, else the weights were trained with learned positions
  and the message names ``position_embedding: learned``. A ``learned`` model takes the file's ``pos_embed``
  resampled to its grid by timm's ``resample_abs_pos_embed`` (bicubic), whatever the image size; a file without
  a cls position (timm's ``no_embed_class``) gives the cls token none, as timm does.
- Other timm families: DeiT's distillation token (``dist_token``, with its position) is dropped and named in the
  log line (the encoder has the cls token only; the patch tokens then differ slightly from DeiT's own); a
  global-pool ViT's ``fc_norm`` serves as the final ``norm``. Parts the encoder does not have (register tokens,
  LayerScale, QK-norm, a pre-norm, a patch-embedding norm) raise ``ValueError`` naming them: the network would
  compute something else than the file's.
- A decoder deeper than the file's keeps the loaded blocks and initialises the rest; heads absent from the file
  (``mask_pred`` in MAE files) stay initialised. Any other shape difference (e.g. patch 14 against 16), an
  encoder of a different depth, or a file decoder deeper than the model's raises ``ValueError`` naming the first
  mismatching keys with both shapes and the settings that would fit the file.

Example:
    >>> model = IsstadModel("vit_base", decoder_depth=12)
    >>> report = load_weights(model, "mae_visualize_vit_base.pth")  # doctest: +SKIP
    >>> report.new  # doctest: +SKIP
    ['decoder_blocks.8.norm1.weight', ..., 'mask_pred.weight', 'mask_pred.bias']
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from anomalib.utils.serialization import anomalib_safe_globals
from timm.layers import resample_abs_pos_embed

from .torch_model import VIT_VARIANTS, IsstadModel, sincos_position_embedding

logger = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
FIXED_POSITION_KEYS = ("pos_embed", "decoder_pos_embed")
DROPPED_PREFIX_TOKENS = {"dist_token": "DeiT's distillation token"}
# encoder parts of other ViT families that IsstadModel's encoder lacks (key pattern -> what it is)
UNSUPPORTED_PARTS = {
    r"^reg_token$": "register tokens",
    r"^blocks\.\d+\.ls[12]\.": "LayerScale (ls1/ls2)",
    r"^blocks\.\d+\.attn\.[qk]_norm\.": "QK-norm",
    r"^norm_pre\.": "a pre-norm before the blocks (norm_pre)",
    r"^patch_embed\.norm\.": "a norm in the patch embedding",
}
SINCOS_TOLERANCE = 1e-4
MAX_LISTED_MISMATCHES = 6
_BLOCK_KEY = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)$")


class WeightsNotFoundError(FileNotFoundError):
    """The weights are not available here: a missing file, or timm Hub weights that cannot be fetched."""


@dataclass
class WeightsFile:
    """A state dict read from a weights source, before it is matched against a model."""

    source: str
    kind: str
    state: dict[str, Any]
    unused_entries: list[str] = field(default_factory=list)


@dataclass
class WeightsReport:
    """What :func:`load_weights` did with every tensor of the file and of the model."""

    source: str
    kind: str
    grid_size: tuple[int, int]
    loaded: list[str]
    renamed: dict[str, str]
    recomputed: dict[str, str]
    resampled: dict[str, str]
    dropped: dict[str, str]
    new: list[str]
    ignored: list[str]
    unused_entries: list[str]

    def message(self) -> str:
        """The one log line: loaded, recomputed, new and ignored tensors with counts and key prefixes."""
        parts = [
            f"ISSTAD weights from {self.source!r} ({self.kind}): loaded {len(self.loaded)} tensors "
            f"[{summarize_keys(self.loaded)}]",
        ]
        if self.renamed:
            parts.append("renamed " + ", ".join(f"{src} -> {dst}" for src, dst in self.renamed.items()))
        gh, gw = self.grid_size
        for key, how in self.resampled.items():
            parts.append(f"learned position embedding {key} {how}")
        checked = ", ".join(f"{key}: {status}" for key, status in self.recomputed.items()) or "none in file"
        parts.append(f"fixed sin-cos position embeddings computed for the {gh}x{gw} grid, not copied [{checked}]")
        for key, why in self.dropped.items():
            parts.append(f"dropped {key} ({why}: this encoder has the cls token only) and its position")
        parts.append(f"new (kept initialised) {len(self.new)} tensors [{summarize_keys(self.new)}]")
        parts.append(f"ignored {len(self.ignored)} tensors [{summarize_keys(self.ignored)}]")
        if self.unused_entries:
            parts.append("checkpoint entries not used: " + ", ".join(self.unused_entries))
        return "; ".join(parts) + "."


class DeferredWeights:
    """``Isstad(weights=...)``: loaded into the network when the first fit/validate/test/predict starts, never in
    ``__init__`` (so construction, ``load_from_checkpoint`` and export stay offline), unless a Lightning checkpoint
    provides the network.

    Status: ``pending`` -> ``loaded`` (from the source) | ``checkpoint`` (a Lightning checkpoint filled the
    network) | ``missing`` (the source was absent at set-up: only a ``ckpt_path`` restore may still provide the
    network; :meth:`require` fails otherwise).
    """

    def __init__(self, source: str | None) -> None:
        self.source = source
        # A local path is followed through its links now: anomalib points ``results/.../latest`` at the new run's
        # folder when that run starts, so ``weights=results/.../latest/...`` read later would name the new run.
        local = source is not None and not source.startswith(TIMM_PREFIX) and Path(source).exists()
        self.target = str(Path(source).resolve()) if local else source
        self.status = "pending"
        self.error: WeightsNotFoundError | None = None

    def load_into(self, model: IsstadModel) -> None:
        """Load the source into ``model`` once; a missing source is remembered (a checkpoint may replace it)."""
        if self.source is None or self.status in {"loaded", "checkpoint"}:
            return
        try:
            load_weights(model, self.target)
        except WeightsNotFoundError as error:
            self.status, self.error = "missing", error
            logger.info("ISSTAD: %s Continuing only if a checkpoint (ckpt_path) provides the network.", error)
            return
        self.status = "loaded"

    def replaced_by_checkpoint(self) -> None:
        """A Lightning checkpoint filled the network: the source is not loaded (again)."""
        if self.source is not None and self.status != "checkpoint":
            logger.info("ISSTAD: the Lightning checkpoint provides the network; it replaces weights=%r.", self.source)
        self.status = "checkpoint"

    def require(self) -> None:
        """Fail when the source could not be read and no checkpoint was restored instead."""
        if self.status == "missing":
            msg = f"{self.error} No Lightning checkpoint was restored in its place."
            raise FileNotFoundError(msg) from self.error


# ---------------------------------------------------------------------- public API
def load_weights(model: IsstadModel, weights: str | Path) -> WeightsReport:
    """Read ``weights`` (see the module docstring for spellings) and load them into ``model`` in place.

    Raises:
        WeightsNotFoundError: The file does not exist or timm cannot fetch the tag.
        ValueError: The file does not fit the model (message names keys, shapes and fitting settings), or it
            is not a recognised checkpoint.
    """
    report = apply_state(model, read_weights(weights))
    logger.info(report.message())
    return report


def read_weights(weights: str | Path) -> WeightsFile:
    """Read a weights source into a flat ``{key: tensor}`` state with MAE key names (not yet validated)."""
    spec = str(weights)
    if spec.startswith(TIMM_PREFIX):
        return _read_timm(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        msg = f"Weights file {str(path)!r} not found (weights={spec!r})."
        raise WeightsNotFoundError(msg)
    return _unwrap(_torch_load(path), spec)


def apply_state(model: IsstadModel, weights: WeightsFile) -> WeightsReport:
    """Check ``weights`` against ``model`` and copy what fits; raise before touching the model otherwise."""
    model_state = model.state_dict()
    state = weights.state
    renamed = {}
    if "norm.weight" not in state and "fc_norm.weight" in state:
        # timm / MAE fine-tune files with global pooling keep the encoder's final LayerNorm as fc_norm.
        renamed = {f"fc_norm.{p}": f"norm.{p}" for p in ("weight", "bias") if f"fc_norm.{p}" in state}

    _refuse_unsupported_parts(model, weights)
    learned = model.position_embedding == "learned"
    fixed_keys = {"decoder_pos_embed"} | (set() if learned else {"pos_embed"})
    dropped = {key: why for key, why in DROPPED_PREFIX_TOKENS.items() if isinstance(state.get(key), torch.Tensor)}
    loaded: dict[str, torch.Tensor] = {}
    fixed: dict[str, torch.Tensor] = {}
    resampled: dict[str, str] = {}
    ignored: list[str] = []
    mismatches: list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]] = []
    for key, value in state.items():
        target = renamed.get(key, key)
        if not isinstance(value, torch.Tensor):
            ignored.append(key)
        elif target in model_state:
            expected = model_state[target].shape
            if target in FIXED_POSITION_KEYS:
                if value.ndim != 3 or value.shape[-1] != expected[-1]:
                    mismatches.append((key, tuple(value.shape), tuple(expected)))
                elif target in fixed_keys:
                    fixed[target] = _without_dropped_tokens(value, dropped, model, weights.source) \
                        if target == "pos_embed" else value
                else:
                    loaded[target], resampled[target] = _resampled(
                        _without_dropped_tokens(value, dropped, model, weights.source), model, weights.source)
            elif value.shape != expected:
                mismatches.append((key, tuple(value.shape), tuple(expected)))
            else:
                loaded[target] = value
        elif _is_block_beyond_depth(target, model_state):
            mismatches.append((key, tuple(value.shape), None))
        else:
            ignored.append(key)
    mismatches.extend(_missing_encoder_blocks(state, model_state))
    if mismatches:
        raise ValueError(_mismatch_message(model, weights, mismatches))
    if not loaded:
        first = ", ".join(list(state)[:5])
        msg = (
            f"No tensor in {weights.source!r} ({weights.kind}) has an IsstadModel (MAE) parameter name; "
            f"first keys in the file: {first}."
        )
        raise ValueError(msg)
    recomputed = {key: _check_sincos(key, value, model, weights.source) for key, value in fixed.items()}

    model.load_state_dict(loaded, strict=False)  # every key of ``loaded`` is one of the model's own
    new = [key for key in model_state if key not in loaded and key not in fixed_keys]
    return WeightsReport(
        source=weights.source,
        kind=weights.kind,
        grid_size=model.grid_size,
        loaded=[key for key in model_state if key in loaded],
        renamed=renamed,
        recomputed=recomputed,
        resampled=resampled,
        dropped=dropped,
        new=new,
        ignored=ignored,
        unused_entries=weights.unused_entries,
    )


def summarize_keys(keys: Iterable[str]) -> str:
    """Group keys by their top-level module, with block index ranges: ``blocks.0-11 (144), norm (2)``."""
    groups: dict[str, tuple[int, set[int]]] = {}
    for key in keys:
        match = re.match(r"^([^.]+)\.(\d+)\.", key)
        name, index = (match[1], int(match[2])) if match else (key.split(".")[0], None)
        count, indices = groups.get(name, (0, set()))
        if index is not None:
            indices.add(index)
        groups[name] = (count + 1, indices)
    return ", ".join(
        f"{name}{'.' + _ranges(indices) if indices else ''} ({count})" for name, (count, indices) in groups.items()
    )


# ---------------------------------------------------------------------- reading
def _torch_load(path: Path) -> Any:
    try:
        with anomalib_safe_globals(extra=(argparse.Namespace,)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        msg = (
            f"{str(path)!r} holds Python objects other than tensors and plain containers; it is read with "
            f"torch.load(weights_only=True) only (untrusted pickles are never executed). Details: {error}"
        )
        raise ValueError(msg) from error


def _unwrap(checkpoint: Any, source: str) -> WeightsFile:
    if not isinstance(checkpoint, dict):
        msg = f"{source!r} holds a {type(checkpoint).__name__}, not a checkpoint dict or state dict."
        raise ValueError(msg)  # noqa: TRY004 (a bad file is a bad value)
    if isinstance(checkpoint.get("state_dict"), dict):
        full = checkpoint["state_dict"]
        state = {key.removeprefix("model."): value for key, value in full.items() if key.startswith("model.")}
        state.update({key: value for key, value in full.items() if not key.startswith("model.")})
        kind = "Lightning checkpoint, 'model.' prefix"
        unused = [key for key in checkpoint if key != "state_dict"]
    elif isinstance(checkpoint.get("model"), dict):
        state = checkpoint["model"]
        kind = "{'model': state} checkpoint: MAE release or ISSTAD stage 1"
        unused = [key for key in checkpoint if key != "model"]
    elif checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        state = checkpoint
        kind = "bare state dict: ISSTAD stage 2 (net_ad.pth) or timm style"
        unused = []
    else:
        keys = ", ".join(map(str, list(checkpoint)[:8]))
        msg = f"{source!r} is not a recognised checkpoint (no 'model' or 'state_dict' entry, not a state dict): {keys}."
        raise ValueError(msg)
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
        kind += ", DataParallel 'module.' prefix removed"
    return WeightsFile(source=source, kind=kind, state=dict(state), unused_entries=unused)


def _read_timm(spec: str) -> WeightsFile:
    import timm  # noqa: PLC0415 (only needed for this spelling)
    from timm.models import get_pretrained_cfg  # noqa: PLC0415

    tag, _, file = spec.removeprefix(TIMM_PREFIX).partition("@")
    if not timm.is_model(tag):
        msg = f"{spec!r}: timm has no model {tag!r} (spelling: timm:<tag> or timm:<tag>@<file>)."
        raise ValueError(msg)
    try:
        get_pretrained_cfg(tag)
    except RuntimeError as error:
        msg = f"{spec!r}: {error}"
        raise ValueError(msg) from error
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            msg = f"Weights file {str(path)!r} not found (weights={spec!r})."
            raise WeightsNotFoundError(msg)
        overlay = {"file": str(path), "custom_load": False}
        try:  # the tag's own head size: timm then loads strictly, and a classifier is reported as ignored
            network = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay)
        except RuntimeError as error:
            msg = f"timm could not load {str(path)!r} as {tag!r}: {error}"
            raise ValueError(msg) from error
        kind = f"timm {tag} from local file"
    else:
        try:
            network = timm.create_model(tag, pretrained=True)
        except Exception as error:
            msg = (
                f"timm could not fetch the weights of {tag!r} ({type(error).__name__}: {error}). Offline, download "
                f"them once and use weights='timm:{tag}@<file>'."
            )
            raise WeightsNotFoundError(msg) from error
        kind = f"timm {tag} from the Hugging Face Hub"
    return WeightsFile(source=spec, kind=kind, state=network.state_dict())


# ---------------------------------------------------------------------- checks
def _is_block_beyond_depth(key: str, model_state: dict[str, torch.Tensor]) -> bool:
    """``blocks.{i}.x`` / ``decoder_blocks.{i}.x`` that the model has for block 0 but not for block ``i``."""
    match = _BLOCK_KEY.match(key)
    return bool(match) and f"{match[1]}.0.{match[3]}" in model_state


def _block_indices(keys: Iterable[str], prefix: str) -> set[int]:
    return {int(match[2]) for key in keys if (match := _BLOCK_KEY.match(key)) and match[1] == prefix}


def _missing_encoder_blocks(
    state: dict[str, Any],
    model_state: dict[str, torch.Tensor],
) -> list[tuple[str, None, tuple[int, ...]]]:
    """An encoder is loaded whole: a file with fewer encoder blocks than the model does not fit."""
    if not _block_indices(state, "blocks"):
        return []
    return [
        (key, None, tuple(value.shape))
        for key, value in model_state.items()
        if key.startswith("blocks.") and key not in state
    ]


def _refuse_unsupported_parts(model: IsstadModel, weights: WeightsFile) -> None:
    """Fail, naming them, on encoder parts of other ViT families that the network lacks (see the module docstring)."""
    found: dict[str, list[str]] = {}
    for key in weights.state:
        for pattern, what in UNSUPPORTED_PARTS.items():
            if re.match(pattern, key):
                found.setdefault(what, []).append(key)
    if found:
        listed = "; ".join(f"{what} ({summarize_keys(keys)})" for what, keys in found.items())
        msg = (
            f"Weights {weights.source!r} ({weights.kind}) come from a ViT family with encoder parts that ISSTAD's "
            f"network ({len(model.blocks)} plain pre-norm blocks, a cls token, a linear patch embedding) does not "
            f"have: {listed}. Loading the rest would compute another network than the file's; use a plain ViT's "
            "weights (MAE, timm's augreg/DeiT/DINO ViTs)."
        )
        raise ValueError(msg)


def _without_dropped_tokens(value: torch.Tensor, dropped: dict[str, str], model: IsstadModel,
                            source: str) -> torch.Tensor:
    """A file's ``pos_embed`` ``[1, N, E]`` with the positions of the dropped prefix tokens removed (DeiT's
    distillation token sits second, after the cls token), as ``[1, (1 or 0) + gh * gw, E]``."""
    prefix, _ = _position_layout(value, 1 + len(dropped), model.grid_size, source)
    if prefix <= 1:
        return value
    return torch.cat([value[:, :1], value[:, prefix:]], dim=1)


def _position_layout(value: torch.Tensor, prefix: int, model_grid: tuple[int, int],
                     source: str) -> tuple[int, tuple[int, int]]:
    """``(prefix tokens, grid)`` of a file's ``pos_embed`` ``[1, N, E]``: ``prefix`` positions before the grid, or
    none (timm's ``no_embed_class``); the model's grid when its size fits, else a square one."""
    tokens = value.shape[1]
    for count in (prefix, 0):
        if tokens - count == model_grid[0] * model_grid[1]:
            return count, model_grid
        side = math.isqrt(max(tokens - count, 0))
        if side and side * side == tokens - count:
            return count, (side, side)
    msg = (f"pos_embed in {source!r} has {tokens} positions: neither {prefix} prefix token(s) nor none before a "
           "square grid of patches, so its grid cannot be told.")
    raise ValueError(msg)


def _resampled(value: torch.Tensor, model: IsstadModel, source: str) -> tuple[torch.Tensor, str]:
    """A file's learned ``pos_embed`` resampled to the model's grid (timm's ``resample_abs_pos_embed``, bicubic),
    as ``[1, 1 + gh * gw, E]``; and what was done, for the log line."""
    prefix, grid = _position_layout(value, 1, model.grid_size, source)
    out = resample_abs_pos_embed(value.float(), new_size=list(model.grid_size), old_size=list(grid),
                                 num_prefix_tokens=prefix)
    if prefix == 0:  # no cls position in the file: the cls token gets none, as in timm
        out = torch.cat([out.new_zeros(1, 1, out.shape[-1]), out], dim=1)
    gh, gw = model.grid_size
    how = (f"copied (file grid {grid[0]}x{grid[1]})" if grid == model.grid_size else
           f"resampled from the file's {grid[0]}x{grid[1]} grid to {gh}x{gw} (timm's resample_abs_pos_embed, bicubic)")
    return out.to(value.dtype), how + ("" if prefix else "; the file has no cls position: zero, as timm's")


def _check_sincos(key: str, value: torch.Tensor, model: IsstadModel, source: str) -> str:
    """Verify that the file's fixed position embedding is MAE's sin-cos one for its grid (it is not copied)."""
    dim = value.shape[2]
    prefix, grid = _position_layout(value, 1, model.grid_size, source)
    expected = sincos_position_embedding(dim, grid, cls_token=bool(prefix))
    error = (value.float() - expected).abs().max().item()
    if error > SINCOS_TOLERANCE:
        option = "position_embedding: learned (--model.position_embedding learned)" if key == "pos_embed" else None
        fix = (f"; to load them, build the model with {option}" if option else
               " (the decoder's positions are MAE's fixed sin-cos in every ISSTAD network)")
        msg = (
            f"{key} in {source!r} is not MAE's fixed 2-D sin-cos embedding for a {grid[0]}x{grid[1]} grid "
            f"(max |difference| {error:.3g}): these weights were trained with learned position embeddings, which "
            f"this network's fixed sin-cos ones (recomputed for the image size) do not hold{fix}."
        )
        raise ValueError(msg)
    return f"file grid {grid[0]}x{grid[1]}, sin-cos verified"


def _mismatch_message(
    model: IsstadModel,
    weights: WeightsFile,
    mismatches: list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]],
) -> str:
    def shape(value: tuple[int, ...] | None) -> str:
        return "absent" if value is None else str(list(value))

    listed = "; ".join(
        f"{key} {shape(in_file)} vs {shape(in_model)}" for key, in_file, in_model in mismatches[:MAX_LISTED_MISMATCHES]
    )
    more = f" (and {len(mismatches) - MAX_LISTED_MISMATCHES} more)" if len(mismatches) > MAX_LISTED_MISMATCHES else ""
    ours = (
        f"encoder {model.cls_token.shape[-1]} wide with {len(model.blocks)} blocks, patch {model.patch_size}; "
        f"decoder {model.mask_token.shape[-1]} wide with {len(model.decoder_blocks)} blocks"
    )
    return (
        f"Weights {weights.source!r} ({weights.kind}) do not fit this ISSTAD network ({ours}). "
        f"First mismatching keys, file vs model: {listed}{more}. {_fitting_settings(weights.state)}"
    )


def _fitting_settings(state: dict[str, Any]) -> str:
    """Describe the file's encoder and decoder and the ``Isstad`` arguments that would fit it."""

    def width(*keys: str, axis: int = -1) -> int | None:
        return next((int(state[k].shape[axis]) for k in keys if isinstance(state.get(k), torch.Tensor)), None)

    parts = []
    embed_dim = width("cls_token") or width("patch_embed.proj.weight", axis=0)
    if embed_dim:
        depth = len(_block_indices(state, "blocks"))
        proj = state.get("patch_embed.proj.weight")
        patch = int(proj.shape[-1]) if isinstance(proj, torch.Tensor) and proj.ndim == 4 else None
        variant = next((name for name, v in VIT_VARIANTS.items() if (v.embed_dim, v.depth) == (embed_dim, depth)), None)
        known = ", ".join(f"{name} {v.embed_dim}/{v.depth}" for name, v in VIT_VARIANTS.items())
        fits = f"backbone={variant!r}" if variant else f"no built-in backbone fits (width/depth: {known})"
        patch_text = f", patch_size={patch}" if patch else ""
        parts.append(f"The file holds an encoder {embed_dim} wide with {depth} blocks: {fits}{patch_text}.")
    decoder_dim = width("decoder_embed.weight", axis=0) or width("mask_token", "decoder_norm.weight")
    if decoder_dim:
        depth = len(_block_indices(state, "decoder_blocks"))
        parts.append(
            f"Its decoder is {decoder_dim} wide with {depth} blocks: decoder_embed_dim={decoder_dim}, "
            f"decoder_depth>={depth} (extra blocks start initialised; decoder_num_heads must divide "
            f"{decoder_dim}, upstream uses 16).",
        )
    else:
        parts.append("It holds no decoder: any decoder_embed_dim/decoder_depth fits (the decoder starts initialised).")
    return " ".join(parts)


def _ranges(indices: set[int]) -> str:
    ordered = sorted(indices)
    spans: list[str] = []
    start = previous = ordered[0]
    for index in [*ordered[1:], None]:
        if index is not None and index == previous + 1:
            previous = index
            continue
        spans.append(str(start) if start == previous else f"{start}-{previous}")
        if index is not None:
            start = previous = index
    return ",".join(spans)
