"""Every change isstad-plugin makes to third-party behaviour, in one place, each guarded.

anomalib has no plugin registry, so a plugin model needs a few changes to anomalib, jsonargparse, timm and
Lightning. They all live here; nothing else in the package touches another library's internals. Each one

- names the versions it was written for and tested with (``pyproject.toml`` pins those ranges);
- is applied through :func:`apply`, which turns any failure (an internal that moved in another version) into one
  warning that says what is lost: the library then behaves exactly as stock;
- is idempotent and applied only when needed: :func:`register_models` when ``isstad_plugin`` is imported (what
  ``anomalib train --model isstad`` needs), the CLI, Engine and benchmark changes when anomalib's CLI, engine and
  benchmark job modules are imported (by the start-up hook ``isstad_plugin_hook``), the timm tag and
  the DDP option by the code that needs them, when it runs.

This is the bottom layer: it imports nothing of the plugin. What it registers (the models and their modules) is
passed in by the code that knows them (``isstad_plugin/__init__.py``, the start-up hook).

The changes, each with the version it targets (tested) and what it touches:

- :func:`register_models`: the plugin's model modules on ``anomalib.models.ALLOWED_MODULES``, its model classes as
  ``anomalib.models`` attributes (anomalib 2.7.0; public names);
- :func:`case_insensitive_model_names`: ``--model isstad`` resolves as ``get_model`` does (jsonargparse 4.46.0;
  private ``_typehints.resolve_class_path_by_name``);
- :func:`cli_seed_for_plugin_models`: the CLI's ``seed_everything`` applied for our models (anomalib 2.7.0;
  ``AnomalibCLI.before_instantiate_classes``);
- :func:`mixed_benchmark_results`: ``anomalib benchmark`` tabulates jobs with different result keys (anomalib 2.7.0;
  ``BenchmarkJob.collect``);
- :func:`register_timm_tag`: an ``arch.tag`` whose weights are a local file (timm 1.0.31; private
  ``timm.models._registry``);
- :func:`model_epoch_budget`: an Engine given no epoch or step budget trains our models for their own epochs
  (``stage1_epochs + stage2_epochs``, CutPaste's ``max_epochs``) instead of Lightning's "max_epochs was not set:
  1000" (anomalib 2.7.0; private ``anomalib.engine.engine._TrainerArgumentsCache.update``);
- :func:`ddp_allow_unused_parameters`: DDP accepts ISSTAD's per-stage unused parameters (Lightning 2.6.6; private
  ``DDPStrategy._ddp_kwargs``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

_MARK = "_isstad_plugin_patch"


def apply(patch: Callable[[], Any], lost: str) -> bool:
    """Run ``patch``; on any error warn once, naming the patch and what the user loses (``lost``), and go on.

    Returns:
        Whether the patch applied.
    """
    try:
        patch()
    except Exception as error:  # noqa: BLE001  (a moved internal must never break anomalib itself)
        name = getattr(patch, "__name__", None) or getattr(getattr(patch, "func", None), "__name__", repr(patch))
        warnings.warn(f"isstad_plugin: {name} could not be applied ({type(error).__name__}: {error}); "
                      f"{lost}. Everything else works as stock anomalib does. Install the versions pinned by "
                      "isstad-plugin to get it back.", RuntimeWarning, stacklevel=2)
        return False
    return True


def _marked(function: Any) -> bool:  # noqa: ANN401
    return getattr(function, _MARK, False)


def _mark(function: Callable) -> Callable:
    setattr(function, _MARK, True)
    return function


def register_models(models: Mapping[str, type], modules: Iterable[str]) -> None:
    """Allow ``get_model`` to import models from ``modules`` (the plugin's, and only those); expose ``models`` by name
    (``{"class_path": "Isstad"}``, what anomalib's benchmark passes to ``get_model``), never shadowing an anomalib
    model of the same name."""
    from anomalib import models as anomalib_models

    anomalib_models.ALLOWED_MODULES.update(modules)
    for name, model in models.items():
        if name not in vars(anomalib_models):
            setattr(anomalib_models, name, model)


def _normalise(name: str) -> str:
    return name.replace("_", "").lower()


def case_insensitive_model_names() -> None:
    """Let jsonargparse resolve ``--model isstad`` / ``--model padim`` to the one class of that name.

    Exact names and dotted paths resolve exactly as before; only a name that resolves to nothing is retried
    case-insensitively (snake_case accepted) among the subclasses jsonargparse already knows, and only a unique
    match is taken. Stock anomalib lacks this even for its own models.
    """
    from jsonargparse import _from_config, _typehints

    original = _typehints.resolve_class_path_by_name
    if _marked(original):
        return

    def resolve_class_path_by_name(cls: Any, name: str) -> str:  # noqa: ANN401
        class_path = original(cls, name)
        if "." in class_path or isinstance(cls, tuple):
            return class_path
        wanted = _normalise(name)
        matches = [path for path in _typehints.get_all_subclass_paths(cls)
                   if _normalise(path.rsplit(".", 1)[-1]) == wanted]
        unique = {_typehints.import_object(path) for path in matches}
        return matches[0] if len(unique) == 1 else class_path

    _typehints.resolve_class_path_by_name = _mark(resolve_class_path_by_name)
    _from_config.resolve_class_path_by_name = resolve_class_path_by_name


def cli_seed_for_plugin_models() -> None:
    """Apply the CLI's ``seed_everything`` before instantiation when the model is one of ours.

    anomalib 2.7's CLI declares it ("run seed_everything with this value before classes instantiation") but never
    calls it. An int seeds Python, NumPy and torch (and DataLoader workers); ``True`` (the CLI default) picks a random
    seed and logs it, as Lightning's own CLI does; ``False`` leaves the generators alone. Stock models keep anomalib's
    behaviour.
    """
    from anomalib.cli.cli import AnomalibCLI

    original = AnomalibCLI.before_instantiate_classes
    if _marked(original):
        return

    def before_instantiate_classes(self: AnomalibCLI) -> None:
        original(self)
        config = self.config.get(str(self.config.get("subcommand")), self.config)
        model = config.get("model") if hasattr(config, "get") else None
        class_path = str(model.get("class_path", "") if hasattr(model, "get") else model or "")
        seed = config.get("seed_everything", self.config.get("seed_everything"))
        if not class_path.startswith("isstad_plugin.") or seed is False or seed is None:
            return
        from lightning.pytorch import seed_everything

        seed_everything(None if seed is True else int(seed), workers=True)

    AnomalibCLI.before_instantiate_classes = _mark(before_instantiate_classes)


def mixed_benchmark_results() -> None:
    """Let ``anomalib benchmark`` collect results whose keys differ between jobs.

    Stock ``BenchmarkJob.collect`` takes its columns from the first job's result and raises ``KeyError`` (the CSV is
    never written) when a later job has other keys: every grid over models with different ``init_args`` (or
    evaluators) does. This one takes the union of keys in first-seen order; a job lacking a key (e.g. Patchcore has
    no pixel AUPRO) gets an empty cell.
    """
    import pandas as pd
    from anomalib.pipelines.benchmark.job import BenchmarkJob

    if _marked(BenchmarkJob.collect):
        return

    def collect(results: list[dict[str, Any]]) -> pd.DataFrame:
        return pd.DataFrame.from_records(results).convert_dtypes()  # nullable dtypes: 64 stays 64 beside a gap

    BenchmarkJob.collect = staticmethod(_mark(collect))


def model_epoch_budget() -> None:
    """When the Engine got neither ``max_epochs`` nor ``max_steps``, give the trainer our model's own epoch budget
    (``PluginModel.planned_epochs``), so Lightning does not announce (and set) its default of 1000 epochs. A budget
    the user gave is never touched; stock models keep anomalib's behaviour.

    anomalib builds the trainer from these cached arguments after ``model.trainer_arguments`` (which must not set
    ``max_epochs``: anomalib would override the user's budget with it).
    """
    from anomalib.engine.engine import _TrainerArgumentsCache

    original = _TrainerArgumentsCache.update
    if _marked(original):
        return

    def update(self: _TrainerArgumentsCache, model: Any) -> None:  # noqa: ANN401
        original(self, model)
        arguments = self._cached_args  # noqa: SLF001
        planned = getattr(model, "planned_epochs", None)
        if planned and arguments.get("max_epochs") is None and arguments.get("max_steps") in {None, -1}:
            arguments["max_epochs"] = planned

    _TrainerArgumentsCache.update = _mark(update)


def register_timm_tag(name: str, file: str, mean: tuple[float, float, float], std: tuple[float, float, float],
                      origin_url: str, description: str) -> None:
    """Add ``arch.tag`` (``name``) to timm's pretrained registry with a local ``file`` as its only source, so
    ``timm.create_model(name, pretrained=True)`` (and anomalib's feature extractors) load it without a network.

    timm's public API can point one ``create_model`` call at a file (``pretrained_cfg_overlay``), but anomalib's
    extractors pass only the name, so the tag must exist in the registry (``timm.models._registry``).
    """
    from timm.models import _registry

    arch, tag = name.split(".", 1)
    cfg = replace(_registry._model_pretrained_cfgs[arch], tag=tag, file=file, url=None, hf_hub_id=None,
                  hf_hub_filename=None, mean=mean, std=std, license=None, origin_url=origin_url, notes=(description,))
    _registry._model_pretrained_cfgs[name] = cfg
    _registry._model_has_pretrained.add(name)
    if name not in _registry._model_with_tags[arch]:
        _registry._model_with_tags[arch].append(name)


def ddp_allow_unused_parameters(strategy: Any) -> None:  # noqa: ANN401
    """Make a DDP ``strategy`` accept parameters that get no gradient (ISSTAD's pixel head in stage 1, its frozen
    encoder in stage 2), unless the user chose; before the strategy wraps the model. Other strategies: nothing.

    The public way is ``--trainer.strategy ddp_find_unused_parameters_true``; a model cannot choose its strategy.
    """
    from lightning.pytorch.strategies import DDPStrategy

    if not isinstance(strategy, DDPStrategy):
        return

    def ddp_find_unused_parameters() -> None:
        strategy._ddp_kwargs.setdefault("find_unused_parameters", True)  # noqa: SLF001

    apply(ddp_find_unused_parameters, "multi-GPU ISSTAD training needs --trainer.strategy "
          "ddp_find_unused_parameters_true")


def apply_cli_patches() -> None:
    """The changes anomalib's CLI needs for our models (run when ``anomalib.cli.cli`` is imported)."""
    apply(case_insensitive_model_names, "model names must be spelled exactly (--model isstad_plugin.Isstad)")
    apply(cli_seed_for_plugin_models, "seed_everything is not applied to ISSTAD/CutPaste runs (as stock anomalib)")


def apply_engine_patches() -> None:
    """The change anomalib's Engine needs for our models (run when ``anomalib.engine.engine`` is imported)."""
    apply(model_epoch_budget, "with no --trainer.max_epochs, Lightning announces 1000 epochs (the models still stop "
          "after their own)")


def apply_benchmark_patches() -> None:
    """The change ``anomalib benchmark`` needs (run when its job module is imported)."""
    apply(mixed_benchmark_results, "anomalib benchmark fails with KeyError on grids whose result keys differ")
