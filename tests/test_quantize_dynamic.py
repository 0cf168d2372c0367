"""quantize-dynamic: graph shape after the pass, numbers in onnxruntime vs float."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from conftest import apply, make_model, op_types, ort_run, vi
from graphopt.context import PassContext
from graphopt.errors import UsageError
from graphopt.ir import Model

F = np.float32


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Worst cosine over the rows (tokens) of two [..., H] outputs."""
    a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
    b = np.asarray(b, np.float64).reshape(-1, b.shape[-1])
    num = (a * b).sum(1)
    return float((num / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)).min())


def mlp(k: int = 64, hidden: int = 128, n: int = 10, batch: int = 8, seed: int = 0) -> onnx.ModelProto:
    """A 2-layer MLP: MatMul+Add, Relu, Gemm(transB=1)."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": (rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(F),
        "b1": (0.1 * rng.standard_normal(hidden)).astype(F),
        "w2": (rng.standard_normal((n, hidden)) / np.sqrt(hidden)).astype(F),
        "b2": (0.1 * rng.standard_normal(n)).astype(F),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h"], name="relu"),
        helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="fc2", transB=1, alpha=0.5, beta=2.0),
    ]
    return make_model(nodes, [vi("x", [batch, k])], [vi("y", [batch, n])], inits)


def bert_block(hidden: int = 64, layers: int = 2, seq: int = 16, heads: int = 4, batch: int = 1,
               seed: int = 0) -> onnx.ModelProto:
    """A BERT-shaped encoder: per layer Q/K/V MatMuls, scaled-dot-product
    attention with Softmax, output projection, residual + LayerNormalization,
    a GELU (Erf) feed-forward and a second LayerNormalization."""
    rng = np.random.default_rng(seed)
    d = hidden // heads
    inter = 4 * hidden
    inits: dict[str, np.ndarray] = {
        "shape_split": np.array([batch, seq, heads, d], np.int64),
        "shape_merge": np.array([batch, seq, hidden], np.int64),
        "inv_sqrt_d": np.array(1.0 / np.sqrt(d), F),
        "half": np.array(0.5, F), "one": np.array(1.0, F), "inv_sqrt2": np.array(1 / np.sqrt(2), F),
    }
    nodes = []

    def w(name, shape, std=0.05):
        inits[name] = (std * rng.standard_normal(shape)).astype(F)
        return name

    x = "x"
    for i in range(layers):
        p = f"l{i}_"

        def lin(inp, wname, bname, k, n, out, p=p):
            w(p + wname, (k, n))
            w(p + bname, (n,), 0.02)
            nodes.append(helper.make_node("MatMul", [inp, p + wname], [out + "_mm"], name=out + "_matmul"))
            nodes.append(helper.make_node("Add", [out + "_mm", p + bname], [out], name=out + "_add"))
            return out

        heads_t = []
        for proj in "qkv":
            t = lin(x, f"w{proj}", f"b{proj}", hidden, hidden, p + proj)
            nodes.append(helper.make_node("Reshape", [t, "shape_split"], [t + "_4d"], name=t + "_reshape"))
            perm = [0, 2, 3, 1] if proj == "k" else [0, 2, 1, 3]
            nodes.append(helper.make_node("Transpose", [t + "_4d"], [t + "_t"], name=t + "_transpose", perm=perm))
            heads_t.append(t + "_t")
        q, k, v = heads_t
        nodes += [
            helper.make_node("MatMul", [q, k], [p + "scores"], name=p + "scores"),
            helper.make_node("Mul", [p + "scores", "inv_sqrt_d"], [p + "scaled"], name=p + "scale"),
            helper.make_node("Softmax", [p + "scaled"], [p + "probs"], name=p + "softmax", axis=-1),
            helper.make_node("MatMul", [p + "probs", v], [p + "ctx"], name=p + "context"),
            helper.make_node("Transpose", [p + "ctx"], [p + "ctx_t"], name=p + "ctx_transpose", perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [p + "ctx_t", "shape_merge"], [p + "ctx_3d"], name=p + "ctx_reshape"),
        ]
        o = lin(p + "ctx_3d", "wo", "bo", hidden, hidden, p + "attn_out")
        inits[p + "ln1_g"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(F)
        inits[p + "ln1_b"] = (0.1 * rng.standard_normal(hidden)).astype(F)
        inits[p + "ln2_g"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(F)
        inits[p + "ln2_b"] = (0.1 * rng.standard_normal(hidden)).astype(F)
        nodes += [
            helper.make_node("Add", [x, o], [p + "res1"], name=p + "res1"),
            helper.make_node("LayerNormalization", [p + "res1", p + "ln1_g", p + "ln1_b"], [p + "ln1"],
                             name=p + "ln1", axis=-1, epsilon=1e-5),
        ]
        f1 = lin(p + "ln1", "w1", "b1", hidden, inter, p + "ff1")
        nodes += [
            helper.make_node("Mul", [f1, "inv_sqrt2"], [p + "g0"], name=p + "gelu_div"),
            helper.make_node("Erf", [p + "g0"], [p + "g1"], name=p + "gelu_erf"),
            helper.make_node("Add", [p + "g1", "one"], [p + "g2"], name=p + "gelu_add"),
            helper.make_node("Mul", [f1, p + "g2"], [p + "g3"], name=p + "gelu_mul"),
            helper.make_node("Mul", [p + "g3", "half"], [p + "gelu"], name=p + "gelu_half"),
        ]
        f2 = lin(p + "gelu", "w2", "b2", inter, hidden, p + "ff2")
        out = "y" if i == layers - 1 else p + "out"
        nodes += [
            helper.make_node("Add", [p + "ln1", f2], [p + "res2"], name=p + "res2"),
            helper.make_node("LayerNormalization", [p + "res2", p + "ln2_g", p + "ln2_b"], [out],
                             name=p + "ln2", axis=-1, epsilon=1e-5),
        ]
        x = out
    return make_model(nodes, [vi("x", [batch, seq, hidden])], [vi("y", [batch, seq, hidden])], inits)


def _feeds(proto: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for inp in proto.graph.input:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        out[inp.name] = rng.standard_normal(shape).astype(F)
    return out


def _compare(before, after, seed: int = 1):
    feeds = _feeds(before, seed)
    want = ort_run(before, feeds)
    got = ort_run(after, feeds)
    name = before.graph.output[0].name
    return want[name], got[name]


# ----------------------------------------------------------------------------------
# graph shape
# ----------------------------------------------------------------------------------
def test_mlp_fused_graph_shape():
    proto = mlp()
    _, result, after = apply(proto, "quantize-dynamic")
    onnx.checker.check_model(after)
    # the MatMul's bias Add goes into the kernel
    assert op_types(after) == ["DynamicQuantizeMatMul", "Relu", "DynamicQuantizeMatMul"]
    assert all(n.domain == "com.microsoft" for n in after.graph.node if n.op_type == "DynamicQuantizeMatMul")
    inits = {t.name: t for t in after.graph.initializer}
    fc1, fc2 = (n for n in after.graph.node if n.op_type == "DynamicQuantizeMatMul")
    assert inits[fc1.input[1]].data_type == TensorProto.INT8 and list(inits[fc1.input[1]].dims) == [64, 128]
    assert list(inits[fc1.input[2]].dims) == []  # per-tensor scale
    assert len(fc1.input) == 5 and fc1.output == ["h1"]  # x, w, scale, zero point 0, bias
    # Gemm transB=1: the weight is stored transposed [K, N]; beta*C is the bias input
    assert list(inits[fc2.input[1]].dims) == [128, 10] and len(fc2.input) == 5
    assert fc2.output == ["y"]
    assert result.records[0].stats == {"quantized": 2, "kept_float": 0, "weights": 2, "bias_absorbed": 1,
                                       "gathers": 0}
    assert "w1" not in inits and "w2" not in inits


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("weight_type", ["int8", "uint8"])
@pytest.mark.parametrize("fmt", ["fused", "onnx"])
def test_mlp_numbers(per_channel, weight_type, fmt):
    proto = mlp()
    pipeline = f"quantize-dynamic{{per-channel={str(per_channel).lower()},weight-type={weight_type},format={fmt}}}"
    _, _, after = apply(proto, pipeline)
    onnx.checker.check_model(after)
    inits = {t.name: t for t in after.graph.initializer}
    wnode = next(n for n in after.graph.node if n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger"))
    want_type = TensorProto.INT8 if weight_type == "int8" else TensorProto.UINT8
    assert inits[wnode.input[1]].data_type == want_type
    scale_name = wnode.input[2] if fmt == "fused" else next(
        n.input[1] for n in after.graph.node if n.op_type == "Mul" and n.name.endswith("_scales_mul"))
    assert list(inits[scale_name].dims) == ([128] if per_channel else [])
    if fmt == "onnx":
        assert "com.microsoft" not in {n.domain for n in after.graph.node}
        assert op_types(after).count("DynamicQuantizeLinear") == 2
    want, got = _compare(proto, after)
    assert cosine(want, got) >= 0.999
    assert np.abs(want - got).max() / np.abs(want).max() < 0.05


def test_bert_block_cosine():
    proto = bert_block()
    _, result, after = apply(proto, "quantize-dynamic")
    onnx.checker.check_model(after)
    ops = op_types(after)
    # 6 weight MatMuls per layer; the two attention MatMuls (activation x activation) stay float.
    # Q/K/V read one activation: it is quantized once and shared (MatMulIntegerToFloat).
    assert ops.count("DynamicQuantizeMatMul") == 6 and ops.count("MatMul") == 4
    assert ops.count("DynamicQuantizeLinear") == 2 and ops.count("MatMulIntegerToFloat") == 6
    assert {"Softmax", "LayerNormalization", "Erf"} <= set(ops)
    assert result.records[0].stats["bias_absorbed"] == 12
    want, got = _compare(proto, after)
    assert worst_cosine(want, got) >= 0.99


def embedding_model(vocab: int = 500, hidden: int = 32, seq: int = 12, seed: int = 0) -> onnx.ModelProto:
    """Token ids -> embedding table lookup -> MatMul."""
    rng = np.random.default_rng(seed)
    inits = {"table": rng.standard_normal((vocab, hidden)).astype(F),
             "w": (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(F)}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, seq])
    return make_model(nodes, [ids], [vi("y", [1, seq, hidden])], inits)


def test_embedding_table_is_int8_and_dequantized_after_the_lookup():
    proto = embedding_model()
    _, result, after = apply(proto, "quantize-dynamic")
    onnx.checker.check_model(after)
    assert op_types(after) == ["Gather", "DequantizeLinear", "DynamicQuantizeMatMul"]
    inits = {t.name: t for t in after.graph.initializer}
    gather, dq = after.graph.node[0], after.graph.node[1]
    assert inits[gather.input[0]].data_type == TensorProto.INT8 and list(inits[gather.input[0]].dims) == [500, 32]
    assert list(inits[dq.input[1]].dims) == [32]  # one scale per column
    assert helper.get_attribute_value(dq.attribute[0]) == -1 and dq.output == ["e"]
    assert result.records[0].stats["gathers"] == 1 and "table" not in inits
    ids = {"ids": np.random.default_rng(1).integers(0, 500, (1, 12)).astype(np.int64)}
    want, got = ort_run(proto, ids)["y"], ort_run(after, ids)["y"]
    assert worst_cosine(want, got) >= 0.999
    # ops= without Gather leaves the table in float
    _, _, kept = apply(proto, "quantize-dynamic{ops=MatMul}")
    assert op_types(kept) == ["Gather", "DynamicQuantizeMatMul"]


def test_shared_activation_quantized_once_in_onnx_format():
    proto = bert_block(layers=1)
    _, _, after = apply(proto, "quantize-dynamic{format=onnx}")
    ops = op_types(after)
    # x feeds Q, K, V: one DynamicQuantizeLinear; ctx, ln1 and gelu one each
    assert ops.count("DynamicQuantizeLinear") == 4 and ops.count("MatMulInteger") == 6
    want, got = _compare(proto, after)
    assert worst_cosine(want, got) >= 0.99


def test_exclusions():
    proto = bert_block(layers=1)
    _, result, after = apply(proto, 'quantize-dynamic{exclude-nodes=[l0_q_matmul],exclude-regex="ff2"}')
    names = {n.name: n.op_type for n in after.graph.node}
    assert names["l0_q_matmul"] == "MatMul" and names["l0_ff2_matmul"] == "MatMul"
    assert result.records[0].stats["quantized"] == 4
    _, result, after = apply(mlp(), "quantize-dynamic{ops=[MatMul]}")
    assert op_types(after)[-1] == "Gemm" and result.records[0].stats["quantized"] == 1
    _, result, after = apply(mlp(), "quantize-dynamic{exclude-ops=[MatMul]}")
    assert op_types(after)[0] == "MatMul" and result.records[0].stats["quantized"] == 1


def test_bias_add_not_absorbed_when_observed():
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((16, 8)).astype(F), "b": rng.standard_normal(8).astype(F)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    proto = make_model(nodes, [vi("x", [2, 16])], [vi("y", [2, 8]), vi("m", [2, 8])], inits)
    _, _, after = apply(proto, "quantize-dynamic")
    assert op_types(after) == ["DynamicQuantizeMatMul", "Add"]
    assert [o.name for o in after.graph.output] == ["y", "m"]


def test_keep_float_and_smoothing_hooks():
    """What later work (SmoothQuant, a fidelity budget) builds on: nodes kept
    in float and per-input-channel pre-scales, handed over in ctx.scratch."""
    from graphopt.passes.quantization.dynamic import SCRATCH_KEY, Smoothing

    proto = mlp()
    s = np.linspace(0.5, 2.0, 64).astype(F)
    ctx = PassContext()
    ctx.scratch[SCRATCH_KEY] = {"keep_float": {"fc2"}, "smoothing": {"fc1": Smoothing(s)}}
    _, result, after = apply(proto, "quantize-dynamic", ctx)
    assert op_types(after) == ["Mul", "DynamicQuantizeMatMul", "Relu", "Gemm"]
    assert result.records[0].stats["kept_float"] == 1
    want, got = _compare(proto, after)
    assert cosine(want, got) >= 0.999


def test_skips_with_notes():
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 5)).astype(F), "c": rng.standard_normal((3, 5)).astype(F)}
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="full_c"),
        helper.make_node("Gemm", ["x", "w"], ["y"], name="trans_a_not", transA=0),
        helper.make_node("Gemm", ["xt", "w"], ["z"], name="trans_a", transA=1),
    ]
    proto = make_model(nodes, [vi("x", [3, 4]), vi("xt", [4, 3])], [vi("g", [3, 5]), vi("y", [3, 5]), vi("z", [3, 5])],
                       inits)
    _, result, after = apply(proto, "quantize-dynamic")
    notes = result.records[0].notes
    assert any("full_c" in n and "bias C" in n for n in notes) and any("trans_a" in n and "transA" in n for n in notes)
    assert op_types(after) == ["Gemm", "DynamicQuantizeMatMul", "Gemm"]


def test_deterministic():
    proto = bert_block(layers=1)
    outs = [apply(proto, "quantize-dynamic{per-channel=true}")[2].SerializeToString(deterministic=True)
            for _ in range(2)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("pipeline,match", [
    ("quantize-dynamic{weight-type=int4}", "weight-type"),
    ("quantize-dynamic{ops=[Conv]}", "ops"),
    ('quantize-dynamic{exclude-regex="("}', "exclude-regex"),
    ("quantize-dynamic{format=qdq}", "format"),
])
def test_bad_options(pipeline, match):
    with pytest.raises(UsageError, match=match) as info:
        apply(mlp(), pipeline)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------
# LSTM -> com.microsoft.DynamicQuantizeLSTM
# ----------------------------------------------------------------------------------
def lstm_model(direction: str = "bidirectional", layout: int = 0, seq: int = 12, batch: int = 2, inp: int = 24,
               hidden: int = 32, seed: int = 0) -> onnx.ModelProto:
    """An LSTM with bias, initial states and all three outputs, then a MatMul head."""
    rng = np.random.default_rng(seed)
    d = 2 if direction == "bidirectional" else 1
    inits = {
        "W": (0.2 * rng.standard_normal((d, 4 * hidden, inp))).astype(F),
        "R": (0.2 * rng.standard_normal((d, 4 * hidden, hidden))).astype(F),
        "B": (0.1 * rng.standard_normal((d, 8 * hidden))).astype(F),
        "h0": (0.1 * rng.standard_normal((d, batch, hidden))).astype(F),
        "c0": (0.1 * rng.standard_normal((d, batch, hidden))).astype(F),
        "head": (0.2 * rng.standard_normal((hidden, 5))).astype(F),
    }
    x_shape = [batch, seq, inp] if layout else [seq, batch, inp]
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["Y", "Y_h", "Y_c"], name="lstm",
                         hidden_size=hidden, direction=direction, layout=layout),
        helper.make_node("MatMul", ["Y", "head"], ["logits"], name="head"),
    ]
    y_shape = [batch, seq, d, 5] if layout else [seq, d, batch, 5]
    state = [batch, d, hidden] if layout else [d, batch, hidden]
    return make_model(nodes, [vi("x", x_shape)],
                      [vi("logits", y_shape), vi("Y_h", state), vi("Y_c", state)], inits)


def _lstm_feeds(proto, seed=3):
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(F)}


@pytest.mark.parametrize("per_channel", [False, True])
def test_lstm_becomes_dynamic_quantize_lstm(per_channel, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = lstm_model()
    _, result, after = apply(proto, "quantize-dynamic{per-channel=%s}" % str(per_channel).lower())
    onnx.checker.check_model(after)
    assert result.records[0].stats["lstms"] == 1
    ops = {n.name: (n.op_type, n.domain) for n in after.graph.node}
    assert ops["lstm"] == ("DynamicQuantizeLSTM", "com.microsoft")
    inits = {t.name: t for t in after.graph.initializer}
    w = next(t for n, t in inits.items() if n.startswith("W_quantized"))
    scale = next(t for n, t in inits.items() if n.startswith("W_scale"))
    assert list(w.dims) == [2, 24, 128] and w.data_type == TensorProto.INT8  # [D, input, 4*hidden]
    assert list(scale.dims) == ([2, 128] if per_channel else [2])
    feeds = _lstm_feeds(proto)
    want, got = ort_run(proto, feeds), ort_run(after, feeds)
    for name in want:  # Y (through the head), Y_h, Y_c all close to float
        assert cosine(want[name], got[name]) > 0.999, name
    if not per_channel:  # the same rounding as onnxruntime's own quantize_dynamic
        src, ref = tmp_path / "f.onnx", tmp_path / "ort.onnx"
        onnx.save(proto, str(src))
        quantize_dynamic(str(src), str(ref), weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM"])
        theirs = ort_run(onnx.load(str(ref)), feeds)
        _, _, ours = apply(proto, "quantize-dynamic{ops=LSTM}")
        mine = ort_run(ours, feeds)
        for name in theirs:
            np.testing.assert_array_equal(mine[name], theirs[name])


def test_lstm_left_float_when_it_cannot_be_quantized():
    proto = lstm_model(direction="forward", layout=1)
    _, result, after = apply(proto, "quantize-dynamic")
    assert "LSTM" in op_types(after) and "DynamicQuantizeLSTM" not in op_types(after)
    assert any("layout=1" in n for n in result.records[0].notes)
    _, result, after = apply(lstm_model(), "quantize-dynamic{format=onnx}")
    assert "LSTM" in op_types(after)
    assert any("format=onnx has no quantized LSTM" in n for n in result.records[0].notes)


def test_lstm_under_a_budget_it_would_miss_stays_float():
    proto = lstm_model()
    data = PassContext(calibration=open_random(proto), quiet=True)
    _, result, after = apply(proto, 'quantize-dynamic{fidelity="max-abs<=1e-7",ops=LSTM}', data)
    rec = result.records[0]
    assert "LSTM" in op_types(after) and rec.stats["lstms"] == 0
    assert rec.stats["lstm_heldout"]["max-abs"] > 1e-7
    assert any("kept in float" in n and "misses" in n for n in rec.notes)
    data = PassContext(calibration=open_random(proto), quiet=True)
    _, result, after = apply(proto, 'quantize-dynamic{fidelity="cosine>=0.99",ops=LSTM}', data)
    assert "DynamicQuantizeLSTM" in op_types(after) and result.records[0].stats["lstms"] == 1


def open_random(proto, n=16):
    from graphopt.calibration import open_reader

    return open_reader(f"random:{n}", proto, seed=5, quiet=True)
