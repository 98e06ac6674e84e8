"""The GPU run's command, on the CPU at a tiny size: the same script, the same code path, only the GPU machine's
packages importable (``tests/device_env``), then the page generated from what it wrote."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import device_prepare, gpu_report
from tests.conftest import REPO, make_slice


@pytest.fixture(scope="module")
def device_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_slice(tmp_path_factory.mktemp("device_data"), n_train=8, n_good=4, defects={"crack": 2, "blowhole": 2})
    out = tmp_path_factory.mktemp("device_out")
    # the carried wheels are CPython 3.12's (the GPU machine's): here the packages are installed already, and
    # tests/device_env hides all but the GPU machine's and the wheels'
    env = {**os.environ, "OUT": str(out), "DEVICE_DATA": str(root), "PYTHON": sys.executable, "WHEELS": "none",
           "PYTHONPATH": str(REPO / "tests" / "device_env")}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "device_run.sh"), "--device", "cpu", "--size", "tiny",
                             "--workers", "0", "--budget-s", "900"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


def test_the_device_run_measures_every_phase(device_output: Path) -> None:
    environment = json.loads((device_output / "environment.json").read_text())
    assert environment["device"] == "cpu"
    assert environment["packages"]["anomalib"] == importlib.metadata.version("anomalib")
    # what ran is what device_prepare would carry from this environment
    assert [f"{name}=={version}" for name, version in environment["carried_wheels"].items()] == \
        device_prepare.resolve(device_prepare.wanted_wheels())
    throughput = json.loads((device_output / "throughput.json").read_text())
    assert set(throughput["precisions"]) == {"32-true", "bf16-mixed"}
    for row in throughput["precisions"].values():
        for stage in (1, 2):
            rate = row[f"stage{stage}"]
            assert rate["images_per_s"] > 0 and rate["achieved_tflops"] > 0, rate
    assert throughput["flops_per_image"]["1"] > 0 and throughput["flops_per_image"]["2"] > 0
    for name in ("training.json", "training_cpu_recipe.json"):
        training = json.loads((device_output / name).read_text())
        assert training["trained_epochs"] == training["planned_epochs"] == [2, 2]
        assert set(training["metrics"]) == {"image_AUROC", "image_F1", "pixel_AUROC", "pixel_F1", "pixel_AUPRO"}
        assert all(0.0 <= value <= 1.0 for value in training["metrics"].values())
    assert "== machine" in (device_output / "log.txt").read_text()


def test_the_page_is_generated_from_the_run(device_output: Path, tmp_path: Path) -> None:
    page = tmp_path / "gpu.md"
    gpu_report.main([str(device_output), "--page", str(page), "--results", str(tmp_path / "gpu")])
    assert sorted(p.name for p in (tmp_path / "gpu").iterdir()) == sorted(gpu_report.RESULT_FILES)
    text = page.read_text()
    for heading in ("## Throughput of the paper's network", "## The paper's setting from scratch",
                    "## The CPU recipe with four times its epochs", "## How to run it"):
        assert heading in text
    training = json.loads((device_output / "training.json").read_text())
    assert f"| {gpu_report.fmt(training['metrics']['pixel_AUPRO'])} |" in text
    carried = next(line for line in text.splitlines() if line.startswith("Carried wheels"))
    assert f"anomalib {importlib.metadata.version('anomalib')}" in carried


def test_the_published_page_is_generated_from_the_published_results(tmp_path: Path) -> None:
    page = tmp_path / "gpu.md"
    gpu_report.main(["--page", str(page)])
    assert (REPO / "docs" / "benchmarks" / "gpu.md").read_text() == page.read_text()
    if not (gpu_report.RESULTS / "environment.json").is_file():
        assert "No GPU run has been made yet" in page.read_text()


def test_the_carried_wheels_are_the_versions_installed_here(tmp_path: Path) -> None:
    """The wheels are named, not pinned: each carried version is the one this environment (where the suite passes)
    has, whatever the registry served it, and the resolved list is written beside the wheels."""
    names = device_prepare.wanted_wheels()
    assert names and all("=" not in name for name in names)
    resolved = device_prepare.resolve(names)
    assert resolved == [f"{name}=={importlib.metadata.version(name)}" for name in names]
    carried = device_prepare.write_carried(tmp_path, resolved)
    assert carried.read_text().splitlines() == resolved


def test_a_carried_wheel_this_environment_lacks_fails_naming_it() -> None:
    with pytest.raises(SystemExit, match=r"^no-such-wheel-here: named in benchmarks/device_wheels.txt but not"):
        device_prepare.resolve(["anomalib", "no-such-wheel-here"])
