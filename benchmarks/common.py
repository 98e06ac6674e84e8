"""Paths of the hand-run benchmarks; their shared code (timing statistics, the machine's description and matmul
peak, Markdown tables and pages) is in :mod:`isstad_plugin.benchmark`, the one home of benchmark code, which the
``isstad-benchmark`` command uses too."""

from __future__ import annotations

import csv
import subprocess
import tempfile
import time
from pathlib import Path
from statistics import median

import yaml

from isstad_plugin.benchmark.report import markdown_table, write_page
from isstad_plugin.benchmark.timing import machine, matmul_peak_gflops, p90, time_calls

__all__ = ["DOCS", "REPO", "headless_chromium", "load_search", "machine", "markdown_table", "matmul_peak_gflops", "median", "p90", "time_calls",
           "write_page"]

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks"


def load_search(config_path: Path) -> tuple[dict, Path, Path, list[dict[str, str]]]:
    """A recipe search's config, its output folder (created), its ``rows.csv`` and the rows finished so far."""
    config = yaml.safe_load(config_path.read_text())
    output_dir = REPO / config["output_dir"]
    output_dir.mkdir(parents=True, exist_ok=True)
    rows_path = output_dir / "rows.csv"
    rows: list[dict[str, str]] = []
    if rows_path.is_file():
        with rows_path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    return config, output_dir, rows_path, rows


def headless_chromium(arguments: list[str], browser: str = "chromium", timeout: float = 300) -> tuple[float, str]:
    """Headless Chromium (Debian's package) run once with ``arguments`` in a fresh profile: its wall time and its
    standard output (``--dump-dom``'s document). The report's benchmark and its browser test open pages with it."""
    with tempfile.TemporaryDirectory() as profile:
        start = time.perf_counter()
        result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 f"--user-data-dir={profile}", *arguments], capture_output=True, text=True,
                                timeout=timeout, check=True)
        return time.perf_counter() - start, result.stdout
