"""The package's shape: no import circles, and the start-up hook imports nothing but itself."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "isstad_plugin"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks (imports only a type checker runs)."""
    return {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)}


def package_imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere: at module level and inside functions (a loop closed only
    inside a function is still a loop a reader has to follow), not for type checking."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    skipped = type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    """Every module of the package and the start-up hook, with the modules of both it imports anywhere."""
    paths = {module_name(path): path for root in (PACKAGE, REPO / "isstad_plugin_hook") for path in root.rglob("*.py")}
    return {name: package_imports(path, set(paths)) for name, path in paths.items()}


def test_no_import_circles_inside_the_package_not_even_through_functions() -> None:
    graph = import_graph()
    circles = []

    def visit(name: str, trail: list[str]) -> None:
        for target in sorted(graph[name]):
            if target in trail:
                circles.append([*trail[trail.index(target):], target])
            elif target not in done:
                visit(target, [*trail, target])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(" -> ".join(circle) for circle in circles)
    assert "isstad_plugin.models.isstad.lightning_model" not in graph["isstad_plugin.models.isstad.stages"]


def test_lightning_modules_stay_thin() -> None:
    """Like anomalib's own models: the contract, the steps and the wiring; the rest lives in its own module. The
    bound is a guide, not a reason to pack statements: each constructor option costs its signature and docstring
    lines."""
    lines = len((PACKAGE / "models" / "isstad" / "lightning_model.py").read_text().splitlines())
    assert lines <= 260, f"isstad/lightning_model.py has {lines} lines"


def test_patches_is_the_bottom_layer() -> None:
    """``patches`` changes other libraries; it knows nothing of the plugin built on it."""
    graph = import_graph()
    assert graph["isstad_plugin.patches"] == set()
    assert "isstad_plugin.patches" in graph["isstad_plugin"]  # the package entry registers the models through it


def test_the_graph_sees_imports_inside_functions() -> None:
    # deploy.load_trained_model imports the models inside the function only
    assert "isstad_plugin.models" in import_graph()["isstad_plugin.deploy"]
