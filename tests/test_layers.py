"""The layers declared in pyproject.toml ([tool.importlinter]) hold: the core
imports no pass, backend or tool; passes and backends import no tool; the
command modules share graphopt.cli_args instead of importing graphopt.cli."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("lint-imports") is None,
                                reason="import-linter is not installed (pip install -e '.[test]')")


def _lint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["lint-imports", "--no-cache", *args], cwd=ROOT, capture_output=True, text=True)


def test_declared_layers_hold():
    run = _lint()
    assert run.returncode == 0, run.stdout[-3000:]
    assert "the core imports no pass, backend or tool KEPT" in run.stdout
    assert "passes and backends import no tool KEPT" in run.stdout
    assert "command modules import no other command module KEPT" in run.stdout


def test_a_forbidden_import_is_reported(tmp_path):
    """The checker sees imports inside functions too: the CLI does import the
    pruning analysis (inspect --groups), so forbidding it must break."""
    config = tmp_path / "layers.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["graphopt", "passes", "backends"]\n\n'
        '[[tool.importlinter.contracts]]\nname = "cli without pruning"\ntype = "forbidden"\n'
        'source_modules = ["graphopt.cli"]\nforbidden_modules = ["passes.pruning"]\n')
    run = _lint("--config", str(config))
    assert run.returncode != 0 and "cli without pruning BROKEN" in run.stdout
