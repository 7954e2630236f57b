"""The package's shape: layers import only downwards, and what `pip install` puts into
site-packages is the one `vlp` namespace, which still works when another project's generic
top-level `models` / `train` / `data_pipelines` packages come first on the path."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The layers, bottom first; each may import itself and those below it, nothing above.
ORDER = ("core", "data_pipelines", "models", "export", "train", "curate", "slurm", "cli")
ALLOWED = {layer: set(ORDER[: i + 1]) for i, layer in enumerate(ORDER)}


def vlp_imports(path: Path) -> set[str]:
    """The vlp layers a file imports (anywhere in it, lazy imports inside functions included)."""
    layers = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] in ALLOWED:
                layers.add(f"bare:{parts[0]}")  # a generic top-level import: someone else's package
            elif parts[0] == "vlp" and len(parts) > 1:
                layers.add(parts[1])
    return layers


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downwards(layer):
    bad = {
        str(path.relative_to(ROOT)): sorted(found - ALLOWED[layer])
        for path in (ROOT / layer).rglob("*.py")
        if (found := vlp_imports(path)) - ALLOWED[layer]
    }
    assert not bad, f"{layer}/ imports above its layer or by a generic name: {bad}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("vlp", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def import_graph() -> dict[str, set[str]]:
    """vlp module -> the vlp modules it names in an import statement, anywhere in the file (lazy
    and type-only imports included). `from pkg import name` names `pkg.name` where that is a
    module, else `pkg`. The parent packages Python runs first are not counted: a package's
    `__init__` re-exporting its `base` is not a cycle."""
    files = {module_name(path): path for layer in ORDER for path in (ROOT / layer).rglob("*.py")}
    packages = {name for name, path in files.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".") if name in packages else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    targets.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in files else module)
        graph[name] = {target for target in targets if target in files and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert "vlp.train.trainer" in graph and graph["vlp.cli"], "the import graph is empty: module naming broke"
    assert not cycles(graph), f"import cycles between vlp modules: {cycles(graph)}"


def test_cycle_finder_sees_lazy_imports():
    """The finder itself: a function-level import that closes a loop is a cycle."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_tests_and_benchmarks_import_vlp_by_its_namespace():
    bad = [str(path.relative_to(ROOT)) for folder in ("tests", "benchmarks") for path in (ROOT / folder).rglob("*.py")
           if any(name.startswith("bare:") for name in vlp_imports(path))]
    assert not bad


def test_pyproject_installs_every_package_folder_under_vlp():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    folders = {f"vlp.{folder}" for folder in mapping.values()}
    expected = {
        "vlp." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in mapping.values() for init in (ROOT / top).rglob("__init__.py")
    }
    assert folders <= expected, "a package-dir entry has no __init__.py"
    assert set(setuptools["packages"]) == expected, "pyproject's package list and the package folders differ"
    assert all(name.startswith("vlp.") for name in setuptools["packages"])


@pytest.mark.slow
def test_vlp_works_beside_another_projects_generic_packages(tmp_path):
    """Another project's `models`, `train`, `data_pipelines` and `core` first on PYTHONPATH, from
    a folder outside the checkout: every vlp module imports and a short `vlp demo` runs."""
    other = tmp_path / "other_project"
    for name in ("models", "train", "data_pipelines", "core", "export", "cli"):
        (other / name).mkdir(parents=True)
        (other / name / "__init__.py").write_text("OWNER = 'other project'\n")
    env = {**os.environ, "PYTHONPATH": str(other)}
    check_imports = (
        "import importlib, pkgutil, models, train\n"
        "assert models.OWNER == train.OWNER == 'other project'\n"
        f"for top in {tuple('vlp.' + layer for layer in ORDER)}:\n"
        "    package = importlib.import_module(top)\n"
        "    for info in pkgutil.walk_packages(package.__path__, top + '.'):\n"
        "        if not info.name.endswith('.__main__'):  # runs the command line\n"
        "            importlib.import_module(info.name)\n"
        "assert models.OWNER == 'other project'\n"
    )
    subprocess.run([sys.executable, "-c", check_imports], cwd=tmp_path, env=env, check=True)
    vlp = Path(sys.executable).with_name("vlp")
    demo = subprocess.run(
        [str(vlp), "demo", "--out", str(tmp_path / "demo"), "--steps", "4", "train.checkpoint_every=0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert (tmp_path / "demo" / "results.json").is_file()
