"""graphopt.backends.tvm.byoc.partition with the reference accelerator (graphopt.backends.refaccel):
the claimed ops, the stats, and numbers equal to onnxruntime's, with the
claimed parts running as the plug-in's generated C."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import make_model, ort_run, vi

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from graphopt.backends.refaccel import ACCELERATOR  # noqa: E402
from graphopt.backends.refaccel.codegen import generate  # noqa: E402
from graphopt.backends.tvm.byoc import partition  # noqa: E402

F = np.float32


def _conv_gemm_softmax() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {
        "w": (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(F),
        "b": (rng.standard_normal(8) * 0.1).astype(F),
        "gw": (rng.standard_normal((8 * 4 * 4, 10)) * 0.1).astype(F),
        "gb": (rng.standard_normal(10) * 0.1).astype(F),
        "shape": np.array([1, -1], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"]),
        helper.make_node("Softmax", ["g"], ["y"], axis=1),
    ]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 10])], inits)


def _x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 8, 8)).astype(F)


def _external_calls(mod: tvm.IRModule) -> list[str]:
    names = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", None) == "relax.call_dps_packed":
            names.append(str(e.args[0].global_symbol))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return names


def test_partition_claims_conv_relu_and_gemm_and_leaves_softmax_on_host():
    proto = _conv_gemm_softmax()
    mod, stats = partition(from_onnx(proto), ACCELERATOR)

    assert stats["accelerator"] == "refaccel"
    assert stats["patterns"] == {"conv2d_bias_relu": 1, "matmul_bias": 1}
    assert stats["accelerator_ops"] == {"nn.conv2d": 1, "add": 2, "nn.relu": 1, "matmul": 1}
    assert stats["host_ops"] == {"reshape": 1, "nn.softmax": 1}
    assert sorted(stats["external_functions"]) == sorted(_external_calls(mod))
    assert len(_external_calls(mod)) == 2
    assert "external_mods" in mod.attrs

    ex = tvm.compile(mod, target="llvm")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(_x())).numpy()
    want = ort_run(proto, {"x": _x()})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_claimed_functions_run_from_the_generated_library(tmp_path):
    """The library exported with the plug-in's C inside holds the claimed
    functions (``__tvm_ffi_<symbol>``) and, loaded back, gives the same numbers."""
    proto = _conv_gemm_softmax()
    mod, stats = partition(from_onnx(proto), ACCELERATOR)
    ex = tvm.compile(mod, target="llvm")
    lib = tmp_path / "model.so"
    ex.export_library(str(lib))
    loaded = tvm.runtime.load_module(str(lib))
    for symbol in stats["external_functions"]:
        assert loaded.get_function(symbol, query_imports=True) is not None
    got = relax.VirtualMachine(loaded, tvm.cpu())["main"](tvm.runtime.tensor(_x(2))).numpy()
    np.testing.assert_allclose(got, ort_run(proto, {"x": _x(2)})["y"], rtol=1e-5, atol=1e-6)


def test_generated_source_bakes_in_shapes():
    mod = relax.transform.FoldConstant()(from_onnx(_conv_gemm_softmax()))
    mod = relax.transform.FuseOpsByPattern(ACCELERATOR.fusion_patterns(), bind_constants=False)(mod)
    mod = relax.transform.MergeCompositeFunctions()(mod)
    funcs = [f for _, f in mod.functions_items()
             if isinstance(f, relax.Function) and f.attrs is not None and "Codegen" in f.attrs]
    source, symbols = generate(funcs)
    assert len(symbols) == 2
    for s in symbols:
        assert f"__tvm_ffi_{s}(" in source
    # conv: N C H W O KH KW OH OW, strides, pads, dilation, groups
    assert "1, 3, 8, 8, 8, 3, 3, 4, 4, 2, 2, 1, 1, 1, 1, 1);" in source
    assert "ra_matmul(" in source and ", 1L, 128, 10);" in source


def test_grouped_conv_without_bias_and_a_lone_relu():
    """A grouped conv without bias and a Relu after a host op are claimed apart;
    ONNX Clip imports as call_tir maximum/minimum kernels, which stay on the host."""
    rng = np.random.default_rng(0)
    inits = {"w": (rng.standard_normal((4, 1, 3, 3)) * 0.3).astype(F),
             "lo": np.array(0.1, F), "hi": np.array(0.6, F)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], group=4),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Sub", ["s", "lo"], ["d"]),
        helper.make_node("Relu", ["d"], ["r"]),
        helper.make_node("Clip", ["r", "lo", "hi"], ["y"]),
    ]
    proto = make_model(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", [1, 4, 5, 5])], inits)
    mod, stats = partition(from_onnx(proto), ACCELERATOR)
    assert stats["patterns"] == {"conv2d": 1, "relu": 1}
    assert stats["host_ops"] == {"sigmoid": 1, "subtract": 1, "call_tir": 2}
    x = rng.standard_normal((1, 4, 5, 5)).astype(F) * 3
    ex = tvm.compile(mod, target="llvm")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, ort_run(proto, {"x": x})["y"], rtol=1e-5, atol=1e-6)


def test_integer_kernels_stay_on_host():
    """refaccel runs float32 only: int8 kernels from lower_qdq are not claimed."""
    from graphopt.backends.tvm.int8 import lower_qdq
    from graphopt.calibration import open_reader
    from graphopt.context import PassContext

    from conftest import apply

    proto = _conv_gemm_softmax()
    ctx = PassContext(calibration=open_reader("random:8", proto, seed=0, quiet=True), quiet=True)
    qdq = apply(proto, "quantize-static", ctx)[2]
    lowered, _ = lower_qdq(from_onnx(qdq))
    _, stats = partition(lowered, ACCELERATOR)
    assert "nn.conv2d" not in stats["accelerator_ops"] and "matmul" not in stats["accelerator_ops"]
    assert stats["host_ops"]["nn.conv2d"] == 1 and stats["host_ops"]["matmul"] == 1


def test_codegen_failure_is_one_line_compile_error():
    from graphopt.backends.base import CompileError
    from graphopt.backends.tvm.byoc import Accelerator

    def broken(functions, options=None, constant_names=None):
        raise ValueError("no kernel for this shape")

    acc = Accelerator(name="refaccel_broken", patterns=ACCELERATOR.patterns, codegen=broken)
    with pytest.raises(CompileError, match="refaccel_broken.*code generation failed"):
        partition(from_onnx(_conv_gemm_softmax()), acc)
