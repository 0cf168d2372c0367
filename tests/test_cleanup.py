"""cse and eliminate-identity: one rule per test, graph and numbers checked."""
from __future__ import annotations

import numpy as np
import onnx.parser
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import apply, assert_same_outputs, make_model, op_types, vi

F = np.float32


def _outputs(proto) -> list[str]:
    return [o.name for o in proto.graph.output]


def _inputs_of(proto, op: str) -> list[list[str]]:
    return [list(n.input) for n in proto.graph.node if n.op_type == op]


# ==================================================================================
# cse
# ==================================================================================
def test_cse_merges_a_chain_in_one_run():
    # Two identical Relu->Exp->Mul chains: every level merges in a single run.
    nodes = []
    for s in ("a", "b"):
        nodes += [
            helper.make_node("Relu", ["x"], [f"r{s}"]),
            helper.make_node("Exp", [f"r{s}"], [f"e{s}"]),
            helper.make_node("Mul", [f"e{s}", "x"], [f"m{s}"]),
        ]
    nodes.append(helper.make_node("Add", ["ma", "mb"], ["y"]))
    proto = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])])
    _, result, after = apply(proto, "cse")
    assert op_types(after) == ["Relu", "Exp", "Mul", "Add"]
    assert _inputs_of(after, "Add") == [["ma", "ma"]]
    assert result.records[0].stats["merged_nodes"] == 3
    assert_same_outputs(proto, after)


def _two_adds_of_equal_constants():
    """x + c1 - (x + c2) with c1 == c2 held in two initializers."""
    nodes = [
        helper.make_node("Add", ["x", "c1"], ["a1"]),
        helper.make_node("Add", ["x", "c2"], ["a2"]),
        helper.make_node("Sub", ["a1", "a2"], ["y"]),
    ]
    c = np.arange(3, dtype=F)
    proto = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], {"c1": c, "c2": c.copy()})
    return proto


def test_cse_merges_equal_constants_then_their_consumers():
    proto = _two_adds_of_equal_constants()
    _, result, after = apply(proto, "cse")
    assert op_types(after) == ["Add", "Sub"]
    assert len(after.graph.initializer) == 1
    assert result.records[0].stats == {"merged_nodes": 1, "merged_constants": 1}
    assert_same_outputs(proto, after)


def test_cse_leaves_constants_over_the_size_limit_unread():
    proto = _two_adds_of_equal_constants()
    _, result, after = apply(proto, "cse{max-constant-bytes=8}")
    assert len(after.graph.initializer) == 2 and op_types(after).count("Add") == 2
    assert not result.changed


@pytest.mark.parametrize(
    "c2",
    [
        np.array([0.0, 1.0, 2.5], F),  # other values
        np.arange(3, dtype=np.float64),  # other dtype (Cast makes the graph valid)
        np.arange(3, dtype=F).reshape(1, 3),  # other shape
    ],
)
def test_cse_keeps_constants_that_differ(c2):
    nodes = [helper.make_node("Add", ["x", "c1"], ["a1"])]
    if c2.dtype == np.float64:
        nodes += [helper.make_node("Cast", ["c2"], ["c2f"], to=TensorProto.FLOAT),
                  helper.make_node("Add", ["x", "c2f"], ["a2"])]
    else:
        nodes.append(helper.make_node("Add", ["x", "c2"], ["a2"]))
    nodes.append(helper.make_node("Sub", ["a1", "a2"], ["y"]))
    proto = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], {"c1": np.arange(3, dtype=F), "c2": c2})
    _, result, after = apply(proto, "cse")
    assert op_types(after).count("Add") == 2
    assert not result.changed
    assert_same_outputs(proto, after)


def test_cse_respects_attributes_and_input_order():
    nodes = [
        helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
        helper.make_node("Transpose", ["x"], ["t2"], perm=[1, 0]),
        helper.make_node("Softmax", ["x"], ["s1"], axis=0),
        helper.make_node("Softmax", ["x"], ["s2"], axis=1),
        helper.make_node("Sub", ["x", "z"], ["d1"]),
        helper.make_node("Sub", ["z", "x"], ["d2"]),
        helper.make_node("Concat", ["s1", "s2", "d1", "d2"], ["c"], axis=0),
        helper.make_node("Add", ["t1", "t2"], ["t"]),
    ]
    proto = make_model(nodes, [vi("x", [3, 3]), vi("z", [3, 3])], [vi("c", [12, 3]), vi("t", [3, 3])])
    _, result, after = apply(proto, "cse")
    assert op_types(after).count("Transpose") == 1
    assert op_types(after).count("Softmax") == 2
    assert op_types(after).count("Sub") == 2
    assert result.records[0].stats["merged_nodes"] == 1
    assert_same_outputs(proto, after)


