"""Before/after tests of fold-constants: build a graph, run the pass, check the
graph it leaves and its numbers in onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import apply, assert_same_outputs, make_model, op_types, ort_run, vi

FOLD = "fold-constants"


def _init_names(proto: onnx.ModelProto) -> list[str]:
    return [t.name for t in proto.graph.initializer]


def _init(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)


def _stats(result) -> dict:
    return next(r.stats for r in result.records if r.name == FOLD)


def test_chain_of_constants_becomes_one_initializer():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    before = make_model(
        [
            helper.make_node("Transpose", ["w"], ["wt"]),
            helper.make_node("Mul", ["wt", "two"], ["w2"]),
            helper.make_node("MatMul", ["x", "w2"], ["y"]),
        ],
        [vi("x", [4, 3])],
        [vi("y", [4, 2])],
        {"w": w, "two": np.float32(2)},
    )
    _, result, after = apply(before, FOLD)
    assert op_types(after) == ["MatMul"]
    assert _init_names(after) == ["w2"]  # the folded tensor keeps its name
    np.testing.assert_array_equal(_init(after, "w2"), w.T * 2)
    assert _stats(result)["sessions"] == 1  # everything evaluated in one batch
    assert_same_outputs(before, after)


def test_shape_and_size_of_static_tensor_fold_without_constant_input():
    before = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Size", ["x"], ["n"]),
            helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["sf"], ["total"], keepdims=0),
            helper.make_node("Add", ["total", "nf"], ["k"]),
            helper.make_node("Add", ["x", "k"], ["y"]),
        ],
        [vi("x", [2, 3, 4])],
        [vi("y", [2, 3, 4])],
    )
    _, _, after = apply(before, FOLD)
    assert op_types(after) == ["Add"]
    np.testing.assert_array_equal(_init(after, "k"), np.float32(2 + 3 + 4 + 24))
    assert _init(after, "k").shape == ()  # scalars stay scalars
    assert_same_outputs(before, after)


@pytest.mark.parametrize("start,end,want", [(1, None, [3, 4]), (0, -1, [2, 3]), (-2, -1, [3]), (2, 1, [])])
def test_shape_with_start_end(start, end, want):
    attrs = {"start": start} if end is None else {"start": start, "end": end}
    before = make_model(
        [helper.make_node("Shape", ["x"], ["s"], **attrs), helper.make_node("Identity", ["x"], ["y"])],
        [vi("x", [2, 3, 4])],
        [vi("s", [len(want)], TensorProto.INT64), vi("y", [2, 3, 4])],
        opset=17,
    )
    _, _, after = apply(before, FOLD)
    assert op_types(after) == ["Identity"]
    np.testing.assert_array_equal(_init(after, "s"), np.array(want, dtype=np.int64))
    assert_same_outputs(before, after)


def test_shape_of_dynamic_dim_is_kept():
    before = make_model(
        [helper.make_node("Shape", ["x"], ["s"], start=1), helper.make_node("Shape", ["x"], ["t"])],
        [vi("x", ["batch", 3])],
        [vi("s", [1], TensorProto.INT64), vi("t", [2], TensorProto.INT64)],
    )
    _, _, after = apply(before, FOLD)
    assert op_types(after) == ["Shape"]  # only the slice without the dynamic dim folds
    assert _init_names(after) == ["s"]
    assert_same_outputs(before, after)


def _big_constant_model(n: int) -> onnx.ModelProto:
    # ConstantOfShape of a given shape, then used by an Add with the input.
    return make_model(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        [vi("x", [n])],
        [vi("y", [n])],
        {"shape": np.array([n], dtype=np.int64)},
    )


def test_max_bytes_cap_is_respected():
    before = _big_constant_model(4096)  # 16 KiB
    _, _, after = apply(before, "fold-constants{max-bytes=8192,allow-growth=true}")
    assert op_types(after) == ["ConstantOfShape", "Add"]
    _, _, after = apply(before, "fold-constants{max-bytes=65536,allow-growth=true}")
    assert op_types(after) == ["Add"]
    assert _init(after, "c").nbytes == 16384
    assert_same_outputs(before, after)


def test_growth_guard_keeps_small_model_small():
    before = _big_constant_model(4096)  # 8-byte shape -> 16 KiB tensor
    _, _, after = apply(before, FOLD)
    assert op_types(after) == ["ConstantOfShape", "Add"]
    small = _big_constant_model(16)  # 64 bytes: under the growth allowance
    _, _, after = apply(small, FOLD)
    assert op_types(after) == ["Add"]
    assert_same_outputs(small, after)


def test_light_model_weights_stay_generated(light_models):
    proto = onnx.load(str(light_models[0]))
    _, _, after = apply(proto, FOLD)
    assert after.ByteSize() < 2 * proto.ByteSize() + 4096


@pytest.mark.parametrize("op", ["RandomNormalLike", "RandomUniformLike"])
def test_nondeterministic_op_not_folded(op):
    before = make_model(
        [helper.make_node(op, ["c"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])],
        [vi("x", [2])],
        [vi("y", [2])],
        {"c": np.zeros(2, np.float32)},
    )
    _, _, after = apply(before, FOLD)
    assert op_types(after) == [op, "Add"]


def test_dropout_in_training_mode_not_folded():
    before = make_model(
        [helper.make_node("Dropout", ["c", "ratio", "train"], ["d"]), helper.make_node("Add", ["x", "d"], ["y"])],
        [vi("x", [64])],
        [vi("y", [64])],
        {"c": np.ones(64, np.float32), "ratio": np.float32(0.5), "train": np.array(True)},
    )
    _, _, after = apply(before, FOLD)
    assert op_types(after) == ["Dropout", "Add"]


def _dq_model() -> onnx.ModelProto:
    return make_model(
        [
            helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        [vi("x", [1, 4])],
        [vi("y", [1, 4])],
        {"wq": np.arange(16, dtype=np.int8).reshape(4, 4), "scale": np.float32(0.1), "zp": np.int8(0)},
    )


def test_dequantize_of_weights_is_kept():
    before = _dq_model()
    _, _, after = apply(before, FOLD)
    assert op_types(after) == ["DequantizeLinear", "MatMul"]
    assert _init(after, "wq").dtype == np.int8
    _, _, after = apply(before, "fold-constants{keep-dequantize=false}")
    assert op_types(after) == ["MatMul"]
    # Compared with numpy: onnxruntime runs the original through a quantized MatMul.
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    want = x @ (np.arange(16, dtype=np.float32).reshape(4, 4) * np.float32(0.1))
    np.testing.assert_allclose(ort_run(after, {"x": x})["y"], want, rtol=1e-6)


def test_graph_output_becoming_constant_keeps_name_and_dtype():
    before = make_model(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Cast", ["sum"], ["out"], to=TensorProto.FLOAT16),
            helper.make_node("Relu", ["x"], ["y"]),
        ],
        [vi("x", [3])],
        [vi("out", [3], TensorProto.FLOAT16), vi("y", [3])],
        {"a": np.ones(3, np.float32), "b": np.arange(3, dtype=np.float32)},
    )
    _, _, after = apply(before, FOLD)
    assert op_types(after) == ["Relu"]
    assert [o.name for o in after.graph.output] == ["out", "y"]
    assert after.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert _init(after, "out").dtype == np.float16
    assert_same_outputs(before, after)


def test_op_onnxruntime_cannot_run_is_left_alone():
    # Built by hand: the checker (in make_model) rejects ops it does not know.
    graph = helper.make_graph(
        [
            helper.make_node("Neg", ["c"], ["n"]),
            helper.make_node("Frobnicate", ["n"], ["f"], domain="example.custom"),
            helper.make_node("Unknown2", ["n"], ["g"], domain="ai.onnx.ml"),
            helper.make_node("Add", ["f", "x"], ["y0"]),
            helper.make_node("Add", ["g", "y0"], ["y"]),
        ],
        "test",
        [vi("x", [2])],
        [vi("y", [2])],
        [onnx.numpy_helper.from_array(np.ones(2, np.float32), "c")],
    )
    before = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1), helper.make_opsetid("ai.onnx.ml", 3)],
    )
    before.ir_version = 8
    _, result, after = apply(before, FOLD)
    assert op_types(after) == ["Frobnicate", "Unknown2", "Add", "Add"]
    assert _init_names(after) == ["n"]  # Neg folded, its consumers kept
    assert _stats(result)["blocked"] == 1  # the unknown op in a known domain was tried and blocked


def test_if_with_constant_condition_folds_whole():
    def branch(name: str, value: float) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Mul", ["c", "k_" + name], ["o_" + name])],
            name,
            [],
            [vi("o_" + name, [2])],
            [onnx.numpy_helper.from_array(np.float32(value), "k_" + name)],
        )

    before = make_model(
        [
            helper.make_node("Greater", ["a", "b"], ["cond"]),
            helper.make_node("If", ["cond"], ["r"], then_branch=branch("then", 10.0), else_branch=branch("else", -1.0)),
            helper.make_node("Add", ["x", "r"], ["y"]),
        ],
        [vi("x", [2])],
        [vi("y", [2])],
        {"a": np.float32(2), "b": np.float32(1), "c": np.array([1, 2], np.float32)},
    )
    _, _, after = apply(before, FOLD)
    assert op_types(after) == ["Add"]
    np.testing.assert_array_equal(_init(after, "r"), [10, 20])
    assert_same_outputs(before, after)


def _if_model(cond: np.ndarray | None, then_ops: list, else_ops: list) -> onnx.ModelProto:
    then = helper.make_graph(then_ops, "t", [], [vi("o1", [2])])
    other = helper.make_graph(else_ops, "e", [], [vi("o2", [2])])
    inputs = [vi("x", [2])] + ([] if cond is not None else [vi("cond", [], TensorProto.BOOL)])
    return make_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        inputs,
        [vi("y", [2])],
        {} if cond is None else {"cond": cond},
    )


def test_if_with_constant_condition_becomes_its_taken_branch():
    before = _if_model(np.array(True), [helper.make_node("Neg", ["x"], ["o1"])],
                       [helper.make_node("Abs", ["x"], ["o2"])])
    _, _, after = apply(before, FOLD)
    assert op_types(after) == ["Neg"]
    assert [o.name for o in after.graph.output] == ["y"]
    assert_same_outputs(before, after)


def test_if_with_constant_condition_passing_outer_value_keeps_output_name():
    before = _if_model(np.array(False), [helper.make_node("Neg", ["x"], ["o1"])],
                       [helper.make_node("Identity", ["x"], ["o2"])])
    _, _, after = apply(before, FOLD)
    assert [o.name for o in after.graph.output] == ["y"]
    assert "If" not in op_types(after)
    assert_same_outputs(before, after)


def test_if_with_input_condition_is_kept():
    before = _if_model(None, [helper.make_node("Neg", ["x"], ["o1"])], [helper.make_node("Abs", ["x"], ["o2"])])
    _, _, after = apply(before, FOLD)
    assert op_types(after) == ["If"]


def test_one_element_constant_feeding_range_becomes_a_scalar():
    """Range's operands must be 0-d once they are constants: onnxruntime's shape
    inference refuses a shape-[1] one (folding onnx's expanded AffineGrid left
    such a limit).  The written model loads and computes the same range."""
    before = make_model(
        [helper.make_node("Range", ["zero", "limit", "one"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])],
        [vi("x", [3], TensorProto.INT64)],
        [vi("y", [3], TensorProto.INT64)],
        {"limit": np.array([3], np.int64), "zero": np.array(0, np.int64), "one": np.array(1, np.int64)},
    )
    _, _, after = apply(before, FOLD)
    assert "Range" not in op_types(after)
    x = np.array([10, 20, 30], np.int64)
    assert ort_run(after, {"x": x})["y"].tolist() == [10, 21, 32]


def test_sequence_result_is_not_materialized_but_consumers_fold():
    before = make_model(
        [
            helper.make_node("SequenceConstruct", ["a", "a"], ["s"]),
            helper.make_node("ConcatFromSequence", ["s"], ["c"], axis=0),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        [vi("x", [4])],
        [vi("y", [4])],
        {"a": np.ones(2, np.float32)},
    )
    _, _, after = apply(before, FOLD)
    assert op_types(after) == ["Add"]
    assert_same_outputs(before, after)


def test_folding_is_deterministic():
    before = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "i"], ["d"], axis=0),
            helper.make_node("Unsqueeze", ["d", "axes"], ["du"]),
            helper.make_node("Concat", ["du", "minus1"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        [vi("x", [2, 3, 4])],
        [vi("y", [2, 12])],
        {"i": np.int64(0), "axes": np.array([0], np.int64), "minus1": np.array([-1], np.int64)},
    )
    _, _, a = apply(before, FOLD)
    _, _, b = apply(before, FOLD)
    assert op_types(a) == ["Reshape"]
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    assert_same_outputs(before, a)


def test_nothing_to_fold_reports_no_change():
    before = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    _, result, after = apply(before, FOLD)
    assert not result.changed
    assert op_types(after) == ["Relu"]


def test_inputs_feeding_folded_graph_still_run():
    # Graph inputs are never constants, even with a static shape.
    before = make_model(
        [helper.make_node("Neg", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])]
    )
    _, _, after = apply(before, FOLD)
    assert op_types(after) == ["Neg"]
    feeds = {"x": np.array([1, -2], np.float32)}
    np.testing.assert_array_equal(ort_run(after, feeds)["y"], [-1, 2])
