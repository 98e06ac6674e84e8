"""Make anomalib's model look-ups find the plugin's models.

anomalib has no plugin registry; these make ``--model isstad``, ``--model Isstad``,
``--model isstad_plugin.Isstad``, ``get_model("isstad")`` and ``anomalib benchmark`` work:

- importing :mod:`isstad_plugin` defines :class:`~isstad_plugin.Isstad` as a direct subclass of
  ``AnomalibModule`` (what ``get_model`` and jsonargparse search); the start-up hook
  (``isstad_plugin_hook``) does that import whenever ``anomalib.models`` is imported;
- :func:`register_with_anomalib` adds this package's own model modules (nothing else) to anomalib's
  import allow-list so ``get_model({"class_path": "isstad_plugin.Isstad"})`` is accepted, and exposes
  ``Isstad`` / ``Cutpaste`` as ``anomalib.models`` attributes so a bare ``{"class_path": "Isstad"}`` (what the
  benchmark pipeline's config passes to ``get_model``) resolves too;
- :func:`enable_case_insensitive_model_names`, run when anomalib's CLI module is imported, lets the CLI
  resolve a class name the way ``get_model`` does (case-insensitive, snake_case accepted), which stock
  anomalib lacks even for its own models;
- :func:`enable_cli_seed_for_plugin_models`, run when anomalib's CLI module is imported, makes
  ``seed_everything`` (config or ``--seed_everything``) take effect for this package's models: anomalib 2.7's CLI
  declares it ("run seed_everything with this value before classes instantiation") but never calls it; stock
  models keep anomalib's behaviour;
- :func:`enable_mixed_benchmark_results`, run when anomalib's benchmark job module is imported, lets
  ``anomalib benchmark`` tabulate jobs whose result keys differ (any grid over models with different
  ``init_args`` or metrics), which stock anomalib loses with a ``KeyError`` before writing the CSV.
"""

from __future__ import annotations

from typing import Any

PLUGIN_MODELS = ("Isstad", "Cutpaste")
PLUGIN_MODULES = (
    "isstad_plugin",
    "isstad_plugin.models",
    "isstad_plugin.models.isstad",
    "isstad_plugin.models.cutpaste",
)


def register_with_anomalib() -> None:
    """Allow ``get_model`` to import models from this package (and only this package); expose them by name."""
    from anomalib import models

    import isstad_plugin.models as plugin_models

    models.ALLOWED_MODULES.update(PLUGIN_MODULES)
    for name in PLUGIN_MODELS:
        if name not in vars(models):  # never shadow an anomalib model of the same name
            setattr(models, name, getattr(plugin_models, name))


def _normalise(name: str) -> str:
    return name.replace("_", "").lower()


def enable_case_insensitive_model_names() -> None:
    """Let jsonargparse resolve ``--model isstad`` / ``--model padim`` to the one class of that name.

    Exact names and dotted paths resolve exactly as before; only a name that resolves to nothing is
    retried case-insensitively among the subclasses jsonargparse already knows, and only a unique match
    is taken. Idempotent.
    """
    from jsonargparse import _from_config, _typehints

    original = _typehints.resolve_class_path_by_name
    if getattr(original, "_isstad_case_insensitive", False):
        return

    def resolve_class_path_by_name(cls: Any, name: str) -> str:  # noqa: ANN401
        class_path = original(cls, name)
        if "." in class_path or isinstance(cls, tuple):
            return class_path
        wanted = _normalise(name)
        matches = [path for path in _typehints.get_all_subclass_paths(cls) if _normalise(path.rsplit(".", 1)[-1]) == wanted]
        unique = {_typehints.import_object(path) for path in matches}
        return matches[0] if len(unique) == 1 else class_path

    resolve_class_path_by_name._isstad_case_insensitive = True  # type: ignore[attr-defined]
    _typehints.resolve_class_path_by_name = resolve_class_path_by_name
    _from_config.resolve_class_path_by_name = resolve_class_path_by_name


def enable_cli_seed_for_plugin_models() -> None:
    """Apply the CLI's ``seed_everything`` before instantiation when the model is one of ours. Idempotent.

    Targets anomalib 2.7's ``AnomalibCLI.before_instantiate_classes``. An int seeds Python, NumPy and torch (and
    DataLoader workers); ``True`` (the CLI default) picks a random seed and logs it, as Lightning's own CLI
    does; ``False`` leaves the generators alone. Our models' ``corruption_seed: null`` then follows the seed.
    """
    from anomalib.cli.cli import AnomalibCLI

    original = AnomalibCLI.before_instantiate_classes
    if getattr(original, "_isstad_seed", False):
        return

    def before_instantiate_classes(self: AnomalibCLI) -> None:
        original(self)
        config = self.config.get(str(self.config.get("subcommand")), self.config)
        model = config.get("model") if hasattr(config, "get") else None
        class_path = str(model.get("class_path", "") if hasattr(model, "get") else model or "")
        seed = config.get("seed_everything", self.config.get("seed_everything"))
        if not class_path.startswith(f"{__package__}.") or seed is False or seed is None:
            return
        from lightning.pytorch import seed_everything

        seed_everything(None if seed is True else int(seed), workers=True)

    before_instantiate_classes._isstad_seed = True  # type: ignore[attr-defined]
    AnomalibCLI.before_instantiate_classes = before_instantiate_classes


def enable_mixed_benchmark_results() -> None:
    """Let ``anomalib benchmark`` collect results whose keys differ between jobs. Idempotent.

    Stock ``BenchmarkJob.collect`` takes its columns from the first job's result and raises ``KeyError`` (the
    CSV is never written) when a later job has other keys: every grid over models with different ``init_args``
    (or evaluators) does. This replacement takes the union of keys in first-seen order; a job lacking a key
    (e.g. Patchcore has no pixel AUPRO) gets an empty cell.
    """
    import pandas as pd
    from anomalib.pipelines.benchmark.job import BenchmarkJob

    if getattr(BenchmarkJob.collect, "_isstad_mixed_keys", False):
        return

    def collect(results: list[dict[str, Any]]) -> pd.DataFrame:
        return pd.DataFrame.from_records(results).convert_dtypes()  # nullable dtypes: 64 stays 64 beside a gap

    collect._isstad_mixed_keys = True  # type: ignore[attr-defined]
    BenchmarkJob.collect = staticmethod(collect)
