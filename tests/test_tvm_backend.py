"""The TVM backend: small graphs compiled for this machine and compared with
onnxruntime; targets; errors that must be one line and leave no folder."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper

import backends
from backends import CompileError, CompileOptions
from backends.tvm import targets
from graphopt import runtime
from graphopt.errors import UsageError

from conftest import make_model, vi

pytest.importorskip("tvm")
RNG = np.random.default_rng(0)


def conv_relu() -> onnx.ModelProto:
    inits = {"W": RNG.standard_normal((8, 3, 3, 3)).astype(np.float32), "B": RNG.standard_normal(8).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return make_model(nodes, [vi("x", ["N", 3, 12, 12])], [vi("y", ["N", 8, 12, 12])], inits)


def gemm() -> onnx.ModelProto:
    inits = {"W": RNG.standard_normal((10, 16)).astype(np.float32), "b": RNG.standard_normal(10).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="gemm", transB=1, alpha=0.5)]
    return make_model(nodes, [vi("x", [4, 16])], [vi("y", [4, 10])], inits)


def residual() -> onnx.ModelProto:
    """conv-relu-conv + x -> relu, with the inner activation as a second output."""
    inits = {"W1": RNG.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3,
             "W2": RNG.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["mid"], name="relu1"),
             helper.make_node("Conv", ["mid", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "x"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="relu2")]
    return make_model(nodes, [vi("x", [1, 4, 8, 8])], [vi("y", [1, 4, 8, 8]), vi("mid", [1, 4, 8, 8])], inits)


CASES = {"conv_relu": (conv_relu, {"x": [2, 3, 12, 12]}), "gemm": (gemm, {}), "residual": (residual, {})}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Each case compiled once for x86_64: name -> (proto, artifact folder)."""
    if targets.host_arch() != "x86_64":
        pytest.skip("the x86_64 preset targets this machine's CPU")
    root = tmp_path_factory.mktemp("tvm")
    out = {}
    for name, (build, shapes) in CASES.items():
        proto = build()
        onnx.save(proto, root / f"{name}.onnx")
        out[name] = (proto, backends.compile_model(root / f"{name}.onnx", root / name, backend="tvm",
                                                   target="x86_64", options=CompileOptions(input_shapes=shapes)))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_tvm_matches_onnxruntime(compiled, name):
    proto, artifact = compiled[name]
    shapes = CASES[name][1]
    feed = runtime.random_inputs(runtime.session(proto), seed=3, shapes=shapes)
    want = runtime.run(runtime.session(proto), feed)
    got = backends.load_runner(artifact)(feed)
    assert list(got) == list(want)
    for key in want:
        assert got[key].shape == want[key].shape
        assert runtime.relative_error(got[key], want[key]) <= 1e-5, key


