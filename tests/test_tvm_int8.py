"""graphopt.backends.tvm.int8.lower_qdq: QDQ models from quantize-static become int8 x
int8 -> int32 kernels with requantization, matching onnxruntime on the same
QDQ model to within one quantization step."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import apply, make_model, vi
from graphopt.calibration import open_reader
from graphopt.context import PassContext

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from graphopt.backends.tvm.int8 import lower_qdq  # noqa: E402

F = np.float32


def _cnn(group: int = 1, relu: str = "Relu") -> onnx.ModelProto:
    """Conv(+bias, padded, strided)+activation -> Conv(grouped) -> Reshape -> Gemm."""
    rng = np.random.default_rng(0)
    inits = {
        "w": (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(F),
        "b": (rng.standard_normal(8) * 0.1).astype(F),
        "w2": (rng.standard_normal((8, 8 // group, 3, 3)) * 0.3).astype(F),
        "gw": (rng.standard_normal((8 * 4 * 4, 10)) * 0.1).astype(F),
        "gb": (rng.standard_normal(10) * 0.1).astype(F),
        "shape": np.array([1, -1], np.int64),
    }
    act = helper.make_node(relu, ["c"], ["r"]) if relu == "Relu" else \
        helper.make_node("Clip", ["c", "lo", "hi"], ["r"])
    if relu == "Clip":
        inits["lo"], inits["hi"] = np.array(0.0, F), np.array(6.0, F)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        act,
        helper.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1, 1, 1], group=group),
        helper.make_node("Reshape", ["c2", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["y"]),
    ]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 10])], inits)


def _qdq(proto: onnx.ModelProto, options: str = "") -> onnx.ModelProto:
    ctx = PassContext(calibration=open_reader("random:16", proto, seed=0, quiet=True), quiet=True)
    text = "quantize-static" + ("{" + options + "}" if options else "")
    return apply(proto, text, ctx)[2]


def _run_tvm(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, target="llvm")
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def _run_ort(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the QDQ reference semantics
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _output_scale(proto: onnx.ModelProto) -> float:
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    dq = next(n for n in proto.graph.node if n.output[0] == proto.graph.output[0].name)
    assert dq.op_type == "DequantizeLinear"
    return float(inits[dq.input[1]])


def _calls(mod: tvm.IRModule, op: str) -> list:
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", None) == op:
            found.append(e)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


def _steps(proto: onnx.ModelProto, mod: tvm.IRModule, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((1, 3, 8, 8)).astype(F)
    return np.abs(_run_tvm(mod, x).astype(np.float64) - _run_ort(proto, x)) / _output_scale(proto)


@pytest.mark.parametrize("options,group,act", [
    ("", 1, "Relu"),                                  # uint8 activations, zero point != 0, padded convs
    ("activation-type=int8", 1, "Relu"),              # int8 activations
    ("symmetric-activations=true", 1, "Relu"),        # Relu kept as a node between Conv and Q
    ("", 4, "Clip"),                                  # grouped conv, Clip(0, 6) absorbed into the range
])
def test_lowered_kernels_are_integer_and_match_onnxruntime(options, group, act):
    qdq = _qdq(_cnn(group, act), options)
    assert [n.op_type for n in qdq.graph.node].count("DequantizeLinear") >= 6
    before = from_onnx(qdq)
    assert all(str(c.ty.dtype) == "float32" for c in _calls(before, "relax.nn.conv2d"))

    mod, stats = lower_qdq(before)

    assert stats["rewritten"] == {"conv2d": 2, "matmul": 1}
    assert stats["left_float"] == {} and stats["float_kernels"] == {}
    convs = _calls(mod, "relax.nn.conv2d")
    assert len(convs) == 2
    for conv in convs:
        assert str(conv.ty.dtype) == "int32"
        assert str(conv.args[0].ty.dtype) in ("uint8", "int8") and str(conv.args[1].ty.dtype) == "int8"
    (mm,) = _calls(mod, "relax.matmul")
    assert str(mm.ty.dtype) == "int32"
    steps = _steps(qdq, mod)
    assert steps.max() <= 1.0 + 1e-6, f"{steps.max()} quantization steps"
    assert (steps > 0.5).mean() <= 0.1


def test_zero_point_padding_is_explicit():
    """The input's uint8 zero point is nonzero, so the first conv pads with it
    explicitly; the second reads a Relu output (zero point 0) and keeps its padding."""
    qdq = _qdq(_cnn())
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    zx = int(inits["x_zero_point"])
    assert zx != 0
    mod, _ = lower_qdq(from_onnx(qdq))
    (pad,) = _calls(mod, "relax.nn.pad")
    assert float(pad.attrs.pad_value) == zx
    paddings = sorted(list(map(int, c.attrs.padding)) for c in _calls(mod, "relax.nn.conv2d"))
    assert paddings == [[0, 0, 0, 0], [1, 1, 1, 1]]


def test_activation_times_activation_stays_float():
    """MatMul of two activations: the 'weight' is not a constant, so no int8 kernel;
    the reason is in the stats and the numbers still match."""
    rng = np.random.default_rng(0)
    inits = {"w": (rng.standard_normal((8, 8)) * 0.3).astype(F)}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("MatMul", ["a", "x2"], ["y"]),
    ]
    proto = make_model(nodes, [vi("x", [1, 3, 8, 8]), vi("x2", [1, 3, 8, 8])], [vi("y", [1, 3, 8, 8])], inits)
    qdq = _qdq(proto)
    mod, stats = lower_qdq(from_onnx(qdq))
    assert stats["rewritten"] == {"matmul": 1}
    assert stats["left_float"] == {"weight is not constant": 1}
    assert stats["float_kernels"] == {"matmul": 1}
    xs = [np.random.default_rng(s).standard_normal((1, 3, 8, 8)).astype(F) for s in (1, 2)]
    ex = tvm.compile(mod, target="llvm")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](*map(tvm.runtime.tensor, xs)).numpy()
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(qdq.SerializeToString(), so).run(None, {"x": xs[0], "x2": xs[1]})[0]
    steps = np.abs(got - want) / _output_scale(qdq)
    assert steps.max() <= 1.0 + 1e-6


def test_float_model_is_left_alone():
    proto = _cnn()
    mod, stats = lower_qdq(from_onnx(proto))
    assert stats["rewritten"] == {} and stats["passthrough"] == 0
    assert stats["float_kernels"] == {"conv2d": 2, "matmul": 1}
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(F)
    np.testing.assert_allclose(_run_tvm(mod, x), _run_ort(proto, x), rtol=1e-4, atol=1e-5)


def _residual_cnn() -> onnx.ModelProto:
    """An RGB stem, a 3x3 with 24 output channels (not whole vectors), a 1x1
    back to 32 with a residual add, a strided 3x3: the int8 template's cases."""
    rng = np.random.default_rng(3)
    w = lambda *s: (rng.standard_normal(s) * 0.3).astype(F)  # noqa: E731
    inits = {"w0": w(32, 3, 3, 3), "b0": w(32), "w1": w(24, 32, 3, 3), "b1": w(24), "w2": w(32, 24, 1, 1),
             "b2": w(32), "w3": w(16, 32, 3, 3), "b3": w(16)}
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
             helper.make_node("Add", ["c2", "r0"], ["s"]),
             helper.make_node("Relu", ["s"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], pads=[0, 1, 1, 0], strides=[2, 2])]
    return make_model(nodes, [vi("x", [1, 3, 13, 11])], [vi("y", [1, 16, 6, 5])], inits)


