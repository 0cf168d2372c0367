"""quantize-static: QDQ placement, parameter types, exclusions, calibration
methods, fidelity, determinism and the missing --calib error."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import apply, make_model, ort_run, vi
from graphopt.calibration import open_reader
from graphopt.context import PassContext
from graphopt.passes.quantization.common import (
    compute_scale_zero_point,
    dequantize_array,
    quantize_bias,
    quantize_weight,
    qrange,
)

F = np.float32


def _ctx(proto, n: int = 8, seed: int = 0) -> PassContext:
    return PassContext(calibration=open_reader(f"random:{n}", proto, seed=seed, quiet=True), quiet=True)


def _q(proto, options: str = "", n: int = 8):
    text = "quantize-static" + ("{" + options + "}" if options else "")
    return apply(proto, text, _ctx(proto, n))


def _inits(proto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _producer(proto, name):
    return next((n for n in proto.graph.node if name in n.output), None)


def _consumers(proto, name):
    return [n for n in proto.graph.node if name in n.input]


def _input_via_dq(proto, node, index=0) -> onnx.NodeProto | None:
    p = _producer(proto, node.input[index])
    return p if p is not None and p.op_type == "DequantizeLinear" else None


def _cos(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _conv_relu(rng=None, with_bias=True):
    rng = rng or np.random.default_rng(0)
    inits = {"w": (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(F)}
    ins = ["x", "w"]
    if with_bias:
        inits["b"] = (rng.standard_normal(4) * 0.1).astype(F)
        ins.append("b")
    nodes = [
        helper.make_node("Conv", ins, ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    inits["w2"] = (rng.standard_normal((2, 4, 1, 1)) * 0.3).astype(F)
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 2, 8, 8])], inits)


# ==================================================================================
# common.py math
# ==================================================================================
def test_scale_zero_point_conventions():
    s, z = compute_scale_zero_point(-1.0, 3.0, "uint8")
    assert s.dtype == np.float32 and z.dtype == np.uint8 and s.shape == ()
    assert np.isclose(s, 4 / 255) and z == 64
    s, z = compute_scale_zero_point(0.5, 2.0, "uint8")  # widened to include 0
    assert z == 0 and np.isclose(s, 2 / 255)
    s, z = compute_scale_zero_point(np.array([-1.0, -4.0]), np.array([2.0, 1.0]), "int8", symmetric=True)
    assert z.dtype == np.int8 and list(z) == [0, 0] and np.allclose(s, [2 / 127, 4 / 127])
    s, z = compute_scale_zero_point(0.0, 0.0, "int8")  # degenerate
    assert s == 1.0 and z == 0
    assert qrange("int8", symmetric=True) == (-127, 127) and qrange("uint8", reduce_range=True) == (0, 127)


def test_quantize_weight_per_channel_and_bias():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 3, 3)).astype(F) * np.arange(1, 7, dtype=F)[:, None, None, None]
    qt = quantize_weight(w, "int8", symmetric=True, axis=0)
    assert qt.values.dtype == np.int8 and qt.scale.shape == (6,) and np.all(qt.zero_point == 0)
    assert np.abs(qt.values).max() <= 127
    assert np.abs(qt.dequantize() - w).max() <= qt.scale.max() / 2 + 1e-6
    qb = quantize_bias(np.ones(6, F), np.float32(0.1), qt.scale)
    assert qb.values.dtype == np.int32 and qb.axis == 0 and np.allclose(qb.scale, 0.1 * qt.scale)
    assert np.all(np.abs(dequantize_array(qb.values, qb.scale, qb.zero_point, 0) - 1.0) <= qb.scale / 2 + 1e-7)


# ==================================================================================
# placement
# ==================================================================================
def test_conv_relu_placement_and_types():
    proto = _conv_relu()
    _, result, after = _q(proto)
    onnx.checker.check_model(after, full_check=True)
    ops = [n.op_type for n in after.graph.node]
    assert "Relu" not in ops  # absorbed into conv's output range
    assert ops.count("Conv") == 2
    inits = _inits(after)
    conv = next(n for n in after.graph.node if n.name == "conv")
    # activation input: Q -> DQ with uint8 scalar parameters
    dq_x = _input_via_dq(after, conv, 0)
    q_x = _producer(after, dq_x.input[0])
    assert q_x.op_type == "QuantizeLinear" and q_x.input[0] == "x"
    assert inits[dq_x.input[1]].dtype == np.float32 and inits[dq_x.input[1]].shape == ()
    assert inits[dq_x.input[2]].dtype == np.uint8
    # weight: int8 initializer, per-channel along axis 0, symmetric
    dq_w = _input_via_dq(after, conv, 1)
    assert inits[dq_w.input[0]].dtype == np.int8
    assert inits[dq_w.input[1]].shape == (4,) and np.all(inits[dq_w.input[2]] == 0)
    assert next(a.i for a in dq_w.attribute if a.name == "axis") == 0
    # bias: int32, scale = input scale * weight scale
    dq_b = _input_via_dq(after, conv, 2)
    assert inits[dq_b.input[0]].dtype == np.int32
    assert np.allclose(inits[dq_b.input[1]], inits[dq_x.input[1]] * inits[dq_w.input[1]])
    # conv's output (now the Relu's tensor "r") is quantized with zero point at qmin
    q_r = _consumers(after, conv.output[0])
    assert conv.output[0] == "r" and [n.op_type for n in q_r] == ["QuantizeLinear"]
    assert inits[q_r[0].input[2]] == 0
    # graph output keeps its name and is the DQ of the last conv's quantized output
    assert after.graph.output[0].name == "y" and _producer(after, "y").op_type == "DequantizeLinear"
    assert result.records[0].stats["fused_activations"] == 1


def test_gemm_and_matmul_weight_axes():
    rng = np.random.default_rng(1)
    inits = {"wg": rng.standard_normal((5, 4)).astype(F), "bg": rng.standard_normal(5).astype(F),
             "wm": rng.standard_normal((5, 6)).astype(F)}
    nodes = [helper.make_node("Gemm", ["x", "wg", "bg"], ["g"], transB=1, name="gemm"),
             helper.make_node("MatMul", ["g", "wm"], ["y"], name="mm")]
    proto = make_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 6])], inits)
    _, _, after = _q(proto)
    onnx.checker.check_model(after)
    inits = _inits(after)
    by_name = {n.name: n for n in after.graph.node}
    dq_g = _input_via_dq(after, by_name["gemm"], 1)
    assert next(a.i for a in dq_g.attribute if a.name == "axis") == 0 and inits[dq_g.input[1]].shape == (5,)
    assert inits[_input_via_dq(after, by_name["gemm"], 2).input[0]].dtype == np.int32
    dq_m = _input_via_dq(after, by_name["mm"], 1)
    assert next(a.i for a in dq_m.attribute if a.name == "axis") == 1 and inits[dq_m.input[1]].shape == (6,)
    assert _input_via_dq(after, by_name["mm"], 0) is not None
    _, _, per_tensor = _q(proto, "per-channel=false,weight-type=uint8")
    inits = _inits(per_tensor)
    mm = next(n for n in per_tensor.graph.node if n.name == "mm")
    dq = _input_via_dq(per_tensor, mm, 1)
    assert inits[dq.input[0]].dtype == np.uint8 and inits[dq.input[1]].shape == () and inits[dq.input[2]] == 128


def test_add_concat_passthrough_and_softmax():
    """Placement inside a network (float-tails off: here all of it is the output's tail)."""
    rng = np.random.default_rng(2)
    inits = {"w": (rng.standard_normal((4, 3, 1, 1)) * 0.5).astype(F), "shape": np.array([1, -1], np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Add", ["c", "x2"], ["a"], name="add"),
        helper.make_node("Concat", ["a", "c"], ["cat"], axis=1, name="cat"),
        helper.make_node("Reshape", ["cat", "shape"], ["flat"], name="reshape"),
        helper.make_node("Softmax", ["flat"], ["y"], name="softmax"),
    ]
    proto = make_model(nodes, [vi("x", [1, 3, 4, 4]), vi("x2", [1, 4, 4, 4])], [vi("y", [1, 128])], inits)
    _, _, after = _q(proto, "float-tails=false")
    onnx.checker.check_model(after)
    inits = _inits(after)
    by_name = {n.name: n for n in after.graph.node}
    assert all(_input_via_dq(after, by_name["add"], i) for i in (0, 1))
    assert all(_input_via_dq(after, by_name["cat"], i) for i in (0, 1))
    # Reshape's output reuses its input's scale and zero point
    dq_in = _input_via_dq(after, by_name["reshape"], 0)
    dq_out = _input_via_dq(after, by_name["softmax"], 0)
    assert dq_out is not None
    assert inits[dq_in.input[1]] == inits[dq_out.input[1]] and inits[dq_in.input[2]] == inits[dq_out.input[2]]
    # Softmax stays float: its output is not quantized
    assert _producer(after, "y").op_type == "Softmax"
    # unless asked
    _, _, soft = _q(proto, "float-tails=false,keep-float=[],ops=[Conv,Add,Concat,Reshape,Softmax]")
    assert _producer(soft, "y").op_type == "DequantizeLinear"


def test_decode_tail_after_the_last_convolutions_stays_float():
    """A detector head: box and score convolutions, sigmoid on the scores, boxes
    (pixels) concatenated with scores (0..1).  The convolutions stay integer
    (their outputs quantized, each at its own scale); the sigmoid and the
    concatenation of mixed scales stay float.  The Add between trunk
    convolutions feeds a weighted op, so it is trunk and quantized."""
    rng = np.random.default_rng(4)
    w = lambda *s: (rng.standard_normal(s) * 0.5).astype(F)  # noqa: E731
    inits = {"w0": w(8, 3, 3, 3), "w1": w(8, 8, 1, 1), "wb": w(4, 8, 1, 1), "ws": w(2, 8, 1, 1),
             "scale": np.array(32.0, F)}
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["t0"], name="trunk0", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["t0", "w1"], ["t1"], name="trunk1"),
        helper.make_node("Add", ["t0", "t1"], ["t"], name="residual"),
        helper.make_node("Conv", ["t", "wb"], ["b"], name="boxes"),
        helper.make_node("Mul", ["b", "scale"], ["px"], name="to_pixels"),
        helper.make_node("Conv", ["t", "ws"], ["s"], name="scores"),
        helper.make_node("Sigmoid", ["s"], ["p"], name="sigmoid"),
        helper.make_node("Concat", ["px", "p"], ["y"], axis=1, name="cat"),
    ]
    proto = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 6, 8, 8])], inits)
    _, result, after = _q(proto)
    stats = result.records[0].stats
    by_name = {n.name: n for n in after.graph.node}
    assert stats["float_tail_nodes"] == 3
    for name in ("to_pixels", "sigmoid"):  # float results, read as they are
        readers = [n.op_type for n in after.graph.node if by_name[name].output[0] in n.input]
        assert readers == ["Concat"], (name, readers)
    assert _producer(after, "y").op_type == "Concat"
    assert all(_input_via_dq(after, by_name["residual"], i) for i in (0, 1))
    for conv in ("boxes", "scores"):
        (reader,) = [n for n in after.graph.node if by_name[conv].output[0] in n.input]
        assert reader.op_type == "QuantizeLinear"  # the convolution itself stays integer
    off = _q(proto, "float-tails=false")[1].records[0].stats
    assert "float_tail_nodes" not in off and off["quantized_nodes"] > stats["quantized_nodes"]


