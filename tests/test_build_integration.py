"""examples/build: make and CMake run graphopt like a compiler, only when the
model or the pipeline file changed; graphopt's cache turns a rebuild whose
inputs did not really change into a copy."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "build"
GRAPHOPT = [sys.executable, "-m", "graphopt.cli"]  # the interpreter running the tests


@pytest.fixture
def tree(tmp_path):
    """examples/build and the model, laid out as in the repository."""
    (tmp_path / "examples").mkdir()
    shutil.copytree(EXAMPLE, tmp_path / "examples" / "build", ignore=shutil.ignore_patterns("build", "cm*"))
    shutil.copy(ROOT / "examples" / "tiny_resnet.onnx", tmp_path / "examples" / "tiny_resnet.onnx")
    past = time.time() - 100  # inputs clearly older than anything built from them
    for path in (tmp_path / "examples").rglob("*"):
        os.utime(path, (past, past))
    return tmp_path / "examples"


def env_for(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, GRAPHOPT_CACHE_DIR=str(tmp / "cache"))
    env.pop("GRAPHOPT_NO_CACHE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def touch_after(path: Path, reference: Path) -> None:
    """Touch ``path`` and make sure it is newer than ``reference`` whatever the
    file system's clock resolution, without dating anything in the future."""
    now = time.time()
    os.utime(path, (now, now))
    if reference.stat().st_mtime > now - 1:
        os.utime(reference, (now - 1, now - 1))


def sh(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: make -q's "not up to date"
    return proc


def test_make_rebuilds_only_when_an_input_changes(tree):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    build, env = tree / "build", env_for(tree)
    cmd = [make, f"GRAPHOPT={' '.join(GRAPHOPT)}"]
    out, report = build / "build" / "tiny_resnet.opt.onnx", build / "build" / "tiny_resnet.opt.json"

    first = sh(cmd, build, env)
    assert first.returncode == 0 and first.stderr == "", first.stderr  # --quiet: nothing but errors
    assert json.loads(report.read_text())["cache"] == "miss"
    # The output is what graphopt writes when run by hand.
    direct = tree / "direct.onnx"
    sh([*GRAPHOPT, "opt", "tiny_resnet.onnx", "--config", "build/pipeline.toml", "-o", str(direct), "--no-cache",
        "-q"], tree, env)
    assert out.read_bytes() == direct.read_bytes()
    onnx.checker.check_model(str(out))

    # Up to date: make -q says so and make runs nothing.
    mtime = out.stat().st_mtime_ns
    assert sh([*cmd, "-q"], build, env).returncode == 0
    again = sh(cmd, build, env)
    assert "Nothing to be done" in again.stdout and "graphopt" not in again.stdout
    assert out.stat().st_mtime_ns == mtime

    # A touched pipeline file: make reruns graphopt, which copies from its cache.
    touch_after(build / "pipeline.toml", out)
    assert sh([*cmd, "-q"], build, env).returncode == 1
    rebuilt = sh(cmd, build, env)
    assert "opt ../tiny_resnet.onnx" in rebuilt.stdout
    assert json.loads(report.read_text())["cache"] == "hit"
    assert out.stat().st_mtime_ns != mtime and out.read_bytes() == direct.read_bytes()
    assert sh([*cmd, "-q"], build, env).returncode == 0

    # A changed pipeline: a real run.
    old_pipeline = json.loads(report.read_text())["pipeline"]
    text = (build / "pipeline.toml").read_text()
    (build / "pipeline.toml").write_text(text.replace('    { pass = "eliminate-dead-code" },\n', ""))
    touch_after(build / "pipeline.toml", out)
    sh(cmd, build, env)
    data = json.loads(report.read_text())
    assert data["cache"] == "miss" and data["pipeline"] != old_pipeline

    # A touched model rebuilds too.
    touch_after(tree / "tiny_resnet.onnx", out)
    assert sh([*cmd, "-q"], build, env).returncode == 1
    assert "opt ../tiny_resnet.onnx" in sh(cmd, build, env).stdout
    assert sh([*cmd, "-q"], build, env).returncode == 0


def test_cmake_rebuilds_only_when_an_input_changes(tree):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    if shutil.which("make") is None and shutil.which("ninja") is None:
        pytest.skip("cmake needs make or ninja to build")
    env, bin_dir = env_for(tree), tree / "cmake-build"
    configure = sh([cmake, "-S", "build", "-B", str(bin_dir), f"-DGRAPHOPT={';'.join(GRAPHOPT)}"], tree, env)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    build = [cmake, "--build", str(bin_dir)]
    out = bin_dir / "tiny_resnet.opt.onnx"
    comment = "graphopt: optimizing tiny_resnet.onnx"

    first = sh(build, tree, env)
    assert first.returncode == 0 and comment in first.stdout, first.stdout + first.stderr
    onnx.checker.check_model(str(out))
    mtime = out.stat().st_mtime_ns

    again = sh(build, tree, env)
    assert again.returncode == 0 and comment not in again.stdout
    assert out.stat().st_mtime_ns == mtime

    for changed in (tree / "build" / "pipeline.toml", tree / "tiny_resnet.onnx"):
        touch_after(changed, out)
        rebuilt = sh(build, tree, env)
        assert rebuilt.returncode == 0 and comment in rebuilt.stdout, changed
        assert out.stat().st_mtime_ns != mtime
        mtime = out.stat().st_mtime_ns
        assert comment not in sh(build, tree, env).stdout