def test_cse_never_merges_random_ops():
    nodes = [
        helper.make_node("RandomUniformLike", ["x"], ["r1"]),
        helper.make_node("RandomUniformLike", ["x"], ["r2"]),
        helper.make_node("Sub", ["r1", "r2"], ["y"]),
    ]
    proto = make_model(nodes, [vi("x", [4])], [vi("y", [4])])
    _, result, after = apply(proto, "cse")
    assert op_types(after).count("RandomUniformLike") == 2
    assert not result.changed


def test_cse_skips_nodes_with_subgraphs():
    def branch(name):
        return helper.make_graph([helper.make_node("Neg", ["x"], [name])], name, [], [vi(name, [2])])

    nodes = [
        helper.make_node("If", ["c"], ["i1"], then_branch=branch("a"), else_branch=branch("b")),
        helper.make_node("If", ["c"], ["i2"], then_branch=branch("c1"), else_branch=branch("d")),
        helper.make_node("Add", ["i1", "i2"], ["y"]),
    ]
    proto = make_model(nodes, [vi("x", [2]), vi("c", [], TensorProto.BOOL)], [vi("y", [2])])
    _, _, after = apply(proto, "cse")
    assert op_types(after).count("If") == 2
    assert_same_outputs(proto, after, feeds={"x": np.array([1, -2], F), "c": np.array(True)})


def test_cse_two_graph_outputs_keep_their_names():
    nodes = [helper.make_node("Relu", ["x"], ["y1"]), helper.make_node("Relu", ["x"], ["y2"])]
    proto = make_model(nodes, [vi("x", [3])], [vi("y1", [3]), vi("y2", [3])])
    _, _, after = apply(proto, "cse")
    assert _outputs(after) == ["y1", "y2"]
    assert_same_outputs(proto, after)


def test_cse_duplicate_feeding_an_output_renames_the_kept_value():
    nodes = [
        helper.make_node("Relu", ["x"], ["r1"]),
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("Neg", ["r1"], ["z"]),
    ]
    proto = make_model(nodes, [vi("x", [3])], [vi("y", [3]), vi("z", [3])])
    _, _, after = apply(proto, "cse")
    assert op_types(after) == ["Relu", "Neg"]
    assert _outputs(after) == ["y", "z"]
    assert_same_outputs(proto, after)


def test_cse_merges_constant_nodes():
    value = numpy_helper.from_array(np.array([1.0, 2.0], F))
    nodes = [
        helper.make_node("Constant", [], ["k1"], value=value),
        helper.make_node("Constant", [], ["k2"], value=value),
        helper.make_node("Mul", ["x", "k1"], ["m1"]),
        helper.make_node("Mul", ["x", "k2"], ["m2"]),
        helper.make_node("Add", ["m1", "m2"], ["y"]),
    ]
    proto = make_model(nodes, [vi("x", [2])], [vi("y", [2])])
    _, _, after = apply(proto, "cse")
    assert op_types(after) == ["Constant", "Mul", "Add"]
    assert_same_outputs(proto, after)


# ==================================================================================
# eliminate-identity
# ==================================================================================
def _unary(node_fn, in_shape, out_shape, inits=None, dtype=TensorProto.FLOAT, out_dtype=None, opset=17):
    """x -> Relu -> <node under test> -> Neg -> y, so the rule works on an inner value."""
    nodes = [helper.make_node("Relu", ["x"], ["r"])] + node_fn("r", "t") + [helper.make_node("Neg", ["t"], ["y"])]
    return make_model(nodes, [vi("x", in_shape, dtype)], [vi("y", out_shape, out_dtype or dtype)], inits, opset=opset)


def _check_removed(proto, gone: str, rel=0.0):
    _, result, after = apply(proto, "eliminate-identity")
    assert gone not in op_types(after), op_types(after)
    assert op_types(after) == ["Relu", "Neg"], op_types(after)
    assert result.changed
    assert_same_outputs(proto, after, rel=rel)
    return after


