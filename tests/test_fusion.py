"""fuse-batchnorm and fuse-gemm: graph shape after the pass and numbers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from conftest import LIGHT_MODELS, apply, assert_same_outputs, make_model, op_types, random_feeds, vi

F = np.float32


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _bn_params(c: int, dtype=F, seed: int = 1) -> dict[str, np.ndarray]:
    rng = _rng(seed)
    return {
        "scale": rng.uniform(0.5, 2.0, c).astype(dtype),
        "bias": rng.standard_normal(c).astype(dtype),
        "mean": rng.standard_normal(c).astype(dtype),
        "var": rng.uniform(0.1, 3.0, c).astype(dtype),
    }


def _bn(x: str, y: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, "scale", "bias", "mean", "var"], [y], epsilon=1e-3, **attrs)


# ==================================================================================
# fuse-batchnorm
# ==================================================================================
@pytest.mark.parametrize("group,with_bias", [(1, True), (1, False), (2, True)])
def test_bn_folds_into_conv(group, with_bias):
    rng = _rng()
    inits = {"w": rng.standard_normal((4, 6 // group, 3, 3)).astype(F), **_bn_params(4)}
    conv_in = ["x", "w"]
    if with_bias:
        inits["b"] = rng.standard_normal(4).astype(F)
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["c"], group=group, pads=[1, 1, 1, 1]), _bn("c", "y")]
    proto = make_model(nodes, [vi("x", [2, 6, 5, 5])], [vi("y", [2, 4, 5, 5])], inits)
    _, result, after = apply(proto, "fuse-batchnorm")
    assert op_types(after) == ["Conv"]
    assert len(after.graph.node[0].input) == 3 and after.graph.node[0].output == ["y"]
    assert result.records[0].stats == {"fused": 1, "into_Conv": 1}
    assert_same_outputs(proto, after, rel=1e-5)


@pytest.mark.parametrize("group", [1, 2])
def test_bn_folds_into_conv_transpose(group):
    rng = _rng()
    cin, cout = 4, 6
    inits = {
        "w": rng.standard_normal((cin, cout // group, 3, 3)).astype(F),
        "b": rng.standard_normal(cout).astype(F),
        **_bn_params(cout),
    }
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], group=group, strides=[2, 2]), _bn("c", "y")]
    proto = make_model(nodes, [vi("x", [1, cin, 3, 3])], [vi("y", [1, cout, 7, 7])], inits)
    _, _, after = apply(proto, "fuse-batchnorm")
    assert op_types(after) == ["ConvTranspose"]
    assert_same_outputs(proto, after, rel=1e-5)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (3, 1)])
def test_bn_folds_into_gemm(trans_b, c_shape):
    rng = _rng()
    w = rng.standard_normal((5, 4) if trans_b else (4, 5)).astype(F)
    inits = {"w": w, **_bn_params(5)}
    gemm_in = ["x", "w"]
    if c_shape is not None:
        inits["c"] = rng.standard_normal(c_shape).astype(F)
        gemm_in.append("c")
    nodes = [helper.make_node("Gemm", gemm_in, ["g"], transB=trans_b, alpha=0.7, beta=1.5), _bn("g", "y")]
    proto = make_model(nodes, [vi("x", [3, 4])], [vi("y", [3, 5])], inits)
    _, _, after = apply(proto, "fuse-batchnorm")
    assert op_types(after) == ["Gemm"]
    assert_same_outputs(proto, after, rel=1e-5)


def test_bn_folds_into_matmul_add():
    rng = _rng()
    inits = {"w": rng.standard_normal((4, 5)).astype(F), "b": rng.standard_normal(5).astype(F), **_bn_params(5)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["b", "m"], ["a"]), _bn("a", "y")]
    proto = make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 5])], inits)
    _, _, after = apply(proto, "fuse-batchnorm")
    assert op_types(after) == ["MatMul", "Add"]
    assert_same_outputs(proto, after, rel=1e-5)


def test_bn_after_bare_matmul_becomes_add():
    rng = _rng()
    inits = {"w": rng.standard_normal((4, 5)).astype(F), **_bn_params(5)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), _bn("m", "y")]
    proto = make_model(nodes, [vi("x", [3, 4])], [vi("y", [3, 5])], inits)
    _, _, after = apply(proto, "fuse-batchnorm")
    assert op_types(after) == ["MatMul", "Add"]
    assert_same_outputs(proto, after, rel=1e-5)


def test_bn_on_3d_matmul_not_folded():
    # BN's channel axis is 1 (the sequence axis here), not MatMul's feature axis.
    rng = _rng()
    inits = {"w": rng.standard_normal((4, 4)).astype(F), **_bn_params(3)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), _bn("m", "y")]
    proto = make_model(nodes, [vi("x", [2, 3, 4])], [vi("y", [2, 3, 4])], inits)
    _, result, after = apply(proto, "fuse-batchnorm")
    assert "BatchNormalization" in op_types(after) and not result.changed


def test_bn_float16_conv_keeps_weight_dtype():
    rng = _rng()
    inits = {"w": rng.standard_normal((4, 3, 1, 1)).astype(np.float16), **_bn_params(4, np.float16)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "y")]
    proto = make_model(nodes, [vi("x", [1, 3, 2, 2], TensorProto.FLOAT16)], [vi("y", [1, 4, 2, 2], TensorProto.FLOAT16)],
                       inits)
    _, _, after = apply(proto, "fuse-batchnorm")
    assert op_types(after) == ["Conv"]
    assert {t.data_type for t in after.graph.initializer} == {TensorProto.FLOAT16}
    assert_same_outputs(proto, after, rel=5e-3)


def test_bn_not_folded_when_conv_output_has_two_consumers():
    rng = _rng()
    inits = {"w": rng.standard_normal((4, 3, 1, 1)).astype(F), **_bn_params(4)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "y"), helper.make_node("Relu", ["c"], ["z"])]
    proto = make_model(nodes, [vi("x", [1, 3, 2, 2])], [vi("y", [1, 4, 2, 2]), vi("z", [1, 4, 2, 2])], inits)
    _, result, after = apply(proto, "fuse-batchnorm")
    assert op_types(after) == ["Conv", "BatchNormalization", "Relu"]
    assert not result.changed
    assert_same_outputs(proto, after)


def test_bn_not_folded_when_conv_output_is_graph_output():
    rng = _rng()
    inits = {"w": rng.standard_normal((4, 3, 1, 1)).astype(F), **_bn_params(4)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "y")]
    proto = make_model(nodes, [vi("x", [1, 3, 2, 2])], [vi("y", [1, 4, 2, 2]), vi("c", [1, 4, 2, 2])], inits)
    _, _, after = apply(proto, "fuse-batchnorm")
    assert op_types(after) == ["Conv", "BatchNormalization"]


def test_bn_not_folded_with_variable_statistics_or_weight():
    rng = _rng()
    params = _bn_params(4)
    inits = {"w": rng.standard_normal((4, 3, 1, 1)).astype(F), **{k: v for k, v in params.items() if k != "mean"}}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "y")]
    proto = make_model(nodes, [vi("x", [1, 3, 2, 2]), vi("mean", [4])], [vi("y", [1, 4, 2, 2])], inits)
    _, result, _ = apply(proto, "fuse-batchnorm")
    assert not result.changed
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "y")]
    proto = make_model(nodes, [vi("x", [1, 3, 2, 2]), vi("w", [4, 3, 1, 1])], [vi("y", [1, 4, 2, 2])], params)
    _, result, _ = apply(proto, "fuse-batchnorm")
    assert not result.changed


def test_bn_with_shared_weight_leaves_the_other_conv_alone():
    rng = _rng()
    inits = {"w": rng.standard_normal((4, 3, 1, 1)).astype(F), **_bn_params(4)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"]),
        _bn("c1", "y1"),
        helper.make_node("Conv", ["x", "w"], ["y2"]),
    ]
    proto = make_model(nodes, [vi("x", [1, 3, 2, 2])], [vi("y1", [1, 4, 2, 2]), vi("y2", [1, 4, 2, 2])], inits)
    _, _, after = apply(proto, "fuse-batchnorm")
    assert op_types(after) == ["Conv", "Conv"]
    assert_same_outputs(proto, after, rel=1e-5)


def test_bn_after_non_linear_producer_kept():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), _bn("r", "y")]
    proto = make_model(nodes, [vi("x", [1, 4, 2, 2])], [vi("y", [1, 4, 2, 2])], _bn_params(4))
    _, result, after = apply(proto, "fuse-batchnorm")
    assert op_types(after) == ["Relu", "BatchNormalization"] and not result.changed


@pytest.mark.parametrize("path", LIGHT_MODELS, ids=lambda p: p.stem)
def test_light_models_fuse_batchnorm_keeps_outputs(path):
    model = graphopt.load(path)
    before = model.to_proto()
    graphopt.optimize(model, "fuse-batchnorm")
    after = model.to_proto()
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    if op_types(after) != op_types(before):
        assert_same_outputs(before, after, rel=1e-4, feeds=random_feeds(before))


# ==================================================================================
# fuse-gemm
# ==================================================================================
@pytest.mark.parametrize("bias_shape", [(5,), (1, 5), (), (1,)])
@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_becomes_gemm(bias_shape, bias_first):
    rng = _rng()
    inits = {"w": rng.standard_normal((4, 5)).astype(F), "b": np.asarray(rng.standard_normal(bias_shape), F)}
    add_in = ["b", "m"] if bias_first else ["m", "b"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", add_in, ["y"])]
    proto = make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 5])], inits)
    _, result, after = apply(proto, "fuse-gemm")
    assert op_types(after) == ["Gemm"]
    assert after.graph.node[0].output == ["y"]
    assert result.records[0].stats == {"fused": 1}
    assert_same_outputs(proto, after, rel=1e-6)


def test_matmul_add_float64_becomes_gemm():
    rng = _rng()
    inits = {"w": rng.standard_normal((4, 5)), "b": rng.standard_normal(5)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    proto = make_model(nodes, [vi("x", [2, 4], TensorProto.DOUBLE)], [vi("y", [2, 5], TensorProto.DOUBLE)], inits)
    _, _, after = apply(proto, "fuse-gemm")
    assert op_types(after) == ["Gemm"]
    assert_same_outputs(proto, after, rel=1e-12)


def _matmul_add(x_shape, w_shape, b_shape, extra_outputs=(), extra_nodes=(), dtype=TensorProto.FLOAT, out_shape=None):
    rng = _rng()
    npd = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    inits = {"w": rng.standard_normal(w_shape).astype(npd), "b": np.asarray(rng.standard_normal(b_shape)).astype(npd)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"]), *extra_nodes]
    outs = [vi("y", out_shape, dtype)] + [vi(n, s, dtype) for n, s in extra_outputs]
    return make_model(nodes, [vi("x", x_shape, dtype)], outs, inits)


@pytest.mark.parametrize(
    "case",
    [
        dict(x_shape=[2, 3, 4], w_shape=(4, 5), b_shape=(5,), out_shape=[2, 3, 5]),  # 3-D activation
        dict(x_shape=[2, 4], w_shape=(4, 5), b_shape=(2, 5), out_shape=[2, 5]),  # bias not [N]/[1,N]
        dict(x_shape=[1, 4], w_shape=(4, 5), b_shape=(3, 5), out_shape=[3, 5]),  # bias enlarges the output
        dict(x_shape=[2, 4], w_shape=(4, 5), b_shape=(5,), out_shape=[2, 5], dtype=TensorProto.INT32),
        dict(x_shape=[2, 4], w_shape=(4, 5), b_shape=(5,), out_shape=[2, 5], extra_outputs=[("m", [2, 5])]),
        dict(x_shape=[2, 4], w_shape=(4, 5), b_shape=(5,), out_shape=[2, 5],
             extra_nodes=[helper.make_node("Relu", ["m"], ["z"])], extra_outputs=[("z", [2, 5])]),
    ],
    ids=["3d", "bias-2d", "bias-enlarges", "int32", "matmul-is-output", "matmul-two-consumers"],
)
def test_matmul_add_not_fused(case):
    proto = _matmul_add(**case)
    _, result, after = apply(proto, "fuse-gemm")
    assert "Gemm" not in op_types(after) and not result.changed
    assert_same_outputs(proto, after)


def test_matmul_with_variable_weight_not_fused():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    proto = make_model(nodes, [vi("x", [2, 4]), vi("w", [4, 5])], [vi("y", [2, 5])], {"b": np.zeros(5, F)})
    _, result, _ = apply(proto, "fuse-gemm")
    assert not result.changed


# -- fuse-conv-affine --------------------------------------------------------------------
def _conv_then(op: str, const_shape, const_first: bool = False, extra_consumer: bool = False):
    rng = np.random.default_rng(7)
    ins = ["c", "k"] if const_first else ["k", "c"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["k"], pads=[1, 1, 1, 1]),
             helper.make_node(op, ins, ["y"])]
    outputs = [vi("y", [1, 4, 5, 5])]
    if extra_consumer:
        nodes.append(helper.make_node("Relu", ["k"], ["z"]))
        outputs.append(vi("z", [1, 4, 5, 5]))
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
             "c": rng.standard_normal(const_shape).astype(np.float32)}
    return make_model(nodes, [vi("x", [1, 3, 5, 5])], outputs, inits)


@pytest.mark.parametrize("op, shape, first", [
    ("Add", (1, 4, 1, 1), False), ("Add", (4, 1, 1), True), ("Sub", (4, 1, 1), False),
    ("Sub", (1, 4, 1, 1), True), ("Mul", (1, 4, 1, 1), False), ("Mul", (1,), True),
])
def test_fuse_conv_affine_folds_per_channel_constants(op, shape, first):
    proto = _conv_then(op, shape, const_first=first)
    _, result, after = apply(proto, "fuse-conv-affine")
    assert op_types(after) == ["Conv"]
    assert after.graph.node[0].output[0] == "y" and len(after.graph.node[0].input) == 3
    assert result.records[0].stats == {"fused": 1}
    assert_same_outputs(proto, after, rel=1e-5)


@pytest.mark.parametrize("shape, extra", [((1, 4, 5, 5), False), ((5,), False), ((1, 4, 1, 1), True)])
def test_fuse_conv_affine_leaves_spatial_constants_and_shared_outputs(shape, extra):
    proto = _conv_then("Add", shape, extra_consumer=extra)
    _, result, after = apply(proto, "fuse-conv-affine")
    assert "Add" in op_types(after) and not result.changed
    assert_same_outputs(proto, after, rel=0)
