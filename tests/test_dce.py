"""eliminate-dead-code: before/after graphs and numbers."""
from __future__ import annotations

import numpy as np
from onnx import helper

from conftest import apply, assert_same_outputs, make_model, op_types, vi


def test_removes_nodes_no_output_depends_on():
    proto = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Neg", ["x"], ["dead1"]),
            helper.make_node("Exp", ["dead1"], ["dead2"]),
            helper.make_node("Add", ["dead2", "w"], ["dead3"]),
        ],
        [vi("x", [2, 3])],
        [vi("r", [2, 3])],
        {"w": np.ones((2, 3), np.float32)},
    )
    _, result, after = apply(proto, "eliminate-dead-code")
    assert op_types(after) == ["Relu"]
    assert not after.graph.initializer, "the constant only dead code read must go too"
    assert result.records[0].stats == {"removed_nodes": 3, "removed_constants": 1}
    assert_same_outputs(proto, after)


def test_keeps_everything_live_and_reports_no_change():
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])],
        [vi("x", [4])],
        [vi("y", [4]), vi("a", [4])],
    )
    _, result, after = apply(proto, "eliminate-dead-code")
    assert op_types(after) == ["Relu", "Neg"]
    assert not result.changed
    assert [o.name for o in after.graph.output] == ["y", "a"]
    assert_same_outputs(proto, after)


def test_keeps_unused_graph_inputs_and_sorts_nodes():
    # Nodes listed out of order: the pass must sort them, and never drop an input.
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])],
        [vi("x", [4]), vi("unused", [4])],
        [vi("y", [4])],
    )
    del proto.graph.node[:]
    proto.graph.node.extend([helper.make_node("Neg", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])])
    _, _, after = apply(proto, "eliminate-dead-code")
    assert [i.name for i in after.graph.input] == ["x", "unused"]
    assert op_types(after) == ["Relu", "Neg"]


def test_dead_code_inside_a_subgraph():
    then_g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["dead"]), helper.make_node("Relu", ["x"], ["t"])],
        "then", [], [vi("t", [3])],
    )
    else_g = helper.make_graph([helper.make_node("Abs", ["x"], ["e"])], "else", [], [vi("e", [3])])
    proto = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
        [vi("x", [3]), vi("c", [], 9)],
        [vi("y", [3])],
    )
    _, _, after = apply(proto, "eliminate-dead-code")
    then_after = after.graph.node[0].attribute[0].g if after.graph.node[0].attribute[0].name == "then_branch" else after.graph.node[0].attribute[1].g
    assert [n.op_type for n in then_after.node] == ["Relu"]
    for c in (True, False):
        feeds = {"x": np.array([-1.0, 0.5, 2.0], np.float32), "c": np.array(c)}
        assert_same_outputs(proto, after, feeds=feeds)
