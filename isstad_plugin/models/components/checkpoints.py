"""Checkpoint files that fail clearly: atomic writes, readable load errors, an early output check, and a
compatibility check that names the option a checkpoint was trained with.

- :class:`SafeCheckpointIO` wraps the trainer's checkpoint IO (anomalib's allow-listing one) with two changes: a
  checkpoint is written to a temporary file in the same folder and renamed into place, so a full disk or a
  killed process never leaves a half-written ``.ckpt`` looking complete; and a file that cannot be loaded
  (truncated, not a checkpoint) fails with its path and what to do. :func:`use_safe_checkpoint_io` installs it.
- :func:`check_writable` creates the checkpoint folder and writes a probe file there before the first epoch.
- :func:`check_compatible` compares a checkpoint's network with the model it is loaded into and names the
  hyper-parameters that differ (e.g. ``image_size``) or the plugin version that wrote another layout.

Example:
    >>> use_safe_checkpoint_io(trainer)  # in LightningModule.setup, before Lightning restores ckpt_path
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from torch import nn

VERSION_KEY = "isstad_plugin_version"


def plugin_version() -> str:
    """The installed isstad-plugin version (``unknown`` when run from a source tree without metadata)."""
    try:
        return metadata.version("isstad-plugin")
    except metadata.PackageNotFoundError:
        return "unknown"


def check_checkpoint_file(path: str | Path) -> None:
    """Fail with the path and what to do when ``path`` is missing or not a complete checkpoint archive."""
    path = Path(path)
    if not path.is_file():
        msg = f"Checkpoint file {path} does not exist; pass the model.ckpt a training run wrote (--ckpt_path)."
        raise FileNotFoundError(msg)
    if zipfile.is_zipfile(path):
        return
    with path.open("rb") as handle:
        legacy = handle.read(2) == b"\x80\x02"  # torch's pre-1.6 pickle format
    if not legacy:
        msg = (f"Checkpoint file {path} cannot be read: it is truncated or not a PyTorch checkpoint "
               f"({path.stat().st_size} bytes). Copy it again from where it was written, or train again.")
        raise ValueError(msg)


class SafeCheckpointIO(CheckpointIO):
    """Wraps a trainer's checkpoint IO (anomalib's ``AnomalibCheckpointIO``, Lightning's ``TorchCheckpointIO``):
    local files are written atomically, and a failing load names the file.

    Args:
        inner: the checkpoint IO that serialises (its allow-lists and ``weights_only`` rules are kept).
    """

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Let ``inner`` write a temporary file next to ``path``, then rename it into place."""
        if "://" in str(path):
            self.inner.save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            self.inner.save_checkpoint(checkpoint, temporary, storage_options)
            os.replace(temporary, path)
        except OSError as error:
            msg = (f"Could not write checkpoint {path} ({error.strerror or error}): free disk space or choose a "
                   "writable --default_root_dir. Earlier checkpoints were left as they were.")
            raise OSError(error.errno, msg) from error
        finally:
            Path(temporary).unlink(missing_ok=True)

    def load_checkpoint(self, path: str | Path, **kwargs: Any) -> dict[str, Any]:  # noqa: ANN401
        """``inner``'s load (with ``inner``'s defaults, e.g. ``weights_only``), after :func:`check_checkpoint_file`;
        a failing unpickle names the file."""
        if "://" not in str(path):
            check_checkpoint_file(path)
        try:
            return self.inner.load_checkpoint(path, **kwargs)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
            msg = f"Checkpoint file {path} cannot be read ({error.__class__.__name__}): copy it again or train again."
            raise ValueError(msg) from error

    def remove_checkpoint(self, path: str | Path) -> None:
        """``inner``'s removal."""
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        """``inner``'s teardown."""
        self.inner.teardown()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as anomalib's Engine reads it: ``torch.load(weights_only=True)`` with anomalib's
    allow-list (``AnomalibCheckpointIO``), after :func:`check_checkpoint_file`. The one reader of trained checkpoints
    outside a trainer (``isstad-predict``, the benchmark, the scripts): a checkpoint is an untrusted pickle."""
    from anomalib.engine.plugins.checkpoint_io import AnomalibCheckpointIO

    return SafeCheckpointIO(AnomalibCheckpointIO()).load_checkpoint(path)


def use_safe_checkpoint_io(trainer: Any) -> None:  # noqa: ANN401
    """Wrap ``trainer``'s checkpoint IO in a :class:`SafeCheckpointIO` (once)."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and not isinstance(strategy.checkpoint_io, SafeCheckpointIO):
        strategy.checkpoint_io = SafeCheckpointIO(strategy.checkpoint_io)


