"""Integer kernels from QDQ models: the Relax rewrite behind TVM's int8 path.

An ONNX QDQ model (graphopt's ``quantize-static``) imports into Relax as float
compute between ``relax.dequantize`` and ``relax.quantize``.  Run as written,
that is float convolution plus extra elementwise work: slower than fp32.
:func:`lower_qdq` finds ``quantize(act?(add?(op(dq(x), dq(W)), dq(b))))`` with
``op`` a conv2d or matmul and emits the integer form a QLinearConv-style
runtime uses::

    acc = op(x_q, W_q, out_dtype=int32)            # uint8/int8 x int8
    acc = acc + (b_q - zx * sum(W_q))              # zero point folded into the bias
    y_q = cast(clip(round(acc * sx*sw/sy) + zy))   # per-channel requantization

The activation zero point ``zx`` is folded into a per-channel constant.  That
is exact only if padding also pads with ``zx``, so padded convolutions get an
explicit ``pad`` with value ``zx``.  Anything the rewrite cannot prove equal
stays in float and is counted under ``left_float`` with the reason.

Dequantize-then-requantize pairs around pure data movement (reshape,
transpose, max pooling with the same scale and zero point) are collapsed to
the integer op, so integer tensors flow between the kernels.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

_QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}
_CORE = ("relax.nn.conv2d", "relax.matmul")
# Data movement that commutes with dequantize (a positive scale keeps order).
_MOVES = ("relax.reshape", "relax.permute_dims", "relax.nn.max_pool2d", "relax.squeeze",
          "relax.expand_dims", "relax.flatten")


class _Skip(Exception):
    """A candidate that must stay in float; the message is the reason."""


def _op_name(expr) -> str | None:
    op = getattr(expr, "op", None)
    return getattr(op, "name", None) if isinstance(expr, relax.Call) else None


def const_array(expr) -> np.ndarray | None:
    """The value of a Relax constant as numpy, else None."""
    value = getattr(expr, "value", None)
    if isinstance(expr, tvm.ir.expr.GenericConst) and hasattr(value, "numpy"):
        return value.numpy()
    return None


def _dtype(expr) -> str:
    ty = getattr(expr, "ty", None)
    return str(getattr(ty, "dtype", ""))


def _shape(expr) -> tuple[int, ...] | None:
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None


def _scalar(expr, what: str) -> float:
    a = const_array(expr)
    if a is None or a.size != 1:
        raise _Skip(f"{what} is not a constant scalar")
    return float(a.reshape(-1)[0])


@mutator
class _Lowering(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.done: Counter = Counter()
        self.left: Counter = Counter()

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()

    # -- helpers ---------------------------------------------------------------
    def _value(self, expr):
        """The expression bound to ``expr`` when it is a variable (else itself)."""
        seen = 0
        while isinstance(expr, relax.Var) and seen < 64:
            bound = self.lookup_binding(expr)
            if bound is None:
                return expr
            expr, seen = bound, seen + 1
        return expr

    def _const_eval(self, expr) -> np.ndarray:
        """Fold a constant float expression (dequantize/reshape of constants)."""
        expr = self._value(expr)
        a = const_array(expr)
        if a is not None:
            return a
        name = _op_name(expr)
        if name == "relax.dequantize":
            q = self._const_eval(expr.args[0]).astype(np.float64)
            s = self._const_eval(expr.args[1]).astype(np.float64)
            z = self._const_eval(expr.args[2]).astype(np.float64)
            axis = int(expr.attrs.axis) % max(q.ndim, 1)
            if s.size > 1 or z.size > 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                s, z = s.reshape(shape), z.reshape(shape)
            return ((q - z) * s).astype(np.float32)
        if name in ("relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten"):
            out = _shape(expr)
            if out is None:
                raise _Skip("constant of unknown shape")
            return self._const_eval(expr.args[0]).reshape(out)
        if name == "relax.permute_dims":
            a = self._const_eval(expr.args[0])
            axes = expr.attrs.axes
            return np.transpose(a, None if axes is None else [int(i) for i in axes])
        raise _Skip(f"operand is not constant ({name or type(expr).__name__})")

    def _weight(self, expr, out_axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Integer weight (zero point removed) and its per-output-channel scale."""
        expr = self._value(expr)
        perm: list[int] | None = None
        if _op_name(expr) == "relax.permute_dims":
            axes = expr.attrs.axes
            n = len(_shape(expr) or ())
            perm = list(range(n))[::-1] if axes is None else [int(i) for i in axes]
            expr = self._value(expr.args[0])
        if _op_name(expr) != "relax.dequantize":
            raise _Skip("weight is not a DequantizeLinear output")
        q = const_array(self._value(expr.args[0]))
        if q is None:
            raise _Skip("weight is not constant")
        if str(q.dtype) not in _QRANGE:
            raise _Skip(f"weight type {q.dtype} is not int8/uint8")
        s = self._const_eval(expr.args[1]).astype(np.float64)
        z = self._const_eval(expr.args[2]).astype(np.int64)
        axis = int(expr.attrs.axis) % q.ndim
        shape = [1] * q.ndim
        if s.size > 1 or z.size > 1:
            shape[axis] = -1
        s_full = np.broadcast_to(s.reshape(shape if s.size > 1 else [1] * q.ndim), q.shape)
        w = q.astype(np.int64) - np.broadcast_to(z.reshape(shape if z.size > 1 else [1] * q.ndim), q.shape)
        if perm is not None:
            w, s_full = np.transpose(w, perm), np.transpose(s_full, perm)
        if w.min() < -128 or w.max() > 127:
            raise _Skip("weight minus its zero point does not fit int8")
        out_axis %= w.ndim
        per_channel = np.moveaxis(s_full, out_axis, 0).reshape(w.shape[out_axis], -1)
        if not np.all(per_channel == per_channel[:, :1]):
            raise _Skip("weight scale varies along a reduction axis")
        scale = per_channel[:, 0]
        if np.any(scale <= 0):
            raise _Skip("non-positive weight scale")
        return w.astype(np.int8), scale

    def _activation(self, expr) -> tuple[Any, float, int]:
        dq = self._value(expr)
        if _op_name(dq) != "relax.dequantize":
            raise _Skip("activation input is not a DequantizeLinear output")
        x = dq.args[0]
        if _dtype(x) not in _QRANGE:
            raise _Skip(f"activation type {_dtype(x)} is not int8/uint8")
        sx = _scalar(self._value(dq.args[1]), "activation scale")
        zx = int(round(_scalar(self._value(dq.args[2]), "activation zero point")))
        if sx <= 0:
            raise _Skip("non-positive activation scale")
        return x, sx, zx

    # -- the rewrite -------------------------------------------------------------
    def visit_call_(self, call):  # noqa: D401 - visitor hook
        call = self.visit_expr_post_order(call)
        if _op_name(call) != "relax.quantize":
            return call
        try:
            moved = self._passthrough(call)
            if moved is not None:
                self.done["passthrough"] += 1
                return moved
            new, kind = self._lower(call)
        except _Skip as why:
            if str(why) != "not a kernel":
                self.left[str(why)] += 1
            return call
        self.done[kind] += 1
        return new

    def _out_params(self, call) -> tuple[float, int, str]:
        sy = _scalar(self._value(call.args[1]), "output scale")
        zy = int(round(_scalar(self._value(call.args[2]), "output zero point")))
        out_dtype = str(call.attrs.out_dtype)
        if out_dtype not in _QRANGE:
            raise _Skip(f"output type {out_dtype} is not int8/uint8")
        if sy <= 0:
            raise _Skip("non-positive output scale")
        return sy, zy, out_dtype

    def _passthrough(self, call):
        """quantize(move(dequantize(a))) with equal parameters -> move(a)."""
        inner = self._value(call.args[0])
        name = _op_name(inner)
        if name not in _MOVES:
            return None
        dq = self._value(inner.args[0])
        if _op_name(dq) != "relax.dequantize":
            return None
        a = dq.args[0]
        try:
            sy, zy, out_dtype = self._out_params(call)
            sx = _scalar(self._value(dq.args[1]), "scale")
            zx = int(round(_scalar(self._value(dq.args[2]), "zero point")))
        except _Skip:
            return None
        if _dtype(a) != out_dtype or sx != sy or zx != zy:
            return None
        if name == "relax.nn.max_pool2d" and str(inner.attrs.layout) != "NCHW":
            return None
        return relax.Call(inner.op, [a, *inner.args[1:]], inner.attrs)

    def _lower(self, call):
        sy, zy, out_dtype = self._out_params(call)
        qmin, qmax = _QRANGE[out_dtype]
        expr = self._value(call.args[0])
        name = _op_name(expr)
        # optional activation: its bounds, quantized, narrow the output clip
        if name == "relax.nn.relu":
            qmin = max(qmin, zy)
            expr = self._value(expr.args[0])
        elif name == "relax.clip":
            try:
                lo, hi = (float(a.value) for a in expr.args[1:3])
            except (AttributeError, TypeError, ValueError):
                raise _Skip("clip bounds are not constants") from None
            if lo > -np.inf:
                qmin = max(qmin, int(np.round(lo / sy)) + zy)
            if hi < np.inf:
                qmax = min(qmax, int(np.round(hi / sy)) + zy)
            expr = self._value(expr.args[0])
        bias = None
        if _op_name(expr) == "relax.add":
            a, b = (self._value(e) for e in expr.args)
            if _op_name(a) in _CORE:
                core, bias = a, expr.args[1]
            elif _op_name(b) in _CORE:
                core, bias = b, expr.args[0]
            else:
                raise _Skip("not a kernel")
        else:
            core = expr
        kind = _op_name(core)
        if kind not in _CORE:
            raise _Skip("not a kernel")
        x, sx, zx = self._activation(core.args[0])
        if kind == "relax.nn.conv2d":
            return self._conv(core, x, sx, zx, bias, sy, zy, qmin, qmax, out_dtype), "conv2d"
        return self._matmul(core, x, sx, zx, bias, sy, zy, qmin, qmax, out_dtype), "matmul"

    def _bias(self, bias, channels: int, out_shape: tuple[int, ...], axis: int, acc_scale: np.ndarray) -> np.ndarray:
        if bias is None:
            return np.zeros(channels, np.int64)
        b = self._const_eval(bias).astype(np.float64)
        keep = [1] * len(out_shape)
        keep[axis] = channels
        if b.size != channels or b.ndim > len(out_shape) or \
                tuple(b.shape) != tuple(keep[len(out_shape) - b.ndim:]):
            raise _Skip("bias is not one value per output channel")
        b = b.reshape(-1)
        q = np.round(b / acc_scale)
        if np.abs(q).max(initial=0) >= 2 ** 31:
            raise _Skip("bias overflows int32")
        return q.astype(np.int64)

    def _requantize(self, acc, corrected: np.ndarray, multiplier: np.ndarray, shape: list[int],
                    zy: int, qmin: int, qmax: int, out_dtype: str):
        if np.abs(corrected).max(initial=0) >= 2 ** 31:
            raise _Skip("zero-point correction overflows int32")
        acc = relax.op.add(acc, relax.const(corrected.astype(np.int32).reshape(shape)))
        f = relax.op.multiply(relax.op.astype(acc, "float32"),
                              relax.const(multiplier.astype(np.float32).reshape(shape)))
        f = relax.op.round(f)
        if zy:
            f = relax.op.add(f, relax.const(np.float32(zy)))
        f = relax.op.clip(f, float(qmin), float(qmax))
        return relax.op.astype(f, out_dtype)

    def _conv(self, core, x, sx, zx, bias, sy, zy, qmin, qmax, out_dtype):
        attrs = core.attrs
        if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW":
            raise _Skip(f"conv2d layout {attrs.data_layout}/{attrs.kernel_layout}")
        w, sw = self._weight(core.args[1], 0)
        out_shape = _shape(core)
        if out_shape is None:
            raise _Skip("conv2d output shape unknown")
        channels = w.shape[0]
        acc_scale = sx * sw
        b = self._bias(bias, channels, out_shape, 1, acc_scale)
        padding = [int(p) for p in attrs.padding]
        data = x
        if zx != 0 and any(padding):
            top, left, bottom, right = padding
            data = relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zx))
            padding = [0, 0, 0, 0]
        acc = relax.op.nn.conv2d(data, relax.const(w), strides=[int(s) for s in attrs.strides],
                                 padding=padding, dilation=[int(d) for d in attrs.dilation],
                                 groups=int(attrs.groups), out_dtype="int32")
        corrected = b - zx * w.astype(np.int64).sum(axis=(1, 2, 3))
        return self._requantize(acc, corrected, acc_scale / sy, [1, channels, 1, 1], zy, qmin, qmax, out_dtype)

    def _matmul(self, core, x, sx, zx, bias, sy, zy, qmin, qmax, out_dtype):
        w, sw = self._weight(core.args[1], -1)
        if w.ndim != 2:
            raise _Skip("matmul weight is not 2-D")
        out_shape = _shape(core)
        if out_shape is None:
            raise _Skip("matmul output shape unknown")
        channels = w.shape[1]
        acc_scale = sx * sw
        b = self._bias(bias, channels, out_shape, len(out_shape) - 1, acc_scale)
        acc = relax.op.matmul(x, relax.const(w), out_dtype="int32")
        corrected = b - zx * w.astype(np.int64).sum(axis=0)
        return self._requantize(acc, corrected, acc_scale / sy, [channels], zy, qmin, qmax, out_dtype)