def test_compiled_qdq_model_runs_on_dot_product_kernels(tmp_path):
    """``graphopt compile`` of a QDQ model: integer kernels on VNNI lanes
    (the manifest says what was rewritten), within one step of onnxruntime."""
    import json

    from graphopt import backends
    from graphopt.backends import CompileOptions
    from graphopt.backends.tvm import schedule
    from graphopt.backends.tvm.cpu.target import int8_dot
    from graphopt.backends.tvm.targets import host_arch, host_llvm

    if host_arch() != "x86_64" or int8_dot(tvm.target.Target(host_llvm())) is None:
        pytest.skip("this CPU has no AVX-512 VNNI")
    qdq = _qdq(_residual_cnn())
    onnx.save(qdq, tmp_path / "q.onnx")
    out = backends.compile_model(tmp_path / "q.onnx", tmp_path / "art", backend="tvm", target="x86_64",
                                 options=CompileOptions())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["int8"]["rewritten"] == {"conv2d": 4}
    x = np.random.default_rng(1).standard_normal((1, 3, 13, 11)).astype(F)
    got = backends.load_runner(out)({"x": x})["y"]
    steps = np.abs(got - _run_ort(qdq, x)) / _output_scale(qdq)
    assert steps.max() <= 1.0 + 1e-6

    target = schedule._normalized_target(tvm.target.Target(host_llvm()))
    mod, _ = lower_qdq(schedule.bind_params(from_onnx(qdq, shape_dict={"x": [1, 3, 13, 11]})))
    kernels = schedule.default_schedule(schedule.lower_to_kernels(mod, target), target)
    int8 = [f.script() for gv, f in kernels.functions_items() if "conv2d_nchwc_int8" in gv.name_hint]
    assert len(int8) == 4 and all("vpdpbusd" in s for s in int8)


