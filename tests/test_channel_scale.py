"""Folding a per-channel scale upstream (passes/quantization/channel_scale.py).

Before/after: plan the fold for one activation, apply a random positive scale,
and check in onnxruntime that the activation became exactly ``x / s`` while
every other output stayed the same; and that the walk refuses what it must.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.ir import Model
from graphopt.passes.quantization import channel_scale
from graphopt.passes.shapes import annotate_shapes

from conftest import make_model, ort_run, vi
from test_quantize_dynamic import bert_block

F = np.float32


def _model(proto: onnx.ModelProto, extra_outputs=()) -> Model:
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for name in extra_outputs:
        proto.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    model = Model.from_proto(proto)
    annotate_shapes(model)
    return model


def _const(base, values):
    import onnx_graphsurgeon as gs

    return gs.Constant(base + "_test", np.asarray(values))


def _fold(model: Model, name: str):
    x = model.graph.tensors()[name]
    return channel_scale.fold_plan(model.graph, x, int(x.shape[-1]))


def _feeds(proto, seed=0):
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(F)}


def test_attention_context_scale_goes_into_v_projection_columns():
    proto = bert_block(layers=1, heads=4, hidden=64)
    ctx = "l0_ctx_3d"
    before = _model(proto, [ctx])
    want = ort_run(before.to_proto(), _feeds(proto))
    model = _model(proto)
    plan = _fold(model, ctx)
    # through Reshape(merge heads), Transpose, probs @ V, Transpose, Reshape(split heads),
    # the bias Add, to V's weight: the bias and the weight columns absorb 1/s
    assert plan is not None and [(e.node.name, e.index) for e in plan] == [("l0_v_add", 1), ("l0_v_matmul", 1)]
    s = np.random.default_rng(1).uniform(0.25, 4.0, 64).astype(F)
    channel_scale.apply(plan, s, _const)
    model.graph.outputs.append(model.graph.tensors()[ctx])
    got = ort_run(model.to_proto(), _feeds(proto))
    np.testing.assert_allclose(got[ctx] * s, want[ctx], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[ctx], want[ctx])  # the scale really landed


def test_scale_passes_relu_and_scalar_mul_to_a_layernorm():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Mul", ["r", "half"], ["m"]),
        helper.make_node("MatMul", ["m", "w"], ["y"]),
    ]
    proto = make_model(nodes, [vi("x", [2, 5, 8])], [vi("y", [2, 5, 3])],
                       {"g": rng.uniform(0.5, 2, 8).astype(F), "b": rng.standard_normal(8).astype(F),
                        "half": np.array(0.5, F), "w": rng.standard_normal((8, 3)).astype(F)})
    want = ort_run(_model(proto, ["m"]).to_proto(), _feeds(proto))
    model = _model(proto)
    plan = _fold(model, "m")
    assert [(e.node.op, e.index) for e in plan] == [("LayerNormalization", 1), ("LayerNormalization", 2)]
    s = rng.uniform(0.5, 3.0, 8).astype(F)
    channel_scale.apply(plan, s, _const)
    model.graph.outputs.append(model.graph.tensors()["m"])
    got = ort_run(model.to_proto(), _feeds(proto))
    np.testing.assert_allclose(got["m"] * s, want["m"], rtol=1e-5, atol=1e-6)


def test_gelu_output_is_not_folded_and_its_constant_untouched():
    """x * 0.5 at the end of a GELU: folding there would turn the scalar into a
    vector and break the runtime's GELU fusion; the walk must stop instead."""
    proto = bert_block(layers=1)
    model = _model(proto)
    assert _fold(model, "l0_gelu") is None


@pytest.mark.parametrize("case", ["two_readers", "graph_output", "row_scale", "symbolic_reshape"])
def test_refusals(case):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(F)
    g = np.ones(8, F)
    if case == "two_readers":  # the LN output is also read by the residual
        nodes = [helper.make_node("LayerNormalization", ["x", "g"], ["h"], axis=-1),
                 helper.make_node("Relu", ["h"], ["r"]),
                 helper.make_node("Add", ["h", "r"], ["y"])]
        proto = make_model(nodes, [vi("x", [1, 4, 8])], [vi("y", [1, 4, 8])], {"g": g})
        target = "r"
    elif case == "graph_output":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
        proto = make_model(nodes, [vi("x", [1, 4, 8])], [vi("y", [1, 4, 8]), vi("h", [1, 4, 8])], {"w": w})
        target = "y"
    elif case == "row_scale":  # transposed after the MatMul: the scale falls on its rows
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
                 helper.make_node("Transpose", ["h"], ["y"], perm=[0, 2, 1])]
        proto = make_model(nodes, [vi("x", [1, 8, 8])], [vi("y", [1, 8, 8])], {"w": w})
        target = "y"
    else:  # channels made of a symbolic dim: no static channel map
        nodes = [helper.make_node("LayerNormalization", ["x", "g"], ["h"], axis=-1),
                 helper.make_node("Reshape", ["h", "shape"], ["y"])]
        proto = make_model(nodes, [vi("x", ["n", 4])], [vi("y", [None, 8])],
                           {"g": np.ones(4, F), "shape": np.array([-1, 8], np.int64)})
        target = "y"
    model = _model(proto)
    x = model.graph.tensors()[target]
    assert channel_scale.fold_plan(model.graph, x, 8) is None
