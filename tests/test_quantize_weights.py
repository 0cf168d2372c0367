"""quantize-weights: packed MatMulNBits tensors, blocked DequantizeLinear, numbers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import apply, make_model, op_types, ort_run, vi
from graphopt.errors import UsageError
from graphopt.passes.quantization.weights import block_dequantize, block_quantize, pack_rows

F = np.float32


def _matmul(k=96, n=24, m=5, opset=17, bias=False, seed=0):
    rng = np.random.default_rng(seed)
    inits = {"w": rng.standard_normal((k, n)).astype(F)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if not bias else "m"], name="mm")]
    if bias:
        inits["b"] = rng.standard_normal(n).astype(F)
        nodes.append(helper.make_node("Add", ["m", "b"], ["y"], name="add"))
    return make_model(nodes, [vi("x", [2, m, k])], [vi("y", [2, m, n])], inits, opset=opset)


def _gemm(k=64, n=12, opset=17):
    rng = np.random.default_rng(3)
    inits = {"w": rng.standard_normal((n, k)).astype(F), "c": rng.standard_normal(n).astype(F)}
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g", transB=1, alpha=0.5, beta=2.0)]
    return make_model(nodes, [vi("x", [4, k])], [vi("y", [4, n])], inits, opset=opset)


def _rel(proto, after, seed=1):
    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    feeds = {"x": rng.standard_normal(shape).astype(F)}
    want, got = ort_run(proto, feeds)["y"], ort_run(after, feeds)["y"]
    return float(np.abs(want - got).max() / np.abs(want).max())


def test_pack_order():
    q = np.array([[1, 2, 3, 15, 7]], np.uint8)
    assert pack_rows(q, 4).tolist() == [[0x21, 0xF3, 0x07]]
    assert pack_rows(q, 8).tolist() == q.tolist()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_block_roundtrip_error_bounded(bits, symmetric):
    w = np.random.default_rng(0).standard_normal((100, 7)).astype(F)  # K not a multiple of the block
    q, s, z = block_quantize(w, bits, 32, symmetric)
    assert q.shape == (7, 4, 32) and s.shape == (7, 4) and q.max() < 2**bits
    back = block_dequantize(q, s, z, 100)
    # error at most one step (a half step from rounding, one for the symmetric clip)
    step = np.abs(np.repeat(s, 32, axis=1)[:, :100].T)
    assert np.all(np.abs(back - w) <= step * (1.0 if symmetric else 0.5) + 1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmulnbits_graph_and_numbers(symmetric):
    proto = _matmul()
    _, result, after = apply(proto, f"quantize-weights{{bits=4,block=32,symmetric={str(symmetric).lower()}}}")
    onnx.checker.check_model(after)
    assert op_types(after) == ["MatMulNBits"]
    node = after.graph.node[0]
    assert node.domain == "com.microsoft" and node.output == ["y"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"K": 96, "N": 24, "bits": 4, "block_size": 32}
    inits = {t.name: t for t in after.graph.initializer}
    b, s = inits[node.input[1]], inits[node.input[2]]
    assert b.data_type == TensorProto.UINT8 and list(b.dims) == [24, 3, 16]
    assert s.data_type == TensorProto.FLOAT and list(s.dims) == [24, 3]
    if symmetric:
        assert len(node.input) == 3
    else:
        z = inits[node.input[3]]
        assert z.data_type == TensorProto.UINT8 and list(z.dims) == [24, 2]  # 3 blocks -> 2 bytes
    stats = result.records[0].stats
    assert stats["quantized"] == 1 and stats["bytes_after"] < stats["bytes_before"] / 5
    assert _rel(proto, after) < 0.15


def test_8bit_block_128_and_padding():
    proto = _matmul(k=200, n=16)
    _, _, after = apply(proto, "quantize-weights{bits=8,block=128}")
    inits = {t.name: t for t in after.graph.initializer}
    assert list(inits[after.graph.node[0].input[1]].dims) == [16, 2, 128]
    assert _rel(proto, after) < 0.02


def test_gemm_transb_alpha_bias():
    proto = _gemm()
    _, _, after = apply(proto, "quantize-weights{bits=4,block=32}")
    assert op_types(after) == ["MatMulNBits"] and len(after.graph.node[0].input) == 6
    assert _rel(proto, after) < 0.15


@pytest.mark.parametrize("symmetric", [True, False])
def test_qdq_format(symmetric):
    proto = _matmul(opset=21)
    _, _, after = apply(proto, f"quantize-weights{{format=qdq,symmetric={str(symmetric).lower()}}}")
    onnx.checker.check_model(after)
    assert op_types(after) == ["DequantizeLinear", "MatMul"]
    dq = after.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 0, "block_size": 32}
    inits = {t.name: t for t in after.graph.initializer}
    assert inits[dq.input[0]].data_type == (TensorProto.INT4 if symmetric else TensorProto.UINT4)
    assert list(inits[dq.input[0]].dims) == [96, 24] and list(inits[dq.input[1]].dims) == [3, 24]
    assert _rel(proto, after) < 0.15


def test_qdq_gemm():
    proto = _gemm(opset=21)
    _, _, after = apply(proto, "quantize-weights{format=qdq}")
    assert op_types(after) == ["DequantizeLinear", "Gemm"]
    assert _rel(proto, after) < 0.15


def test_qdq_needs_opset_21():
    _, result, after = apply(_matmul(), "quantize-weights{format=qdq}")
    assert not result.changed and "opset >= 21" in result.records[0].notes[0]


def test_small_k_left_alone():
    _, result, after = apply(_matmul(k=8), "quantize-weights")
    assert op_types(after) == ["MatMul"] and "min-k" in result.records[0].notes[0]


def test_deterministic():
    proto = _matmul(bias=True)
    outs = [apply(proto, "quantize-weights{symmetric=false}")[2].SerializeToString(deterministic=True)
            for _ in range(2)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("pipeline,match", [
    ("quantize-weights{bits=3}", "bits"),
    ("quantize-weights{block=48}", "block"),
    ("quantize-weights{format=gptq}", "format"),
])
def test_bad_options(pipeline, match):
    with pytest.raises(UsageError, match=match) as info:
        apply(_matmul(), pipeline)
    assert "\n" not in str(info.value)