_ARM = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
_X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}


def _kernels(qdq: onnx.ModelProto, target: dict) -> tuple[tvm.IRModule, tvm.IRModule, list[str]]:
    """The module planned and legalized for ``target``, the same scheduled,
    and the scripts of its scheduled int8 (dot-product) convolutions."""
    from graphopt.backends.tvm import schedule

    target = schedule._normalized_target(tvm.target.Target(target))
    mod, _ = lower_qdq(schedule.bind_params(from_onnx(qdq, shape_dict={"x": [1, 3, 13, 11]})))
    lowered = schedule.lower_to_kernels(mod, target)
    # scheduling may rewrite the module it is given in place: give it a copy
    scheduled = schedule.default_schedule(tvm.IRModule(dict(lowered.functions_items())), target)
    return lowered, scheduled, [f.script() for gv, f in scheduled.functions_items()
                                if "conv2d_nchwc_int8" in gv.name_hint]


def _steps_on_host(qdq: onnx.ModelProto, mod: tvm.IRModule, target: dict | str = "llvm") -> float:
    """Quantization steps between ``mod`` built for ``target`` and run here, and onnxruntime."""
    ex = tvm.compile(mod, target=tvm.target.Target(target))
    x = np.random.default_rng(1).standard_normal((1, 3, 13, 11)).astype(F)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    return float((np.abs(got - _run_ort(qdq, x)) / _output_scale(qdq)).max())


def _host_has(*features: str) -> bool:
    from graphopt.backends.tvm.cpu.target import cpu_features
    from graphopt.backends.tvm.targets import host_arch, host_llvm

    return host_arch() == "x86_64" and set(features) <= cpu_features(tvm.target.Target(host_llvm()))