@pytest.mark.parametrize("option,excluded", [
    ("exclude-nodes=[conv2]", "conv2"),
    ("exclude-ops=[Conv]", None),
    ('exclude-regex="^conv2$"', "conv2"),
])
def test_exclusions(option, excluded):
    proto = _conv_relu()
    _, _, after = _q(proto, option)
    onnx.checker.check_model(after)
    convs = [n for n in after.graph.node if n.op_type == "Conv"]
    for conv in convs:
        quantized_weight = _input_via_dq(after, conv, 1) is not None
        if excluded is None or conv.name == excluded:
            assert not quantized_weight, conv.name
        else:
            assert quantized_weight, conv.name


def test_ops_option_limits_quantized_types():
    rng = np.random.default_rng(3)
    inits = {"w": rng.standard_normal((3, 3)).astype(F)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Add", ["m", "x"], ["y"], name="add")]
    proto = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], inits)
    _, _, after = _q(proto, "float-tails=false,ops=[Add]")  # the Add is the output's tail otherwise
    mm = next(n for n in after.graph.node if n.name == "mm")
    assert _input_via_dq(after, mm, 1) is None
    add = next(n for n in after.graph.node if n.name == "add")
    assert _input_via_dq(after, add, 0) is not None


# ==================================================================================
# calibration and fidelity
# ==================================================================================
def _small_cnn():
    rng = np.random.default_rng(4)
    inits = {
        "w1": (rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(F), "b1": (rng.standard_normal(8) * 0.1).astype(F),
        "w2": (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(F), "b2": (rng.standard_normal(8) * 0.1).astype(F),
        "wf": (rng.standard_normal((10, 16)) * 0.3).astype(F), "bf": (rng.standard_normal(10) * 0.1).astype(F),
        "lo": np.array(0, F), "hi": np.array(6, F),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="clip2"),
        helper.make_node("Add", ["r1", "r2"], ["a"], name="add"),
        helper.make_node("Concat", ["a", "r1"], ["cat"], axis=1, name="concat"),
        helper.make_node("MaxPool", ["cat"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("GlobalAveragePool", ["mp"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["fl"], name="flat"),
        helper.make_node("Gemm", ["fl", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    return make_model(nodes, [vi("x", [1, 3, 16, 16])], [vi("y", [1, 10])], inits)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_calibration_methods_give_valid_ranges_and_fidelity(method):
    proto = _small_cnn()
    _, result, after = _q(proto, f"method={method}", n=16)
    onnx.checker.check_model(after, full_check=True)
    stats = result.records[0].stats
    assert stats["method"] == method and stats["samples"] == 16 and stats["quantized_nodes"] >= 7
    inits = _inits(after)
    for node in after.graph.node:
        if node.op_type == "QuantizeLinear":
            scale = inits[node.input[1]]
            assert np.all(np.isfinite(scale)) and np.all(scale > 0) and inits[node.input[2]].dtype == np.uint8
    rng = np.random.default_rng(99)  # held-out inputs, same distribution as random:N
    cos = [_cos(ort_run(proto, f)["y"], ort_run(after, f)["y"])
           for f in ({"x": rng.standard_normal((1, 3, 16, 16)).astype(F)} for _ in range(4))]
    assert min(cos) >= 0.99, cos


def test_int8_activations_and_symmetric():
    proto = _small_cnn()
    _, result, after = _q(proto, "activation-type=int8,symmetric-activations=true")
    onnx.checker.check_model(after)
    inits = _inits(after)
    zps = [inits[n.input[2]] for n in after.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.int8 and z == 0 for z in zps)
    assert result.records[0].stats["fused_activations"] == 0  # symmetric ranges cannot clamp at 0
    assert "Relu" in [n.op_type for n in after.graph.node]
    f = {"x": np.random.default_rng(5).standard_normal((1, 3, 16, 16)).astype(F)}
    assert _cos(ort_run(proto, f)["y"], ort_run(after, f)["y"]) >= 0.98


def test_opset12_is_upgraded_for_per_channel():
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    proto = make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 3, 4, 4])],
                       {"w": rng.standard_normal((3, 2, 1, 1)).astype(F)}, opset=12)
    _, result, after = _q(proto)
    onnx.checker.check_model(after)
    assert next(o.version for o in after.opset_import if o.domain == "") == 13
    assert any("upgraded" in n for n in result.records[0].notes)
    _, result, kept = _q(proto, "upgrade-opset=false")
    assert next(o.version for o in kept.opset_import if o.domain == "") == 12
    dq = _input_via_dq(kept, next(n for n in kept.graph.node if n.op_type == "Conv"), 1)
    assert _inits(kept)[dq.input[1]].shape == () and not any(a.name == "axis" for a in dq.attribute)


def test_opset9_has_no_quantizelinear_and_is_upgraded():
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    proto = make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 3, 4, 4])],
                       {"w": rng.standard_normal((3, 2, 1, 1)).astype(F)}, opset=9)
    _, result, after = _q(proto)
    onnx.checker.check_model(after)
    assert next(o.version for o in after.opset_import if o.domain == "") == 13
    assert "QuantizeLinear" in [n.op_type for n in after.graph.node]
    _, result, kept = _q(proto, "upgrade-opset=false")
    assert not result.changed and "could not be upgraded" in result.records[0].notes[0]
    f = {"x": rng.standard_normal((1, 2, 4, 4)).astype(F)}
    assert _cos(ort_run(proto, f)["y"], ort_run(after, f)["y"]) >= 0.99


