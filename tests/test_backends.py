"""The backend interface: registry and plug-ins, the onnxruntime backend's
round trip, artifact folders (atomic, manifest) and input checks."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt import backends
from graphopt.backends import registry
from graphopt.backends.base import CompileOptions
from graphopt import runtime
from graphopt.errors import ExitCode, ModelError, UsageError

from conftest import make_model, vi


def gemm_model() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = {"W": rng.standard_normal((6, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["g"], name="gemm"),
             helper.make_node("Tanh", ["g"], ["y"], name="tanh")]
    return make_model(nodes, [vi("x", ["N", 6])], [vi("y", ["N", 4])], inits)


@pytest.fixture
def gemm_file(tmp_path) -> Path:
    path = tmp_path / "gemm.onnx"
    onnx.save(gemm_model(), path)
    return path


def readme_backend():
    """The "Add a backend" example of README.md, executed: the example must work."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    block = next(b for b in blocks if "class ReferenceBackend" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace["ReferenceBackend"]


ReferenceBackend = readme_backend()


class FakeEntryPoint:
    def __init__(self, name, value, obj=None, error=None):
        self.name, self.value, self._obj, self._error = name, value, obj, error

    def load(self):
        if self._error:
            raise self._error
        return self._obj


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as if graphopt had just started, with these entry points."""
    def install(entry_points):
        monkeypatch.setattr(registry, "_loaded", False)
        monkeypatch.setattr(registry, "_BACKENDS", {})
        monkeypatch.setattr(registry, "_plugin_errors", [])
        monkeypatch.setattr(registry, "_entry_points", lambda: list(entry_points))
        # Built-ins register on first import; re-register the classes already imported.
        from graphopt.backends.onnxruntime import OnnxRuntimeBackend
        from graphopt.backends.tvm import TVMBackend

        registry._BACKENDS.update(onnxruntime=OnnxRuntimeBackend, tvm=TVMBackend)

    return install


def test_builtin_backends_and_targets():
    names = backends.backends()
    assert {"onnxruntime", "tvm"} <= set(names)
    assert set(backends.get_backend("onnxruntime").targets()) == {"cpu", "cuda"}
    assert {"x86_64", "aarch64", "armv7", "riscv64", "cuda", "vulkan", "opencl"} <= set(
        backends.get_backend("tvm").targets())


def test_unknown_backend_is_usage_error():
    with pytest.raises(UsageError, match=r"--backend 'onnxrutime': unknown backend \(did you mean 'onnxruntime'"):
        backends.get_backend("onnxrutime")


def test_plugin_backend_from_entry_point(fresh_registry, gemm_file, tmp_path):
    fresh_registry([FakeEntryPoint("reference", "example_pkg:ReferenceBackend", ReferenceBackend),
                    FakeEntryPoint("broken", "missing_pkg:Backend", error=ImportError("no module named missing_pkg"))])
    assert "reference" in backends.backends()
    errors = backends.plugin_errors()
    assert len(errors) == 1 and "broken" in errors[0] and "missing_pkg" in errors[0]

    out = backends.compile_model(gemm_file, tmp_path / "ref", backend="reference", target="python",
                                 options=CompileOptions(input_shapes={"x": [3, 6]}))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "reference" and manifest["target"]["name"] == "python"
    feed = {"x": np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)}
    got = backends.load_runner(out)(feed)
    want = runtime.run(runtime.session(gemm_model()), feed)
    assert runtime.relative_error(got["y"], want["y"]) <= 1e-6


def test_plugin_name_clash_is_reported_not_fatal(fresh_registry):
    class Clash(ReferenceBackend):
        name = "onnxruntime"

    fresh_registry([FakeEntryPoint("clash", "pkg:Clash", Clash)])
    assert backends.backends()["onnxruntime"].__name__ == "OnnxRuntimeBackend"
    assert any("already registered" in e for e in backends.plugin_errors())


def test_onnxruntime_round_trip(gemm_file, tmp_path):
    out = backends.compile_model(gemm_file, tmp_path / "art", backend="onnxruntime", target="cpu")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["manifest.json", "model.onnx"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime"
    assert manifest["session"]["providers"] == ["CPUExecutionProvider"]
    assert manifest["inputs"] == [{"name": "x", "shape": ["N", 6], "dtype": "float32"}]
    assert [o["name"] for o in manifest["outputs"]] == ["y"]
    import hashlib

    assert manifest["model"]["sha256"] == hashlib.sha256(gemm_file.read_bytes()).hexdigest()
    assert manifest["versions"]["onnxruntime"] and manifest["versions"]["graphopt"]
    # The saved model is the input model, and runs to the same numbers.
    assert onnx.load(out / "model.onnx").graph.node[0].op_type == "Gemm"
    feed = {"x": np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)}
    got = backends.load_runner(out)(feed)
    want = runtime.run(runtime.session(gemm_model()), feed)
    np.testing.assert_array_equal(got["y"], want["y"])


def test_runner_checks_inputs(gemm_file):
    runner = backends.load_runner(gemm_file)
    x = np.zeros((2, 6), np.float32)
    with pytest.raises(UsageError, match="input 'x' is missing"):
        runner({})
    with pytest.raises(UsageError, match="'z' is not an input of the model"):
        runner({"x": x, "z": x})
    with pytest.raises(UsageError, match="input 'x' has dtype float64, the model expects float32"):
        runner({"x": x.astype(np.float64)})
    with pytest.raises(UsageError, match="input 'x' has shape 2x5, the model expects Nx6"):
        runner({"x": x[:, :5]})


def test_existing_artifact_is_replaced_and_other_folders_are_not(gemm_file, tmp_path):
    out = tmp_path / "art"
    backends.compile_model(gemm_file, out, backend="onnxruntime", target="cpu")
    first = json.loads((out / "manifest.json").read_text())["created"]
    backends.compile_model(gemm_file, out, backend="onnxruntime", target="cpu")
    assert json.loads((out / "manifest.json").read_text())["created"] >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "gemm.onnx"]  # no temporary folders left

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(UsageError, match="not a graphopt artifact; refusing"):
        backends.compile_model(gemm_file, other, backend="onnxruntime", target="cpu")
    assert (other / "notes.txt").read_text() == "keep"


def test_failed_compile_leaves_nothing(gemm_file, tmp_path, monkeypatch):
    from graphopt.backends.onnxruntime import OnnxRuntimeBackend

    def boom(self, model, target, options, folder):
        (folder / "partial.bin").write_bytes(b"x")
        raise backends.CompileError("code generator failed")

    monkeypatch.setattr(OnnxRuntimeBackend, "compile", boom)
    with pytest.raises(backends.CompileError) as info:
        backends.compile_model(gemm_file, tmp_path / "art", backend="onnxruntime", target="cpu")
    assert info.value.exit_code == ExitCode.PASS_FAILED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemm.onnx"]


def test_bad_artifacts_are_model_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="not a graphopt artifact"):
        backends.load_runner(empty)
    (empty / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable manifest"):
        backends.load_runner(empty)
    (empty / "manifest.json").write_text(json.dumps({"format": "graphopt-artifact/1", "backend": "nope"}))
    with pytest.raises(ModelError, match="backend 'nope', which is not installed"):
        backends.load_runner(empty)
    (empty / "manifest.json").write_text(json.dumps({"format": "graphopt-artifact/1", "backend": "onnxruntime",
                                                     "files": {"model": "model.onnx"}}))
    with pytest.raises(ModelError, match="model file .* is missing"):
        backends.load_runner(empty)


def test_input_shape_checked_against_model(gemm_file, tmp_path):
    with pytest.raises(UsageError, match="'q' is not an input"):
        backends.compile_model(gemm_file, tmp_path / "a", backend="onnxruntime", target="cpu",
                               options=CompileOptions(input_shapes={"q": [1]}))
    with pytest.raises(UsageError, match="declares x as \\?x6"):
        backends.compile_model(gemm_file, tmp_path / "a", backend="onnxruntime", target="cpu",
                               options=CompileOptions(input_shapes={"x": [1, 7]}))
    assert not (tmp_path / "a").exists()
