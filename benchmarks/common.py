"""Shared pieces of the hand-run benchmarks: timing statistics, the machine's matmul peak, Markdown output."""

from __future__ import annotations

from pathlib import Path

import torch

from isstad_plugin.benchmark.report import markdown_table
from isstad_plugin.benchmark.timing import machine, median, p90, time_calls

__all__ = ["machine", "markdown_table", "matmul_peak_gflops", "median", "p90", "time_calls", "write_page"]

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks"


def matmul_peak_gflops(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matmul throughput (GFLOP/s) of this machine with ``threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = median(time_calls(lambda: torch.mm(a, b), repeats, warmup=3))
    torch.set_num_threads(previous)
    return 2 * size**3 / seconds / 1e9


def write_page(path: Path, lines: list[str]) -> None:
    """Write a generated Markdown page and say where it went."""
    path.write_text("\n".join(lines))
    print(f"wrote {path}")