def test_deterministic():
    proto = _small_cnn()
    outs = [_q(proto, "method=entropy")[2].SerializeToString(deterministic=True) for _ in range(2)]
    assert outs[0] == outs[1]


# ==================================================================================
# command line
# ==================================================================================
def test_missing_calib_is_one_line_usage_error(tmp_path, capsys):
    from graphopt import cli

    path = tmp_path / "m.onnx"
    onnx.save(_conv_relu(), path)
    rc = cli.main(["opt", str(path), "-o", str(tmp_path / "o.onnx"), "-p", "quantize-static"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "quantize-static" in err and "--calib" in err
    assert not (tmp_path / "o.onnx").exists()


def test_cli_with_calib_runs_in_onnxruntime(tmp_path):
    from graphopt import cli

    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    proto = _small_cnn()
    onnx.save(proto, path)
    rng = np.random.default_rng(7)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 1, 3, 16, 16)).astype(F))
    rc = cli.main(["opt", str(path), "-o", str(out), "-p", "quantize-static{method=mse}",
                   "--calib", str(tmp_path / "calib.npz"), "-q"])
    assert rc == 0
    after = onnx.load(out)
    onnx.checker.check_model(after, full_check=True)
    f = {"x": rng.standard_normal((1, 3, 16, 16)).astype(F)}
    assert _cos(ort_run(proto, f)["y"], ort_run(after, f)["y"]) >= 0.99
