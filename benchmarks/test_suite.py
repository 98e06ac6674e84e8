"""What the README's test command costs: wall time, peak memory, peak disk under the temporary folder.

    python -m benchmarks.test_suite            # runs `python -m pytest tests` as the README says; see the page for how long
    python -m benchmarks.test_suite --readme   # only rewrites the README's line from the page as it stands

Runs the suite twice. The first run is timed alone: its minutes and every test's duration (``--durations=0``, summed
per test file) are the page's. The second is sampled every few seconds (``SAMPLE_SECONDS``) for the peaks, since the
sampling competes with the suite for the cores: the memory of the pytest process and all its descendants together
(summed proportional set sizes, so libraries they share count once: the test workers and the commands they start), and the bytes under pytest's temporary folder (its
``basetemp``, set to a fresh folder: every ``tmp_path`` of the suite lives there). With ``--dist loadfile`` each file
runs on one worker, so the slowest file bounds the suite; the seconds of every file go to
``docs/benchmarks/test-suite-files.csv``, the order in which ``tests/conftest.py`` hands files to the workers (longest
first). Writes ``docs/benchmarks/test-suite.md`` and the one-line summary between the README's
``<!-- test-suite-summary -->`` markers. Run it on a quiet machine: other processes slow the suite down.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import DOCS, REPO, machine, write_page

PAGE = DOCS / "test-suite.md"
FILE_SECONDS = DOCS / "test-suite-files.csv"  # read by tests/conftest.py (pytest_collection_modifyitems)
README = REPO / "README.md"
# Sampling reads every process's memory map summary and walks the temporary folder, which competes with the suite
# for the two cores: every few seconds is enough for the peaks, and the page reports what the sampling itself cost.
SAMPLE_SECONDS = 5.0
README_BLOCK = re.compile(r"(<!-- test-suite-summary -->\n).*?(<!-- /test-suite-summary -->)", re.DOTALL)


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


def command_line(pid: int) -> str:
    """``pid``'s command line, shortened to what names it (program and module or script)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    words = [Path(words[0]).name, *words[1:]] if words and words[0] else words
    return " ".join(word for word in words if word)[:90]


def tree_memory(root: int) -> tuple[int, list[tuple[int, str]]]:
    """Memory of process ``root`` and every descendant together (summed proportional set sizes, from /proc), and
    the descendants' own sizes with their command lines, largest first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    sizes, pending = [], [root]
    while pending:
        pid = pending.pop()
        sizes.append((proportional_bytes(pid), pid))
        pending += children.get(pid, [])
    sizes.sort(reverse=True)
    return sum(size for size, _ in sizes), [(size, command_line(pid)) for size, pid in sizes[:5]]


def folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


DURATION = re.compile(r"^([0-9.]+)s (?:setup|call|teardown)\s+(tests/\S+?\.py)::", re.MULTILINE)


def seconds_per_file(output: str) -> dict[str, float]:
    """Seconds per test file (setup, call and teardown of all its tests) from pytest's ``--durations=0`` report."""
    totals: dict[str, float] = {}
    for seconds, path in DURATION.findall(output):
        totals[path] = totals.get(path, 0.0) + float(seconds)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def refresh_readme(summary: str) -> None:
    """Put ``summary`` between the README's test-suite markers (the README quotes the page, never types it)."""
    text = README.read_text()
    if not README_BLOCK.search(text):
        msg = f"{README} has no <!-- test-suite-summary --> ... <!-- /test-suite-summary --> block to fill"
        raise SystemExit(msg)
    README.write_text(README_BLOCK.sub(lambda match: f"{match[1]}{summary}\n{match[2]}", text, count=1))


def readme_line(machine_line: str, result: str, minutes: str, memory: str, disk: str) -> str:
    return (f"Measured by `python -m benchmarks.test_suite` on {machine_line}: {result}; {minutes} min, peak memory "
            f"{memory} (pytest and all it started), peak temporary files {disk}.")


def readme_from_page() -> int:
    """Rewrite the README's line from the published page (its machine line and its first table row)."""
    text = PAGE.read_text()
    machine_line = re.search(r"^Machine: (.*)\.$", text, re.MULTILINE)[1]
    row = re.search(r"^\| (?!result)(.*?) \| ([0-9.]+) \| ([0-9.]+ GB) \| ([0-9.]+ GB) \|$", text, re.MULTILINE)
    refresh_readme(readme_line(machine_line, *row.groups()))
    return 0


