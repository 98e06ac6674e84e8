"""Every shell command in the README and the docs runs as written.

Each ``bash`` block of the README, ``docs/`` and the model cards is split into commands (``\\`` continuations
joined, comments dropped) and every command runs, in the document's order, through ``bash`` in a scratch folder
laid out like a checkout (``configs/`` and the ``Makefile`` linked in, ``../shared/data`` and ``../shared/weights``
beside it), one folder per document: later commands use what earlier ones wrote (a checkpoint under
``results/.../latest``), as a reader following that document would.

What is added to a command, and why (nothing else is changed):

- a short budget, through documented options: ``--trainer.limit_*_batches 2`` with batches of 4 and no loader
  worker processes, one epoch per stage (no image cache: two batches read only eight images), 64 px images (for
  CutPaste with 32 px patches and the map smoothing at sigma 4, which fit that size) and, for ISSTAD, a ViT-tiny
  encoder in place of the paper's ViT-B/L (a CPU would train those for hours) and a 64-wide decoder in place of
  the paper's twelve 512-wide blocks (whose weights and Adam state made each checkpoint ~0.3 GB: three per
  training, 1 GB of writes, for no property the test checks): one block, or two where ``--model.weights`` name a
  file, whose stand-in holds one, so that a file decoder shallower than the model's is still loaded and extended
  as with the official files (8 of 12 blocks, the authors' 6);
  a command whose weights name a timm tag keeps its backbone, since the tag fixes the architecture, and trains
  stage 2 alone with a small decoder (the weights load and train as well; ViT-B's stage-1 optimiser state would
  write gigabytes of checkpoints);
- ``--model.pretrained false`` where the backbone's ImageNet weights would be downloaded (no internet here).

Commands not run here:

- downloads (``curl``, ``hf download``): no internet here. The test writes, at the path the command names, a
  stand-in of the same format (the official MAE key layout, timm's safetensors), scaled to ViT-tiny where the
  budget swaps the encoder;
- ``make test``: this test suite itself;
- the benchmarks (``isstad-benchmark``, ``python -m benchmarks...``): each is up to an hour of CPU, run by hand on a
  quiet machine (every page names its command and machine); ``tests/test_benchmark.py`` runs the same runner on
  ``configs/benchmark/tiny.yaml``.

Every command must end with status 0, and every writer must say where it wrote (``checkpoint written:``,
``pictures written under``, ``Exported``), to a path that exists.

``anomalib`` and ``isstad-predict`` commands run in children forked from one warm interpreter
(:mod:`tests.warm_commands`: real processes with the command's own directory, environment, argv and exit status,
without 6.5 s of imports each); anything else (``make demo``, a command with shell syntax) runs through ``bash``.
All of it takes about 3 minutes on a quiet 2-core AMD EPYC (5.6 with a fresh interpreter per command), so it is part
of ``make test``; ``make test-docs`` runs it alone (marker ``doc_commands``). The static check below also runs on
every command (no placeholders, known programs, the configs and data folders a command names exist).
"""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, SHARED_DATA, command_env
from tests.warm_commands import PROGRAMS as WARM_PROGRAMS
from tests.warm_commands import WarmCommands

DOCUMENTS = sorted(str(path.relative_to(REPO)) for path in [REPO / "README.md", *(REPO / "docs").rglob("*.md"),
                                                            *(REPO / "isstad_plugin").rglob("README.md")]
                   if "```bash" in path.read_text())
NOT_RUN = ("make test", "isstad-benchmark ", "python -m benchmarks.")  # see the module docstring
DOWNLOADERS = ("curl ", "wget ", "hf download ")
BUDGET = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
          "--trainer.limit_predict_batches", "2", "--trainer.enable_progress_bar", "false"]
DATA_BUDGET = ["--data.train_batch_size", "4", "--data.eval_batch_size", "4", "--data.num_workers", "0"]
ISSTAD_BUDGET = ["--model.image_size", "64", "--model.stage1_epochs", "1", "--model.stage2_epochs", "1",
                 "--model.train_cache_gb", "0"]
CUTPASTE_BUDGET = ["--model.image_size", "64", "--model.patch_size", "32", "--model.patch_stride", "16",
                   "--model.score_sigma", "4", "--trainer.max_epochs", "1"]
SMALL_DECODER = ["--model.decoder_embed_dim", "64", "--model.decoder_depth", "1", "--model.decoder_num_heads", "4"]
FILE_DECODER_DEPTH = 1  # the stand-ins' decoder: 64 wide (as SMALL_DECODER), one block
FILE_DECODER = ["--model.decoder_embed_dim", "64", "--model.decoder_depth", str(FILE_DECODER_DEPTH + 1),
                "--model.decoder_num_heads", "4"]  # deeper than the file's: loaded blocks kept, the next one new
