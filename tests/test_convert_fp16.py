"""convert-fp16: dtypes after the pass, interface kept, numbers within 1e-2."""
from __future__ import annotations

import platform

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, helper

from conftest import LIGHT_MODELS, apply, assert_same_outputs, make_model, op_types, ort_run, vi
from graphopt.errors import UsageError
from graphopt.passes.quantization.fp16 import probe_cpu_fallbacks
from test_quantize_dynamic import bert_block, mlp

F = np.float32


def _inits(proto):
    return {t.name: t for t in proto.graph.initializer}


def _io_types(proto):
    return [(v.name, v.type.tensor_type.elem_type) for v in list(proto.graph.input) + list(proto.graph.output)]


def test_mlp_graph_shape_and_numbers():
    proto = mlp()
    _, result, after = apply(proto, "convert-fp16")
    onnx.checker.check_model(after)
    assert _io_types(after) == _io_types(proto)
    assert op_types(after) == ["Cast", "MatMul", "Add", "Relu", "Gemm", "Cast"]
    assert all(t.data_type == TensorProto.FLOAT16 for t in after.graph.initializer)
    assert result.records[0].stats["casts"] == 2
    assert_same_outputs(proto, after, rel=1e-2)


def test_kept_op_gets_casts_around_it():
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((8, 8)).astype(F), "k": np.array([3], np.int64)}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
        helper.make_node("CumSum", ["m", "axis"], ["c"], name="cs"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    inits["axis"] = np.array(1, np.int64)
    del inits["k"]
    proto = make_model(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])], inits)
    _, _, after = apply(proto, "convert-fp16")
    assert op_types(after) == ["Cast", "MatMul", "Cast", "CumSum", "Cast", "Relu", "Cast"]
    types = {n.name: n for n in after.graph.node}
    assert _inits(after)["axis"].data_type == TensorProto.INT64
    assert_same_outputs(proto, after, rel=1e-2)
    _, _, after = apply(proto, "convert-fp16{keep-nodes=[mm],keep-ops=[]}")
    assert op_types(after) == ["MatMul", "Cast", "CumSum", "Relu", "Cast"]


def test_bert_block():
    proto = bert_block()
    _, result, after = apply(proto, "convert-fp16")
    onnx.checker.check_model(after)
    assert _io_types(after) == _io_types(proto)
    assert op_types(after).count("Cast") == 2
    floats = [t for t in after.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert floats and all(t.data_type == TensorProto.FLOAT16 for t in floats)
    assert_same_outputs(proto, after, rel=1e-2)


def test_out_of_range_constant_clipped_with_note():
    inits = {"big": np.array([1e6, -1e6, 1.0], F)}
    nodes = [helper.make_node("Mul", ["x", "big"], ["m"]), helper.make_node("Tanh", ["m"], ["y"])]
    proto = make_model(nodes, [vi("x", [3])], [vi("y", [3])], inits)
    _, result, after = apply(proto, "convert-fp16{range-check=false}")
    assert any("outside float16" in n and "big" in n for n in result.records[0].notes)
    assert np.isfinite(onnx.numpy_helper.to_array(_inits(after)["big_fp16"])).all()
    feeds = {"x": np.array([1.0, 1.0, 0.5], F)}
    np.testing.assert_allclose(ort_run(after, feeds)["y"], ort_run(proto, feeds)["y"], atol=1e-3)


def test_cast_and_constant_nodes_retyped():
    nodes = [
        helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [2.0])),
        helper.make_node("Mul", ["f", "c"], ["y"]),
    ]
    proto = make_model(nodes, [vi("i", [4], TensorProto.INT32)], [vi("y", [4])])
    _, _, after = apply(proto, "convert-fp16")
    onnx.checker.check_model(after)
    cast = after.graph.node[0] if after.graph.node[0].op_type == "Cast" else after.graph.node[1]
    assert helper.get_attribute_value(cast.attribute[0]) == TensorProto.FLOAT16
    assert_same_outputs(proto, after, rel=1e-3, feeds={"i": np.arange(4, dtype=np.int32)})


