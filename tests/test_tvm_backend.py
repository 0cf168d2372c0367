"""The TVM backend: small graphs compiled for this machine and compared with
onnxruntime; targets; errors that must be one line and leave no folder."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt import backends
from graphopt.backends import CompileError, CompileOptions
from graphopt.backends.tvm import targets
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


def elf_header(lib: bytes) -> tuple[int, int, int]:
    """(ELF class: 1 = 32-bit, 2 = 64-bit; e_machine; e_flags) of a little-endian ELF file."""
    assert lib[:4] == b"\x7fELF" and lib[5] == 1, lib[:8]
    flags_at = 0x24 if lib[4] == 1 else 0x30
    return lib[4], int.from_bytes(lib[18:20], "little"), int.from_bytes(lib[flags_at:flags_at + 4], "little")


# preset -> (ELF class, e_machine, e_flags mask, e_flags under the mask): the float ABI the LLVM target asks for
CROSS_ELF = {
    "aarch64": (2, 183, 0, 0),  # EM_AARCH64
    "riscv64": (2, 243, 0x6, 0x4),  # EM_RISCV, EF_RISCV_FLOAT_ABI_DOUBLE (mabi lp64d)
    "armv7": (1, 40, 0x400, 0x400),  # EM_ARM, EF_ARM_ABI_FLOAT_HARD
}


@pytest.mark.parametrize("preset", ["aarch64", "riscv64"])
def test_cross_compile(tmp_path, preset):
    """Linked by the GNU cross gcc when installed, else by zig from the test
    extra: never skipped, the README's setup installs ziglang."""
    spec = targets.resolve(preset)
    onnx.save(gemm(), tmp_path / "g.onnx")
    out = backends.compile_model(tmp_path / "g.onnx", tmp_path / "art", backend="tvm", target=preset)
    elf_class, machine, mask, flags = CROSS_ELF[preset]
    got_class, got_machine, got_flags = elf_header((out / "model.so").read_bytes())
    assert (got_class, got_machine, got_flags & mask) == (elf_class, machine, flags)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["tvm"]["mtriple"] == spec.tvm["mtriple"]
    assert manifest["target"]["cc"] == spec.cc
    if spec.cross:
        assert spec.cc in (targets.CROSS_CC[spec.arch][0], f"zig cc -target {targets.CROSS_CC[spec.arch][2]}")
        with pytest.raises(UsageError, match=f"compiled for {spec.arch} .*this machine is"):
            backends.load_runner(out)


def fake_gcc(folder, name: str):
    """An executable ``name`` that records its arguments and writes its -o file."""
    folder.mkdir(exist_ok=True)
    script = folder / name
    script.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n'
                      'while [ "$1" != "-o" ]; do shift; done\necho fake > "$2"\n')
    script.chmod(0o755)
    return script


def test_gnu_cross_compiler_preferred_over_zig(tmp_path, monkeypatch):
    gcc = fake_gcc(tmp_path / "bin", "aarch64-linux-gnu-gcc")
    monkeypatch.setenv("PATH", f"{gcc.parent}:{os.environ.get('PATH', '')}")
    linker = targets.find_linker("aarch64")
    assert linker is not None and linker.name == "aarch64-linux-gnu-gcc" and linker.argv == (str(gcc),)
    if targets.host_arch() != "aarch64":
        assert targets.resolve("aarch64").cc == "aarch64-linux-gnu-gcc"
    linker.fcompile()(str(tmp_path / "m.so"), ["a.o", "b.o"])
    assert (tmp_path / "bin" / "args").read_text().split() == ["-shared", "-fPIC", "-o", str(tmp_path / "m.so"),
                                                              "a.o", "b.o"]


def test_link_failure_is_one_line_with_the_linkers_reason(tmp_path, monkeypatch):
    gcc = tmp_path / "bin" / "riscv64-linux-gnu-gcc"
    gcc.parent.mkdir()
    gcc.write_text("#!/bin/sh\necho 'riscv64-linux-gnu-ld: lib0.o: file in wrong format'\n"
                   "echo 'collect2: error: ld returned 1 exit status'\nexit 1\n")
    gcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gcc.parent}:{os.environ.get('PATH', '')}")
    if targets.host_arch() == "riscv64":
        pytest.skip("riscv64 is this machine: the host compiler links it")
    onnx.save(gemm(), tmp_path / "g.onnx")
    with pytest.raises(CompileError) as info:
        backends.compile_model(tmp_path / "g.onnx", tmp_path / "art", backend="tvm", target="riscv64")
    assert str(info.value) == ("linking model.so failed (riscv64-linux-gnu-gcc): "
                               "riscv64-linux-gnu-ld: lib0.o: file in wrong format")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "g.onnx"]