@mutator
class _FloatRounding(PyExprMutator):
    """Per-tensor quantize / dequantize left between float ops, in the
    cheapest exact float form (rounding half to even, as ONNX specifies):

    * ``dequantize(quantize(y, s, z), s, z)``, a quantization step between
      two float ops (a QDQ model quantizes each piece of a HardSwish), is
      ``clip(round(y / s), qmin - z, qmax - z) * s``: no integer tensor, no
      casts, no zero point;
    * any other ``quantize(y, s, z)`` is ``cast(clip(round(y / s) + z))``.
    """

    def __init__(self, mod: tvm.IRModule, pairs: bool) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.pairs = pairs  # this pass rewrites the pairs, or (after) the lone quantize ops
        self.done: Counter = Counter()

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.uses = _use_counts(func)
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()

    def _params(self, call) -> tuple[float, int] | None:
        try:
            scale = _scalar(self._value(call.args[1]), "scale")
            zero = int(round(_scalar(self._value(call.args[2]), "zero point")))
        except _Skip:
            return None
        return (scale, zero) if scale > 0 else None

    def _value(self, expr):
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        return expr if bound is None else bound

    def visit_call_(self, call):  # noqa: D401 - visitor hook
        call = self.visit_expr_post_order(call)
        name = _op_name(call)
        # A quantized tensor that integer kernels also read stays: its
        # dequantize is cheap, and the quantize fuses into its producer.
        if self.pairs and name == "relax.dequantize" and _dtype(call) == "float32" \
                and self.uses.get(call.args[0], 0) == 1:
            inner = self._value(call.args[0])
            if _op_name(inner) == "relax.quantize" and _dtype(inner.args[0]) == "float32":
                params, inner_params = self._params(call), self._params(inner)
                if params is not None and params == inner_params and str(inner.attrs.out_dtype) in _QRANGE:
                    scale, zero = params
                    qmin, qmax = _QRANGE[str(inner.attrs.out_dtype)]
                    steps = relax.op.clip(_steps(inner.args[0], scale), float(qmin - zero), float(qmax - zero))
                    self.done["quantize_dequantize"] += 1
                    return relax.op.multiply(steps, relax.const(np.float32(scale)))
        if not self.pairs and name == "relax.quantize" and _dtype(call.args[0]) == "float32" \
                and str(call.attrs.out_dtype) in _QRANGE:
            params = self._params(call)
            if params is not None:
                scale, zero = params
                qmin, qmax = _QRANGE[str(call.attrs.out_dtype)]
                q = _steps(call.args[0], scale)
                if zero:
                    q = relax.op.add(q, relax.const(np.float32(zero)))
                self.done["quantize"] += 1
                return relax.op.astype(relax.op.clip(q, float(qmin), float(qmax)), str(call.attrs.out_dtype))
        return call