def check_writable(folder: str | Path, option: str = "--default_root_dir") -> None:
    """Create ``folder`` and write a probe file there; fail naming the folder and ``option`` if that fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as error:
        msg = (f"Output folder {folder} is not writable ({error.strerror or error}): choose a folder you can "
               f"write with {option}. Nothing was trained.")
        raise OSError(error.errno, msg) from error


def check_compatible(model: nn.Module, checkpoint: dict[str, Any], options: Iterable[str],
                     prefix: str = "model.", path: str | Path | None = None) -> None:
    """Fail before ``load_state_dict`` when ``checkpoint``'s network does not fit ``model``'s.

    Args:
        model: the LightningModule the checkpoint is loaded into (``hparams`` and ``state_dict``).
        checkpoint: the loaded checkpoint dictionary.
        options: hyper-parameters that shape the network (compared and named when they differ).
        prefix: state-dict keys of the network.
        path: the checkpoint's file, named in the message when known.

    Raises:
        ValueError: naming each differing option with both values (and the flags to pass), or, when the options
            agree, the differing keys and the plugin versions of the checkpoint and of this install.
    """
    saved = {k: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith(prefix)}
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    mismatched = sorted(k for k in saved.keys() & own.keys() if tuple(saved[k].shape) != tuple(own[k].shape))
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    if not (mismatched or missing or unexpected):
        return
    hyper = checkpoint.get("hyper_parameters", {})
    name = f"checkpoint {path}" if path else "checkpoint"
    differ = [(option, hyper[option], model.hparams.get(option)) for option in options
              if option in hyper and hyper[option] != model.hparams.get(option)]
    if differ:
        flags = " ".join(f"--model.{option} {value}" for option, value, _ in differ)
        values = ", ".join(f"{option}={value!r} (this model: {current!r})" for option, value, current in differ)
        msg = (f"The {name} was trained with {values}: pass {flags} (the same options as in training) "
               "to load it.")
        raise ValueError(msg)
    written_by = checkpoint.get(VERSION_KEY, "an unknown (older) version")
    details = "; ".join(part for part in (
        f"{len(missing)} keys missing, e.g. {missing[0]}" if missing else "",
        f"{len(unexpected)} unexpected, e.g. {unexpected[0]}" if unexpected else "",
        f"{len(mismatched)} of other shapes, e.g. {mismatched[0]}" if mismatched else "") if part)
    msg = (f"The {name} holds a network of another layout than this model's ({details}). It was written by "
           f"isstad-plugin {written_by}; this is {plugin_version()}: load it with that version, or train again.")
    raise ValueError(msg)


def check_model_checkpoint(checkpoint: dict[str, Any], model_name: str, marker: str, alternative: str) -> None:
    """Refuse a Lightning checkpoint written by another model (none of its state keys starts with ``marker``),
    saying which model it looks like and the ``alternative`` (e.g. another option for weight files)."""
    state = checkpoint.get("state_dict", {})
    if any(key.startswith(marker) for key in state):
        return
    prefixes = sorted({".".join(key.split(".")[:2]) for key in state})[:6]
    hyper = sorted(checkpoint.get("hyper_parameters", {}))[:8]
    msg = (f"This checkpoint was not written by {model_name}: its state keys start with {prefixes}; "
           f"hyper-parameters {hyper}. Pass the checkpoint to the model that trained it, or {alternative}.")
    raise ValueError(msg)