def test_zig_when_no_gnu_cross_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no riscv64-linux-gnu-gcc here
    linker = targets.find_linker("riscv64")
    assert linker is not None, "ziglang (the cross and test extras) is not installed"
    assert linker.name == "zig cc -target riscv64-linux-gnu"
    assert linker.argv[1:] == ("-m", "ziglang", "cc", "-target", "riscv64-linux-gnu", "-O2")


def test_no_linker_is_one_line_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(targets, "zig_linker", lambda arch: None)
    arch = "riscv64" if targets.host_arch() != "riscv64" else "aarch64"  # a cross target on any machine
    gcc, package, _ = targets.CROSS_CC[arch]
    with pytest.raises(UsageError) as info:
        targets.resolve(arch)
    assert str(info.value) == (f"--target {arch}: no linker for {arch}: neither {gcc} nor zig is installed "
                               f"(pip install 'graphopt[cross]', or Debian/Ubuntu: apt-get install {package})")


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
    assert spec.arch == "riscv64" and spec.device == "cpu"
    assert spec.cc in ("riscv64-linux-gnu-gcc", "zig cc -target riscv64-linux-gnu")  # GNU when on PATH, else zig
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
    with pytest.raises(UsageError, match="--rpc .* needs --tune-trials N or --tune-minutes M"):
        backends.compile_model(tmp_path / "missing.onnx", tmp_path / "o", backend="tvm", target="x86_64",
                               options=CompileOptions(rpc="127.0.0.1:9190:board"))
    with pytest.raises(UsageError, match="not supported by backend 'onnxruntime'"):
        backends.compile_model(tmp_path / "missing.onnx", tmp_path / "o", backend="onnxruntime", target="cpu",
                               options=CompileOptions(tune_trials=4))
    with pytest.raises(UsageError, match="--tune-minutes must be >= 0"):
        backends.compile_model(tmp_path / "missing.onnx", tmp_path / "o", backend="tvm", target="x86_64",
                               options=CompileOptions(tune_minutes=-1))
    with pytest.raises(UsageError, match="--tune-minutes, --tune-db"):
        backends.compile_model(tmp_path / "missing.onnx", tmp_path / "o", backend="onnxruntime", target="cpu",
                               options=CompileOptions(tune_minutes=1))


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


def test_sum_of_three_compiles_as_chained_adds(tmp_path):
    """Sum (ResNet's residual form in some exporters) reaches TVM as Adds, with
    Sum's broadcasting, and the numbers are onnxruntime's."""
    nodes = [helper.make_node("Sum", ["x", "b", "c"], ["y"], name="sum")]
    inits = {"b": RNG.standard_normal((1, 4, 1, 1)).astype(np.float32), "c": RNG.standard_normal(3).astype(np.float32)}
    proto = make_model(nodes, [vi("x", [2, 4, 5, 3])], [vi("y", [2, 4, 5, 3])], inits)
    from graphopt.backends.tvm import frontend
    from graphopt.ir import Model

    lowered = frontend.prepare(Model.from_proto(proto), [backends.TensorSpec("x", (2, 4, 5, 3), "float32")])
    assert [n.op_type for n in lowered.graph.node] == ["Add", "Add"]
    onnx.save(proto, tmp_path / "m.onnx")
    out = backends.compile_model(tmp_path / "m.onnx", tmp_path / "art", backend="tvm", target="x86_64",
                                 options=CompileOptions())
    feed = {"x": RNG.standard_normal((2, 4, 5, 3)).astype(np.float32)}
    np.testing.assert_allclose(backends.load_runner(out)(feed)["y"], runtime.run(runtime.session(proto), feed)["y"],
                               rtol=1e-6)


def test_usable_cores_counts_the_affinity_mask():
    cores = targets.usable_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