TIMM_TAG = "vit_base_patch16_224.mae"
# A timm tag fixes the encoder (ViT-B): its weights are proven to load and train through stage 2 alone with a small
# decoder, without writing ViT-B's stage-1 optimiser state (gigabytes of checkpoints for the same proof).
TIMM_TAG_BUDGET = ["--model.stage1_epochs", "0", *SMALL_DECODER]


def shell_commands(document: Path) -> list[str]:
    """The commands of every ``bash`` block, continuations joined, comments and blank lines dropped."""
    commands, block, inside = [], "", False
    for line in document.read_text().splitlines():
        if line.strip().startswith("```"):
            inside = not inside and line.strip() == "```bash"
            continue
        if not inside:
            continue
        block += re.sub(r"(^|\s)#.*$", "", line).rstrip() if "#" in line else line.rstrip()
        if block.endswith("\\"):
            block = block[:-1].rstrip() + " "
            continue
        if block.strip():
            commands.append(" ".join(block.split()))
        block = ""
    return commands


def model_of(words: list[str]) -> str:
    """``isstad`` or ``cutpaste``: from ``--model`` or the config's file name."""
    for flag, value in itertools.pairwise(words):
        if flag == "--model":
            return value.rpartition(".")[2].lower()
        if flag == "-c":
            return "cutpaste" if "cutpaste" in value else "isstad"
    return "isstad"


def with_budget(command: str) -> str:
    """``command`` with the short budget appended (see the module docstring); other commands unchanged."""
    words = shlex.split(command)
    if words[:1] != ["anomalib"] or words[1] not in {"train", "fit", "test", "predict"}:
        return command
    extra = list(BUDGET)
    if words[1] != "predict":  # a predict's --data is a folder, not a datamodule
        extra += DATA_BUDGET
    if words[1] in {"train", "fit"}:
        if model_of(words) == "isstad":
            extra += ISSTAD_BUDGET + (TIMM_TAG_BUDGET if "timm:" in command else ["--model.backbone", "vit_tiny"])
            if "--model.weights" not in words:  # a small decoder (see the docstring)
                extra += SMALL_DECODER
            elif "timm:" not in command:  # a file's decoder: 64 wide like its stand-in, one block deeper
                extra += FILE_DECODER
        else:
            extra += CUTPASTE_BUDGET + (["--model.pretrained", "false"] if "cutpaste.yaml" in command else [])
    return f"{command} {shlex.join(extra)}"


# ------------------------------------------------------------------ stand-ins for what the downloads would bring
def mae_file(path: Path, decoder_depth: int, authors: bool = False) -> None:
    """An official MAE (or the authors' stage-1) file in its exact key layout, with a ViT-tiny encoder and, if
    ``decoder_depth``, a 64-wide decoder of that many blocks (the official files: 512 wide, 8 or 6 blocks)."""
    from tests.models.isstad.test_weights import TINY_DEPTH, TINY_DIM, mae_shapes, random_state, stage1_checkpoint

    state = random_state(mae_shapes(TINY_DIM, TINY_DEPTH, 64 if decoder_depth else None, decoder_depth))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**stage1_checkpoint(), "model": state} if authors else {"model": state}, path)


def timm_file(path: Path) -> None:
    """timm's ``model.safetensors`` of the tag: the real architecture and key names, random values but MAE's fixed
    sin-cos position embeddings (which the loader checks)."""
    import timm
    from safetensors.torch import save_file

    from tests.models.isstad.test_weights import mae_sincos

    state = timm.create_model(TIMM_TAG, pretrained=False).state_dict()
    grid = int((state["pos_embed"].shape[1] - 1) ** 0.5)
    state["pos_embed"] = torch.from_numpy(mae_sincos(state["pos_embed"].shape[-1], grid, grid)).float().unsqueeze(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)


def stand_in(command: str, workspace: Path) -> None:
    """Write what a download command would have written (see the module docstring)."""
    words = shlex.split(command)
    if words[0] == "curl":
        target = workspace / words[words.index("-o") + 1]
        mae_file(target, decoder_depth=FILE_DECODER_DEPTH if "visualize" in target.name else 0)
    elif words[:2] == ["hf", "download"]:
        timm_file(workspace / words[words.index("--local-dir") + 1] / words[3])
    else:
        pytest.fail(f"no stand-in for {command!r}")


