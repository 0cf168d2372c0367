"""aarch64 artifacts run for real: a Conv+Relu graph compiled with the
``aarch64`` preset, executed by the aarch64 TVM runtime under qemu-user
(tests/aarch64_guest.py, the harness of benchmarks/arm_qemu.py), compared
with onnxruntime on the host.

The slow test needs qemu-aarch64, a linker for aarch64 (GNU, or zig from the
ziglang wheel the test extra installs) and the arm64 root
that ``python benchmarks/arm_qemu.py --setup-only`` builds; it is skipped,
with the missing piece named, where any of them is absent.  The fast tests
check how a missing or stale root is reported.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import aarch64_guest as guest
from conftest import make_model, vi

ELF_MACHINE_AARCH64 = 183


def conv_relu() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"W": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "B": rng.standard_normal(8).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return make_model(nodes, [vi("x", ["N", 3, 16, 16])], [vi("y", ["N", 8, 8, 8])], inits)


def test_missing_root_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_BENCH_CACHE", str(tmp_path))
    root, why = guest.root_ready()
    assert root is None
    assert str(tmp_path / "arm64-root") in why and "--setup-only" in why


def test_root_with_other_tvm_version_is_stale(tmp_path, monkeypatch):
    pytest.importorskip("tvm")
    monkeypatch.setenv("GRAPHOPT_BENCH_CACHE", str(tmp_path))
    root = tmp_path / "arm64-root"
    root.mkdir()
    (root / ".graphopt-ready").write_text(json.dumps({"versions": {"apache-tvm": "0.0", "apache-tvm-ffi": "0.0"}}))
    found, why = guest.root_ready()
    assert found is None and "0.0" in why and "--setup-only" in why
    (root / ".graphopt-ready").write_text(json.dumps({"versions": guest.host_versions()}))
    assert guest.root_ready() == (root, "")


@pytest.fixture(scope="module")
def aarch64_artifact(tmp_path_factory):
    """(qemu, arm64 root, artifact folder) for conv_relu compiled with the aarch64 preset."""
    pytest.importorskip("tvm")
    qemu = guest.find_qemu()
    if qemu is None:
        pytest.skip("qemu-aarch64 not installed (Debian: apt-get install qemu-user)")
    from graphopt.backends.tvm.targets import find_linker, missing_linker

    if find_linker("aarch64") is None:
        pytest.skip(missing_linker("aarch64"))
    root, why = guest.root_ready()
    if root is None:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("arm")
    model = tmp / "conv_relu.onnx"
    onnx.save(conv_relu(), str(model))
    out = tmp / "conv_relu_aarch64"
    result = guest.compile_aarch64(model, out, ["--input-shape", "x=2x3x16x16"], timeout=600)
    assert "error" not in result, result["error"]
    return qemu, root, out


def check_against_onnxruntime(got: dict[str, np.ndarray], x: np.ndarray) -> None:
    from graphopt import runtime

    want = runtime.run(runtime.session(conv_relu()), {"x": x})
    assert list(got) == ["y"] and got["y"].shape == (2, 8, 8, 8)
    assert (got["y"] > 0).any() and (got["y"] == 0).any()  # the Relu clips something and passes something
    assert runtime.relative_error(got["y"], want["y"]) <= 1e-5


@pytest.mark.slow
def test_conv_relu_runs_on_aarch64_under_qemu(aarch64_artifact):
    qemu, root, out = aarch64_artifact
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["arch"] == "aarch64" and manifest["target"]["cc"] in (
        "aarch64-linux-gnu-gcc", "zig cc -target aarch64-linux-gnu")
    header = (out / manifest["files"]["library"]).read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == ELF_MACHINE_AARCH64

    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    got, report = guest.run_artifact(qemu, root, out, {"x": x}, runs=1, timeout=600)
    assert report["machine"] == "aarch64" and report["runtime_only"]
    check_against_onnxruntime(got, x)


@pytest.mark.slow
def test_conv_relu_through_tvm_rpc_under_qemu(aarch64_artifact):
    qemu, root, out = aarch64_artifact
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with guest.GuestRPCServer(qemu, root) as server:
        assert server.machine == "aarch64"
        got, _ = guest.run_artifact_rpc(server, out, {"x": x}, runs=1, timeout=600)
    assert server.proc.poll() is not None  # the server under qemu is gone after the block
    check_against_onnxruntime(got, x)


@pytest.mark.slow
def test_int8_qdq_model_runs_on_sdot_under_qemu(tmp_path):
    """A QDQ model compiled for AArch64 with dotprod (its convolutions on
    ``sdot``, activations shifted to int8) runs under qemu and gives
    onnxruntime's numbers to the quantization step."""
    pytest.importorskip("tvm")
    from test_tvm_int8 import _output_scale, _qdq, _residual_cnn, _run_ort

    qemu, root = guest.find_qemu(), guest.root_ready()[0]
    if qemu is None or root is None:
        pytest.skip(guest.root_ready()[1] or "qemu-aarch64 not installed (Debian: apt-get install qemu-user)")
    from graphopt.backends.tvm.targets import find_linker, missing_linker

    if find_linker("aarch64") is None:
        pytest.skip(missing_linker("aarch64"))
    qdq = _qdq(_residual_cnn())
    onnx.save(qdq, str(tmp_path / "q.onnx"))
    target = json.dumps({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})
    result = guest.compile_aarch64(tmp_path / "q.onnx", tmp_path / "art", [], timeout=600, target=target)
    assert "error" not in result, result["error"]
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["int8"]["rewritten"] == {"conv2d": 4}
    x = np.random.default_rng(1).standard_normal((1, 3, 13, 11)).astype(np.float32)
    got, report = guest.run_artifact(qemu, root, tmp_path / "art", {"x": x}, runs=1, timeout=600)
    assert report["machine"] == "aarch64"
    steps = np.abs(got["y"] - _run_ort(qdq, x)) / _output_scale(qdq)
    assert steps.max() <= 1.0 + 1e-6
