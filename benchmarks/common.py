"""Paths of the hand-run benchmarks; their shared code (timing statistics, the machine's description and matmul
peak, Markdown tables and pages) is in :mod:`isstad_plugin.benchmark`, the one home of benchmark code, which the
``isstad-benchmark`` command uses too."""

from __future__ import annotations

from pathlib import Path

from isstad_plugin.benchmark.report import markdown_table, write_page
from isstad_plugin.benchmark.timing import machine, matmul_peak_gflops, median, p90, time_calls

__all__ = ["DOCS", "REPO", "machine", "markdown_table", "matmul_peak_gflops", "median", "p90", "time_calls",
           "write_page"]

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks"