# ------------------------------------------------------------------ the run
def workspace_for(tmp_path: Path, text: str) -> tuple[Path, dict[str, str]]:
    """``tmp_path/main``: a checkout's layout (configs, Makefile, the venv) with ``../shared/data`` beside it and the
    stand-ins the document ``text`` needs beyond its downloads; and the environment its commands run in."""
    main = tmp_path / "main"
    main.mkdir()
    for name in ("configs", "Makefile", "pyproject.toml"):
        (main / name).symlink_to(REPO / name)
    (main / ".venv").mkdir()  # this interpreter's environment, marked installed for the Makefile
    (main / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
    (main / ".venv" / ".isstad-installed").touch()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    (tmp_path / "shared" / "weights").symlink_to(SHARED_DATA.parent / "weights")  # the offline ImageNet ViT-Tiny
    authors = "ISSTAD/saved_models/step1_saved_models/magnetic_tile/checkpoint-0.75.pth"
    if authors in text:  # made by the authors' own code (not downloadable): a stand-in, in their format
        mae_file(main / authors, FILE_DECODER_DEPTH, authors=True)
    return main, command_env()


def said_paths(output: str) -> list[Path]:
    patterns = (r"checkpoint written: (/\S+)", r"pictures written under (/\S+)", r"Exported (/\S+)")
    return [Path(match) for pattern in patterns for match in re.findall(pattern, output)]


PROGRAMS = ("anomalib ", "make ", "isstad-predict ", "isstad-demo", "isstad-benchmark ", "python -m benchmarks.",
            *DOWNLOADERS)
PLACEHOLDER = re.compile(r"\.\.\.|<[a-z_]+>|\bpath/to\b|\bCKPT\b(?!=)|\bMODEL\b|\bDATA\b")


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_command_is_complete(document: str) -> None:
    """No placeholders, a program this project documents, and every config or data path the command names exists
    (paths under results/ or weights/ are made by earlier commands of the document, which the full run checks)."""
    for command in shell_commands(REPO / document):
        if re.fullmatch(r"[A-Z_]+=\S+", command):
            continue
        assert not PLACEHOLDER.search(command.replace("$CKPT", "")), f"{document}: placeholder in {command!r}"
        assert command.startswith(PROGRAMS), f"{document}: unknown program in {command!r}"
        for word in shlex.split(command):
            word = word.rpartition("@")[2] if word.startswith("timm:") else word  # timm:<tag>@<file>: the file
            if word.startswith(("configs/", "../shared/")):
                target = REPO / word if word.startswith("configs/") else SHARED_DATA.parent / word[len("../shared/"):]
                assert target.exists(), f"{document}: {command!r} names {word}, which does not exist"


def expand(command: str, variables: dict[str, str]) -> str:
    """``command`` with the document's shell variables (``$NAME``, ``${NAME}``) replaced by their values."""
    return re.sub(r"\$\{?([A-Z_]+)\}?", lambda match: variables[match[1]], command)


SHELL_SYNTAX = re.compile(r"[|;&<>`*?]|\$\(")


@pytest.mark.doc_commands
@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_command_runs_as_written(document: str, tmp_path: Path, warm: WarmCommands) -> None:
    commands = shell_commands(REPO / document)
    assert commands, f"{document} has no bash commands"
    workspace, env = workspace_for(tmp_path, (REPO / document).read_text())
    variables: dict[str, str] = {}
    for number, command in enumerate(commands):
        if re.fullmatch(r"[A-Z_]+=\S+", command):  # a shell variable for the document's later commands
            name, _, value = command.partition("=")
            variables[name] = value
            continue
        if command.startswith(NOT_RUN):
            continue
        if command.startswith(DOWNLOADERS):
            stand_in(command, workspace)
            continue
        start = time.perf_counter()
        words = shlex.split(with_budget(expand(command, variables)))
        if words[0] in WARM_PROGRAMS and not SHELL_SYNTAX.search(command):
            result = warm.run(words, workspace, env, tmp_path / "output" / str(number))
        else:  # through bash, as a reader's shell would
            script = "\n".join(["set -euo pipefail", *(f"{k}={v}" for k, v in variables.items()),
                                 with_budget(command)])
            result = subprocess.run(["bash", "-c", script], cwd=workspace, env=env, capture_output=True,
                                    text=True, timeout=600, check=False)
        output = result.stdout + result.stderr
        print(f"{time.perf_counter() - start:6.1f} s  {command}")  # shown with pytest -rP
        assert result.returncode == 0, f"{document}: {command}\n{output[-4000:]}"
        writes = command.startswith(("anomalib train", "anomalib fit", "anomalib test", "anomalib predict",
                                     "anomalib export"))
        assert not writes or said_paths(output), f"{document}: {command} did not say where it wrote\n{output[-2000:]}"
        for path in said_paths(output):
            assert path.exists(), f"{document}: {command} named {path}, which does not exist"
