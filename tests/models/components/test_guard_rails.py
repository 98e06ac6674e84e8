"""Guard rails: a fit that would take hours says so early, naming the CPU-sized config; workers fit the cores."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from isstad_plugin import Isstad
from isstad_plugin.models.components import guard_rails
from tests.conftest import TINY_MODEL


def test_a_long_fit_is_announced_with_the_cpu_config(tile_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(guard_rails, "LONG_RUN_HOURS", 0.0)  # every fit counts as long: the message is what we test
    datamodule = MVTecAD(root=tile_root, category="magnetic_tile", train_batch_size=2, eval_batch_size=8,
                         num_workers=0)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with caplog.at_level(logging.WARNING, logger=guard_rails.__name__):
        engine.fit(model=Isstad(**TINY_MODEL, stage1_epochs=1, stage2_epochs=1), datamodule=datamodule)
    (message,) = [record.getMessage() for record in caplog.records if record.name == guard_rails.__name__]
    assert "this fit's 16 steps take about" in message and "configs/isstad_cpu.yaml" in message


def test_workers_are_capped_at_the_cores(tile_root: Path) -> None:
    datamodule = MVTecAD(root=tile_root, category="magnetic_tile", num_workers=10_000)
    guard_rails.fit_workers_to_cores(datamodule, "Isstad")
    assert datamodule.num_workers == guard_rails.available_cores()
    datamodule.num_workers = 0
    guard_rails.fit_workers_to_cores(datamodule, "Isstad")
    assert datamodule.num_workers == 0