def _check_kept(proto, kept: str, count: int = 1):
    _, result, after = apply(proto, "eliminate-identity")
    assert op_types(after).count(kept) == count, op_types(after)
    assert_same_outputs(proto, after)
    return after


def test_identity_removed():
    _check_removed(_unary(lambda i, o: [helper.make_node("Identity", [i], [o])], [2, 3], [2, 3]), "Identity")


def test_identity_chain_into_graph_output_keeps_the_output_name():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Identity", ["r"], ["i1"]),
        helper.make_node("Identity", ["i1"], ["y"]),
    ]
    proto = make_model(nodes, [vi("x", [3])], [vi("y", [3])])
    _, _, after = apply(proto, "eliminate-identity")
    assert op_types(after) == ["Relu"]
    assert _outputs(after) == ["y"]
    assert after.graph.node[0].output == ["y"]
    assert_same_outputs(proto, after)


def test_identity_between_graph_input_and_output_is_kept():
    proto = make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", [3])], [vi("y", [3])])
    _, result, after = apply(proto, "eliminate-identity")
    assert op_types(after) == ["Identity"]
    assert [i.name for i in after.graph.input] == ["x"] and _outputs(after) == ["y"]
    assert not result.changed
    assert_same_outputs(proto, after)


def test_identity_between_two_graph_outputs_is_kept():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["b"])]
    proto = make_model(nodes, [vi("x", [3])], [vi("a", [3]), vi("b", [3])])
    _, _, after = apply(proto, "eliminate-identity")
    assert op_types(after) == ["Relu", "Identity"]
    assert _outputs(after) == ["a", "b"]