# onnxruntime's x86 CPU provider has no float16 MatMul or Relu kernel (it runs
# them in float32 behind Casts it inserts itself); Transpose only moves bytes
# and has one for every type.
CPU_FALLBACK_TEXT = """
<ir_version: 8, opset_import: ["": 17]>
g (float[2,4] x) => (float[3,2] y)
<float[4,3] w = {0.5, -1.25, 0.3, 0.8, 0.1, -0.7, -0.45, 1.1, 0.25, 0.9, -0.6, 0.05}>
{
    h = MatMul(x, w)
    r = Relu(h)
    y = Transpose<perm = [1, 0]>(r)
}
"""
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _value_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value the proto declares (inputs, outputs, value_info, initializers)."""
    g = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    return types | {t.name: t.data_type for t in g.initializer}


@pytest.mark.skipif(not X86, reason="the graph is chosen for the kernels of onnxruntime's x86 CPU provider")
def test_keep_cpu_fallbacks_runs_and_matches():
    """With the option, the nodes onnxruntime would silently run in float32 are
    kept in float32 here (weight included), with one Cast into the float16
    rest; without it they become float16.  Either way the model matches."""
    proto = onnx.parser.parse_model(CPU_FALLBACK_TEXT)
    _, _, plain = apply(proto, "convert-fp16")
    assert probe_cpu_fallbacks(plain) == {"h", "r"}  # what onnxruntime computes behind its own Casts
    assert op_types(plain) == ["Cast", "MatMul", "Relu", "Transpose", "Cast"]
    plain_types = _value_types(plain)
    assert {plain_types[v] for v in ("w_fp16", "h", "r", "y_fp16")} == {TensorProto.FLOAT16}

    _, result, kept = apply(proto, "convert-fp16{keep-cpu-fallbacks=true}")
    onnx.checker.check_model(kept)
    assert op_types(kept) == ["MatMul", "Relu", "Cast", "Transpose", "Cast"]
    kept_types = _value_types(kept)
    assert {kept_types[v] for v in ("w", "h", "r")} == {TensorProto.FLOAT}
    assert kept_types["y_fp16"] == TensorProto.FLOAT16  # the option keeps what it must, not everything
    assert probe_cpu_fallbacks(kept) == set()
    assert result.records[0].notes == ["2 node(s) kept in float32: no float16 kernel on onnxruntime CPU"]
    for after in (plain, kept):
        assert_same_outputs(proto, after, rel=1e-2)


@pytest.mark.skipif(not X86, reason="onnxruntime's x86 CPU provider has no float16 Gemm")
def test_keep_cpu_fallbacks_covers_the_node_writing_a_graph_output():
    _, _, kept = apply(mlp(), "convert-fp16{keep-cpu-fallbacks=true}")
    assert probe_cpu_fallbacks(kept) == set()


QUICK_LIGHT = ("light_squeezenet.onnx", "light_inception_v1.onnx")  # both overflow float16 without range-check


@pytest.mark.parametrize("path", [
    pytest.param(p, id=p.name, marks=() if p.name in QUICK_LIGHT else pytest.mark.slow) for p in LIGHT_MODELS
])
def test_light_models(path):
    for path in [path]:
        proto = onnx.load(path)
        _, _, after = apply(proto, "convert-fp16")
        onnx.checker.check_model(after)
        # (a round trip drops unused inputs of these IR v3 models, as any pass does)
        before = dict(_io_types(proto))
        assert all(before[name] == t for name, t in _io_types(after)), path.name
        assert_same_outputs(proto, after, rel=1e-2)


def test_deterministic():
    proto = bert_block(layers=1)
    outs = [apply(proto, "convert-fp16")[2].SerializeToString(deterministic=True) for _ in range(2)]
    assert outs[0] == outs[1]


def test_bad_option():
    with pytest.raises(UsageError, match="keep-cpu-fallbacks") as info:
        apply(mlp(), "convert-fp16{keep-cpu-fallbacks=maybe}")
    assert "\n" not in str(info.value)
