"""Shared quantization math and QDQ graph building for the quantization passes.

Conventions follow onnxruntime's quantization tool (``onnxruntime.quantization``),
so that models written here get the same kernels there:

* the affine relation is ``real = scale * (q - zero_point)``; the real range is
  always widened to include 0, so 0.0 is exactly representable;
* symmetric int8 uses the restricted range ``[-127, 127]`` (zero point 0);
  symmetric uint8 uses ``[0, 255]`` with zero point 128; asymmetric types use
  their full range; ``reduce_range`` gives 7-bit ranges (``[-64, 64]``,
  ``[0, 127]``) for CPUs without VNNI;
* rounding is round-half-to-even (``np.rint``), as QuantizeLinear does;
* a range too small for a finite scale gets scale 1.0 and zero point 0;
* a bias is int32 with ``scale = input_scale * weight_scale`` and zero point 0.

Everything here is deterministic: names come from the tensors they belong to,
made unique with :func:`graphopt.rewrite.fresh_name`.

Typical use::

    qw = quantize_weight(w, "int8", symmetric=True, axis=0)
    builder = QDQBuilder(model)
    dq_out = builder.weight_dq(weight_const, qw)      # int8 initializer -> DequantizeLinear
    builder.insert_qdq(activation, scale, zero_point)  # Q -> DQ after a float tensor
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.rewrite import fresh_name

# ----------------------------------------------------------------------------------
# Types and ranges
# ----------------------------------------------------------------------------------
QUANT_DTYPES: dict[str, np.dtype] = {"int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8)}
"""Option value -> numpy dtype of the quantized values."""

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
"""Float dtypes the QDQ passes quantize (the scale takes the tensor's dtype)."""


def quant_dtype(name: str | np.dtype) -> np.dtype:
    """``"int8"``/``"uint8"`` (or a numpy dtype) -> numpy dtype."""
    if isinstance(name, str):
        return QUANT_DTYPES[name]
    return np.dtype(name)


def qrange(dtype: str | np.dtype, symmetric: bool = False, reduce_range: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of a quantized type, as onnxruntime's ``get_qmin_qmax_for_qType``.

    int8: ``[-128, 127]``, symmetric ``[-127, 127]``, reduced ``[-64, 64]``;
    uint8: ``[0, 255]``, reduced ``[0, 127]``.
    """
    dt = quant_dtype(dtype)
    if dt == np.int8:
        if reduce_range:
            return -64, 64
        return (-127, 127) if symmetric else (-128, 127)
    if dt == np.uint8:
        return (0, 127) if reduce_range else (0, 255)
    raise ValueError(f"unsupported quantized type {dt}")


def compute_scale_zero_point(
    rmin, rmax, dtype: str | np.dtype, *, symmetric: bool = False, reduce_range: bool = False,
    scale_dtype=np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point for real ranges ``[rmin, rmax]`` (scalars or 1-D
    arrays for per-channel); returns ``(scale, zero_point)`` arrays shaped like
    the inputs, ``scale`` in ``scale_dtype`` and ``zero_point`` in ``dtype``.

    The range is widened to include 0; ``symmetric`` makes it ``[-m, m]`` with
    ``m = max(|rmin|, |rmax|)`` so the zero point is the middle of the type
    (0 for int8, 128 for uint8).
    """
    dt = quant_dtype(dtype)
    qmin, qmax = qrange(dt, symmetric, reduce_range)
    lo = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    lo = np.where(np.isfinite(lo), lo, 0.0)
    hi = np.where(np.isfinite(hi), hi, 0.0)
    if symmetric:
        m = np.maximum(-lo, hi)
        lo, hi = -m, m
    scale = (hi - lo) / float(qmax - qmin)
    tiny = np.finfo(np.dtype(scale_dtype)).tiny
    degenerate = ~(scale.astype(scale_dtype) >= tiny)
    if symmetric:
        zp = np.full(scale.shape, np.round((qmin + qmax) / 2.0))
    else:
        safe = np.where(degenerate, 1.0, scale)
        zp = np.clip(np.round(qmin - lo / safe), qmin, qmax)
    scale = np.where(degenerate, 1.0, scale)
    zp = np.where(degenerate, 0 if qmin <= 0 <= qmax else qmin, zp)
    return scale.astype(scale_dtype), zp.astype(dt)


def quantize_array(x: np.ndarray, scale, zero_point, dtype: str | np.dtype, axis: int | None = None,
                   *, qmin: int | None = None, qmax: int | None = None) -> np.ndarray:
    """``saturate(rint(x / scale) + zero_point)`` as QuantizeLinear computes it;
    per-channel when ``axis`` is given (``scale``/``zero_point`` 1-D along it).
    ``qmin``/``qmax`` narrow the saturation (e.g. ``[-127, 127]``)."""
    dt = quant_dtype(dtype)
    info = np.iinfo(dt)
    lo = info.min if qmin is None else qmin
    hi = info.max if qmax is None else qmax
    x = np.asarray(x, dtype=np.float32)
    s, z = _broadcast_params(scale, zero_point, x.ndim, axis)
    q = np.rint(x / s) + z
    return np.clip(q, lo, hi).astype(dt)


def dequantize_array(q: np.ndarray, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """``(q - zero_point) * scale`` in float32, per-channel along ``axis`` when given."""
    q = np.asarray(q)
    s, z = _broadcast_params(scale, zero_point, q.ndim, axis)
    return ((q.astype(np.float32) - z) * s).astype(np.float32)


def _broadcast_params(scale, zero_point, ndim: int, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point as float32, shaped to broadcast along ``axis`` when per-channel."""
    s = np.asarray(scale, dtype=np.float32)
    z = np.asarray(zero_point).astype(np.float32)
    if axis is not None and s.ndim == 1:
        shape = [1] * ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return s, z


@dataclasses.dataclass
class QuantizedTensor:
    """A quantized constant: ``values`` (int8/uint8/int32), ``scale`` and
    ``zero_point`` (scalars, or 1-D along ``axis`` for per-channel)."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    def dequantize(self) -> np.ndarray:
        return dequantize_array(self.values, self.scale, self.zero_point, self.axis)


def quantize_weight(
    w: np.ndarray, dtype: str | np.dtype = "int8", *, symmetric: bool = True, axis: int | None = None,
    reduce_range: bool = False,
) -> QuantizedTensor:
    """Quantize a float weight per tensor (``axis=None``) or per channel along
    ``axis`` (negative axes allowed), from its own min/max."""
    w = np.asarray(w)
    scale_dtype = w.dtype if w.dtype in FLOAT_DTYPES else np.float32
    if axis is not None:
        axis = axis % w.ndim
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
        if moved.shape[1] == 0:
            rmin = rmax = np.zeros(w.shape[axis])
        else:
            rmin, rmax = moved.min(axis=1), moved.max(axis=1)
    else:
        rmin = np.asarray(w.min() if w.size else 0.0, dtype=np.float64)
        rmax = np.asarray(w.max() if w.size else 0.0, dtype=np.float64)
    scale, zp = compute_scale_zero_point(rmin, rmax, dtype, symmetric=symmetric, reduce_range=reduce_range,
                                         scale_dtype=scale_dtype)
    qmin, qmax = qrange(dtype, symmetric, reduce_range)
    q = quantize_array(w, scale, zp, dtype, axis, qmin=qmin, qmax=qmax)
    return QuantizedTensor(q, scale, zp, axis)


def quantize_bias(bias: np.ndarray, input_scale, weight_scale) -> QuantizedTensor:
    """int32 bias with ``scale = input_scale * weight_scale`` (per channel when
    the weight scale is 1-D) and zero point 0, as onnxruntime's QLinearConv /
    QGemm fusions expect."""
    b = np.asarray(bias, dtype=np.float64)
    scale = (np.asarray(input_scale, dtype=np.float64) * np.asarray(weight_scale, dtype=np.float64))
    per_channel = scale.ndim == 1 and scale.size > 1
    if scale.ndim == 1 and scale.size == 1:
        scale = scale.reshape(())
    scale = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(b / scale), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
    scale32 = scale.astype(np.float32)
    return QuantizedTensor(q, scale32, np.zeros(scale32.shape, np.int32), 0 if per_channel else None)


# ----------------------------------------------------------------------------------
# Op tables (what onnxruntime's CPU provider runs quantized from QDQ)
# ----------------------------------------------------------------------------------
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
"""Ops with a weight input: QLinearConv, QGemm, QLinearMatMul / MatMulIntegerToFloat."""

BINARY_OPS = frozenset({"Add", "Mul"})
"""QLinearAdd / QLinearMul: both inputs and the output get their own QDQ."""

VARIADIC_OPS = frozenset({"Concat"})
"""QLinearConcat."""

UNARY_OPS = frozenset({"AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu"})
"""Ops with a QLinear kernel and an output range of their own."""

PASSTHROUGH_OPS = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool", "Resize", "Slice",
    "Pad", "Split", "Gather", "Expand", "Tile", "DepthToSpace", "SpaceToDepth",
})
"""Ops that move 8-bit values without arithmetic: onnxruntime drops the QDQ
around them (or runs them in 8 bits) when input and output share scale and
zero point; they are quantized only when their input already is."""

REMOVABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})
"""Absorbed into the producer's output quantization (the zero point sits at
qmin, so QuantizeLinear's saturation does the clamping)."""

