"""prune-heads / prune-neurons: before/after on small BERT-shaped encoders.

Exactness: a head whose Q/K/V columns and output-projection rows are zero
contributes nothing, and a unit whose first-layer column and bias are zero
outputs Gelu(0) = Relu(0) = 0; pruning them must leave the outputs unchanged.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt import runtime
from graphopt.calibration import open_reader
from graphopt.context import PassContext
from graphopt.errors import UsageError
from conftest import apply, ort_run, vi

HIDDEN, HEADS, FFN, SEQ = 32, 4, 64, 6
DIM = HIDDEN // HEADS


class Encoder:
    """A post-LN encoder (attention + residual + LayerNorm + FFN) built with onnx.helper.

    ``shapes``: ``const`` Reshape shapes, or ``concat`` shapes computed from
    Shape/Gather like a PyTorch export.  ``mask``: None, ``broadcast`` (an input
    [B, 1, 1, S]) or ``per_head`` (an input [B, H, S, S]).  ``head_bias``: a
    constant [1, H, S, S] added to the scores.  ``sdpa``: the context passes
    through a shape-keeping Reshape whose shape is read off the query, value and
    context with Shape/Gather, and softmax NaNs are zeroed, as PyTorch's
    scaled-dot-product-attention export writes it.
    """

    def __init__(self, layers=2, act="gelu", shapes="const", mask=None, head_bias=False, probs_output=False,
                 fused_qkv=False, nan_guard=False, sdpa=False, seed=0):
        rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.outputs = []
        self.inputs = [vi("x", ["batch", SEQ, HIDDEN])]
        if mask == "broadcast":
            self.inputs.append(vi("mask", ["batch", 1, 1, SEQ]))
        elif mask == "per_head":
            self.inputs.append(vi("mask", ["batch", HEADS, SEQ, SEQ]))

        def node(op, inputs, out, **attrs):
            self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
            return out

        def const(name, arr):
            self.inits[name] = np.asarray(arr)
            return name

        def linear(x, k, n, p):
            const(f"{p}.w", (rng.standard_normal((k, n)) / math.sqrt(k)).astype(np.float32))
            const(f"{p}.b", (rng.standard_normal(n) * 0.1).astype(np.float32))
            return node("Add", [node("MatMul", [x, f"{p}.w"], f"{p}.mm"), f"{p}.b"], f"{p}.out")

        const("scale", np.array(1 / math.sqrt(DIM), np.float32))
        const("split", np.array([0, -1, HEADS, DIM], np.int64))
        const("merge", np.array([0, 0, -1], np.int64))
        const("ln.g", np.ones(HIDDEN, np.float32))
        const("ln.b", np.zeros(HIDDEN, np.float32))
        for name, v in (("half", 0.5), ("one", 1.0), ("sqrt2", math.sqrt(2)), ("zero", 0.0)):
            const(name, np.array(v, np.float32))
        if sdpa:
            for name, v in (("s0", 0), ("s2", 2), ("sm1", -1)):
                const(name, np.array(v, np.int64))
            const("minus1", np.array([-1], np.int64))
        if shapes == "concat" or sdpa:
            for name, v in (("i0", [0]), ("i1", [1]), ("nh", [HEADS]), ("dh", [DIM]), ("hid", [HIDDEN])):
                const(name, np.array(v, np.int64))
        if head_bias:
            const("head_bias", (rng.standard_normal((1, HEADS, SEQ, SEQ)) * 0.5).astype(np.float32))

        x = "x"
        for i in range(layers):
            p = f"l{i}"
            if shapes == "concat":
                shp = node("Shape", [x], f"{p}.shape")
                b = node("Gather", [shp, "i0"], f"{p}.b_dim", axis=0)
                s = node("Gather", [shp, "i1"], f"{p}.s_dim", axis=0)
                split = node("Concat", [b, s, "nh", "dh"], f"{p}.split_shape", axis=0)
            else:
                split = "split"

            def heads(t, perm, what):
                r = node("Reshape", [t, split], f"{p}.{what}.r")
                return node("Transpose", [r], f"{p}.{what}.t", perm=perm)

            if fused_qkv:
                const("qkv.split", np.array([HIDDEN] * 3, np.int64))
                qkv = linear(x, HIDDEN, 3 * HIDDEN, f"{p}.qkv")
                names = [f"{p}.{w}.out" for w in "qkv"]
                self.nodes.append(helper.make_node("Split", [qkv, "qkv.split"], names, name=f"{p}.split", axis=-1))
            else:
                names = [linear(x, HIDDEN, HIDDEN, f"{p}.{w}") for w in "qkv"]
            q = heads(names[0], [0, 2, 1, 3], "q")
            k = heads(names[1], [0, 2, 3, 1], "k")
            v = heads(names[2], [0, 2, 1, 3], "v")
            scores = node("Div", [node("MatMul", [q, k], f"{p}.qk"), "sqrt_d"], f"{p}.scaled")
            if head_bias:
                scores = node("Add", [scores, "head_bias"], f"{p}.biased")
            if mask:
                scores = node("Add", [scores, "mask"], f"{p}.masked")
            probs = node("Softmax", [scores], f"{p}.probs", axis=-1)
            if nan_guard:  # as scaled-dot-product-attention exports write it
                isnan = node("IsNaN", [probs], f"{p}.isnan")
                probs = node("Where", [isnan, "zero", probs], f"{p}.guarded")
            if sdpa:
                isnan = node("IsNaN", [probs], f"{p}.isnan")
                probs = node("Where", [isnan, "zero", probs], f"{p}.guarded")
            if probs_output and i == 0:
                self.outputs.append(vi(probs, ["batch", HEADS, SEQ, SEQ]))
            ctx = node("MatMul", [probs, v], f"{p}.pv")
            if sdpa:
                def dim(t, index, tag):
                    shape = node("Shape", [t], f"{p}.{tag}.shape")
                    return node("Unsqueeze", [node("Gather", [shape, index], f"{p}.{tag}.dim", axis=0), "i0"],
                                f"{p}.{tag}.dim1")
                keep = node("Concat", [dim(ctx, "s0", "pv"), "minus1", dim(q, "s2", "q"), dim(v, "sm1", "v")],
                            f"{p}.pv.shape4", axis=0)
                ctx = node("Reshape", [ctx, keep], f"{p}.pv.r")
            ctx = node("Transpose", [ctx], f"{p}.ctx.t", perm=[0, 2, 1, 3])
            if shapes == "concat":
                merge = node("Concat", [b, s, "hid"], f"{p}.merge_shape", axis=0)
            else:
                merge = "merge"
            ctx = node("Reshape", [ctx, merge], f"{p}.ctx")
            x = node("LayerNormalization", [node("Add", [x, linear(ctx, HIDDEN, HIDDEN, f"{p}.o")], f"{p}.res1"),
                                            "ln.g", "ln.b"], f"{p}.ln1", axis=-1)
            h = linear(x, HIDDEN, FFN, f"{p}.ffn1")
            if act == "relu":
                a = node("Relu", [h], f"{p}.act")
            else:
                erf = node("Erf", [node("Div", [h, "sqrt2"], f"{p}.gelu.div")], f"{p}.gelu.erf")
                a = node("Mul", [node("Mul", [h, node("Add", [erf, "one"], f"{p}.gelu.add")], f"{p}.gelu.mul"),
                                 "half"], f"{p}.act")
            x = node("LayerNormalization", [node("Add", [x, linear(a, FFN, HIDDEN, f"{p}.ffn2")], f"{p}.res2"),
                                            "ln.g", "ln.b"], f"{p}.ln2", axis=-1)
        const("sqrt_d", np.array(math.sqrt(DIM), np.float32))
        self.nodes.append(helper.make_node("Identity", [x], ["y"], name="y"))
        self.outputs.insert(0, vi("y", ["batch", SEQ, HIDDEN]))

    def zero_head(self, layer: int, head: int) -> None:
        cols = slice(head * DIM, (head + 1) * DIM)
        for what in ("q", "k", "v"):
            self.inits[f"l{layer}.{what}.w"][:, cols] = 0
            self.inits[f"l{layer}.{what}.b"][cols] = 0
        self.inits[f"l{layer}.o.w"][cols, :] = 0

    def zero_units(self, layer: int, units) -> None:
        self.inits[f"l{layer}.ffn1.w"][:, units] = 0
        self.inits[f"l{layer}.ffn1.b"][units] = 0

    def proto(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "encoder", self.inputs, self.outputs,
                                  [numpy_helper.from_array(v, k) for k, v in self.inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def feeds(proto: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"x": rng.standard_normal((batch, SEQ, HIDDEN)).astype(np.float32)}
    names = {i.name for i in proto.graph.input}
    if "mask" in names:
        dims = [d.dim_value or batch for d in proto.graph.input[1].type.tensor_type.shape.dim]
        m = np.zeros(dims, np.float32)
        m[..., -2:] = -1e4  # the last two tokens are padding
        out["mask"] = m
    return out


def inits(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def matmul_weight(proto: onnx.ModelProto, node_name: str) -> np.ndarray:
    node = next(n for n in proto.graph.node if n.name == node_name)
    return inits(proto)[node.input[1]]


def reshape_shape(proto: onnx.ModelProto, node_name: str) -> list[int]:
    node = next(n for n in proto.graph.node if n.name == node_name)
    values = inits(proto)
    if node.input[1] in values:
        return values[node.input[1]].tolist()
    concat = next(n for n in proto.graph.node if node.input[1] in n.output)
    return [values[i].tolist()[0] if i in values else None for i in concat.input]


def calibration(proto: onnx.ModelProto) -> PassContext:
    return PassContext(calibration=open_reader("random:4", proto, input_shapes={"x": [2, SEQ, HIDDEN]}, quiet=True),
                       quiet=True)


# ----------------------------------------------------------------------------------
# prune-heads
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["l1", "l2", "activation"])
@pytest.mark.parametrize("shapes", ["const", "concat"])
def test_zero_heads_are_pruned_exactly(criterion, shapes):
    enc = Encoder(shapes=shapes, mask="broadcast", nan_guard=shapes == "concat")
    enc.zero_head(0, 1)
    enc.zero_head(1, 3)
    before = enc.proto()
    ctx = calibration(before) if criterion == "activation" else None
    _, result, after = apply(before, f"prune-heads{{ratio=0.25,criterion={criterion}}}", ctx)
    rec = result.records[0]
    assert rec.changed and rec.stats["heads_before"] == 8 and rec.stats["heads_after"] == 6, rec.stats
    for layer in (0, 1):
        for what in ("q", "k", "v"):
            assert matmul_weight(after, f"l{layer}.{what}.mm").shape == (HIDDEN, 3 * DIM)
            assert reshape_shape(after, f"l{layer}.{what}.r")[2:] == [3, DIM]
        assert matmul_weight(after, f"l{layer}.o.mm").shape == (3 * DIM, HIDDEN)
        assert reshape_shape(after, f"l{layer}.ctx")[-1] in (-1, 3 * DIM)
    f = feeds(before)
    want, got = ort_run(before, f)["y"], ort_run(after, f)["y"]
    assert runtime.relative_error(got, want) <= 1e-5
    # the zero head is the one removed: layer 0 keeps columns of heads 0, 2, 3
    q0 = matmul_weight(after, "l0.q.mm")
    np.testing.assert_array_equal(q0, np.delete(enc.inits["l0.q.w"], np.s_[DIM:2 * DIM], axis=1))


def test_sdpa_export_pattern():
    pytest.importorskip("sympy", reason="onnxruntime's symbolic shape inference proves the shape-keeping Reshape")
    enc = Encoder(shapes="concat", mask="broadcast", sdpa=True)
    enc.zero_head(0, 0)
    enc.zero_head(1, 2)
    before = enc.proto()
    _, result, after = apply(before, "prune-heads{ratio=0.25}")
    assert result.records[0].stats["heads_after"] == 6, result.records[0].notes
    assert matmul_weight(after, "l1.o.mm").shape == (3 * DIM, HIDDEN)
    f = feeds(before)
    assert runtime.relative_error(ort_run(after, f)["y"], ort_run(before, f)["y"]) <= 1e-5
    # a Shape reader of the head axis itself is not allowed
    enc = Encoder(layers=1, sdpa=True)
    enc.inits["s2"] = np.array(1, np.int64)  # the query's head count now feeds the Reshape
    _, result, _ = apply(enc.proto(), "prune-heads{ratio=0.25}")
    assert not result.records[0].changed
    assert any("l0.q.t' has other readers" in n and "Shape" in n for n in result.records[0].notes)


def test_per_head_score_bias_is_sliced():
    enc = Encoder(head_bias=True)
    enc.zero_head(0, 2)
    enc.zero_head(1, 0)
    before = enc.proto()
    _, result, after = apply(before, "prune-heads{ratio=0.25}")
    assert result.records[0].changed
    biases = [v for k, v in inits(after).items() if k.startswith("head_bias")]
    assert sorted(b.shape for b in biases) == [(1, 3, SEQ, SEQ)] * 2
    f = feeds(before)
    assert runtime.relative_error(ort_run(after, f)["y"], ort_run(before, f)["y"]) <= 1e-5


def test_ratio_and_min_heads():
    before = Encoder(shapes="concat", mask="broadcast").proto()
    _, result, half = apply(before, "prune-heads{ratio=0.5}")
    assert result.records[0].stats["heads_after"] == 4
    assert matmul_weight(half, "l1.v.mm").shape == (HIDDEN, 2 * DIM)
    assert reshape_shape(half, "l1.q.r")[2:] == [2, DIM]
    assert reshape_shape(half, "l1.ctx")[-1] == 2 * DIM
    onnx.checker.check_model(half, full_check=True)
    f = feeds(before)
    want = ort_run(before, f)["y"]
    cos = runtime.cosine_similarity(ort_run(half, f)["y"], want)
    assert 0.5 < cos < 0.9999, cos
    _, result, most = apply(before, "prune-heads{ratio=1.0,min-heads=2}")
    assert result.records[0].stats["heads_after"] == 4
    assert matmul_weight(most, "l0.k.mm").shape == (HIDDEN, 2 * DIM)
    assert ort_run(most, f)["y"].shape == want.shape


def test_probabilities_as_graph_output_are_left_alone():
    before = Encoder(probs_output=True).proto()
    _, result, after = apply(before, "prune-heads{ratio=0.5}")
    rec = result.records[0]
    assert rec.stats["layers"] == 1 and rec.stats["heads_after"] == 2
    assert any("l0.probs" in n and "graph output" in n for n in rec.notes), rec.notes
    assert matmul_weight(after, "l0.q.mm").shape == (HIDDEN, HIDDEN)
    assert matmul_weight(after, "l1.q.mm").shape == (HIDDEN, 2 * DIM)
    f = feeds(before)
    got, want = ort_run(after, f), ort_run(before, f)
    np.testing.assert_array_equal(got["l0.probs"], want["l0.probs"])


def test_mask_per_head_is_left_alone():
    before = Encoder(mask="per_head", layers=1).proto()
    _, result, after = apply(before, "prune-heads{ratio=0.5}")
    rec = result.records[0]
    assert not rec.changed
    assert any("may differ per head" in n for n in rec.notes), rec.notes
    assert after.graph.node == before.graph.node


def test_fused_qkv_is_left_alone():
    before = Encoder(layers=1, fused_qkv=True).proto()
    _, result, after = apply(before, "prune-heads{ratio=0.5}")
    rec = result.records[0]
    assert not rec.changed
    assert any("fused QKV" in n for n in rec.notes), rec.notes
    assert matmul_weight(after, "l0.qkv.mm").shape == (HIDDEN, 3 * HIDDEN)


def test_activation_criterion_needs_calibration():
    with pytest.raises(UsageError, match="criterion=activation needs calibration"):
        apply(Encoder(layers=1).proto(), "prune-heads{criterion=activation}")


# ----------------------------------------------------------------------------------
# prune-neurons
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("criterion", ["l2", "activation"])
def test_zero_units_are_pruned_exactly(act, criterion):
    enc = Encoder(act=act)
    rng = np.random.default_rng(1)
    for layer in (0, 1):
        enc.zero_units(layer, rng.choice(FFN, FFN // 4, replace=False))
    before = enc.proto()
    ctx = calibration(before) if criterion == "activation" else None
    _, result, after = apply(before, f"prune-neurons{{ratio=0.25,criterion={criterion}}}", ctx)
    rec = result.records[0]
    assert rec.changed and rec.stats["neurons_after"] == 2 * 48, rec.stats
    for layer in (0, 1):
        assert matmul_weight(after, f"l{layer}.ffn1.mm").shape == (HIDDEN, 48)
        assert matmul_weight(after, f"l{layer}.ffn2.mm").shape == (48, HIDDEN)
    f = feeds(before)
    assert runtime.relative_error(ort_run(after, f)["y"], ort_run(before, f)["y"]) <= 1e-5
    # attention projections are no feed-forward blocks
    assert matmul_weight(after, "l0.q.mm").shape == (HIDDEN, HIDDEN)


def test_round_to_and_cosine():
    before = Encoder().proto()
    _, result, after = apply(before, "prune-neurons{ratio=0.3,round-to=16}")
    assert result.records[0].stats["neurons_after"] == 2 * 48  # 64 - 19 = 45 -> 48
    assert matmul_weight(after, "l1.ffn2.mm").shape == (48, HIDDEN)
    f = feeds(before)
    cos = runtime.cosine_similarity(ort_run(after, f)["y"], ort_run(before, f)["y"])
    assert 0.5 < cos < 0.9999, cos


def test_activation_read_outside_block_is_left_alone():
    enc = Encoder(layers=1, act="relu")
    enc.outputs.append(vi("l0.act", ["batch", SEQ, FFN]))
    before = enc.proto()
    _, result, after = apply(before, "prune-neurons{ratio=0.5}")
    rec = result.records[0]
    assert not rec.changed
    assert any("l0.act" in n and "graph output" in n for n in rec.notes), rec.notes
    assert matmul_weight(after, "l0.ffn1.mm").shape == (HIDDEN, FFN)


# ----------------------------------------------------------------------------------
# compensation: a unit whose output is constant is removed exactly
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("compensate", [True, False])
def test_constant_head_is_folded_into_the_output_bias(compensate):
    # Wv_h = 0 with a bias: every value row of head h is bv_h, so the head outputs
    # bv_h Wo_h whatever it attends to.
    enc = Encoder(mask="broadcast", layers=1)
    cols = slice(1 * DIM, 2 * DIM)
    enc.inits["l0.v.w"][:, cols] = 0
    enc.inits["l0.v.b"][cols] = 1.0
    enc.inits["l0.o.w"][cols, :] *= 0.05
    before = enc.proto()
    pipe = f"prune-heads{{ratio=0.25,criterion=activation,compensate={str(compensate).lower()}}}"
    _, result, after = apply(before, pipe, calibration(before))
    stats = result.records[0].stats
    assert stats["compensated"] == (1 if compensate else 0)
    kept_v = matmul_weight(after, "l0.v.mm")
    assert not (kept_v == 0).all(axis=0).any()  # the constant head is the one removed
    f = feeds(before)
    err = runtime.relative_error(ort_run(after, f)["y"], ort_run(before, f)["y"])
    assert (err <= 1e-5) if compensate else (err > 1e-4), err


def test_constant_units_are_folded_into_the_output_bias():
    # Relu units with a zero weight column and a positive bias output a constant.
    enc = Encoder(act="relu", layers=1)
    units = np.arange(0, FFN, 4)
    enc.inits["l0.ffn1.w"][:, units] = 0
    enc.inits["l0.ffn1.b"][units] = 0.5
    enc.inits["l0.ffn2.w"][units, :] *= 0.01
    before = enc.proto()
    _, result, after = apply(before, "prune-neurons{ratio=0.25,criterion=activation}", calibration(before))
    assert result.records[0].stats["compensated"] == 1
    assert not (matmul_weight(after, "l0.ffn1.mm") == 0).all(axis=0).any()
    f = feeds(before)
    assert runtime.relative_error(ort_run(after, f)["y"], ort_run(before, f)["y"]) <= 1e-5
