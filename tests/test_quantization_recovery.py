"""Accuracy recovery without training (passes/quantization/recovery.py):
SmoothQuant smoothing for quantize-dynamic, bias correction and cross-layer
equalization for quantize-static."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import apply, assert_same_outputs, make_model, op_types, ort_run, vi
from graphopt.calibration import open_reader
from graphopt.context import PassContext
from graphopt.errors import UsageError
from graphopt.ir import Model

F = np.float32
OUTLIERS = [3, 17, 40]


def _ctx(proto, n: int = 8, seed: int = 0) -> PassContext:
    return PassContext(calibration=open_reader(f"random:{n}", proto, seed=seed, quiet=True), quiet=True)


def _worst_cosine(a, b) -> float:
    a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
    b = np.asarray(b, np.float64).reshape(-1, b.shape[-1])
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)).min())


def pre_ln_block(hidden: int = 64, seq: int = 16, seed: int = 0, outlier: float = 40.0) -> onnx.ModelProto:
    """A pre-LayerNorm transformer block (as in GPT/OPT, SmoothQuant's case):
    LN1 -> Q/K/V (LN1's output read by nothing else), attention, output
    projection + residual, LN2 -> FF1 -> GELU -> FF2 + residual.  A few
    large gamma entries make outlier activation channels."""
    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {"inv_sqrt_d": np.array(1 / np.sqrt(hidden), F),
                                    "half": np.array(0.5, F), "one": np.array(1.0, F),
                                    "inv_sqrt2": np.array(1 / np.sqrt(2), F)}
    for name in ("ln1", "ln2"):
        g = (1 + 0.1 * rng.standard_normal(hidden)).astype(F)
        g[OUTLIERS] *= outlier
        inits[name + "_g"] = g
        inits[name + "_b"] = (0.1 * rng.standard_normal(hidden)).astype(F)
    nodes = [helper.make_node("LayerNormalization", ["x", "ln1_g", "ln1_b"], ["h1"], name="ln1", axis=-1)]

    def lin(inp, name, k, n):
        inits["w" + name] = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(F)
        inits["b" + name] = (0.02 * rng.standard_normal(n)).astype(F)
        nodes.append(helper.make_node("MatMul", [inp, "w" + name], [name + "_mm"], name=name + "_matmul"))
        nodes.append(helper.make_node("Add", [name + "_mm", "b" + name], [name], name=name + "_add"))
        return name

    q, k, v = (lin("h1", p, hidden, hidden) for p in "qkv")
    nodes += [
        helper.make_node("Transpose", [k], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", [q, "kt"], ["scores"], name="scores"),
        helper.make_node("Mul", ["scores", "inv_sqrt_d"], ["scaled"], name="scale"),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probs", v], ["ctx"], name="context"),
    ]
    o = lin("ctx", "o", hidden, hidden)
    nodes += [helper.make_node("Add", ["x", o], ["res1"], name="res1"),
              helper.make_node("LayerNormalization", ["res1", "ln2_g", "ln2_b"], ["h2"], name="ln2", axis=-1)]
    f1 = lin("h2", "f1", hidden, 2 * hidden)
    nodes += [
        helper.make_node("Mul", [f1, "inv_sqrt2"], ["g0"], name="gelu_div"),
        helper.make_node("Erf", ["g0"], ["g1"], name="gelu_erf"),
        helper.make_node("Add", ["g1", "one"], ["g2"], name="gelu_add"),
        helper.make_node("Mul", [f1, "g2"], ["g3"], name="gelu_mul"),
        helper.make_node("Mul", ["g3", "half"], ["gelu"], name="gelu_half"),
    ]
    f2 = lin("gelu", "f2", 2 * hidden, hidden)
    nodes.append(helper.make_node("Add", ["res1", f2], ["y"], name="res2"))
    return make_model(nodes, [vi("x", [1, seq, hidden])], [vi("y", [1, seq, hidden]), vi("q", [1, seq, hidden])],
                      inits)


def _feeds(seed: int = 7, seq: int = 16, hidden: int = 64):
    return {"x": np.random.default_rng(seed).standard_normal((1, seq, hidden)).astype(F)}


# ==================================================================================
# smoothing
# ==================================================================================
def test_smoothing_folding_is_exact_in_float():
    """Folding 1/s into LayerNorm/Mul and diag(s) into the weights, without
    quantizing, computes the same function."""
    from graphopt.passes.quantization.dynamic import find_sites, make_selection
    from graphopt.passes.quantization.recovery import apply_smoothing_float, plan_smoothing

    proto = pre_ln_block()
    for unfolded in (False, True):
        model = Model.from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
        sites = find_sites(model, make_selection("t", ["MatMul", "Gemm"], [], [], ""), [])
        data = open_reader("random:4", proto, seed=0, quiet=True)
        smoothing, counts = plan_smoothing(model, sites, data, 0.5, unfolded=unfolded)
        # Q/K/V share LN1: one scale for all three, folded; FF1 into LN2; the attention
        # context into V's columns; FF2 (the GELU's output) only with an inserted Mul
        assert counts["smoothed_folded"] == 3
        assert counts["smoothed"] == (6 if unfolded else 5) and counts["smoothed_mul"] == int(unfolded)
        s = smoothing["q_matmul"].scale
        assert smoothing["k_matmul"].scale is s and smoothing["v_matmul"].scale is s
        assert s[OUTLIERS].min() > np.delete(s, OUTLIERS).max()  # outlier channels get the largest scales
        assert apply_smoothing_float(model, sites, smoothing) == len(smoothing)
        after = model.to_proto()
        onnx.checker.check_model(after)
        assert_same_outputs(proto, after, rel=1e-5, feeds=_feeds())


def test_smoothing_raises_worst_token_cosine():
    proto = pre_ln_block()
    feeds = _feeds()
    want = ort_run(proto, feeds)
    scores = {}
    stats = {}
    for opt in ("", "smooth=true", "smooth=true,per-channel=true"):
        _, result, after = apply(proto, "quantize-dynamic{%s}" % opt, _ctx(proto))
        onnx.checker.check_model(after)
        got = ort_run(after, feeds)
        scores[opt] = min(_worst_cosine(want[n], got[n]) for n in want)
        stats[opt] = result.records[0].stats
        ops = op_types(after)
        # Q/K/V share one quantized activation; no Mul inserted: all folded
        assert ops.count("DynamicQuantizeMatMul") + ops.count("MatMulIntegerToFloat") == 6 and ops.count("Mul") == 4
    assert scores["smooth=true"] > scores[""], scores
    # Q, K, V and FF1; the context goes into V's columns only when they get a scale each
    assert stats["smooth=true"]["smoothed"] == 4 and stats["smooth=true"]["quantized"] == 6
    assert stats["smooth=true,per-channel=true"]["smoothed"] == 5


def test_smoothing_skips_unfoldable_and_inserts_mul_on_request():
    from test_quantize_dynamic import bert_block  # post-LN: the LN output also feeds the residual

    proto = bert_block(layers=1)
    _, result, after = apply(proto, "quantize-dynamic{smooth=true}", _ctx(proto))
    stats, notes = result.records[0].stats, result.records[0].notes
    assert stats["smoothed_mul"] == 0 and any("not smoothed" in n for n in notes)
    _, result, after2 = apply(proto, "quantize-dynamic{smooth=true,smooth-unfolded=true}", _ctx(proto))
    assert result.records[0].stats["smoothed_mul"] >= 3
    for a in (after, after2):
        onnx.checker.check_model(a)
        f = _feeds(seq=16)
        want, got = ort_run(proto, f)["y"], ort_run(a, f)["y"]
        assert _worst_cosine(want, got) >= 0.99


def test_smoothing_with_kept_float_consumer_stays_exact():
    """A site kept in float whose input had 1/s folded upstream gets diag(s) W."""
    from graphopt.passes.quantization.dynamic import SCRATCH_KEY

    proto = pre_ln_block()
    ctx = _ctx(proto)
    ctx.scratch[SCRATCH_KEY] = {"keep_float": {"q_matmul"}}
    _, result, after = apply(proto, "quantize-dynamic{smooth=true,per-channel=true}", ctx)
    # q keeps float: Q/K/V's LN is not shared consistently, so it is not smoothed; FF1 and
    # the context (into V's columns) are
    assert result.records[0].stats["smoothed"] == 2
    f = _feeds()
    assert _worst_cosine(ort_run(proto, f)["q"], ort_run(after, f)["q"]) > 0.99999


def test_smoothing_needs_calibration_and_is_deterministic():
    proto = pre_ln_block()
    with pytest.raises(UsageError, match="calib"):
        apply(proto, "quantize-dynamic{smooth=true}")
    outs = [apply(proto, "quantize-dynamic{smooth=true,per-channel=true}", _ctx(proto))[2]
            .SerializeToString(deterministic=True) for _ in range(2)]
    assert outs[0] == outs[1]
    with pytest.raises(UsageError, match="smooth-alpha"):
        apply(proto, "quantize-dynamic{smooth=true,smooth-alpha=1.5}", _ctx(proto))


# ==================================================================================
# bias correction
# ==================================================================================
def _cnn(with_bias: bool = False):
    rng = np.random.default_rng(3)
    inits = {"w1": (rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(F),
             "w2": (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(F),
             "wf": (rng.standard_normal((10, 8)) * 0.3).astype(F)}
    b1 = ["b1"] if with_bias else []
    if with_bias:
        inits["b1"] = (rng.standard_normal(8) * 0.1).astype(F)
    nodes = [
        helper.make_node("Conv", ["x", "w1", *b1], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["fl"], name="flat"),
        helper.make_node("Gemm", ["fl", "wf"], ["y"], transB=1, name="fc"),
    ]
    return make_model(nodes, [vi("x", [1, 3, 16, 16])], [vi("y", [1, 10])], inits)


def _errors(proto, after, n: int = 8):
    rng = np.random.default_rng(99)
    errs = []
    for _ in range(n):
        f = {"x": rng.standard_normal((1, 3, 16, 16)).astype(F)}
        errs.append(ort_run(after, f)["y"] - ort_run(proto, f)["y"])
    e = np.array(errs)
    return float(np.abs(e.mean(0)).mean()), float((e ** 2).mean())


def test_bias_correction_reduces_mean_error():
    proto = _cnn()
    results = {}
    for on in ("false", "true"):
        _, result, after = apply(proto, f"quantize-static{{per-channel=false,bias-correction={on}}}", _ctx(proto, 16))
        onnx.checker.check_model(after, full_check=True)
        results[on] = _errors(proto, after)
    stats = result.records[0].stats
    assert stats["bias_corrected"] == 3 and stats["bias_created"] == 3  # conv2, fc (and conv1) had no bias
    assert stats["biases"] == 3  # the new biases are int32 like original ones
    assert results["true"][0] < results["false"][0], results
    assert results["true"][1] < results["false"][1], results


def test_bias_correction_keeps_existing_bias_and_matmul_add():
    from graphopt.passes.quantization.recovery import correct_biases

    rng = np.random.default_rng(1)
    inits = {"w": rng.standard_normal((16, 8)).astype(F), "b": rng.standard_normal(8).astype(F)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    proto = make_model(nodes, [vi("x", [4, 16])], [vi("y", [4, 8])], inits)
    model = Model.from_proto(proto)
    node = model.graph.nodes[0]
    data = [{"x": (rng.standard_normal((4, 16)) + 1.0).astype(F)} for _ in range(4)]
    counts, created = correct_biases(model, [(node, 1, None)], data)
    assert counts == {"bias_corrected": 1, "bias_created": 0} and not created
    add = model.graph.nodes[1]
    new_b = np.asarray(add.inputs[1].values)
    assert add.inputs[1].name != "b" and not np.array_equal(new_b, inits["b"])
    assert np.abs(new_b - inits["b"]).max() < 0.1 * np.abs(inits["b"]).max()


# ==================================================================================
# cross-layer equalization
# ==================================================================================
def test_equalization_is_exact_and_equalizes_ranges():
    from graphopt.passes.quantization.recovery import equalize_conv_pairs

    proto = _cnn(with_bias=True)
    model = Model.from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    w = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    w1 = w["w1"].copy()
    w1[2] *= 20.0  # one channel with a much larger range
    for t in model.graph.nodes[0].inputs[1:2]:
        t.values = w1
    before = model.to_proto()
    assert equalize_conv_pairs(model) == 1
    after = model.to_proto()
    onnx.checker.check_model(after)
    assert_same_outputs(before, after, rel=1e-5)
    nw = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    r1 = np.abs(nw["w1_equalized"]).reshape(8, -1).max(1)
    r2 = np.abs(np.moveaxis(nw["w2_equalized"], 1, 0)).reshape(8, -1).max(1)
    np.testing.assert_allclose(r1, r2, rtol=1e-4)


def test_equalize_option_in_quantize_static():
    proto = _cnn(with_bias=True)
    _, result, after = apply(proto, "quantize-static{per-channel=false,equalize=true}", _ctx(proto, 16))
    onnx.checker.check_model(after, full_check=True)
    assert any("equalization: 1" in n for n in result.records[0].notes)
    assert _errors(proto, after)[1] < 1e-2
    outs = [apply(proto, "quantize-static{equalize=true}", _ctx(proto, 8))[2].SerializeToString(deterministic=True)
            for _ in range(2)]
    assert outs[0] == outs[1]
