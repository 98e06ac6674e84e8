"""The benchmark's YAML configuration (``configs/benchmark/*.yaml``), validated before anything runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf


@dataclass(frozen=True)
class RunSpec:
    """One model of the comparison.

    Args:
        name: row label, unique in the config (e.g. ``isstad``, ``isstad_target_clean``).
        model: ``{class_path, init_args}`` as in an anomalib config.
        max_epochs: the fixed training schedule (trainer ``max_epochs``); no early stopping, no selection.
        backbones: ImageNet backbones to try in order, each a dict merged into ``init_args`` (its
            ``backbone`` key names a timm model); the first whose weights can be loaded here is used.
            Empty for models without a pretrained backbone.
        trainer: Trainer arguments for this run, over the benchmark's ``trainer`` (e.g.
            ``check_val_every_n_epoch`` equal to ``max_epochs`` to validate only once, at the end).
        note: one line shown under the table (what this row ablates).
        rescores: another run's name: this run trains nothing and scores *that run's* trained models (same category
            and seed) with its own options, which may differ from that run's in scoring options only (a later
            scoring recipe as its own row); its training minutes and memory are that run's.
    """

    name: str
    model: dict[str, Any]
    max_epochs: int
    backbones: list[dict[str, Any]] = field(default_factory=list)
    trainer: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    rescores: str = ""


@dataclass(frozen=True)
class BenchmarkConfig:
    """The whole benchmark: data, categories, runs and measurement settings."""

    data: dict[str, Any]
    categories: list[str]
    runs: list[RunSpec]
    seed: int = 42
    seeds: list[int] = field(default_factory=list)  # several: one row per seed, the page gives mean +- std
    output_dir: str = "results/benchmark"
    trainer: dict[str, Any] = field(default_factory=lambda: {"accelerator": "cpu", "devices": 1})
    latency_repeats: int = 20
    threads: int = 2
    title: str = "Benchmark"

    @property
    def all_seeds(self) -> list[int]:
        """The seeds every (run, category) trains with: ``seeds``, else the one ``seed``. A seed sets the training
        randomness; the validation/test split of the test folder always comes from ``seed``, so every row of every
        model is tested on the same half (no seed's test half overlaps the validation half another chose on)."""
        return list(self.seeds) or [self.seed]

    def row_spec(self, run: RunSpec, category: str, seed: int | None = None) -> dict[str, Any]:
        """Everything one row's job needs, JSON-serialisable; its hash decides whether a stored row is current.
        ``seed`` (default: the config's) seeds the training; ``split_seed``, always the config's ``seed`` and always
        an explicit integer (0 included), makes the validation/test split."""
        data = {"class_path": self.data["class_path"],
                "init_args": {**self.data.get("init_args", {}), "category": category}}
        run_spec = {k: v for k, v in asdict(run).items() if k != "rescores" or v}  # old rows keep their hash
        return {"run": run_spec, "category": category, "data": data,
                "seed": int(self.seed if seed is None else seed), "split_seed": int(self.seed),
                "trainer": {**self.trainer, **run.trainer}, "latency_repeats": self.latency_repeats,
                "threads": self.threads}


def spec_hash(spec: dict[str, Any]) -> str:
    """Short stable hash of a row spec."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def load_config(path: Path | str, overrides: list[str] | None = None) -> BenchmarkConfig:
    """Read and check a benchmark YAML; ``overrides`` are ``dotted.key=yaml-value`` items (``runs.0.max_epochs=3``)."""
    path = Path(path)
    if not path.is_file():
        msg = f"Benchmark config {path} does not exist (see configs/benchmark/ for examples)."
        raise FileNotFoundError(msg)
    raw = OmegaConf.load(path)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            msg = f"Override {item!r} must look like dotted.key=value (e.g. data.init_args.root=/data)."
            raise ValueError(msg)
        OmegaConf.update(raw, key, yaml.safe_load(value), merge=True)
    values = OmegaConf.to_container(raw, resolve=True)
    known = set(BenchmarkConfig.__dataclass_fields__)
    if unknown := sorted(set(values) - known):
        msg = f"{path}: unknown key(s) {unknown}; allowed: {sorted(known)}."
        raise ValueError(msg)
    for key in ("data", "categories", "runs"):
        if not values.get(key):
            msg = f"{path}: '{key}' is required and must not be empty."
            raise ValueError(msg)
    if "class_path" not in values["data"]:
        msg = f"{path}: data needs a class_path (e.g. anomalib.data.MVTecAD)."
        raise ValueError(msg)
    runs = []
    for index, run in enumerate(values.pop("runs")):
        if unknown := sorted(set(run) - set(RunSpec.__dataclass_fields__)):
            allowed = sorted(RunSpec.__dataclass_fields__)
            msg = f"{path}: runs[{index}] has unknown key(s) {unknown}; allowed: {allowed}."
            raise ValueError(msg)
        for key in ("name", "model", "max_epochs"):
            if key not in run:
                msg = f"{path}: runs[{index}] needs '{key}'."
                raise ValueError(msg)
        if "class_path" not in run["model"]:
            msg = f"{path}: runs[{index}] ({run['name']}) model needs a class_path."
            raise ValueError(msg)
        if int(run["max_epochs"]) < 1:
            msg = f"{path}: runs[{index}] ({run['name']}) max_epochs must be >= 1."
            raise ValueError(msg)
        runs.append(RunSpec(**run))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        msg = f"{path}: run names must be unique, got {names}."
        raise ValueError(msg)
    for index, run in enumerate(runs):
        if run.rescores and run.rescores not in names[:index]:
            msg = f"{path}: runs[{index}] ({run.name}) rescores {run.rescores!r}, which must be a run listed before it."
            raise ValueError(msg)
    return BenchmarkConfig(runs=runs, **values)
