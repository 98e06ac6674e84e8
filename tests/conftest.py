"""Shared fixtures: a small real slice of ../shared/data/magnetic_tile and a tiny ISSTAD configuration."""

from __future__ import annotations

import csv
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.warm_commands import WarmCommands

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test workers share the machine's two cores: one compute thread each (and in their subprocesses).
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
SHARED_DATA = Path(os.environ.get("ISSTAD_SHARED_DATA", REPO.parent / "shared" / "data"))
MAGNETIC_TILE = SHARED_DATA / "magnetic_tile"

TINY_MODEL = {
    "backbone": "vit_tiny",
    "image_size": 64,
    "decoder_embed_dim": 64,
    "decoder_depth": 2,
    "decoder_num_heads": 4,
}


def shared_category(name: str) -> Path:
    """The real category ``name`` under the shared data folder; a test that needs it fails (never skips) without it."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.fail(f"Real test data not found at {folder}: put the shared data beside the checkout "
                    "(../shared/data) or set ISSTAD_SHARED_DATA to the folder holding it.")
    return folder


def make_slice(root: Path, n_train: int = 16, n_good: int = 4, defects: dict[str, int] | None = None) -> Path:
    """Copy the first images of each split (real files, MVTec layout) into ``root/magnetic_tile``."""
    shared_category("magnetic_tile")
    defects = defects or {"crack": 3, "blowhole": 3}
    target = root / "magnetic_tile"

    def copy(split: str, n: int) -> list[str]:
        files = sorted((MAGNETIC_TILE / split).glob("*.png"))[:n]
        (target / split).mkdir(parents=True, exist_ok=True)
        for file in files:
            shutil.copy(file, target / split / file.name)
        return [file.stem for file in files]

    copy("train/good", n_train)
    copy("test/good", n_good)
    for defect, n in defects.items():
        (target / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        for stem in copy(f"test/{defect}", n):
            mask = MAGNETIC_TILE / "ground_truth" / defect / f"{stem}_mask.png"
            shutil.copy(mask, target / "ground_truth" / defect / mask.name)
    return root


@pytest.fixture(scope="session")
def tile_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root folder holding a small real ``magnetic_tile`` category (16 train, 4 good + 6 defective test)."""
    return make_slice(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def magnetic_tile() -> Path:
    """The real ``magnetic_tile`` category (read only)."""
    return shared_category("magnetic_tile")


@pytest.fixture
def tiny_model_args() -> dict:
    return dict(TINY_MODEL)


def command_env() -> dict[str, str]:
    """The environment console commands run in: this interpreter's scripts first on PATH, and the Hub offline
    (nothing may reach for the network)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="session")
def warm() -> Iterator[WarmCommands]:
    """One warm interpreter per test worker for the console commands of every test file (``anomalib``,
    ``isstad-predict``, ``isstad-benchmark``: :mod:`tests.warm_commands`, each command a real forked process, without
    6.5 s of imports). Tests of what a fresh interpreter does (the start-up hook, the first screen's warnings) start
    the real console script instead."""
    server = WarmCommands(command_env())
    yield server
    server.close()


# ------------------------------------------------------------------ scheduling: longest test files first
FILE_SECONDS = REPO / "docs" / "benchmarks" / "test-suite-files.csv"  # written by `python -m benchmarks.test_suite`


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Test files longest first, by their seconds in the last measured run (:data:`FILE_SECONDS`); files it does not
    list follow, most tests first (xdist's own order). ``--dist loadfile`` hands a worker the next file when it runs
    low, so with the long files started first the two workers finish together instead of one waiting out a long file
    handed out late (pyproject's ``--no-loadscope-reorder`` keeps this order; a file's tests keep theirs)."""
    seconds: dict[str, float] = {}
    if FILE_SECONDS.is_file():
        with FILE_SECONDS.open() as handle:
            seconds = {row["test_file"]: float(row["seconds"]) for row in csv.DictReader(handle)}
    def test_file(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    tests_per_file = Counter(map(test_file, items))
    items.sort(key=lambda item: (-seconds.get(test_file(item), 0.0), -tests_per_file[test_file(item)], test_file(item)))


# ------------------------------------------------------------------ temporary files: a passed test's go at once
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """Record each phase's report on the test (``item.phase_reports``) for :func:`remove_a_passed_tests_files`."""
    report = yield
    item.__dict__.setdefault("phase_reports", {})[call.when] = report
    return report


@pytest.fixture(autouse=True)
def remove_a_passed_tests_files(request: pytest.FixtureRequest) -> Iterator[None]:
    """Delete a test's ``tmp_path`` as soon as it passed (pyproject's ``tmp_path_retention_policy = "failed"``
    deletes them only when the session ends: the checkpoints and exports of 300 tests piled up to 5 GB); a failed
    test's files stay for reading."""
    yield
    tmp_path = getattr(request.node, "funcargs", {}).get("tmp_path")  # set up for this test, if it used one
    reports = request.node.__dict__.get("phase_reports", {})
    if tmp_path is not None and reports and all(report.passed for report in reports.values()):
        shutil.rmtree(tmp_path, ignore_errors=True)


# ------------------------------------------------------------------ OpenVINO and the thread's signal stack
@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """Each test, its fixtures' set-up and tear-down included, gives the main thread back its signal stack: OpenVINO
    models released in the order they were made leave it on freed memory, and the next child process to exit then
    kills the test process (isstad_plugin/signal_stack.py; the product's own OpenVINO calls keep it themselves)."""
    from isstad_plugin.signal_stack import keep_signal_stack

    with keep_signal_stack():
        return (yield)
