"""The layers declared in pyproject.toml ([tool.importlinter]) hold: the core
imports no pass, backend or tool; passes and backends import no tool; the
command modules share graphopt.cli_args instead of importing graphopt.cli.
And the wheel installs passes/ and backends/ as graphopt.passes and
graphopt.backends, never as top-level modules."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("lint-imports") is None,
                                reason="import-linter is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def installed_layout(tmp_path_factory) -> Path:
    """The package tree as pip installs it: passes/ and backends/ inside graphopt/.

    The checker finds modules by walking the package's folder, and in the
    repository graphopt.passes and graphopt.backends live beside it."""
    root = tmp_path_factory.mktemp("layout")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "graphopt", root / "graphopt", ignore=ignore)
    shutil.copytree(ROOT / "passes", root / "graphopt" / "passes", ignore=ignore)
    shutil.copytree(ROOT / "backends", root / "graphopt" / "backends", ignore=ignore)
    return root


def _lint(layout: Path, config: Path = ROOT / "pyproject.toml") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(layout)}
    return subprocess.run(["lint-imports", "--no-cache", str(config)], cwd=layout, env=env,
                          capture_output=True, text=True)


def test_declared_layers_hold(installed_layout):
    run = _lint(installed_layout)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "tools above passes and backends above the core KEPT" in run.stdout
    assert "command modules import no other command module KEPT" in run.stdout


def test_a_forbidden_import_is_reported(installed_layout, tmp_path):
    """The checker sees imports inside functions too: the CLI does import the
    pruning analysis (inspect --groups), so forbidding it must break."""
    config = tmp_path / "layers.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["graphopt"]\n\n'
        '[[tool.importlinter.contracts]]\nname = "cli without pruning"\ntype = "forbidden"\n'
        'source_modules = ["graphopt.cli"]\nforbidden_modules = ["graphopt.passes.pruning"]\n')
    run = _lint(installed_layout, config)
    assert run.returncode != 0 and "cli without pruning BROKEN" in run.stdout


def test_installed_package_has_no_top_level_passes_or_backends(tmp_path):
    """pip puts passes/ and backends/ under graphopt/ (setuptools package-dir),
    so they cannot collide with other distributions' `passes` or `backends`."""
    if importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None:
        pytest.skip("pip and setuptools are needed to install the package")
    src, site = tmp_path / "src", tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("graphopt", "passes", "backends"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--no-index", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    assert not (site / "passes").exists() and not (site / "backends").exists()
    assert (site / "graphopt" / "passes" / "quantization" / "static.py").is_file()
    assert (site / "graphopt" / "backends" / "tvm" / "cpu" / "__init__.py").is_file()

    probe = """
import importlib, sys
for name in ("passes", "backends"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    sys.exit(f"top-level {name} importable")
import graphopt.passes, graphopt.backends
from graphopt import registry
assert graphopt.passes.__file__.startswith(sys.argv[1]), graphopt.passes.__file__
assert "quantize-static" in registry.passes(), sorted(registry.passes())
assert {"onnxruntime", "tvm"} <= set(graphopt.backends.backends())
"""
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", probe, str(site)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