@pytest.mark.parametrize("mattr,instruction,data", [
    (["+neon", "+dotprod"], "llvm.aarch64.neon.sdot", "int8"),
    (["+neon", "+dotprod", "+i8mm"], "llvm.aarch64.neon.usdot", "uint8"),
])
def test_arm_dot_product_kernels_compute_the_integers_onnxruntime_does(mattr, instruction, data):
    """AArch64 int8 convolutions run on ``sdot`` (dotprod: signed bytes only,
    so the uint8 activations are shifted by -128, padded with -128, and
    128 * sum(W) is added back) or ``usdot`` (i8mm: uint8 x int8 as they
    are).  The planned module's integer arithmetic, run here on this
    machine's CPU, is onnxruntime's to the quantization step."""
    qdq = _qdq(_residual_cnn())
    lowered, _, int8 = _kernels(qdq, {**_ARM, "mattr": mattr})
    assert len(int8) == 4
    assert all(f'"{instruction}"' in s and f'T.reinterpret("{data}x16"' in s for s in int8)
    if data == "int8":
        tir = "".join(f.script() for _, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
        assert "T.int8(-128)" in tir, "a zero-point-0 activation must pad with -128 once shifted"
    assert _steps_on_host(qdq, lowered) <= 1.0 + 1e-6


def test_avx2_runs_seven_bit_weights_on_vpmaddubsw_and_the_rest_in_float():
    """AVX2 without VNNI: ``vpmaddubsw`` sums byte pairs in a saturating
    int16, so only convolutions whose weights cannot saturate run on it
    (``reduce-range=true`` quantizes weights to 7 bits); 8-bit weights run
    as exact small integers on the float templates.  Both give onnxruntime's
    numbers."""
    haswell = {**_X86, "mcpu": "haswell"}
    seven = _qdq(_residual_cnn(), "reduce-range=true")
    _, scheduled, int8 = _kernels(seven, haswell)
    assert len(int8) == 4 and all('"llvm.x86.avx2.pmadd.ub.sw"' in s for s in int8)
    eight = _qdq(_residual_cnn())
    _, scheduled8, int8 = _kernels(eight, haswell)
    assert int8 == []
    floats = [gv.name_hint for gv, f in scheduled8.functions_items() if "conv2d_nchwc" in gv.name_hint]
    assert len(floats) == 4, floats
    if not _host_has("avx2", "fma"):
        pytest.skip("this CPU cannot run AVX2 code")
    assert _steps_on_host(seven, scheduled, haswell) <= 1.0 + 1e-6
    assert _steps_on_host(eight, scheduled8, haswell) <= 1.0 + 1e-6


def test_avx_vnni_runs_int8_on_256_bit_vpdpbusd():
    lowered, scheduled, int8 = _kernels(_qdq(_residual_cnn()), {**_X86, "mcpu": "alderlake"})
    assert len(int8) == 4 and all('"llvm.x86.avx512.vpdpbusd.256"' in s for s in int8)
    if not _host_has("avx2", "avxvnni"):
        pytest.skip("this CPU has no AVX-VNNI")
    assert _steps_on_host(_qdq(_residual_cnn()), scheduled, {**_X86, "mcpu": "alderlake"}) <= 1.0 + 1e-6


@pytest.mark.parametrize("rows,compute", [(16, "float32"), (1, "int32")])
def test_int8_matmul_by_a_constant_runs_on_the_float_template(rows, compute):
    """No int8 matmul template: the product of a uint8 activation and an int8
    constant is computed in float (exact small integers) and cast back,
    except for a single row, which reads each weight once and is bound by
    its bytes (int8: a quarter of float's).  The numbers stay onnxruntime's."""
    from graphopt.backends.tvm.cpu.matmul import plan_matmuls

    rng = np.random.default_rng(0)
    inits = {"w": (rng.standard_normal((32, 24)) * 0.3).astype(F), "b": (rng.standard_normal(24) * 0.1).astype(F)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    # float-tails=false: the bias Add is the output's tail, which would leave the matmul without requantization
    qdq = _qdq(make_model(nodes, [vi("x", [rows, 32])], [vi("y", [rows, 24])], inits), "float-tails=false")
    mod, stats = lower_qdq(from_onnx(qdq))
    assert stats["rewritten"] == {"matmul": 1}
    planned = plan_matmuls(mod, 16)
    (mm,) = _calls(planned, "relax.matmul")
    assert str(mm.ty.dtype) == compute
    x = np.random.default_rng(1).standard_normal((rows, 32)).astype(F)
    steps = np.abs(_run_tvm(planned, x) - _run_ort(qdq, x)) / _output_scale(qdq)
    assert steps.max() <= 1.0 + 1e-6


def test_byte_pairs_fit_int16_up_to_128_per_sign():
    from graphopt.backends.tvm.cpu.intrinsics import pairs_fit_int16

    w = np.zeros((2, 4, 1, 1), np.int8)
    w[0, 0, 0, 0], w[0, 1, 0, 0] = 100, 28      # 255 * 128 = 32640 fits
    w[1, 2, 0, 0], w[1, 3, 0, 0] = -64, -64
    assert pairs_fit_int16(w)
    w[0, 1, 0, 0] = 29                            # 255 * 129 overflows
    assert not pairs_fit_int16(w)
    w[0, 1, 0, 0] = -127                          # opposite signs never add up
    assert pairs_fit_int16(w)
    w[1, 1, 0, 0] = 127                           # channels 1 and 2 are not a pair
    assert pairs_fit_int16(w)


def test_quantize_steps_between_float_ops_round_half_to_even_like_onnx():
    """A quantize -> dequantize step between float ops becomes float
    clip(round(y / s)) * s, a lone quantize cast(clip(round(y / s) + z)),
    both rounding half to even as onnxruntime does: x / s lands on ties."""
    from onnx import parser

    model = parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 8] x) => (float[1, 8] y, uint8[1, 8] q2) {
            s = Constant <value = float {0.5}> ()
            z = Constant <value = uint8 {10}> ()
            r = Relu (x)
            q = QuantizeLinear (r, s, z)
            d = DequantizeLinear (q, s, z)
            y = Sigmoid (d)
            q2 = QuantizeLinear (x, s, z)
        }""")
    x = np.array([[0.25, 0.75, 1.25, -0.75, -1.25, 3.0, 200.0, -9.0]], F)
    lowered, stats = lower_qdq(from_onnx(model, shape_dict={"x": [1, 8]}))
    assert stats["float_rounding"] == {"quantize_dequantize": 1, "quantize": 1}
    ex = tvm.compile(lowered, target="llvm")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    import onnxruntime as ort

    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got[0].numpy(), want[0], rtol=1e-6)
    np.testing.assert_array_equal(got[1].numpy(), want[1])
