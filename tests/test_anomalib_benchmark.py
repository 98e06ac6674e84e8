"""Stock ``anomalib benchmark`` with configs/benchmark/mvtec_ad.yaml: ISSTAD and an offline Patchcore side by side."""

from __future__ import annotations

import copy
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, TINY_MODEL, make_slice

CONFIG = REPO / "configs" / "benchmark" / "mvtec_ad.yaml"
BIN = Path(sys.executable).parent


def isstad_and_patchcore(config: dict) -> tuple[dict, dict]:
    isstad, patchcore = config["benchmark"]["model"]["grid"]
    assert (isstad["class_path"], patchcore["class_path"]) == ("Isstad", "Patchcore")
    return isstad, patchcore


def test_config_uses_the_tiny_isstad_and_an_offline_patchcore() -> None:
    isstad, patchcore = isstad_and_patchcore(yaml.safe_load(CONFIG.read_text()))
    tiny = yaml.safe_load((REPO / "configs" / "isstad_tiny.yaml").read_text())
    assert isstad["init_args"] == tiny["model"]["init_args"]
    assert patchcore["init_args"]["backbone"] == "efficientnet_lite0.pypi_in1k"


def test_pipeline_resolves_isstad_by_bare_name_and_keeps_mixed_results() -> None:
    from anomalib.models import get_model
    from anomalib.pipelines.benchmark.job import BenchmarkJob

    from isstad_plugin import Isstad

    assert isinstance(get_model({"class_path": "Isstad", "init_args": TINY_MODEL}), Isstad)
    table = BenchmarkJob.collect([{"model": "Isstad", "pixel_AUPRO": 0.5, "size": 64}, {"model": "Patchcore", "k": 9}])
    assert list(table.columns) == ["model", "pixel_AUPRO", "size", "k"]
    assert table["size"].tolist()[0] == 64 and table["k"].isna().tolist() == [True, False]


def test_anomalib_benchmark_command_runs_both_models(tmp_path: Path) -> None:
    """The real console command on a small real slice; the repo config with a tiny epoch budget and image size."""
    root = make_slice(tmp_path / "data", n_train=8, n_good=3, defects={"crack": 2, "blowhole": 2})
    config = copy.deepcopy(yaml.safe_load(CONFIG.read_text()))
    isstad, _ = isstad_and_patchcore(config)
    isstad["init_args"].update(TINY_MODEL, stage1_epochs=1, stage2_epochs=1, stage1_warmup_epochs=0,
                               stage2_cosine_epochs=1)
    config["benchmark"]["data"]["init_args"].update(root=str(root), train_batch_size=8, eval_batch_size=8,
                                                    num_workers=0)
    (tmp_path / "benchmark.yaml").write_text(yaml.safe_dump(config))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(BIN / "anomalib"), "benchmark", "--config", "benchmark.yaml"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    log = (tmp_path / "runs" / "pipeline.log").read_text() if (tmp_path / "runs" / "pipeline.log").is_file() else ""
    assert result.returncode == 0 and "There were some errors" not in result.stdout, result.stdout[-3000:] + log[-3000:]
    (results,) = (tmp_path / "runs" / "benchmark").glob("*/results.csv")
    rows = {row["model.class_path"]: row for row in csv.DictReader(results.open())}
    assert set(rows) == {"Isstad", "Patchcore"}
    assert rows["Patchcore"]["model.init_args.backbone"] == "efficientnet_lite0.pypi_in1k"
    for model, row in rows.items():
        for metric in ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"):
            assert 0.0 <= float(row[metric]) <= 1.0, (model, metric, row[metric])
    assert not math.isnan(float(rows["Isstad"]["pixel_AUPRO"]))
