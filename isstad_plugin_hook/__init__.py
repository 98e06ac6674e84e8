"""Start-up hook that makes anomalib find the ``isstad_plugin`` models, and never breaks anomalib.

anomalib has no plugin registry: ``get_model("isstad")`` only sees imported direct subclasses of
``AnomalibModule`` and the CLI resolves ``--model`` names only among imported classes. This module is
imported by ``isstad_plugin.pth`` at interpreter start-up and installs a tiny ``sys.meta_path`` finder that
does nothing until one of the watched anomalib modules has been imported:

- ``anomalib.models``: imports ``isstad_plugin`` so ``get_model("isstad")`` and ``--model Isstad`` work.
- ``anomalib.cli.cli``: lets the CLI resolve model names case-insensitively (``--model isstad``) and apply
  ``seed_everything`` for this package's models (:func:`isstad_plugin.patches.apply_cli_patches`).
- ``anomalib.pipelines.benchmark.job``: lets ``anomalib benchmark`` tabulate models whose result keys differ and
  use the offline backbone (:func:`isstad_plugin.patches.apply_benchmark_patches`,
  :func:`isstad_plugin.backbones.register_offline_backbones`).
- ``anomalib.engine.engine``: an Engine given no epoch budget trains this package's models for their own epochs
  (:func:`isstad_plugin.patches.apply_engine_patches`).

Quiet: when a watched module is first imported, three deprecation warnings that anomalib's and Lightning's own
code raises with the pinned library versions (about their internals, nothing a user can act on) are filtered by
their exact message (``_THIRD_PARTY_NOISE``); every other warning shows as before.

Fail-safe: if the plugin cannot be imported (a broken install, an incompatible library), the watched module is
left exactly as anomalib made it, one warning says why, and the hook stays quiet from then on.

It imports nothing but the standard library's ``sys`` at start-up, so processes that never import
anomalib pay only the cost of reading this file.
"""


import sys

_WATCHED = ("anomalib.models", "anomalib.cli.cli", "anomalib.pipelines.benchmark.job", "anomalib.engine.engine")


# (message regex, category): raised by anomalib's model imports (timm.models.layers, its own dinov2 package) and by
# Lightning's pytree helper with torch >= 2.10 on every fit; none comes from the user's code or ours.
_THIRD_PARTY_NOISE = (
    (r"Importing from timm\.models\.layers is deprecated", FutureWarning),
    (r"The anomalib\.models\.components\.dinov2 package is deprecated", FutureWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


def _quiet_third_party_noise() -> None:
    import warnings

    for message, category in _THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


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
            _quiet_third_party_noise()
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


_failed = False  # the plugin could not be imported: anomalib stays stock, warned once


def _after_import(fullname: str, module) -> None:  # noqa: ANN001
    """Apply the plugin's part for ``fullname``; any failure leaves anomalib as it is, with one warning."""
    global _failed  # noqa: PLW0603
    del module
    if _failed:
        return
    try:
        if fullname == "anomalib.models":
            import isstad_plugin  # noqa: F401  (defines the models as AnomalibModule subclasses)
        elif fullname == "anomalib.cli.cli":
            from isstad_plugin.patches import apply_cli_patches

            apply_cli_patches()
        elif fullname == "anomalib.pipelines.benchmark.job":
            from isstad_plugin.backbones import register_offline_backbones
            from isstad_plugin.patches import apply, apply_benchmark_patches

            apply_benchmark_patches()
            apply(register_offline_backbones, "the offline backbone efficientnet_lite0.pypi_in1k is not available")
        elif fullname == "anomalib.engine.engine":
            from isstad_plugin.patches import apply_engine_patches

            apply_engine_patches()
    except Exception as error:  # noqa: BLE001  (never break `import anomalib.models` for every model)
        _failed = True
        import warnings

        warnings.warn(f"isstad-plugin is installed but could not be loaded ({type(error).__name__}: {error}); "
                      "anomalib works as without it, and its models Isstad and Cutpaste are not available. "
                      "Reinstall isstad-plugin (pip install --force-reinstall isstad-plugin) or uninstall it.",
                      RuntimeWarning, stacklevel=2)


_FINDER = _PostImportFinder()


def install() -> None:
    """Put the post-import finder first on ``sys.meta_path`` (idempotent)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
