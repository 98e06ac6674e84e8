"""Timing statistics, a one-line machine description and its matmul peak, shared by ``isstad-benchmark`` and
``benchmarks/``."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


# CPU flags (as /proc/cpuinfo names them) that decide which kernels torch and OpenVINO can use.
VECTOR_EXTENSIONS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}


def cpu_description() -> tuple[str, list[str]]:
    """The CPU model name and its vector extensions that matter for inference (e.g. ``["AVX2", "AVX-512"]``)."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == (platform.processor() or platform.machine()):
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return cpu, [name for flag, name in VECTOR_EXTENSIONS.items() if flag in flags]


def cpu_label() -> str:
    """The CPU model with its vector extensions, e.g. ``AMD EPYC (AVX2, AVX-512)``: what a timing depends on."""
    cpu, extensions = cpu_description()
    return f"{cpu} ({', '.join(extensions) or 'no AVX2'})"


def machine() -> str:
    """One line naming the machine (CPU model and vector extensions) and software."""
    import torch

    return (f"{cpu_label()}, {os.cpu_count()} cores visible, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def matmul_peak_gflops(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matmul throughput (GFLOP/s) of this machine with ``threads`` torch threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = statistics.median(time_calls(lambda: torch.mm(a, b), repeats, warmup=3))
    torch.set_num_threads(previous)
    return 2 * size**3 / seconds / 1e9


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process on this machine has spent working since boot (``/proc/stat``: user, nice, system,
    irq, softirq); None where there is no ``/proc/stat``."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How much of the machine processes other than this one and its children used while it was open: a row timed
    with other work on the cores is marked, not passed off as quiet.

    ``with OtherLoad() as load: run_and_wait(child)``; then ``load.percent`` is the other processes' CPU time as a
    percentage of the machine's capacity (cores x wall time) over that interval. This process's own time and that of
    its waited-for children (and theirs: a job's DataLoader workers) come from ``os.times``; the machine's from
    ``/proc/stat``. ``percent`` is None where ``/proc/stat`` is missing.
    """

    def __enter__(self) -> OtherLoad:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self._start = (time.perf_counter(), busy_cpu_seconds(), self._own())
        self.percent: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, busy0, own0 = self._start
        busy1 = busy_cpu_seconds()
        if busy0 is None or busy1 is None:
            return
        capacity = (time.perf_counter() - wall0) * (os.cpu_count() or 1)
        other = max(0.0, (busy1 - busy0) - (self._own() - own0))
        self.percent = round(100 * other / capacity, 1) if capacity > 0 else None

    @staticmethod
    def _own() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system
