"""Companion step of the GPU run, on this machine: fetch what the GPU machine lacks into ignored folders.

    python -m benchmarks.device_prepare [--data ../shared/data]

- ``.whl/``: the wheels of the packages named in ``benchmarks/device_wheels.txt`` for CPython 3.12 on manylinux
  x86-64 (the GPU machine's Python), downloaded from PyPI without their dependencies (the machine has the rest:
  ``device_packages.txt``), each at the version installed in the environment this runs from (the one the test suite
  passed in), and ``.whl/carried.txt``, the resolved ``name==version`` list the device run reports;
- ``.device-data/magnetic_tile``: a copy of the category the run trains on (the GPU machine cannot see ``../shared``).

Both are git-ignored (never committed) and travel with the device call through its ``carry`` argument. The device
accepts 64 MiB in all (the working tree included): the step checks the total and prints the exact call to make.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS, DATA = REPO / ".whl", REPO / ".device-data"
CARRIED = "carried.txt"  # the resolved list, written beside the wheels
LIMIT_MB = 64
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
RUN_CALL = ('run(command="bash benchmarks/device_run.sh", carry=[".whl", ".device-data"], timeout_s=480)')


def wanted_wheels() -> list[str]:
    """The package names of ``benchmarks/device_wheels.txt``."""
    lines = (REPO / "benchmarks" / "device_wheels.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def resolve(names: list[str]) -> list[str]:
    """``name==version`` for each name, at the version installed in this environment; every absent name is named."""
    resolved, absent = [], []
    for name in names:
        try:
            resolved.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            absent.append(name)
    if absent:
        msg = (f"{', '.join(absent)}: named in benchmarks/device_wheels.txt but not installed in {sys.executable}'s "
               "environment; run this from the environment the test suite passed in (make install), or remove the "
               "name from the list")
        raise SystemExit(msg)
    return resolved


def write_carried(folder: Path, requirements: list[str]) -> Path:
    """The resolved list beside the wheels, as the device run reads and reports it."""
    path = folder / CARRIED
    path.write_text("".join(f"{requirement}\n" for requirement in requirements))
    return path


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def working_tree_mb() -> float:
    """What travels besides the carried folders: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    return sum((REPO / name).stat().st_size for name in listed if name and (REPO / name).is_file()) / 2**20


def download(requirements: list[str]) -> None:
    """Each requirement's wheel for the GPU machine; one published only as source (FrEIA) is built into a wheel
    here, which must then be pure Python (``py3-none-any``) to run there."""
    if WHEELS.exists():
        shutil.rmtree(WHEELS)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    for requirement in requirements:
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                  "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                                  *platforms, "-d", str(WHEELS), requirement], check=False, capture_output=True)
        if fetched.returncode == 0:
            continue
        before = set(WHEELS.glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(WHEELS), requirement],
                       check=True)
        built = set(WHEELS.glob("*.whl")) - before
        if not built or not all(path.name.endswith("-py3-none-any.whl") for path in built):
            msg = f"{requirement}: no wheel for CPython 3.12 on PyPI, and the one built here is not pure Python"
            raise SystemExit(msg)


def copy_data(source: Path) -> None:
    if DATA.exists():
        shutil.rmtree(DATA)
    folder = source / "magnetic_tile"
    if not folder.is_dir():
        msg = f"{folder} does not exist: pass --data (the folder holding magnetic_tile)"
        raise SystemExit(msg)
    shutil.copytree(folder, DATA / "magnetic_tile")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args(argv)
    requirements = resolve(wanted_wheels())
    download(requirements)
    write_carried(WHEELS, requirements)
    print("carried wheels: " + ", ".join(requirements))
    copy_data(args.data)
    sizes = {"working tree": working_tree_mb(), ".whl": folder_mb(WHEELS), ".device-data": folder_mb(DATA)}
    total = sum(sizes.values())
    print(", ".join(f"{name} {mb:.1f} MiB" for name, mb in sizes.items()) + f": {total:.1f} of {LIMIT_MB} MiB")
    if total > LIMIT_MB:
        print(f"too large for one device call ({LIMIT_MB} MiB)", file=sys.stderr)
        return 1
    print(f"ready; on a session lent a GPU, call the device tool's {RUN_CALL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
