"""Transposed convolution as a stride-1 convolution and a depth-to-space.

A transposed convolution of stride ``s`` writes output row ``t = s*q + r``
from the input rows ``q - j`` and the kernel taps ``j*s + r``: per phase
``r`` it is an ordinary stride-1 convolution of ``K = ceil(k / s)`` taps.
All ``s*s`` phases share the input, so they become one convolution with
``s*s`` times the output channels (weights regrouped at compile time), whose
output is interleaved back (depth-to-space) and cropped by the padding.
That convolution then gets the blocked kernels of :mod:`.conv2d`, instead of
the scatter-shaped loop nest TVM legalizes a transposed convolution to (no
zero is ever multiplied: the DBNet upsampling head ran 60x slower).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from graphopt.backends.tvm.cpu.layout import map_functions

_CONV2D_TRANSPOSE = tvm.ir.Op.get("relax.nn.conv2d_transpose")


def phase_weights(weight: np.ndarray, stride: tuple[int, int], dilation: tuple[int, int],
                  taps: tuple[int, int]) -> np.ndarray:
    """IOHW transposed-convolution weights ``[C, O, kh, kw]`` as OIHW weights
    ``[O*sh*sw, C, Kh, Kw]`` of the equivalent stride-1 convolution, output
    channel ``(o, ry, rx)`` holding phase ``(ry, rx)``."""
    c, o, kh, kw = weight.shape
    (sh, sw), (dh, dw), (th, tw) = stride, dilation, taps
    dilated = np.zeros((c, o, th * sh, tw * sw), weight.dtype)
    dilated[:, :, : (kh - 1) * dh + 1 : dh, : (kw - 1) * dw + 1 : dw] = weight
    # tap (j, i) of phase (ry, rx) is dilated[..., j*sh + ry, i*sw + rx], flipped for correlation
    phases = dilated.reshape(c, o, th, sh, tw, sw)[:, :, ::-1, :, ::-1, :]
    return np.ascontiguousarray(phases.transpose(1, 3, 5, 0, 2, 4).reshape(o * sh * sw, c, th, tw))


def rewrite(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every eligible ``relax.nn.conv2d_transpose`` rewritten."""
    return map_functions(mod, lambda: _Deconvolution(mod))


@mutator
class _Deconvolution(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor naming)
        call = super().visit_call_(call)
        if call.op != _CONV2D_TRANSPOSE:
            return call
        attrs = call.attrs
        layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout or "NCHW"))
        data, weight = call.args
        if layouts != ("NCHW", "IOHW", "NCHW") or int(attrs.groups) != 1 or not isinstance(weight, tvm.ir.expr.Constant):
            return call
        dshape, oshape = data.ty.shape, call.ty.shape
        if not all(isinstance(d, tvm.tirx.IntImm) for d in list(dshape) + list(oshape)):
            return call
        n, _, h, w = (int(d) for d in dshape)
        _, o, oh, ow = (int(d) for d in oshape)
        w_np = weight.value.numpy()
        kh, kw = w_np.shape[2:]
        sh, sw = (int(s) for s in attrs.strides)
        dh, dw = (int(d) for d in attrs.dilation)
        top, left = int(attrs.padding[0]), int(attrs.padding[1])
        # Enough taps that the interleaved output covers the crop [pad, pad + out).
        th = max(1, -(-((kh - 1) * dh + 1) // sh), -(-(oh + top) // sh) - h + 1)
        tw = max(1, -(-((kw - 1) * dw + 1) // sw), -(-(ow + left) // sw) - w + 1)
        if th * tw > 64:  # pathological: leave it to TVM
            return call
        packed = relax.const(phase_weights(w_np, (sh, sw), (dh, dw), (th, tw)))
        conv = self.builder_.emit(relax.op.nn.conv2d(
            data, packed, strides=(1, 1), padding=(th - 1, tw - 1, th - 1, tw - 1), out_dtype=attrs.out_dtype))
        qh, qw = h + th - 1, w + tw - 1
        phases = relax.op.reshape(conv, (n, o, sh, sw, qh, qw))
        interleaved = relax.op.reshape(relax.op.permute_dims(phases, [0, 1, 4, 2, 5, 3]), (n, o, qh * sh, qw * sw))
        if (top, left, oh, ow) == (0, 0, qh * sh, qw * sw):
            return interleaved
        return relax.op.strided_slice(interleaved, axes=[2, 3], begin=[top, left], end=[top + oh, left + ow])
