"""prune-blocks: residual blocks found, ranked by measured output error, removed."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import LIGHT_DIR, apply, make_model, op_types, ort_run, random_feeds, vi
from graphopt import runtime
from graphopt.context import PassContext
from graphopt.errors import UsageError
from graphopt.pipeline import parse as parse_pipeline

F = np.float32
C = 8


def _resnet(zero_block=1, blocks=3, projection=True, seed=0):
    """stem conv -> `blocks` residual blocks (conv-relu-conv + x, relu) -> [projection block] -> output.
    Block ``zero_block`` has all-zero weights: removing it changes nothing."""
    rng = np.random.default_rng(seed)
    inits = {"stem": (0.3 * rng.standard_normal((C, 3, 3, 3))).astype(F)}
    nodes = [helper.make_node("Conv", ["x", "stem"], ["h0"], name="stem", pads=[1, 1, 1, 1])]
    h = "h0"
    for i in range(blocks):
        scale = 0.0 if i == zero_block else 0.2
        inits[f"w{i}a"] = (scale * rng.standard_normal((C, C, 3, 3))).astype(F)
        inits[f"w{i}b"] = (scale * rng.standard_normal((C, C, 3, 3))).astype(F)
        nodes += [
            helper.make_node("Conv", [h, f"w{i}a"], [f"a{i}"], name=f"conv{i}a", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
            helper.make_node("Conv", [f"r{i}", f"w{i}b"], [f"f{i}"], name=f"conv{i}b", pads=[1, 1, 1, 1]),
            helper.make_node("Add", [h, f"f{i}"], [f"s{i}"], name=f"add{i}"),
            helper.make_node("Relu", [f"s{i}"], [f"h{i + 1}"]),
        ]
        h = f"h{i + 1}"
    if projection:
        inits["wp"] = (0.3 * rng.standard_normal((C, C, 1, 1))).astype(F)
        inits["wq"] = (0.3 * rng.standard_normal((C, C, 3, 3))).astype(F)
        nodes += [
            helper.make_node("Conv", [h, "wp"], ["p"], name="proj"),
            helper.make_node("Conv", [h, "wq"], ["q"], name="convq", pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["p", "q"], ["y"], name="add_proj"),
        ]
    else:
        nodes.append(helper.make_node("Identity", [h], ["y"]))
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, C, 8, 8])], inits)


def test_zero_block_is_removed_first_and_exactly():
    proto = _resnet(zero_block=1)
    _, result, after = apply(proto, "prune-blocks{count=1,samples=2}")
    onnx.checker.check_model(after)
    record = result.records[0]
    assert record.changed
    names = {n.name for n in after.graph.node}
    assert "add1" not in names and "conv1a" not in names and "conv1b" not in names
    assert {"add0", "add2", "conv0a", "conv2b", "add_proj", "proj"} <= names
    assert len(after.graph.node) == len(proto.graph.node) - 4  # conv, relu, conv, add
    assert "w1a" not in {t.name for t in after.graph.initializer}  # dead weights gone
    # the Relu after the Add now reads the block's input directly
    relu = next(n for n in after.graph.node if n.output[0] == "h2")
    assert relu.input[0] == "h1"
    feeds = random_feeds(proto, seed=7)
    np.testing.assert_array_equal(ort_run(after, feeds)["y"], ort_run(proto, feeds)["y"])
    stats = record.stats
    assert stats["candidates"] == 3
    assert stats["removed"][0]["block"] == "add1" and stats["removed"][0]["mean_cosine"] == 1.0
    assert stats["removed"][0]["params"] == 2 * C * C * 9
    assert stats["ranking"][0]["error"] == 0.0 and all(r["error"] > 0 for r in stats["ranking"][1:])
    assert any("add_proj" in n and "projection shortcut" in n for n in record.notes)


@pytest.mark.parametrize("greedy", [True, False])
def test_count_two_matches_measured_error(greedy):
    proto = _resnet(zero_block=2)
    feeds = random_feeds(proto, seed=3)
    ctx = PassContext(inputs=feeds)
    _, result, after = apply(proto, f"prune-blocks{{count=2,greedy={str(greedy).lower()}}}", ctx)
    stats = result.records[0].stats
    assert [r["block"] for r in stats["removed"]][0] == "add2"
    assert len(stats["removed"]) == 2 and op_types(after).count("Add") == 2  # one residual Add + add_proj
    want, got = ort_run(proto, feeds)["y"], ort_run(after, feeds)["y"]
    from graphopt.fidelity import compare_outputs

    measured = compare_outputs([{"y": got}], [{"y": want}])["mean-cosine"]
    reported = stats["removed"][-1]["mean_cosine"] if greedy else stats["final"]["mean_cosine"]
    assert measured == pytest.approx(reported, abs=1e-5) and measured < 1.0


def test_branch_used_elsewhere_is_not_a_block():
    proto = _resnet(zero_block=5, blocks=2, projection=False)
    # read the first block's internal Relu from outside: that block cannot go
    graph = proto.graph
    graph.node.append(helper.make_node("Relu", ["r0"], ["extra"]))
    graph.output.append(vi("extra", [1, C, 8, 8]))
    _, result, after = apply(proto, "prune-blocks{count=5,samples=1}")
    removed = [r["block"] for r in result.records[0].stats["removed"]]
    assert removed == ["add1"]
    assert "only 1 removable block" in result.records[0].notes[-1]


def _transformer(seq=4, d=8, layers=2, zero_ffn=1, seed=0):
    """Post-LN encoder layers: h = LN(x + Attn(x, mask)); out = LN(h + FFN(h)); the
    attention reads a mask computed outside the block."""
    rng = np.random.default_rng(seed)
    inits = {"scale": np.array(1 / np.sqrt(d), F), "g": np.ones(d, F), "b": np.zeros(d, F),
             "neg": np.array(-1e4, F), "one": np.array(1.0, F)}
    nodes = [helper.make_node("Sub", ["one", "mask"], ["inv"]), helper.make_node("Mul", ["inv", "neg"], ["bias"])]
    h = "x"
    for i in range(layers):
        for n in ("q", "k", "v", "o"):
            inits[f"{n}{i}"] = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(F)
        s = 0.0 if i == zero_ffn else 1.0
        inits[f"f1_{i}"] = (s * rng.standard_normal((d, 2 * d)) / np.sqrt(d)).astype(F)
        inits[f"f2_{i}"] = (s * rng.standard_normal((2 * d, d)) / np.sqrt(d)).astype(F)
        nodes += [
            helper.make_node("MatMul", [h, f"q{i}"], [f"Q{i}"]),
            helper.make_node("MatMul", [h, f"k{i}"], [f"K{i}"]),
            helper.make_node("MatMul", [h, f"v{i}"], [f"V{i}"]),
            helper.make_node("Transpose", [f"K{i}"], [f"KT{i}"], perm=[0, 2, 1]),
            helper.make_node("MatMul", [f"Q{i}", f"KT{i}"], [f"S{i}"]),
            helper.make_node("Mul", [f"S{i}", "scale"], [f"Ss{i}"]),
            helper.make_node("Add", [f"Ss{i}", "bias"], [f"Sm{i}"]),
            helper.make_node("Softmax", [f"Sm{i}"], [f"P{i}"], axis=-1),
            helper.make_node("MatMul", [f"P{i}", f"V{i}"], [f"A{i}"]),
            helper.make_node("MatMul", [f"A{i}", f"o{i}"], [f"O{i}"]),
            helper.make_node("Add", [h, f"O{i}"], [f"R{i}"], name=f"attn_res{i}"),
            helper.make_node("LayerNormalization", [f"R{i}", "g", "b"], [f"H{i}"], axis=-1),
            helper.make_node("MatMul", [f"H{i}", f"f1_{i}"], [f"F{i}"]),
            helper.make_node("Relu", [f"F{i}"], [f"Fr{i}"]),
            helper.make_node("MatMul", [f"Fr{i}", f"f2_{i}"], [f"G{i}"]),
            helper.make_node("Add", [f"H{i}", f"G{i}"], [f"T{i}"], name=f"ffn_res{i}"),
            helper.make_node("LayerNormalization", [f"T{i}", "g", "b"], [f"L{i}"], axis=-1),
        ]
        h = f"L{i}"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    return make_model(nodes, [vi("x", [2, seq, d]), vi("mask", [2, 1, seq])], [vi("y", [2, seq, d])], inits)


def test_transformer_residuals_with_layernorm_after():
    proto = _transformer(zero_ffn=1)
    _, result, after = apply(proto, "prune-blocks{count=1,samples=2}")
    stats = result.records[0].stats
    assert stats["candidates"] == 4  # two attention and two FFN residuals; the mask Add is not one
    assert stats["removed"][0]["block"] == "ffn_res1"
    names = {n.name for n in after.graph.node}
    assert "ffn_res1" not in names and "attn_res1" in names
    assert op_types(after).count("LayerNormalization") == 4  # the LayerNorm after the Add stays
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, 8)).astype(F),
             "mask": np.ones((2, 1, 4), F)}
    # LN(H + 0) == LN(H) == H only up to LN's epsilon: nearly identical
    err = runtime.relative_error(ort_run(after, feeds)["y"], ort_run(proto, feeds)["y"])
    assert err < 1e-3
    # removing every block leaves a chain of LayerNorms and the mask computation gone
    _, result, after = apply(proto, "prune-blocks{count=4,samples=1}")
    assert len(result.records[0].stats["removed"]) == 4
    assert set(op_types(after)) <= {"LayerNormalization", "Identity"}


@pytest.mark.skipif(not (LIGHT_DIR / "light_resnet50.onnx").exists(), reason="onnx light models not found")
def test_resnet50_light_runs():
    proto = onnx.load(str(LIGHT_DIR / "light_resnet50.onnx"))
    _, result, after = apply(proto, "prune-blocks{count=1,samples=1}")
    stats = result.records[0].stats
    # 16 bottleneck blocks, 4 of them with a projection shortcut
    assert stats["candidates"] == 12
    assert sum("projection shortcut" in n for n in result.records[0].notes) == 4
    assert op_types(after).count("Sum") == 15
    assert len(after.graph.node) < len(proto.graph.node) - 8
    feeds = random_feeds(proto, seed=1)
    out = ort_run(after, feeds)
    assert all(np.isfinite(v).all() for v in out.values())
    assert list(out) == [o.name for o in proto.graph.output]


def test_bad_options():
    with pytest.raises(UsageError, match="count"):
        parse_pipeline("prune-blocks{count=0}")
    with pytest.raises(UsageError, match="metric"):
        parse_pipeline("prune-blocks{metric=l2}")


def test_shapes_from_onnxruntime_when_inference_cannot_tell():
    """A branch that reshapes by a computed shape: shape inference loses it, the
    sample runs show it equals x's."""
    rng = np.random.default_rng(0)
    inits = {"w": (0.1 * rng.standard_normal((8, 8))).astype(F), "v": (0.1 * rng.standard_normal((8, 8))).astype(F)}
    nodes = [
        helper.make_node("Shape", ["z"], ["s"]),  # not from x: the shape is no block's internal
        helper.make_node("Cast", ["s"], ["sf"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Sqrt", ["sf"], ["sq"]),
        helper.make_node("Mul", ["sq", "sq"], ["sf2"]),
        helper.make_node("Round", ["sf2"], ["sr"]),
        helper.make_node("Cast", ["sr"], ["si"], to=onnx.TensorProto.INT64),
    ]
    h = "x"
    for i, w in enumerate(("w", "v")):
        nodes += [helper.make_node("MatMul", [h, w], [f"m{i}"]),
                  helper.make_node("Reshape", [f"m{i}", "si"], [f"r{i}"]),
                  helper.make_node("Add", [h, f"r{i}"], [f"h{i}"], name=f"add{i}")]
        h = f"h{i}"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    proto = make_model(nodes, [vi("x", ["B", 8]), vi("z", ["B", 8])], [vi("y", ["B", 8])], inits)
    ctx = PassContext(input_shapes={"x": [3, 8], "z": [3, 8]})
    _, result, after = apply(proto, "prune-blocks{count=1,samples=2}", ctx)
    record = result.records[0]
    assert record.stats["candidates"] == 2 and len(record.stats["removed"]) == 1
    assert any("taken from onnxruntime" in n for n in record.notes)
    feeds = {n: rng.standard_normal((5, 8)).astype(F) for n in "xz"}  # another batch size runs too
    got, want = ort_run(after, feeds)["y"], ort_run(proto, feeds)["y"]
    assert got.shape == want.shape and runtime.cosine_similarity(got, want) > 0.9