FLOAT_ONLY_OPS = frozenset({
    "Softmax", "LayerNormalization", "BatchNormalization", "InstanceNormalization",
    "GroupNormalization", "ReduceMean", "Pow", "Sqrt", "Div", "Erf", "Exp", "Log", "HardSwish",
    "HardSigmoid", "Tanh", "Gelu",
})
"""Kept in float by default: no QLinear kernel on CPU, or quantization hurts."""

DEFAULT_STATIC_OPS = tuple(sorted(WEIGHTED_OPS | BINARY_OPS | VARIADIC_OPS | UNARY_OPS | PASSTHROUGH_OPS))
"""Op types ``quantize-static`` quantizes by default."""


def output_tails(graph: gs.Graph) -> set[int]:
    """ids of the nodes of a model's decode tails: not weighted, and every
    result flows only into graph outputs or other tail nodes (the sigmoid,
    exp, grid offsets, box/score concatenation and DFL softmax after a
    detector's last convolutions).  They are cheap and carry values of mixed
    scales (pixels beside probabilities), so quantizing them buys no speed
    and costs fidelity.  A node that also feeds a weighted op is trunk, not
    tail.  ``graph`` must be topologically sorted."""
    outputs = {id(t) for t in graph.outputs}
    tail: set[int] = set()
    for node in reversed(graph.nodes):
        if node.op in WEIGHTED_OPS or not node.outputs:
            continue
        readers = [r for t in node.outputs for r in t.outputs]
        reaches = any(id(t) in outputs for t in node.outputs) or bool(readers)
        if reaches and all(id(r) in tail for r in readers):
            tail.add(id(node))
    return tail