def run_suite(basetemp: Path, sample: bool) -> tuple[list[str], float, dict]:
    """``python -m pytest tests`` with its temporary folder under ``basetemp``: its output lines, its minutes and,
    when ``sample``, the peaks of memory and disk (every ``SAMPLE_SECONDS``) and the sampler's own CPU seconds."""
    # -v: each finished test is a line "[gw0] ... PASSED tests/...", so the page can say what ran at the peak
    command = [sys.executable, "-m", "pytest", "tests", "--basetemp", str(basetemp / "pytest"),
               "--durations=0", "-v"]
    peaks = {"memory": 0, "disk": 0, "holders": [], "at": 0.0, "finished": [], "sampler_cpu": 0.0}
    basetemp.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()
    lines: list[str] = []

    def sampler_loop() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            memory, holders = tree_memory(process.pid)
            if memory > peaks["memory"]:
                finished = [line for line in lines[-40:] if line.startswith("[gw")]
                peaks.update(memory=memory, holders=holders, at=time.perf_counter() - start, finished=finished[-4:])
            peaks["disk"] = max(peaks["disk"], folder_bytes(basetemp))
            peaks["sampler_cpu"] = time.thread_time()

    sampler = threading.Thread(target=sampler_loop, daemon=True)
    if sample:
        sampler.start()
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        print(line, end="", flush=True)
    process.wait()
    minutes = (time.perf_counter() - start) / 60
    stop.set()
    if sample:
        sampler.join()
    return lines, minutes, peaks


def summary_line(lines: list[str]) -> str:
    """pytest's last line (``334 passed in ...``) without its ``=`` frame."""
    output = "\n".join(lines).strip()
    return output.splitlines()[-1].strip("= ") if output else "no output"


def write_file_seconds(per_file: dict[str, float]) -> None:
    """Every test file's seconds, longest first, to :data:`FILE_SECONDS`."""
    with FILE_SECONDS.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["test_file", "seconds"])
        writer.writerows((path, f"{seconds:.1f}") for path, seconds in per_file.items())


def main() -> int:
    if "--readme" in sys.argv[1:]:
        return readme_from_page()
    basetemp = Path(tempfile.mkdtemp(prefix="suite-"))
    lines, minutes, _ = run_suite(basetemp / "timed", sample=False)
    sampled_lines, sampled_minutes, peaks = run_suite(basetemp / "sampled", sample=True)
    for run_lines in (lines, sampled_lines):
        if not re.search(r"\d+ (passed|failed)", summary_line(run_lines)):  # pytest itself failed: nothing to report
            msg = f"pytest reported no result ({summary_line(run_lines)}); the page and the README were left as they are"
            raise SystemExit(msg)
    output = "\n".join(lines)
    summary = summary_line(lines)
    per_file = seconds_per_file(output)
    write_file_seconds(per_file)
    failures = [line for line in [*lines, *sampled_lines] if line.startswith(("FAILED ", "ERROR "))]
    disk, memory = peaks["disk"] / 2**30, peaks["memory"] / 2**30
    write_page(PAGE, [
        "# The test suite's cost", "",
        ("Command: `python -m benchmarks.test_suite` (runs `python -m pytest tests`, the README's test command, with "
         "its temporary folder under one measured directory) twice: once timed alone, once sampled for memory and "
         "disk."), f"Machine: {machine()}.", "",
        "| result (timed run) | minutes | peak memory (pytest and all it started) | peak disk (its temporary files) |",
        "|---|---|---|---|",
        f"| {summary} | {minutes:.1f} | {memory:.1f} GB | {disk:.2f} GB |", "",
        *(["Failed:", "", *(f"- `{line}`" for line in failures), ""] if failures else []),
        ("Minutes are the timed run's, alone on the machine. Memory and disk come from the sampled run "
         f"({summary_line(sampled_lines)}; {sampled_minutes:.1f} min), whose sampler read every {SAMPLE_SECONDS:.0f} s "
         "the summed proportional set size (shared pages counted once) of pytest and every process it started and "
         "the bytes under its temporary folder; a file written and deleted in between can be missed. The sampling "
         f"itself used {peaks['sampler_cpu']:.0f} s of CPU time."), "",
        f"At the memory peak ({peaks['at'] / 60:.1f} min in), its largest processes:", "",
        "| process | memory |", "|---|---|",
        *(f"| `{holder.replace(str(basetemp), '<basetemp>')}` | {size / 2**30:.2f} GB |"
          for size, holder in peaks["holders"]), "",
        "Tests that had just finished then:", "",
        *(f"- `{line}`" for line in peaks["finished"]), "",
        "## Where the time goes", "",
        ("Seconds per test file in the timed run (setup, call and teardown of its tests, from `--durations=0`), the "
         "slowest ten; all of them in [test-suite-files.csv](test-suite-files.csv). `--dist loadfile` (pyproject's "
         "addopts) runs each file on one of the two workers, so no run is shorter than its slowest file; "
         "`tests/conftest.py` hands the files out longest first, in that file's order, so the workers finish "
         "together."), "",
        "| test file | seconds |", "|---|---|",
        *(f"| `{path}` | {seconds:.0f} |" for path, seconds in list(per_file.items())[:10]),
        f"| all files together | {sum(per_file.values()):.0f} |", "",
    ])
    refresh_readme(readme_line(machine(), summary, f"{minutes:.1f}", f"{memory:.1f} GB", f"{disk:.2f} GB"))
    return 1 if failures or "passed" not in summary else 0


if __name__ == "__main__":
    raise SystemExit(main())
