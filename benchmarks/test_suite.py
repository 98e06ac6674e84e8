"""What the README's test command costs: wall time, peak memory, peak disk under the temporary folder.

    python -m benchmarks.test_suite            # runs `python -m pytest tests` as the README says; see the page for how long

Samples every second, while the suite runs: the memory of the pytest process and all its descendants together
(summed proportional set sizes, so libraries they share count once: the test workers and the commands they start), and the bytes under pytest's temporary folder (its
``basetemp``, set to a fresh folder: every ``tmp_path`` of the suite lives there). Writes ``docs/benchmarks/test-suite.md``. Run it on a quiet machine: other processes slow the suite down.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import DOCS, REPO, machine, write_page

PAGE = DOCS / "test-suite.md"


def proportional_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` (its private pages plus its share of pages it shares with others, so that
    the sum over processes is the memory they use together; plain RSS counts torch's libraries once per worker)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory_bytes(root: int) -> int:
    """Memory of process ``root`` and every descendant together (summed proportional set sizes, from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    total, pending = 0, [root]
    while pending:
        pid = pending.pop()
        total += proportional_bytes(pid)
        pending += children.get(pid, [])
    return total


def folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def main() -> int:
    basetemp = Path(tempfile.mkdtemp(prefix="suite-"))
    command = [sys.executable, "-m", "pytest", "tests", "--basetemp", str(basetemp / "pytest")]
    peaks = {"memory": 0, "disk": 0}
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            peaks["memory"] = max(peaks["memory"], tree_memory_bytes(process.pid))
            peaks["disk"] = max(peaks["disk"], folder_bytes(basetemp))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.communicate()[0]
    minutes = (time.perf_counter() - start) / 60
    stop.set()
    sampler.join()
    summary = output.strip().splitlines()[-1] if output.strip() else "no output"
    print(output[-3000:])
    write_page(PAGE, [
        "# The test suite's cost", "",
        ("Command: `python -m benchmarks.test_suite` (runs `python -m pytest tests`, the README's test command, with "
         "its temporary folder under one measured directory)."), f"Machine: {machine()}.", "",
        "| result | minutes | peak memory (pytest and all it started) | peak disk (its temporary files) |",
        "|---|---|---|---|",
        f"| {summary.strip('= ')} | {minutes:.1f} | {peaks['memory'] / 2**30:.1f} GB | {peaks['disk'] / 2**30:.2f} GB |",
        "", ("Memory is the summed proportional set size (shared pages counted once) of pytest and every process it "
             "started. Sampled once a second; a file written and deleted within a second can be missed."), "",
    ])
    return process.returncode


if __name__ == "__main__":
    raise SystemExit(main())
