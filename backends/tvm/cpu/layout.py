"""Layout planning at the Relax level: convolutions and what lies between them
in a channel-blocked layout, weights packed at compile time (NeoCPU's global
layout).

A tensor is *blocked* when it is ``[N, C/b, H, W, b]`` (NCHW[b]c) with ``b``
the target's fp32 vector lanes, one ``b`` for the whole module, so that
neighbours always agree.  Planning walks each dataflow block in order:

* a convolution whose output channels ``b`` divides writes a blocked tensor;
  it reads a blocked input as it is, or an NCHW one (the RGB stem, a tensor
  some op needed in NCHW) through the blocked, zero-padded copy its kernel
  makes anyway.  Its weight is packed to OIHW[i]i[b]o (depthwise:
  OIHW1i[b]o) by a ``layout_transform`` of the constant that ``FoldConstant``
  evaluates at compile time;
* a convolution with other output channels runs blocked inside with the last
  vector zero-padded and writes NCHW (18 channels: 2 vectors of 16);
* elementwise ops (per-tensor quantize and dequantize among them),
  per-channel broadcasts (bias, batch-norm scale, the squeeze-excite
  product), residual adds, pooling, spatial means, nearest or linear
  resizing, spatial padding and channel concatenation of blocked tensors
  stay blocked (a per-channel constant is transformed with its tensor, at
  compile time);
* any other op gets NCHW: the blocked value is transformed back once, where
  the first such consumer needs it, and the function's outputs are NCHW.

So a chain of convolutions with their epilogues runs blocked end to end, and
layout transforms sit only at the graph's edges and around the ops that
cannot take the blocked layout.  Grouped convolutions other than depthwise
stay as they are.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from graphopt.backends.tvm.cpu.conv2d import column_limit, column_tile
from graphopt.backends.tvm.cpu.intrinsics import pairs_fit_int16
from graphopt.backends.tvm.cpu.target import Int8Dot
from graphopt.backends.tvm.int8 import const_array

_op = tvm.ir.Op.get
_CONV2D = _op("relax.nn.conv2d")
_CALL_TIR = _op("relax.call_tir")
_UNARY = {_op(f"relax.{name}") for name in (
    "nn.relu", "sigmoid", "tanh", "nn.silu", "nn.gelu", "nn.gelu_tanh", "nn.leakyrelu", "clip", "exp", "negative",
    "abs", "sqrt", "rsqrt", "erf", "square", "log", "floor", "ceil", "round", "astype")}
_BINARY = {_op(f"relax.{name}") for name in (
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "power")}
_POOL = {_op("relax.nn.max_pool2d"), _op("relax.nn.avg_pool2d")}
_SPATIAL_REDUCE = {_op("relax.mean"), _op("relax.max"), _op("relax.sum")}
_RESIZE = _op("relax.image.resize2d")
_QDQ = {_op("relax.quantize"), _op("relax.dequantize")}
_PAD = _op("relax.nn.pad")
_CONCAT = _op("relax.concat")
# The frontend emits Clip as TE calls of topi's maximum and minimum.
_TE_BINARY = {"maximum": _op("relax.maximum"), "minimum": _op("relax.minimum")}
_FLOATS = ("float32", "float16")


def block_size(channels: int, lanes: int) -> int | None:
    """The channel block: ``lanes`` if ``channels`` is a multiple of it, else the
    largest smaller power of two (>= 4) that is."""
    b = lanes
    while b >= 4:
        if channels % b == 0:
            return b
        b //= 2
    return None


def output_block(channels: int, lanes: int) -> tuple[int, int]:
    """(block, padded channels) of a dense convolution's output: whole vectors
    of ``lanes`` (fewer, a power of two >= 4, when the channels are fewer), the
    last one zero-padded.  The inner loop issues one FMA per vector of output
    channels, whatever its width, so 24 channels take 2 vectors of 16 (one a
    third padding), not 3 of 8."""
    b = max(4, min(lanes, 1 << (channels - 1).bit_length()))
    return b, -(-channels // b) * b


def input_block(in_channels: int, out_block: int) -> int:
    """The input-channel block of a dense convolution: the output block where it
    divides the input channels, else the largest divisor up to it (all of them
    for an RGB stem).  It is a reduction axis, so it needs no padding."""
    if in_channels % out_block == 0:
        return out_block
    return max(d for d in range(1, min(in_channels, out_block) + 1) if in_channels % d == 0)


def blocked_layout(b: int) -> str:
    return f"NCHW{b}c"


def plan(mod: tvm.IRModule, lanes: int, int8_dot: Int8Dot | None = None, registers: int = 32) -> tvm.IRModule:
    """Every function of ``mod`` with its layouts planned (see the module doc);
    with ``int8_dot`` (the target's dot-product instruction, as many int32
    lanes as ``lanes``), quantized dense convolutions too."""
    return map_functions(mod, lambda: _PlanLayouts(mod, lanes, int8_dot, registers))


def map_functions(mod: tvm.IRModule, make_mutator: Callable[[], PyExprMutator]) -> tvm.IRModule:
    """``mod`` with each Relax function rewritten by a fresh ``make_mutator()``."""
    out = tvm.IRModule({g: f for g, f in mod.functions_items()}, attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gv] = make_mutator().visit_expr(func)
    return out


def _static_shape(expr: relax.Expr) -> list[int] | None:
    ty = expr.ty
    shape = getattr(ty, "shape", None)
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


def _dtype(expr: relax.Expr) -> str:
    return str(getattr(expr.ty, "dtype", ""))


def unblock(blocked: relax.Expr) -> relax.Expr:
    """[N, C/b, H, W, b] back to NCHW as a transpose and a reshape, not a
    ``layout_transform``: those are injective, so they fuse into the
    consumer's kernel (a depth-to-space reads the blocked tensor in one
    pass) and loop in the destination's order, where a layout transform
    loops in the source's and scatters every lane of its stores (a
    96x160x160 unblocking took 2.4 ms)."""
    n, cb, h, w, b = (int(d) for d in blocked.ty.shape)
    return relax.op.reshape(relax.op.permute_dims(blocked, [0, 1, 4, 2, 3]), [n, cb * b, h, w])


@mutator
class _PlanLayouts(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int, int8_dot: Int8Dot | None = None, registers: int = 32):
        super().__init__(mod)
        self.columns = column_limit(registers)
        self.mod = mod
        self.lanes = lanes
        self.b = lanes
        self.int8_dot = int8_dot if int8_dot is not None and int8_dot.lanes == lanes else None
        # original NCHW var -> its blocked value; original var -> NCHW value made from it
        self.blocked: dict[relax.Var, relax.Var] = {}
        self.plain: dict[relax.Var, relax.Var] = {}

    # ------------------------------------------------------------ bindings

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:  # noqa: N802 (TVM's visitor naming)
        value, var = binding.value, binding.var
        if isinstance(value, relax.Call) and value.op == _CONV2D:
            planned = self._conv2d(value, blocked_out=isinstance(var, relax.DataflowVar))
            if planned is not None:
                conv, blocked = planned
                if blocked:
                    emitted = self.builder_.emit(conv, var.name + "_blocked")
                elif isinstance(var, relax.DataflowVar):
                    emitted = self.builder_.emit(conv, var.name)
                else:  # a value the dataflow block exports
                    emitted = self.builder_.emit_output(conv, var.name)
                if blocked:
                    self.blocked[var] = emitted
                else:
                    self.set_var_remap(var, emitted)
                return
        elif isinstance(value, relax.Call) and isinstance(var, relax.DataflowVar):
            blocked = self._blocked_value(value)
            if blocked is not None:
                self.blocked[var] = self.builder_.emit(blocked, var.name + "_blocked")
                return
        self._plain_operands(value)
        super().visit_var_binding_(binding)

    def _plain_operands(self, value: relax.Expr) -> None:
        """Make the NCHW form of every blocked var ``value`` reads."""
        for var in relax.analysis.free_vars(value):
            if var in self.blocked and var not in self.plain:
                plain = self.builder_.emit(unblock(self.blocked[var]), var.name)
                self.plain[var] = plain
                self.set_var_remap(var, plain)

    # ------------------------------------------------------------ operands

    def _is_blocked(self, expr: relax.Expr) -> bool:
        return isinstance(expr, relax.Var) and expr in self.blocked

    def _to_blocked(self, expr: relax.Expr, channels: int) -> relax.Expr | None:
        """``expr`` (rank <= 4, broadcasting against an NCHW tensor of
        ``channels`` channels) in the blocked layout, or None."""
        if self._is_blocked(expr):
            return self.blocked[expr]
        shape = _static_shape(expr)
        if shape is None or len(shape) > 4:
            return None
        expr = self.visit_expr(expr)
        if not shape:
            return expr
        full = [1] * (4 - len(shape)) + shape
        if full[1] == 1:
            return self.builder_.emit(relax.op.reshape(expr, [*full, 1]))
        if full[1] != channels:
            return None
        if len(shape) < 4:
            expr = self.builder_.emit(relax.op.reshape(expr, full))
        b = self.b
        return self.builder_.emit(
            relax.op.layout_transform(expr, index_map=lambda n, c, h, w: (n, c // b, h, w, c % b)))

    # ------------------------------------------------------------ blocked ops

    def _blocked_value(self, call: relax.Call) -> relax.Expr | None:
        """The blocked form of ``call`` where it reads a blocked tensor and can
        write one, else None (it stays NCHW)."""
        out_shape = _static_shape(call)
        if out_shape is None or len(out_shape) != 4 or _dtype(call) in ("", "bool") or out_shape[1] % self.b:
            return None
        op, args = call.op, list(call.args)
        if op == _CALL_TIR:
            op = self._te_binary(call)
            if op is None:
                return None
            args = list(call.args[1].fields)
        if op == _CONCAT:
            return self._concat(call)
        if not any(self._is_blocked(a) for a in args):
            return None
        channels, layout = out_shape[1], blocked_layout(self.b)
        first, attrs = args[0], call.attrs
        if op in _BINARY:
            blocked = [self._to_blocked(a, channels) for a in args]
            return None if any(a is None for a in blocked) else relax.Call(op, blocked, attrs)
        if not self._is_blocked(first):
            return None
        data = self.blocked[first]
        if op in _UNARY:
            return relax.Call(op, [data, *args[1:]], attrs)
        if op in _QDQ:  # per-tensor only: a per-channel scale runs along NCHW's axis 1
            scalar = all(_static_shape(a) in ([], [1]) for a in args[1:])
            return relax.Call(op, [data, *args[1:]], attrs) if scalar else None
        if op == _PAD and str(attrs.pad_mode) == "constant":  # spatial padding (the int8 zero point's)
            widths = [int(v) for v in attrs.pad_width]
            if len(widths) != 8 or any(widths[:4]):
                return None
            return relax.op.nn.pad(data, [*widths, 0, 0], pad_value=float(attrs.pad_value), pad_mode="constant")
        if op in _POOL and str(attrs.layout) == "NCHW" and str(attrs.out_layout) == "NCHW":
            pool = relax.op.nn.max_pool2d if op.name.endswith("max_pool2d") else relax.op.nn.avg_pool2d
            return pool(data, attrs.pool_size, attrs.strides, attrs.padding, attrs.dilation, attrs.ceil_mode,
                        attrs.count_include_pad, layout, layout)
        if op in _SPATIAL_REDUCE:
            axes = sorted(int(a) % 4 for a in (attrs.axis or []))
            return relax.Call(op, [data], attrs) if axes == [2, 3] and bool(attrs.keepdims) else None
        if op == _RESIZE and str(attrs.layout) == "NCHW":
            return relax.op.image.resize2d(
                data, args[1], tuple(float(v) for v in attrs.roi), layout, attrs.method,
                attrs.coordinate_transformation_mode, attrs.rounding_method, attrs.cubic_alpha,
                attrs.cubic_exclude, attrs.extrapolation_value, attrs.out_dtype)
        return None

    def _concat(self, call: relax.Call) -> relax.Expr | None:
        """A channel concatenation of tensors whose channels ``b`` divides."""
        fields = call.args[0].fields if isinstance(call.args[0], relax.Tuple) else None
        if int(call.attrs.axis) % 4 != 1 or fields is None or not any(self._is_blocked(f) for f in fields):
            return None
        parts = []
        for field in fields:
            shape = _static_shape(field)
            if shape is None or len(shape) != 4 or shape[1] % self.b:
                return None
            parts.append(self._to_blocked(field, shape[1]))
        return relax.op.concat(parts, axis=1)

    def _te_binary(self, call: relax.Call) -> tvm.ir.Op | None:
        """The Relax op of a TE call of topi's maximum or minimum, else None."""
        callee, args = call.args[0], call.args[1]
        name = getattr(callee, "name_hint", "").rstrip("0123456789_")
        if name not in _TE_BINARY or not isinstance(args, relax.Tuple) or len(args.fields) != 2:
            return None
        return _TE_BINARY[name]

    def _conv2d(self, call: relax.Call, blocked_out: bool) -> tuple[relax.Expr, bool] | None:
        """``call`` with its weight packed, and whether it writes a blocked
        tensor (where ``b`` divides its output channels and it may); else it
        writes NCHW, its output channels padded to whole vectors and sliced
        back.  It reads its input blocked where that exists."""
        attrs = call.attrs
        if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout or "NCHW")) != \
                ("NCHW", "OIHW", "NCHW"):
            return None
        source, weight = call.args[0], self.visit_expr(call.args[1])
        dshape, wshape = _static_shape(source), _static_shape(weight)
        if dshape is None or wshape is None:
            return None
        channels, out_channels = dshape[1], wshape[0]
        groups = int(attrs.groups)
        integer = _dtype(source) in ("uint8", "int8") and _dtype(weight) == "int8" and _dtype(call) == "int32"
        if integer and _dtype(source) == "uint8":
            planned = self._conv2d_int8(call, source, weight, channels, out_channels, blocked_out)
            if planned is not None:
                return planned
        depthwise = groups == channels == out_channels and wshape[1] == 1
        if groups != 1 and not depthwise:
            return None
        in_blocked = self._is_blocked(source)
        data = self.blocked[source] if in_blocked else self.visit_expr(source)
        data_layout = blocked_layout(self.b) if in_blocked else "NCHW"
        blocked_out = blocked_out and out_channels % self.b == 0 and (integer or _dtype(call) in _FLOATS)
        if integer:
            # No dot-product kernel for it: the byte products and their sums
            # are integers float32 holds exactly (to 2**24, beyond which the
            # requantization's own float32 rounds anyway), and the float
            # templates run them on FMAs, where int32 vectors multiply slowly.
            data = self.builder_.emit(relax.op.astype(data, "float32"))
            weight = self.builder_.emit(relax.op.astype(weight, "float32"))
        out_dtype = "float32" if integer else None
        if depthwise:
            b = self.b if (blocked_out or in_blocked) else block_size(out_channels, self.lanes)
            if b is None or out_channels % b:
                return None
            kh, kw = wshape[2], wshape[3]
            packed = relax.op.reshape(relax.op.permute_dims(
                relax.op.reshape(weight, (out_channels // b, b, kh, kw)), [0, 2, 3, 1]),
                (out_channels // b, 1, kh, kw, 1, b))
            out_layout = blocked_layout(b) if blocked_out else "NCHW"
            conv = self._emit_conv(call, data, packed, f"OIHW1i{b}o", data_layout, out_layout, out_dtype=out_dtype)
            return (relax.op.astype(self.builder_.emit(conv), "int32") if integer else conv), blocked_out
        b, padded = (self.b, out_channels) if blocked_out else output_block(out_channels, self.lanes)
        ib = self.b if in_blocked else input_block(channels, b)
        if padded != out_channels:
            weight = self.builder_.emit(relax.op.nn.pad(weight, [0, padded - out_channels, 0, 0, 0, 0, 0, 0]))
        packed = relax.op.layout_transform(
            weight, index_map=lambda o, i, h, w: (o // b, i // ib, h, w, i % ib, o % b))
        conv = self._emit_conv(call, data, packed, f"OIHW{ib}i{b}o", data_layout,
                               blocked_layout(b) if blocked_out else "NCHW", out_dtype=out_dtype)
        if padded != out_channels:
            conv = relax.op.strided_slice(self.builder_.emit(conv), axes=[1], begin=[0], end=[out_channels])
        return (relax.op.astype(self.builder_.emit(conv), "int32") if integer else conv), blocked_out

    def _conv2d_int8(self, call: relax.Call, source: relax.Expr, weight: relax.Expr, channels: int,
                     out_channels: int, blocked_out: bool) -> tuple[relax.Expr, bool] | None:
        """A dense uint8 x int8 -> int32 convolution on dot-product lanes:
        the weight packed to [O/b, I/4, KH, KW, b, 4] (zero-padded to whole
        vectors of output channels).  Others are computed in float.

        Where the instruction multiplies signed bytes only (Arm ``sdot``),
        the kernel reads ``x - 128`` as int8 and ``128 * sum(W)`` per output
        channel is added back: ``sum(x * W) = sum((x - 128) * W) + 128 *
        sum(W)``, exact in int32.  Its padding then pads with -128 (x = 0).
        Where it sums byte pairs in a saturating int16 (AVX2), only weights
        whose pairs cannot saturate run on it."""
        out_dtype = str(call.attrs.out_dtype or "")
        in_blocked = self._is_blocked(source)
        dot = self.int8_dot
        if (dot is None or int(call.attrs.groups) != 1 or (channels % 4 and in_blocked)
                or _dtype(source) != "uint8" or _dtype(weight) != "int8" or out_dtype != "int32"):
            return None
        shifted = dot.data == "int8"
        weights = const_array(weight)
        if (shifted or dot.pairs_int16) and weights is None:
            return None
        if dot.pairs_int16 and not pairs_fit_int16(weights):
            return None
        b, group = self.b, 4
        if channels % group:  # an RGB stem: zero channels (data and weights) up to whole fours
            extra = -channels % group
            weight = self.builder_.emit(relax.op.nn.pad(weight, [0, 0, 0, extra, 0, 0, 0, 0]))
            source = self.builder_.emit(relax.op.nn.pad(self.visit_expr(source), [0, 0, 0, extra, 0, 0, 0, 0]))
        data = self.blocked[source] if in_blocked else self.visit_expr(source)
        blocked_out = blocked_out and out_channels % b == 0
        padded = -(-out_channels // b) * b
        if padded != out_channels:
            weight = self.builder_.emit(relax.op.nn.pad(weight, [0, padded - out_channels, 0, 0, 0, 0, 0, 0]))
        packed = relax.op.layout_transform(
            weight, index_map=lambda o, i, h, w: (o // b, i // group, h, w, o % b, i % group))
        padding = [int(p) for p in call.attrs.padding]
        if shifted:
            data = self.builder_.emit(relax.op.astype(
                relax.op.subtract(relax.op.astype(data, "int16"), relax.const(128, "int16")), "int8"))
            if any(padding):
                top, left, bottom, right = padding
                widths = [0, 0, 0, 0, top, bottom, left, right] + ([0, 0] if in_blocked else [])
                data = self.builder_.emit(relax.op.nn.pad(data, widths, pad_value=-128.0))
                padding = [0, 0, 0, 0]
        conv = self._emit_conv(call, data, packed, f"OIHW{b}o{group}i",
                               blocked_layout(b) if in_blocked else "NCHW",
                               blocked_layout(b) if blocked_out else "NCHW", padding)
        if shifted:
            sums = np.zeros(padded, np.int64)
            sums[:out_channels] = weights.astype(np.int64).sum(axis=(1, 2, 3)) * 128
            shape = [1, padded // b, 1, 1, b] if blocked_out else [1, padded, 1, 1]
            conv = relax.op.add(self.builder_.emit(conv), relax.const(sums.astype(np.int32).reshape(shape)))
        if padded != out_channels:
            conv = relax.op.strided_slice(self.builder_.emit(conv), axes=[1], begin=[0], end=[out_channels])
        return conv, blocked_out

    def _emit_conv(self, call: relax.Call, data: relax.Expr, packed: relax.Expr, kernel_layout: str,
                   data_layout: str, out_layout: str, padding: list[int] | None = None,
                   out_dtype: str | None = None) -> relax.Expr:
        """The packed convolution.  An output width with no divisor near the
        register tile (111 = 3 x 37) is computed to the next whole number of
        tiles, on extra zero padding at the right, and sliced back: a tile
        with a tail would predicate every step of the reduction.  ``padding``
        replaces the call's (its data padded already), ``out_dtype`` its
        accumulator type (int8 computed in float)."""
        attrs = call.attrs
        padding = [int(p) for p in (attrs.padding if padding is None else padding)]
        width = (_static_shape(call) or [0, 0, 0, 0])[3]
        extra = 0
        if width > self.columns and width % column_tile(width, self.columns):
            extra = -(-width // self.columns) * self.columns - width
            padding[3] += extra * int(attrs.strides[1])
        conv = relax.op.nn.conv2d(
            data, self.builder_.emit(packed), strides=attrs.strides, padding=padding,
            dilation=attrs.dilation, groups=attrs.groups, data_layout=data_layout, kernel_layout=kernel_layout,
            out_layout=out_layout, out_dtype=out_dtype or attrs.out_dtype)
        if not extra:
            return conv
        return relax.op.strided_slice(self.builder_.emit(conv), axes=[3], begin=[0], end=[width])
