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
# Each layer and the vlp layers it may import (itself included); nothing may import upwards.
ALLOWED = {
    "core": {"core"},
    "data_pipelines": {"core", "data_pipelines"},
    "models": {"core", "data_pipelines", "models"},
    "train": {"core", "data_pipelines", "models", "train"},
}


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
    for name in ALLOWED:
        (other / name).mkdir(parents=True)
        (other / name / "__init__.py").write_text("OWNER = 'other project'\n")
    env = {**os.environ, "PYTHONPATH": str(other)}
    check_imports = (
        "import importlib, pkgutil, models, train\n"
        "assert models.OWNER == train.OWNER == 'other project'\n"
        "for top in ('vlp.core', 'vlp.models', 'vlp.data_pipelines', 'vlp.train'):\n"
        "    package = importlib.import_module(top)\n"
        "    for info in pkgutil.walk_packages(package.__path__, top + '.'):\n"
        "        importlib.import_module(info.name)\n"
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
