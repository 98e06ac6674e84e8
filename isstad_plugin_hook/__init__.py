"""Start-up hook that makes anomalib find the ``isstad_plugin`` models.

anomalib has no plugin registry: ``get_model("isstad")`` only sees imported direct subclasses of
``AnomalibModule`` and the CLI resolves ``--model`` names only among imported classes. This module is
imported by ``isstad_plugin.pth`` at interpreter start-up and installs a tiny ``sys.meta_path`` finder that
does nothing until one of the watched anomalib modules is imported:

- ``anomalib``: adds a module ``__getattr__`` so ``import anomalib; anomalib.models`` works (lazily).
- ``anomalib.models``: imports ``isstad_plugin`` so ``get_model("isstad")`` and ``--model Isstad`` work.
- ``anomalib.cli.cli``: lets the CLI resolve model names case-insensitively (``--model isstad``) and apply
  ``seed_everything`` for this package's models.
- ``anomalib.pipelines.benchmark.job``: lets ``anomalib benchmark`` tabulate models whose result keys differ.

It imports nothing but the standard library's ``sys`` at start-up, so processes that never import
anomalib pay only the cost of reading this file.
"""


import sys

_WATCHED = ("anomalib", "anomalib.models", "anomalib.cli.cli", "anomalib.pipelines.benchmark.job")


class _PostImportFinder:
    """Meta-path finder that runs :func:`_after_import` once a watched module has executed."""

    def __init__(self) -> None:
        self._busy: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201
        if fullname not in _WATCHED or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            from importlib.util import find_spec

            spec = find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_notify(module):  # noqa: ANN001, ANN202
            exec_module(module)
            _after_import(fullname, module)

        # Wrap only this spec's loader instance method: other modules are untouched.
        spec.loader = _LoaderProxy(loader, exec_and_notify)
        return spec


class _LoaderProxy:
    """Loader that delegates everything to ``loader`` but runs ``exec_module`` through ``exec_hook``."""

    def __init__(self, loader, exec_hook) -> None:  # noqa: ANN001
        self._loader = loader
        self._exec_hook = exec_hook

    def __getattr__(self, name):  # noqa: ANN001, ANN204
        return getattr(self._loader, name)

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self._exec_hook(module)


def _lazy_submodule_getattr(module):  # noqa: ANN001, ANN202
    """``__getattr__`` for the ``anomalib`` package: import ``anomalib.<name>`` on first attribute access."""

    def __getattr__(name: str):  # noqa: ANN202
        if name.startswith("_"):
            raise AttributeError(name)
        import importlib

        try:
            return importlib.import_module(f"{module.__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{module.__name__}.{name}":
                raise
            msg = f"module {module.__name__!r} has no attribute {name!r}"
            raise AttributeError(msg) from None

    return __getattr__


def _after_import(fullname: str, module) -> None:  # noqa: ANN001
    if fullname == "anomalib":
        if "__getattr__" not in module.__dict__:
            module.__getattr__ = _lazy_submodule_getattr(module)
    elif fullname == "anomalib.models":
        if "isstad_plugin" not in sys.modules:
            import isstad_plugin  # noqa: F401  (registers the models as AnomalibModule subclasses)
    elif fullname == "anomalib.cli.cli":
        from isstad_plugin.registration import enable_case_insensitive_model_names, enable_cli_seed_for_plugin_models

        enable_case_insensitive_model_names()
        enable_cli_seed_for_plugin_models()
    elif fullname == "anomalib.pipelines.benchmark.job":
        from isstad_plugin.registration import enable_mixed_benchmark_results

        enable_mixed_benchmark_results()


_FINDER = _PostImportFinder()


def install() -> None:
    """Put the post-import finder first on ``sys.meta_path`` (idempotent)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