def weight_axis(node: gs.Node, weight_rank: int) -> int:
    """The per-channel (output channel) axis of a weight for ``node``, as
    onnxruntime picks it: Conv 0, ConvTranspose 1, Gemm 0 with ``transB`` else
    1, MatMul the last axis."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return weight_rank - 1


# ----------------------------------------------------------------------------------
# Graph building
# ----------------------------------------------------------------------------------
class QDQBuilder:
    """Inserts QuantizeLinear/DequantizeLinear nodes into a gs graph with
    deterministic names derived from the tensors they quantize.

    ``names`` is every tensor and node name already in use (collected from the
    graph when omitted).  Nodes are appended to ``graph.nodes``; call
    ``graph.toposort()`` when done.
    """

    def __init__(self, graph: gs.Graph, names: set[str] | None = None, opset: int = 13):
        self.graph = graph
        self.opset = opset
        if names is None:
            names = set(graph.tensors())
            names.update(n.name for n in graph.nodes if n.name)
        self.names = names
        self._weights: dict[tuple, gs.Variable] = {}
        self.inserted_q = 0
        self.inserted_dq = 0

    def name(self, base: str) -> str:
        return fresh_name(self.names, base)

    def const(self, base: str, values: np.ndarray) -> gs.Constant:
        # np.array, not np.ascontiguousarray: that one turns a scalar into shape [1],
        # and QLinear kernels want scalar (0-d) per-tensor scales.
        return gs.Constant(self.name(base), np.array(values, order="C"))

    def params(self, base: str, scale, zero_point) -> tuple[gs.Constant, gs.Constant]:
        """Scale and zero-point initializers ``<base>_scale``, ``<base>_zero_point``."""
        return self._params(base, scale, zero_point)

    def _params(self, base: str, scale, zero_point) -> tuple[gs.Constant, gs.Constant]:
        s = np.asarray(scale)
        z = np.asarray(zero_point)
        return self.const(base + "_scale", s), self.const(base + "_zero_point", z)

    def dequantize(self, base: str, q: gs.Tensor, scale, zero_point, axis: int | None,
                   out_dtype=np.float32, shape=None, params: tuple[gs.Constant, gs.Constant] | None = None,
                   out: gs.Variable | None = None) -> gs.Variable:
        """A DequantizeLinear of ``q``; returns its float output (``out`` when
        given).  ``params`` reuses scale/zero-point constants (of the matching
        QuantizeLinear)."""
        s, z = params if params is not None else self._params(base, scale, zero_point)
        if out is None:
            out = gs.Variable(self.name(base + "_dequantized"), dtype=np.dtype(out_dtype), shape=shape)
        attrs = {"axis": int(axis)} if axis is not None and np.asarray(scale).ndim == 1 else {}
        self.graph.nodes.append(gs.Node("DequantizeLinear", name=self.name(base + "_DequantizeLinear"),
                                        attrs=attrs, inputs=[q, s, z], outputs=[out]))
        self.inserted_dq += 1
        return out

    def quantize(self, base: str, x: gs.Tensor, scale, zero_point, axis: int | None = None,
                 params: tuple[gs.Constant, gs.Constant] | None = None) -> gs.Variable:
        """A QuantizeLinear of ``x``; returns its 8-bit output."""
        s, z = params if params is not None else self._params(base, scale, zero_point)
        out = gs.Variable(self.name(base + "_quantized"), dtype=np.asarray(zero_point).dtype,
                          shape=getattr(x, "shape", None))
        attrs = {"axis": int(axis)} if axis is not None and np.asarray(scale).ndim == 1 else {}
        self.graph.nodes.append(gs.Node("QuantizeLinear", name=self.name(base + "_QuantizeLinear"),
                                        attrs=attrs, inputs=[x, s, z], outputs=[out]))
        self.inserted_q += 1
        return out

    def constant_dq(self, base: str, qt: QuantizedTensor, out_dtype=np.float32) -> gs.Variable:
        """A quantized initializer (``qt.values``) followed by a DequantizeLinear;
        returns the float output to wire where the float constant was read."""
        q = self.const(base + "_quantized", qt.values)
        return self.dequantize(base, q, qt.scale, qt.zero_point, qt.axis, out_dtype)

    def weight_dq(self, weight: gs.Constant, qt: QuantizedTensor, key: Iterable = ()) -> gs.Variable:
        """:meth:`constant_dq` for a weight, shared by every node that reads the
        same weight with the same quantization (``key`` adds what else must match)."""
        cache_key = (weight.name, qt.axis, tuple(key))
        hit = self._weights.get(cache_key)
        if hit is None:
            dtype = np.dtype(weight.dtype) if np.dtype(weight.dtype) in FLOAT_DTYPES else np.float32
            hit = self._weights[cache_key] = self.constant_dq(weight.name, qt, dtype)
        return hit

    def insert_qdq(self, tensor: gs.Tensor, scale, zero_point, consumers: Sequence[gs.Node] | None = None,
                   axis: int | None = None) -> gs.Variable:
        """Insert ``tensor -> QuantizeLinear -> DequantizeLinear`` and make
        ``consumers`` (default: every node reading ``tensor``) read the
        dequantized value.  Graph outputs keep reading the float ``tensor``, so
        the graph's interface does not change.  Returns the DQ output."""
        params = self._params(tensor.name, scale, zero_point)
        q = self.quantize(tensor.name, tensor, scale, zero_point, axis, params=params)
        dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)
        dq = self.dequantize(tensor.name, q, scale, zero_point, axis, dtype, shape=getattr(tensor, "shape", None),
                             params=params)
        return self._rewire(tensor, q, dq, consumers)

    def insert_qdq_at_output(self, tensor: gs.Variable, scale, zero_point, axis: int | None = None) -> gs.Variable:
        """QDQ on a value that must keep its name (a graph output): its producer
        now writes ``<name>_float``, which goes through Q and DQ, and the DQ
        writes ``tensor`` itself.  Every reader, the graph output included,
        sees the dequantized value, and the producer can fuse with the Q."""
        producer = tensor.inputs[0]
        idx = next(i for i, o in enumerate(producer.outputs) if o is tensor)
        raw = gs.Variable(self.name(tensor.name + "_float"), dtype=tensor.dtype, shape=tensor.shape)
        producer.outputs[idx] = raw
        params = self._params(tensor.name, scale, zero_point)
        q = self.quantize(tensor.name, raw, scale, zero_point, axis, params=params)
        return self.dequantize(tensor.name, q, scale, zero_point, axis, params=params, out=tensor)

    def _rewire(self, tensor, q, dq, consumers):
        targets = list(tensor.outputs) if consumers is None else list(consumers)
        seen: set[int] = set()
        for node in targets:
            if id(node) in seen or node.op == "QuantizeLinear" and node.outputs and node.outputs[0] is q:
                continue
            seen.add(id(node))
            for i, t in enumerate(node.inputs):
                if t is tensor:
                    node.inputs[i] = dq
        return dq