def _steps(y, scale: float):
    """``round(y / scale)``: quantization steps, ties to even, before the
    zero point and the clip."""
    return relax.op.round(relax.op.divide(y, relax.const(np.float32(scale))))


def _use_counts(func: relax.Function) -> Counter:
    """How many bindings (and the function's result) read each variable."""
    uses: Counter = Counter()
    body = func.body
    for block in body.blocks:
        for binding in block.bindings:
            uses.update(relax.analysis.free_vars(binding.value))
    uses.update(relax.analysis.free_vars(body.body))
    return uses


def _count_float_kernels(mod: tvm.IRModule) -> Counter:
    found: Counter = Counter()

    def visit(expr) -> None:
        name = _op_name(expr)
        if name in _CORE and _dtype(expr) == "float32":
            found[name.rsplit(".", 1)[-1]] += 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return found


def lower_qdq(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict]:
    """Rewrite DequantizeLinear -> conv2d/matmul -> (bias add) -> (relu/clip) ->
    QuantizeLinear into int8 x int8 -> int32 compute with requantization.

    Returns the new module and stats: ``rewritten`` (per kernel kind),
    ``passthrough`` (dequantize/requantize pairs dropped around data
    movement), ``left_float`` (reason -> count for candidates kept in float)
    and ``float_kernels`` (float conv2d/matmul left in the module)."""
    lowering = _Lowering(mod)
    new = lowering.run()
    new = relax.transform.DeadCodeElimination()(new)
    done: Counter = Counter()
    for pairs in (True, False):
        rounding = _FloatRounding(new, pairs)
        new = relax.transform.DeadCodeElimination()(rounding.run())
        done.update(rounding.done)
    stats: dict[str, Any] = {
        "rewritten": {k: v for k, v in lowering.done.items() if k != "passthrough"},
        "passthrough": lowering.done.get("passthrough", 0),
        "left_float": dict(lowering.left),
        "float_kernels": dict(_count_float_kernels(new)),
        "float_rounding": dict(done),
    }
    return new, stats