def test_identity_inside_if_branch_passing_outer_value_is_kept():
    """The then-branch returns the outer ``r`` through an Identity.  Bypassing it
    would make the branch output ``r`` itself (renaming ``r`` to ``t`` instead
    would rename it in the outer graph too), so the Identity must stay, and with
    it the branch's own output name."""
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2] x, bool c) => (float[2] y) {
            r = Relu(x)
            y = If(c) <
                then_branch = then () => (float[2] t) { t = Identity(r) },
                else_branch = else () => (float[2] e) { e = Neg(r) }
            >
        }
    """)
    _, _, after = apply(proto, "eliminate-identity")
    then_branch = next(helper.get_attribute_value(a) for a in after.graph.node[1].attribute
                       if a.name == "then_branch")
    assert [(n.op_type, list(n.input), list(n.output)) for n in then_branch.node] == [("Identity", ["r"], ["t"])]
    assert [o.name for o in then_branch.output] == ["t"]
    assert op_types(after) == ["Relu", "If"] and after.graph.node[0].output == ["r"]
    for c in (True, False):
        assert_same_outputs(proto, after, rel=0.0, feeds={"x": np.array([1, -2], F), "c": np.array(c)})


@pytest.mark.parametrize("opset", [11, 13])
def test_dropout_in_inference_removed(opset):
    _check_removed(
        _unary(lambda i, o: [helper.make_node("Dropout", [i], [o], ratio=0.5)] if opset < 12 else
               [helper.make_node("Dropout", [i], [o])], [2, 3], [2, 3], opset=opset),
        "Dropout",
    )


def test_dropout_with_constant_false_training_mode_removed():
    make = lambda i, o: [helper.make_node("Dropout", [i, "ratio", "train"], [o])]
    proto = _unary(make, [2, 3], [2, 3], {"ratio": np.array(0.3, F), "train": np.array(False)})
    _check_removed(proto, "Dropout")


def test_dropout_with_used_mask_or_training_input_kept():
    nodes = [helper.make_node("Dropout", ["x"], ["y", "mask"])]
    proto = make_model(nodes, [vi("x", [4])], [vi("y", [4]), vi("mask", [4], TensorProto.BOOL)])
    _check_kept(proto, "Dropout")
    nodes = [helper.make_node("Dropout", ["x", "", "train"], ["y"])]
    proto = make_model(nodes, [vi("x", [4]), vi("train", [], TensorProto.BOOL)], [vi("y", [4])])
    _, _, after = apply(proto, "eliminate-identity")
    assert op_types(after) == ["Dropout"]


def test_cast_to_same_type_removed():
    _check_removed(_unary(lambda i, o: [helper.make_node("Cast", [i], [o], to=TensorProto.FLOAT)], [2], [2]), "Cast")


def test_cast_like_same_type_removed():
    proto = _unary(lambda i, o: [helper.make_node("CastLike", [i, "like"], [o])], [2], [2], {"like": np.zeros(1, F)})
    _check_removed(proto, "CastLike")


def test_cast_to_other_type_kept():
    proto = _unary(
        lambda i, o: [helper.make_node("Cast", [i], [o], to=TensorProto.FLOAT16)], [2], [2],
        out_dtype=TensorProto.FLOAT16,
    )
    _check_kept(proto, "Cast")


def test_reshape_pair_restoring_shape_removed():
    make = lambda i, o: [helper.make_node("Reshape", [i, "s1"], ["m"]), helper.make_node("Reshape", ["m", "s2"], [o])]
    proto = _unary(make, [2, 3, 4], [2, 3, 4], {"s1": np.array([6, -1], np.int64), "s2": np.array([2, 3, 4], np.int64)})
    _check_removed(proto, "Reshape")


def test_flatten_squeeze_unsqueeze_chain_restoring_shape_removed():
    make = lambda i, o: [
        helper.make_node("Unsqueeze", [i, "ax"], ["u"]),  # [2,3] -> [1,2,3]
        helper.make_node("Flatten", ["u"], ["f"], axis=1),  # -> [1,6]
        helper.make_node("Reshape", ["f", "s"], ["rs"]),  # -> [1,2,3]
        helper.make_node("Squeeze", ["rs", "ax"], [o]),  # -> [2,3]
    ]
    proto = _unary(make, [2, 3], [2, 3], {"ax": np.array([0], np.int64), "s": np.array([1, 2, 3], np.int64)})
    _check_removed(proto, "Squeeze")


def test_reshape_to_same_static_shape_removed_and_to_other_shape_kept():
    same = _unary(lambda i, o: [helper.make_node("Reshape", [i, "s"], [o])], [2, 3], [2, 3],
                  {"s": np.array([0, -1], np.int64)})
    _check_removed(same, "Reshape")
    other = _unary(lambda i, o: [helper.make_node("Reshape", [i, "s"], [o])], [2, 3], [3, 2],
                   {"s": np.array([3, 2], np.int64)})
    _check_kept(other, "Reshape")


def test_reshape_with_dynamic_shape_kept():
    make = lambda i, o: [helper.make_node("Reshape", [i, "s1"], ["m"]), helper.make_node("Reshape", ["m", "s2"], [o])]
    proto = _unary(make, ["N", 6], ["N", 6], {"s1": np.array([-1, 2, 3], np.int64), "s2": np.array([-1, 6], np.int64)})
    after = _check_kept(proto, "Reshape", count=2)
    assert_same_outputs(proto, after, feeds={"x": np.ones((4, 6), F)})


def test_identity_transpose_and_inverse_pair_removed():
    _check_removed(_unary(lambda i, o: [helper.make_node("Transpose", [i], [o], perm=[0, 1, 2])], [2, 3, 4], [2, 3, 4]),
                   "Transpose")
    pair = lambda i, o: [
        helper.make_node("Transpose", [i], ["m"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["m"], [o], perm=[0, 3, 1, 2]),
    ]
    _check_removed(_unary(pair, [1, 2, 3, 4], [1, 2, 3, 4]), "Transpose")


def test_transpose_pair_not_composing_to_identity_kept():
    pair = lambda i, o: [
        helper.make_node("Transpose", [i], ["m"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["m"], [o], perm=[0, 2, 1]),
    ]
    _check_kept(_unary(pair, [2, 3, 4], [3, 4, 2]), "Transpose", count=2)


def test_zero_pad_removed_nonzero_kept():
    zero = _unary(lambda i, o: [helper.make_node("Pad", [i, "p"], [o], mode="constant")], [2, 3], [2, 3],
                  {"p": np.zeros(4, np.int64)})
    _check_removed(zero, "Pad")
    some = _unary(lambda i, o: [helper.make_node("Pad", [i, "p"], [o])], [2, 3], [2, 4],
                  {"p": np.array([0, 0, 0, 1], np.int64)})
    _check_kept(some, "Pad")


def test_full_slice_removed_partial_kept():
    big = np.iinfo(np.int64).max
    full = _unary(lambda i, o: [helper.make_node("Slice", [i, "s", "e", "a"], [o])], [2, 5], [2, 5],
                  {"s": np.array([0, -9], np.int64), "e": np.array([big, 5], np.int64), "a": np.array([0, 1], np.int64)})
    _check_removed(full, "Slice")
    part = _unary(lambda i, o: [helper.make_node("Slice", [i, "s", "e"], [o])], [2, 5], [2, 4],
                  {"s": np.array([0, 0], np.int64), "e": np.array([2, -1], np.int64)})
    _check_kept(part, "Slice")


def test_slice_on_unknown_dim_kept():
    proto = _unary(lambda i, o: [helper.make_node("Slice", [i, "s", "e"], [o])], ["N"], ["M"],
                   {"s": np.array([0], np.int64), "e": np.array([5], np.int64)})
    _check_kept(proto, "Slice")


def test_expand_keeping_shape_removed_enlarging_kept():
    same = _unary(lambda i, o: [helper.make_node("Expand", [i, "s"], [o])], ["N", 3], ["N", 3],
                  {"s": np.array([1, 3], np.int64)})
    _check_removed(same, "Expand")
    bigger = _unary(lambda i, o: [helper.make_node("Expand", [i, "s"], [o])], [1, 3], [4, 3],
                    {"s": np.array([4, 3], np.int64)})
    _check_kept(bigger, "Expand")


@pytest.mark.parametrize(
    "op,const,swap",
    [("Add", 0.0, False), ("Add", 0.0, True), ("Sub", 0.0, False), ("Mul", 1.0, False), ("Mul", 1.0, True),
     ("Div", 1.0, False)],
)
def test_neutral_arithmetic_removed(op, const, swap):
    c = np.full((1, 3, 1, 1), const, F)
    make = lambda i, o: [helper.make_node(op, ["c", i] if swap else [i, "c"], [o])]
    _check_removed(_unary(make, ["N", 3, 4, 4], ["N", 3, 4, 4], {"c": c}), op)


def test_neutral_arithmetic_that_broadcasts_bigger_kept():
    make = lambda i, o: [helper.make_node("Add", [i, "c"], [o])]
    _check_kept(_unary(make, [3], [2, 3], {"c": np.zeros((2, 3), F)}), "Add")


def test_arithmetic_not_neutral_or_wrong_side_kept():
    _check_kept(_unary(lambda i, o: [helper.make_node("Add", [i, "c"], [o])], [3], [3], {"c": np.ones(3, F)}), "Add")
    _check_kept(_unary(lambda i, o: [helper.make_node("Sub", ["c", i], [o])], [3], [3], {"c": np.zeros(3, F)}), "Sub")
    _check_kept(_unary(lambda i, o: [helper.make_node("Div", ["c", i], [o])], [3], [3], {"c": np.ones(3, F)}), "Div")


def test_arithmetic_with_unknown_rank_kept():
    # Reshape to a runtime shape of unknown length: the rank of "m" is unknown,
    # so zeros([1, 1]) might enlarge it.
    nodes = [helper.make_node("Reshape", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "c"], ["y"])]
    proto = make_model(nodes, [vi("x", [6]), vi("s", ["K"], TensorProto.INT64)], [vi("y", ["A", "B"])],
                       {"c": np.zeros((1, 1), F)})
    _, _, after = apply(proto, "eliminate-identity")
    assert op_types(after) == ["Reshape", "Add"]
    feeds = {"x": np.arange(6, dtype=F), "s": np.array([6], np.int64)}
    assert_same_outputs(proto, after, feeds=feeds)


def test_single_input_concat_and_single_output_split_removed():
    _check_removed(_unary(lambda i, o: [helper.make_node("Concat", [i], [o], axis=0)], [2, 3], [2, 3]), "Concat")
    _check_removed(_unary(lambda i, o: [helper.make_node("Split", [i], [o], axis=1)], [2, 3], [2, 3]), "Split")


def test_graph_output_renamed_onto_bypassed_value():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Transpose", ["r"], ["y"], perm=[0, 1])]
    proto = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])])
    _, _, after = apply(proto, "eliminate-identity")
    assert op_types(after) == ["Relu"] and _outputs(after) == ["y"]
    assert_same_outputs(proto, after)
