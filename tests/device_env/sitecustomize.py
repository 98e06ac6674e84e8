"""Makes a Python process import only what the lent GPU machine has: the standard library, the distributions of
``benchmarks/device_packages.txt``, the wheels of ``benchmarks/device_wheels.txt`` and this project's own packages.

``tests/test_device_run.py`` puts this folder first on ``PYTHONPATH`` (Python imports ``sitecustomize`` at start-up)
and runs the device command on the CPU: an import the GPU machine could not satisfy fails here first, naming the
module, instead of costing device time.
"""

import importlib.machinery
import importlib.metadata
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OWN = {"isstad_plugin", "isstad_plugin_hook", "benchmarks", "tests", "sitecustomize"}


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _listed(name: str) -> set[str]:
    lines = (REPO / "benchmarks" / name).read_text().splitlines()
    return {_normalised(line.split("==")[0]) for line in lines if line.strip() and not line.startswith("#")}


def _with_dependencies(names: set[str]) -> set[str]:
    """``names`` and what they require here, recursively (extras left out): the GPU machine's own version of a
    package comes with its own dependencies, which this machine's version may name differently (httpx2, say)."""
    pending, found = list(names), set()
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        pending += [_normalised(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in requirements if "extra ==" not in r]
    return found


def _allowed_modules() -> set[str]:
    distributions = _with_dependencies(_listed("device_packages.txt")) | _listed("device_wheels.txt")
    return {module for module, owners in importlib.metadata.packages_distributions().items()
            if any(_normalised(owner) in distributions for owner in owners)}


class DeviceOnlyFinder:
    """Refuses top-level modules the GPU machine would not have."""

    def __init__(self) -> None:
        self.allowed = _allowed_modules() | OWN | set(sys.stdlib_module_names)

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201, ARG002
        top = fullname.partition(".")[0]
        if top in self.allowed or top.startswith("_") or top in sys.modules:
            return None
        callers = {sys._getframe(depth).f_globals.get("__name__") for depth in (1, 2, 3)}  # noqa: SLF001
        if "importlib.util" in callers or importlib.machinery.PathFinder.find_spec(top) is None:
            return None  # a probe for an optional module (torch makes many), or a module not installed here either
        msg = f"No module named {top!r} on the GPU machine: add its wheel to benchmarks/device_wheels.txt"
        raise ModuleNotFoundError(msg, name=top)


sys.meta_path.insert(0, DeviceOnlyFinder())
