"""graphopt's CPU schedule library (backends/tvm/cpu): blocked convolutions,
injective and spatial-reduction kernels, against onnxruntime's numbers."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from graphopt.backends.tvm import schedule  # noqa: E402
from graphopt.backends.tvm.cpu import conv2d, layout, matmul  # noqa: E402
from graphopt.backends.tvm.cpu.target import vector_lanes  # noqa: E402
from graphopt.backends.tvm.targets import host_llvm  # noqa: E402

F = np.float32


def _model(nodes, x_shape, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _cnn(rng) -> onnx.ModelProto:
    """An RGB stem, a strided 3x3, a depthwise 3x3, a 1x1 with a residual add,
    a grouped conv (left to TVM), max pooling and global average pooling."""
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(F)  # noqa: E731
    inits = {"w0": w(32, 3, 3, 3), "b0": w(32), "w1": w(32, 32, 3, 3), "wd": w(32, 1, 3, 3), "w2": w(32, 32, 1, 1),
             "b2": w(32), "wg": w(32, 8, 3, 3), "w3": w(24, 32, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["c1", "wd"], ["d"], pads=[1, 1, 1, 1], group=32),
        helper.make_node("HardSwish", ["d"], ["hd"]),
        helper.make_node("Conv", ["hd", "w2", "b2"], ["c2"]),
        helper.make_node("Add", ["c2", "c1"], ["s"]),
        helper.make_node("Conv", ["s", "wg"], ["g"], pads=[1, 1, 1, 1], group=4),
        helper.make_node("MaxPool", ["g"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w3"], ["c3"]),
        helper.make_node("GlobalAveragePool", ["c3"], ["y"]),
    ]
    return _model(nodes, [1, 3, 30, 30], inits)


def _build(model: onnx.ModelProto, shape):
    target = tvm.target.Target(host_llvm())
    mod = from_onnx(model, shape_dict={"x": shape})
    return schedule.build(mod, target, progress=False), target


def test_blocked_cnn_matches_onnxruntime():
    rng = np.random.default_rng(0)
    model = _cnn(rng)
    x = rng.standard_normal((1, 3, 30, 30)).astype(F)
    ex, _ = _build(model, [1, 3, 30, 30])
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_convolutions_get_blocked_kernels_and_schedules():
    """Every convolution but the grouped one becomes graphopt's blocked compute,
    and every kernel of the module is scheduled (none is a plain loop nest)."""
    rng = np.random.default_rng(0)
    target = tvm.target.Target(host_llvm())
    mod = schedule.bind_params(from_onnx(_cnn(rng), shape_dict={"x": [1, 3, 30, 30]}))
    kernels = schedule.lower_to_kernels(mod, schedule._normalized_target(target))
    names = [gv.name_hint for gv, f in kernels.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    blocked = [n for n in names if conv2d.DENSE in n or conv2d.DEPTHWISE in n]
    assert sum(conv2d.DEPTHWISE in n for n in blocked) == 1
    assert len(blocked) == 5  # stem, strided, depthwise, 1x1, last 1x1; not the grouped one
    scheduled = schedule.default_schedule(kernels, schedule._normalized_target(target))
    unscheduled = [gv.name_hint for gv, f in scheduled.functions_items()
                   if isinstance(f, tvm.tirx.PrimFunc) and not (f.attrs and f.attrs.get("tirx.is_scheduled"))]
    assert [n for n in unscheduled if conv2d.DENSE in n or conv2d.DEPTHWISE in n] == []


@pytest.mark.parametrize("channels, lanes, block", [(64, 16, 16), (24, 16, 8), (40, 8, 8), (12, 16, 4), (6, 16, None)])
def test_block_size_follows_the_vector_lanes(channels, lanes, block):
    assert layout.block_size(channels, lanes) == block


def test_stem_blocks_all_its_input_channels():
    assert layout.input_block(3, 16) == 3
    assert layout.input_block(64, 16) == 16
    assert layout.input_block(40, 16) == 10
    assert layout.input_block(18, 16) == 9  # a reduction axis: any divisor, no padding


@pytest.mark.parametrize("channels,lanes,expected", [(64, 16, (16, 64)), (24, 16, (16, 32)), (18, 16, (16, 32)),
                                                     (42, 16, (16, 48)), (6, 16, (8, 8)), (10, 8, (8, 16))])
def test_odd_output_channels_are_padded_to_whole_vectors(channels, lanes, expected):
    assert layout.output_block(channels, lanes) == expected


@pytest.mark.parametrize("target, lanes", [
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}, 16),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}, 8),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512", "mattr": ["-avx512f"]}, 8),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, 4),
])
def test_vector_lanes_come_from_the_target_not_the_host(target, lanes):
    assert vector_lanes(tvm.target.Target(target)) == lanes


def test_one_row_softmax_is_not_slowed_by_a_parallel_schedule():
    """DLight's CPU reduction rule parallelized a 1-row softmax into a 2 ms
    kernel; graphopt leaves such a kernel to the generic rules."""
    from tvm import te, topi

    x = te.placeholder((1, 1000), name="x")
    func = te.create_prim_func([x, topi.nn.softmax(x, 1)])
    target = schedule._normalized_target(tvm.target.Target(host_llvm()))
    mod = schedule.default_schedule(tvm.IRModule({"main": func}), target)
    assert "parallel" not in mod["main"].script()


def test_matmul_with_epilogue_is_tiled_and_matches_onnxruntime():
    """A transformer-shaped projection (bias and Relu fused) and a batched
    attention product, both through the register-tiled matmul rule."""
    rng = np.random.default_rng(1)
    inits = {"w": (rng.standard_normal((120, 360)) * 0.1).astype(F), "b": rng.standard_normal(360).astype(F)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["q"]),
             helper.make_node("Transpose", ["q"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["y"])]
    inits["shape"] = np.array([6, 40, 60], np.int64)
    model = _model(nodes, [1, 40, 120], inits)
    x = rng.standard_normal((1, 40, 120)).astype(F)
    ex, _ = _build(model, [1, 40, 120])
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    target = schedule._normalized_target(tvm.target.Target(host_llvm()))
    kernels = schedule.lower_to_kernels(schedule.bind_params(from_onnx(model, shape_dict={"x": [1, 40, 120]})), target)
    scheduled = schedule.default_schedule(kernels, target)
    matmuls = [f for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint]
    assert matmuls and all(f.attrs.get("tirx.is_scheduled") and "vectorized" in f.script() for f in matmuls)


@pytest.mark.parametrize("kernel,strides,pads,output_padding,dilations", [
    ((2, 2), (2, 2), (0, 0, 0, 0), (0, 0), (1, 1)),  # DBNet's upsampling head
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), (1, 1)),
    ((4, 4), (2, 2), (1, 1, 1, 1), (0, 0), (1, 1)),
    ((3, 2), (1, 2), (0, 1, 2, 0), (0, 1), (2, 1)),
])
def test_transposed_convolution_becomes_a_blocked_convolution(kernel, strides, pads, output_padding, dilations):
    rng = np.random.default_rng(1)
    inits = {"w": rng.standard_normal((8, 5, *kernel)).astype(F), "b": rng.standard_normal(5).astype(F)}
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], strides=list(strides), pads=list(pads),
                            output_padding=list(output_padding), dilations=list(dilations))
    model = _model([node, helper.make_node("Relu", ["c"], ["y"])], [1, 8, 7, 9], inits)
    target = schedule._normalized_target(tvm.target.Target(host_llvm()))
    kernels = schedule.lower_to_kernels(schedule.bind_params(from_onnx(model, shape_dict={"x": [1, 8, 7, 9]})), target)
    names = [gv.name_hint for gv, f in kernels.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any(conv2d.DENSE in n for n in names) and not any("transpose" in n and "conv" in n for n in names)
    x = rng.standard_normal((1, 8, 7, 9)).astype(F)
    ex, _ = _build(model, [1, 8, 7, 9])
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _kernels(model: onnx.ModelProto, shape) -> tuple[tvm.IRModule, tvm.target.Target]:
    target = schedule._normalized_target(tvm.target.Target(host_llvm()))
    return schedule.lower_to_kernels(schedule.bind_params(from_onnx(model, shape_dict={"x": shape})), target), target


def _assert_matches_onnxruntime(model: onnx.ModelProto, x: np.ndarray, rtol=1e-4, atol=1e-4) -> None:
    ex, _ = _build(model, list(x.shape))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def _blocked_chain(rng) -> onnx.ModelProto:
    """Convolutions joined by what should stay blocked between them: Clip,
    a squeeze-excite product, max pooling, a nearest upsampling, a residual
    add and a channel concatenation; the last convolution has 5 channels."""
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(F)  # noqa: E731
    inits = {"w0": w(32, 3, 3, 3), "w1": w(32, 32, 3, 3), "ws": w(32, 32, 1, 1), "bs": w(32), "w2": w(32, 32, 1, 1),
             "w3": w(5, 64, 3, 3), "scales": np.array([1, 1, 2, 2], F), "lo": np.array(0, F), "hi": np.array(6, F)}
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c0", "lo", "hi"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c1"], ["g"]),
        helper.make_node("Conv", ["g", "ws", "bs"], ["gs"]),
        helper.make_node("Sigmoid", ["gs"], ["e"]),
        helper.make_node("Mul", ["c1", "e"], ["se"]),
        helper.make_node("MaxPool", ["se"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w2"], ["c2"]),
        helper.make_node("Resize", ["c2", "", "scales"], ["u"], mode="nearest"),
        helper.make_node("Add", ["u", "se"], ["s"]),
        helper.make_node("Concat", ["s", "r0"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w3"], ["y"], pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, [1, 3, 12, 14], inits)


def test_a_chain_of_convolutions_stays_blocked_end_to_end():
    """No layout transform of data between the convolutions: the stem packs its
    RGB input itself and the 5-channel head writes NCHW; numbers match."""
    rng = np.random.default_rng(2)
    model = _blocked_chain(rng)
    kernels, _ = _kernels(model, [1, 3, 12, 14])
    names = [gv.name_hint for gv, f in kernels.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert [n for n in names if "layout_transform" in n] == []
    assert sum(conv2d.DENSE in n for n in names) == 5
    _assert_matches_onnxruntime(model, rng.standard_normal((1, 3, 12, 14)).astype(F))


def test_an_operand_that_must_be_nchw_is_transformed_back_once():
    """A Transpose cannot read the blocked layout: its operand is transformed
    back once, and the convolution that also reads it stays blocked."""
    rng = np.random.default_rng(3)
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(F)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["c1"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 3, 2]),
             helper.make_node("Transpose", ["t"], ["tt"], perm=[0, 1, 3, 2]),
             helper.make_node("Add", ["c1", "tt"], ["y"])]
    model = _model(nodes, [1, 4, 6, 6], {"w0": w(16, 4, 3, 3), "w1": w(16, 16, 1, 1)})
    kernels, _ = _kernels(model, [1, 4, 6, 6])
    names = [gv.name_hint for gv, f in kernels.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sum("layout_transform" in n for n in names) <= 2  # r back to NCHW; the sum, fused or not
    _assert_matches_onnxruntime(model, rng.standard_normal((1, 4, 6, 6)).astype(F))


@pytest.mark.parametrize("columns", [37, 6625 // 25])
def test_matmul_columns_that_are_not_whole_vectors_are_padded(columns):
    """A classifier with a prime number of classes still gets the tiled rule:
    its weight is padded with zero columns at compile time."""
    rng = np.random.default_rng(4)
    inits = {"w": (rng.standard_normal((24, columns)) * 0.1).astype(F), "b": rng.standard_normal(columns).astype(F)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    model = _model(nodes, [1, 40, 24], inits)
    kernels, target = _kernels(model, [1, 40, 24])
    scheduled = schedule.default_schedule(kernels, target)
    matmuls = [f for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint]
    assert matmuls and all(f.attrs.get("tirx.is_scheduled") and "vectorized" in f.script() for f in matmuls)
    assert matmul.padded_columns(columns, 16) % 16 == 0
    _assert_matches_onnxruntime(model, rng.standard_normal((1, 40, 24)).astype(F))


def test_only_kernels_worth_a_wake_up_run_in_parallel():
    """Waking sleeping workers costs tens of microseconds: a 1x1 convolution
    of a 56x56x64 map is spread over the cores, the same on 7x7 is not."""
    from graphopt.backends.tvm.cpu.target import parallel_worthwhile

    two = schedule._normalized_target(tvm.target.Target({**host_llvm(), "num-cores": 2}))
    one = schedule._normalized_target(tvm.target.Target({**host_llvm(), "num-cores": 1}))
    assert parallel_worthwhile(two, macs=56 * 56 * 64 * 64)
    assert not parallel_worthwhile(two, macs=7 * 7 * 64 * 64)
    assert not parallel_worthwhile(one, macs=56 * 56 * 64 * 64)
    assert parallel_worthwhile(two, elements=1 << 20) and not parallel_worthwhile(two, elements=4096)


@pytest.mark.parametrize("batch,channels,out_channels,size,kernel,strides,pads,group,dilation", [
    (1, 7, 13, (9, 11), (3, 3), (1, 1), (1, 1, 1, 1), 1, 1),  # prime channels
    (2, 16, 32, (10, 10), (3, 3), (2, 2), (0, 1, 1, 2), 1, 1),  # batch 2, stride 2, asymmetric padding
    (1, 17, 33, (7, 9), (1, 1), (2, 2), (0, 0, 0, 0), 1, 1),  # strided 1x1, odd channels
    (1, 32, 32, (9, 8), (3, 3), (2, 2), (1, 1, 1, 1), 32, 1),  # strided depthwise
    (2, 13, 13, (7, 7), (5, 5), (1, 1), (2, 2, 2, 2), 13, 1),  # depthwise, prime channels
    (1, 8, 12, (8, 8), (3, 3), (1, 1), (1, 1, 1, 1), 2, 1),  # grouped
    (1, 16, 16, (12, 12), (3, 3), (1, 1), (2, 2, 2, 2), 1, 2),  # dilated
    (1, 3, 24, (15, 13), (7, 7), (2, 2), (3, 2, 3, 2), 1, 1),  # RGB stem, uneven padding
    (1, 16, 16, (5, 37), (3, 3), (1, 1), (1, 1, 1, 1), 1, 1),  # prime width: computed to whole tiles, sliced
    (1, 16, 16, (5, 37), (3, 3), (1, 1), (1, 1, 1, 1), 16, 1),  # the same, depthwise
])
def test_convolution_templates_on_odd_shapes(batch, channels, out_channels, size, kernel, strides, pads, group,
                                             dilation):
    rng = np.random.default_rng(5)
    inits = {"w": (rng.standard_normal((out_channels, channels // group, *kernel)) * 0.2).astype(F),
             "b": rng.standard_normal(out_channels).astype(F)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=list(strides), pads=list(pads), group=group,
                              dilations=[dilation, dilation]),
             helper.make_node("HardSwish", ["c"], ["y"])]
    model = _model(nodes, [batch, channels, *size], inits)
    _assert_matches_onnxruntime(model, rng.standard_normal((batch, channels, *size)).astype(F), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool", [
    helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0]),
    helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 1, 1],
                     count_include_pad=0),
    helper.make_node("GlobalAveragePool", ["c"], ["p"]),
    helper.make_node("Softmax", ["c"], ["p"], axis=1),
])
def test_blocked_pooling_and_reductions_on_odd_shapes(pool):
    """Pooling of a blocked convolution output (then a ReLU, so the pooled
    tensor is an inner one and may stay blocked), batch 3, odd spatial sizes."""
    rng = np.random.default_rng(6)
    inits = {"w": (rng.standard_normal((16, 5, 3, 3)) * 0.2).astype(F)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), pool, helper.make_node("Relu", ["p"], ["y"])]
    model = _model(nodes, [3, 5, 11, 7], inits)
    _assert_matches_onnxruntime(model, rng.standard_normal((3, 5, 11, 7)).astype(F), rtol=1e-4, atol=1e-5)
    kernels, target = _kernels(model, [3, 5, 11, 7])
    scheduled = schedule.default_schedule(kernels, target)
    reductions = [f for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
                  and any(k in gv.name_hint for k in ("pool", "mean", "softmax"))]
    assert reductions and all(f.attrs.get("tirx.is_scheduled") and "vectorized" in f.script() for f in reductions)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "LayerNormalization"])
@pytest.mark.parametrize("shape", [[3, 7, 37], [2, 5, 64]])
def test_row_reductions_run_a_row_at_a_time_and_match_onnxruntime(op, shape):
    """Softmax, log-softmax and layer normalization (whose mean and variance
    are per-row values) over rows of 37 (two whole vectors of 16 and a tail
    of 5 on AVX-512) and of 64: scheduled, vectorized, numbers match.  Loop
    partitioning fails inside TVM on log-softmax's rows, so its tails stay
    scalar and only whole-vector rows vectorize."""
    from graphopt.backends.tvm.cpu import generic

    rng = np.random.default_rng(7)
    inits = {"g": rng.standard_normal(shape[-1:]).astype(F), "b": rng.standard_normal(shape[-1:]).astype(F)}
    inputs = ["x", "g", "b"] if op == "LayerNormalization" else ["x"]
    model = _model([helper.make_node(op, inputs, ["y"], axis=-1)], shape, inits if len(inputs) > 1 else {})
    kernels, target = _kernels(model, shape)
    funcs = [f for _, f in kernels.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    scheduled = [s for s in (generic.RowReduction().apply(f, target, False) for f in funcs) if s is not None]
    assert scheduled
    if op != "LogSoftmax" or shape[-1] % vector_lanes(target) == 0:
        assert any("vectorized" in s.mod.script() for s in scheduled)
    _assert_matches_onnxruntime(model, rng.standard_normal(shape).astype(F), atol=1e-5)
