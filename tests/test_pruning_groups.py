"""Channel dependency analysis: one small graph per kind of coupling.

Each test builds a graph, checks the groups the analysis finds, then removes
channels for real.  The numbers check is exact: before pruning, every
Conv/Gemm/MatMul that reads a removed channel gets zero weights for it, so the
removed channels contribute nothing and the pruned model must compute the same
outputs; any coupled tensor left unsliced (or sliced at the wrong offset)
shows up as an onnxruntime error or a numeric difference.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import make_model, ort_run, random_feeds, vi
from graphopt import runtime
from graphopt.ir import Model
from graphopt.rewrite import as_constant
from graphopt.passes.pruning.groups import analyze, channel_groups, format_groups

F = np.float32


def zero_and_prune(proto: onnx.ModelProto, fraction: float = 0.4, seed: int = 0, groups=None):
    """Remove ``fraction`` of the channels of every prunable group (or of
    ``groups``), chosen at random, after zeroing their consumers' input weights.
    Returns (reference proto with zeroed weights, pruned proto, analysis, keep)."""
    model = Model.from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    analysis = analyze(model)
    rng = np.random.default_rng(seed)
    keep = {}
    for g in analysis.groups():
        if not g.prunable or (groups is not None and g.id not in groups) or g.size < 2:
            continue
        n = max(1, int(round(g.size * (1 - fraction))))
        keep[g.id] = np.sort(rng.choice(g.size, n, replace=False))
    for e in analysis.edits:
        if e.kind != "slice" or e.role != "in-weight":
            continue
        const = as_constant(e.node.inputs[e.index], analysis._overridable)
        full = sum(s.length for s in e.segs)
        removed = np.setdiff1d(np.arange(full), analysis.indices(e.segs, keep))
        values = np.array(const.values)
        index = [slice(None)] * values.ndim
        index[e.axis] = removed
        values[tuple(index)] = 0
        const.values = values
    reference = model.to_proto()
    analysis.apply(keep)
    from graphopt.passes.pruning.channels import _refresh_shapes

    _refresh_shapes(model)
    pruned = model.to_proto()
    onnx.checker.check_model(pruned)
    return reference, pruned, analysis, keep


def assert_same(reference: onnx.ModelProto, pruned: onnx.ModelProto, rel: float = 1e-5, feeds=None) -> None:
    feeds = feeds or random_feeds(reference)
    want, got = ort_run(reference, feeds), ort_run(pruned, feeds)
    for name in want:
        assert got[name].shape == want[name].shape
        assert runtime.relative_error(got[name], want[name]) <= rel, name


def init_shapes(proto: onnx.ModelProto) -> dict[str, tuple]:
    return {t.name: tuple(t.dims) for t in proto.graph.initializer}


def _w(rng, *shape):
    return (rng.standard_normal(shape) * 0.3).astype(F)


def conv(x, w, y, b=None, **kw):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], **kw)


# ----------------------------------------------------------------------------------
def test_conv_bn_relu_chain_and_consumer():
    rng = np.random.default_rng(0)
    inits = {"w1": _w(rng, 8, 3, 3, 3), "b1": _w(rng, 8), "s": rng.uniform(0.5, 1.5, 8).astype(F),
             "t": _w(rng, 8), "m": _w(rng, 8), "v": rng.uniform(0.5, 1.5, 8).astype(F), "w2": _w(rng, 4, 8, 1, 1)}
    nodes = [conv("x", "w1", "c1", "b1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "s", "t", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]), conv("r", "w2", "y")]
    proto = make_model(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", [1, 4, 6, 6])], inits)
    groups = channel_groups(proto)
    first = next(g for g in groups if g.roots == [proto.graph.node[0].name or "Conv"])
    assert first.prunable and first.size == 8
    assert any("BatchNormalization" in m for m in first.members)
    assert not next(g for g in groups if g.size == 4).prunable  # feeds the graph output
    ref, pruned, _, keep = zero_and_prune(proto)
    k = len(next(iter(keep.values())))
    shapes = init_shapes(pruned)
    assert shapes["w1"] == (k, 3, 3, 3) and shapes["b1"] == (k,) and shapes["s"] == (k,)
    assert shapes["w2"] == (4, k, 1, 1)
    assert_same(ref, pruned)


def test_residual_add_merges_producers():
    rng = np.random.default_rng(1)
    inits = {"wa": _w(rng, 6, 3, 1, 1), "wb": _w(rng, 6, 3, 3, 3), "wc": _w(rng, 6, 6, 1, 1),
             "wd": _w(rng, 2, 6, 1, 1), "k": _w(rng, 1, 6, 1, 1)}
    nodes = [conv("x", "wa", "a"), conv("x", "wb", "b", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["b"], ["rb"]),
             conv("rb", "wc", "c"), helper.make_node("Add", ["a", "c"], ["s"]),
             helper.make_node("Mul", ["s", "k"], ["sk"]), helper.make_node("Relu", ["sk"], ["r"]),
             conv("r", "wd", "y")]
    proto = make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, 2, 5, 5])], inits)
    model = Model.from_proto(proto)
    analysis = analyze(model)
    merged = [g for g in analysis.groups() if len(g.roots) == 2]
    assert len(merged) == 1 and merged[0].prunable and merged[0].size == 6
    ref, pruned, _, keep = zero_and_prune(proto)
    shapes = init_shapes(pruned)
    k = len(keep[merged[0].id])
    assert shapes["wa"][0] == shapes["wc"][0] == k and shapes["k"] == (1, k, 1, 1) and shapes["wd"] == (2, k, 1, 1)
    assert_same(ref, pruned)


def test_concat_offsets_and_split():
    rng = np.random.default_rng(2)
    inits = {"wa": _w(rng, 4, 3, 1, 1), "wb": _w(rng, 6, 3, 1, 1), "wc": _w(rng, 5, 10, 3, 3),
             "split": np.array([3, 7], np.int64), "wd": _w(rng, 2, 3, 1, 1), "we": _w(rng, 2, 7, 1, 1)}
    nodes = [conv("x", "wa", "a"), conv("x", "wb", "b"), helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
             helper.make_node("Relu", ["cat"], ["r"]), conv("r", "wc", "c", pads=[1, 1, 1, 1]),
             helper.make_node("Split", ["r", "split"], ["s0", "s1"], axis=1),
             conv("s0", "wd", "d"), conv("s1", "we", "e"), helper.make_node("Add", ["d", "e"], ["de"]),
             helper.make_node("Concat", ["c", "de"], ["y"], axis=1)]
    proto = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 7, 4, 4])], inits)
    ref, pruned, analysis, keep = zero_and_prune(proto, groups=None)
    joined = [g for g in analysis.groups() if any(m.startswith("Concat") for m in g.members)]
    assert sorted(g.size for g in joined if g.prunable) == [4, 6]
    shapes = init_shapes(pruned)
    ka, kb = shapes["wa"][0], shapes["wb"][0]
    assert ka < 4 and kb < 6
    assert shapes["wc"][1] == ka + kb
    split = next(t for t in pruned.graph.initializer if t.name.startswith("split"))
    assert sum(onnx.numpy_helper.to_array(split)) == ka + kb
    assert_same(ref, pruned)


def test_depthwise_conv_couples_input_and_output():
    rng = np.random.default_rng(3)
    inits = {"w1": _w(rng, 8, 3, 1, 1), "dw": _w(rng, 8, 1, 3, 3), "db": _w(rng, 8), "w2": _w(rng, 4, 8, 1, 1)}
    nodes = [conv("x", "w1", "a"), helper.make_node("Relu", ["a"], ["r"]),
             conv("r", "dw", "d", "db", group=8, pads=[1, 1, 1, 1]), helper.make_node("Relu", ["d"], ["rd"]),
             conv("rd", "w2", "y")]
    proto = make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, 4, 5, 5])], inits)
    groups = [g for g in channel_groups(proto) if g.prunable]
    assert len(groups) == 1 and any("depthwise" in m for m in groups[0].members)
    ref, pruned, _, keep = zero_and_prune(proto)
    k = len(next(iter(keep.values())))
    shapes = init_shapes(pruned)
    assert shapes["dw"] == (k, 1, 3, 3) and shapes["db"] == (k,) and shapes["w2"] == (4, k, 1, 1)
    dw = next(n for n in pruned.graph.node if any(a.name == "group" for a in n.attribute))
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == k
    assert_same(ref, pruned)


def test_grouped_conv_is_left_alone_with_reason():
    rng = np.random.default_rng(4)
    inits = {"w1": _w(rng, 8, 3, 1, 1), "wg": _w(rng, 8, 4, 3, 3), "w2": _w(rng, 6, 8, 1, 1), "w3": _w(rng, 2, 6, 1, 1)}
    nodes = [conv("x", "w1", "a"), conv("a", "wg", "g", group=2, pads=[1, 1, 1, 1]), conv("g", "w2", "b"),
             helper.make_node("Relu", ["b"], ["rb"]), conv("rb", "w3", "y")]
    proto = make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, 2, 5, 5])], inits)
    groups = channel_groups(proto)
    grouped = [g for g in groups if any("grouped convolution" in r for r in g.reasons)]
    assert len(grouped) == 2  # the grouped conv's input and output channels
    assert [g.size for g in groups if g.prunable] == [6]
    ref, pruned, _, _ = zero_and_prune(proto)
    shapes = init_shapes(pruned)
    assert shapes["wg"] == (8, 4, 3, 3) and shapes["w2"][0] < 6
    assert_same(ref, pruned)


def test_channel_shuffle_is_left_alone():
    rng = np.random.default_rng(5)
    inits = {"w1": _w(rng, 8, 3, 1, 1), "s1": np.array([1, 2, 4, 4, 4], np.int64),
             "s2": np.array([1, 8, 4, 4], np.int64), "w2": _w(rng, 4, 8, 1, 1), "w0": _w(rng, 6, 3, 1, 1),
             "w3": _w(rng, 2, 6, 1, 1)}
    nodes = [conv("x", "w1", "a"), helper.make_node("Reshape", ["a", "s1"], ["r1"]),
             helper.make_node("Transpose", ["r1"], ["t"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t", "s2"], ["r2"]), conv("r2", "w2", "y"),
             conv("x", "w0", "b"), helper.make_node("Relu", ["b"], ["rb"]), conv("rb", "w3", "z")]
    proto = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4]), vi("z", [1, 2, 4, 4])], inits)
    groups = channel_groups(proto)
    shuffled = next(g for g in groups if g.size == 8)
    assert not shuffled.prunable and "channel shuffle" in shuffled.reasons[0]
    assert "channel groups:" in format_groups(groups)
    ref, pruned, _, _ = zero_and_prune(proto)
    shapes = init_shapes(pruned)
    assert shapes["w1"] == (8, 3, 1, 1) and shapes["w0"][0] < 6
    assert_same(ref, pruned)


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_flatten_into_gemm_prunes_runs_of_features(flatten, trans_b):
    rng = np.random.default_rng(6)
    k = 5 * 2 * 2
    inits = {"w1": _w(rng, 5, 3, 3, 3), "b1": _w(rng, 5), "fc": _w(rng, *((7, k) if trans_b else (k, 7))),
             "fb": _w(rng, 7), "fc2": _w(rng, 7, 3), "shape": np.array([1, k], np.int64)}
    reshape = (helper.make_node("Flatten", ["p"], ["f"], axis=1) if flatten == "Flatten"
               else helper.make_node("Reshape", ["p", "shape"], ["f"]))
    nodes = [conv("x", "w1", "c", "b1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]), reshape,
             helper.make_node("Gemm", ["f", "fc", "fb"], ["g"], transB=trans_b), helper.make_node("Relu", ["g"], ["rg"]),
             helper.make_node("MatMul", ["rg", "fc2"], ["y"])]
    proto = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 3])], inits)
    ref, pruned, analysis, keep = zero_and_prune(proto)
    assert len(keep) == 2
    shapes = init_shapes(pruned)
    kc, kf = shapes["w1"][0], shapes["fb"][0]
    assert shapes["fc"] == ((kf, kc * 4) if trans_b else (kc * 4, kf)) and shapes["fc2"] == (kf, 3)
    if flatten == "Reshape":
        assert list(onnx.numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name.startswith("shape")))) \
            == [1, kc * 4]
    assert_same(ref, pruned)


def test_conv_transpose_weight_layout():
    rng = np.random.default_rng(7)
    inits = {"w1": _w(rng, 6, 3, 1, 1), "wt": _w(rng, 6, 5, 2, 2), "bt": _w(rng, 5), "w2": _w(rng, 2, 5, 1, 1)}
    nodes = [conv("x", "w1", "a"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["t"], strides=[2, 2]),
             helper.make_node("Relu", ["t"], ["rt"]), conv("rt", "w2", "y")]
    proto = make_model(nodes, [vi("x", [1, 3, 3, 3])], [vi("y", [1, 2, 6, 6])], inits)
    ref, pruned, _, keep = zero_and_prune(proto)
    assert len(keep) == 2
    shapes = init_shapes(pruned)
    k1, k2 = shapes["w1"][0], shapes["bt"][0]
    assert shapes["wt"] == (k1, k2, 2, 2) and shapes["w2"] == (2, k2, 1, 1)
    assert_same(ref, pruned)


def test_slice_offsets_and_resize_pad_pool():
    rng = np.random.default_rng(8)
    inits = {"w1": _w(rng, 8, 3, 1, 1), "st": np.array([2], np.int64), "en": np.array([7], np.int64),
             "ax": np.array([1], np.int64), "w2": _w(rng, 2, 5, 1, 1), "sc": np.array([1, 1, 2, 2], F),
             "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "w3": _w(rng, 2, 8, 1, 1)}
    nodes = [conv("x", "w1", "a"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Slice", ["r", "st", "en", "ax"], ["s"]), conv("s", "w2", "y"),
             helper.make_node("Resize", ["r", "", "sc"], ["u"], mode="nearest"),
             helper.make_node("Pad", ["u", "pads"], ["pd"]),
             helper.make_node("GlobalAveragePool", ["pd"], ["gp"]), conv("gp", "w3", "z")]
    proto = make_model(nodes, [vi("x", [1, 3, 3, 3])], [vi("y", [1, 2, 3, 3]), vi("z", [1, 2, 1, 1])], inits)
    ref, pruned, analysis, keep = zero_and_prune(proto, fraction=0.5, seed=3)
    kept = next(iter(keep.values()))
    shapes = init_shapes(pruned)
    assert shapes["w2"] == (2, int(((kept >= 2) & (kept < 7)).sum()), 1, 1)
    assert_same(ref, pruned)


def test_unknown_op_and_graph_output_freeze():
    rng = np.random.default_rng(9)
    inits = {"w1": _w(rng, 4, 3, 1, 1), "w2": _w(rng, 4, 3, 1, 1), "w3": _w(rng, 2, 4, 1, 1)}
    nodes = [conv("x", "w1", "a"), helper.make_node("Shape", ["a"], ["sh"]),
             conv("x", "w2", "b"), helper.make_node("LRN", ["b"], ["l"], size=3), conv("l", "w3", "y")]
    proto = make_model(nodes, [vi("x", [1, 3, 2, 2])], [vi("y", [1, 2, 2, 2]), vi("sh", [4], onnx.TensorProto.INT64)],
                       inits)
    reasons = {g.size: g.reasons for g in channel_groups(proto) if g.size == 4}
    text = " ".join(r for g in channel_groups(proto) for r in g.reasons)
    assert "Shape" in text and "LRN" in text and "graph output" in text
    assert all(not g.prunable for g in channel_groups(proto))
    assert reasons


def test_inspect_groups_cli(capsys, tmp_path):
    import json

    from graphopt.cli import main

    rng = np.random.default_rng(10)
    inits = {"w0": _w(rng, 6, 3, 1, 1), "w1": _w(rng, 8, 6, 1, 1), "wg": _w(rng, 8, 4, 3, 3), "w2": _w(rng, 2, 8, 1, 1)}
    nodes = [conv("x", "w0", "z"), helper.make_node("Relu", ["z"], ["rz"]),
             conv("rz", "w1", "a"), conv("a", "wg", "g", group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["g"], ["r"]), conv("r", "w2", "y")]
    proto = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 2, 4, 4])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    assert main(["inspect", str(path), "--groups"]) == 0
    out = capsys.readouterr().out
    assert "channel groups: 4 (1 prunable)" in out and "grouped convolution (group=2)" in out
    assert main(["inspect", str(path), "--groups", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["channel_groups"]
    assert [g["size"] for g in groups if g["prunable"]] == [6] and len(groups) == 4