def test_manifest_fields(compiled):
    proto, artifact = compiled["conv_relu"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["backend"] == "tvm"
    target = manifest["target"]
    assert target["name"] == "x86_64" and target["device"] == "cpu" and target["arch"] == "x86_64"
    assert target["tvm"]["kind"] == "llvm" and target["tvm"]["mcpu"] == targets.host_llvm()["mcpu"]
    assert manifest["inputs"] == [{"name": "x", "shape": [2, 3, 12, 12], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "y", "shape": [2, 8, 12, 12], "dtype": "float32"}]
    assert manifest["input_shapes"] == {"x": [2, 3, 12, 12]}
    assert (artifact / manifest["files"]["library"]).read_bytes()[:4] == b"\x7fELF"
    assert manifest["versions"]["tvm"].startswith("0.27") and manifest["versions"]["graphopt"]
    assert len(manifest["model"]["sha256"]) == 64
    assert manifest["tuning"]["trials"] == 0
    assert manifest["compile_seconds"] > 0


def test_residual_outputs_in_model_order(compiled):
    _, artifact = compiled["residual"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert [o["name"] for o in manifest["outputs"]] == ["y", "mid"]


def test_cross_compile_aarch64(tmp_path):
    spec = targets.PRESETS["aarch64"][1]()
    if spec.cc and shutil.which(spec.cc) is None:
        pytest.skip(f"{spec.cc} not installed")
    onnx.save(gemm(), tmp_path / "g.onnx")
    out = backends.compile_model(tmp_path / "g.onnx", tmp_path / "arm", backend="tvm", target="aarch64")
    lib = (out / "model.so").read_bytes()
    assert lib[:4] == b"\x7fELF" and int.from_bytes(lib[18:20], "little") == 183  # EM_AARCH64
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["tvm"]["mtriple"] == "aarch64-linux-gnu"
    if targets.host_arch() != "aarch64":
        with pytest.raises(UsageError, match="compiled for aarch64 .*this machine is"):
            backends.load_runner(out)


def test_unsupported_op_names_node(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Celu", ["r"], ["y"], name="my_celu", alpha=1.0)]
    onnx.save(make_model(nodes, [vi("x", [1, 4])], [vi("y", [1, 4])]), tmp_path / "celu.onnx")
    with pytest.raises(CompileError, match=r"^node 'my_celu' \(Celu\): op not supported by TVM's Relax ONNX"):
        backends.compile_model(tmp_path / "celu.onnx", tmp_path / "out", backend="tvm", target="x86_64")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["celu.onnx"]


def test_dynamic_input_needs_input_shape(tmp_path):
    onnx.save(conv_relu(), tmp_path / "m.onnx")
    with pytest.raises(UsageError, match=r"input 'x' has a dynamic shape \(\?x3x12x12\); pin it with --input-shape"):
        backends.compile_model(tmp_path / "m.onnx", tmp_path / "out", backend="tvm", target="x86_64")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("x86", r"unknown target \(presets: x86_64, aarch64"),
    ("llvm -mcpu=skylake", "unknown target"),
    ("{kind: llvm}", "not valid JSON"),
    ('{"kind": "nosuch"}', "TVM refuses"),
    ('{"mcpu": "skylake"}', 'needs a "kind"'),
    ('{"kind": "llvm", "mcpu": "skylak"}', "LLVM does not know mcpu 'skylak'.*did you mean 'skylake'"),
    ('{"kind": "llvm", "mtriple": "sparc-unknown-linux"}', "no cross compiler known"),
])
def test_bad_targets(text, message):
    with pytest.raises(UsageError, match=message):
        targets.resolve(text)


def test_json_target_and_presets_resolve():
    spec = targets.resolve('{"kind": "llvm", "mtriple": "riscv64-linux-gnu", "mattr": ["+m", "+a", "+f", "+d"]}')
    assert spec.arch == "riscv64" and spec.cc == "riscv64-linux-gnu-gcc" and spec.device == "cpu"
    host = targets.resolve('{"kind": "llvm", "mcpu": "x86-64-v2"}' if targets.host_arch() == "x86_64"
                           else '{"kind": "llvm"}')
    assert host.cc is None and host.arch == targets.host_arch()
    armv7 = targets.PRESETS["armv7"][1]()
    assert armv7.tvm["mfloat-abi"] == "hard" and armv7.arch == "arm"
    cuda = targets.PRESETS["cuda"][1]()
    assert cuda.tvm["host"]["kind"] == "llvm" and cuda.tvm["arch"].startswith("sm_")


def test_vulkan_without_codegen_is_usage_error():
    import tvm

    if tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None:
        pytest.skip("this TVM build has Vulkan")
    with pytest.raises(UsageError, match="no vulkan code generator"):
        targets.resolve("vulkan")


def test_tuning_options_checked_before_the_model(tmp_path):
    with pytest.raises(UsageError, match="--tune-trials must be >= 0"):
        backends.compile_model(tmp_path / "missing.onnx", tmp_path / "o", backend="tvm", target="x86_64",
                               options=CompileOptions(tune_trials=-1))
    with pytest.raises(UsageError, match="--rpc .* needs --tune-trials"):
        backends.compile_model(tmp_path / "missing.onnx", tmp_path / "o", backend="tvm", target="x86_64",
                               options=CompileOptions(rpc="127.0.0.1:9190:board"))
    with pytest.raises(UsageError, match="not supported by backend 'onnxruntime'"):
        backends.compile_model(tmp_path / "missing.onnx", tmp_path / "o", backend="onnxruntime", target="cpu",
                               options=CompileOptions(tune_trials=4))


def test_shape_computations_fold_once_inputs_are_pinned(tmp_path):
    """Reshape to a shape computed from Shape(x), as exporters write it: the
    frontend needs a constant shape, which pinning the batch dim provides."""
    inits = {"i0": np.array([0], np.int64), "minus1": np.array([-1], np.int64)}
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i0"], ["n"], name="batch", axis=0),
             helper.make_node("Concat", ["n", "minus1"], ["new_shape"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "new_shape"], ["y"], name="flatten")]
    proto = make_model(nodes, [vi("x", ["N", 4, 2, 2])], [vi("y", ["N", 16])], inits)
    onnx.save(proto, tmp_path / "m.onnx")
    out = backends.compile_model(tmp_path / "m.onnx", tmp_path / "art", backend="tvm", target="x86_64",
                                 options=CompileOptions(input_shapes={"x": [3, 4, 2, 2]}))
    feed = {"x": RNG.standard_normal((3, 4, 2, 2)).astype(np.float32)}
    got = backends.load_runner(out)(feed)
    np.testing.assert_array_equal(got["y"], runtime.run(runtime.session(proto), feed)["y"])
    assert json.loads((out / "manifest.json").read_text())["outputs"][0]["shape"] == [3, 16]
