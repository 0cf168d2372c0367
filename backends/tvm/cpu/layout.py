"""Layout planning at the Relax level: convolution weights packed for NCHW[b]c.

Each NCHW ``relax.nn.conv2d`` whose output channels are a multiple of ``b``
(the target's fp32 vector lanes, else a smaller power of two down to 4) gets
its weight packed to OIHW[i]i[b]o (``i`` = ``b`` where it divides the input
channels, all of them for an RGB stem; depthwise: OIHW1i[b]o) by a
``layout_transform`` of the constant, which ``FoldConstant`` evaluates at
compile time.  Activations stay NCHW between kernels: the convolution's
kernel blocks its input in the copy that zero-padding makes anyway and
unblocks its output at the register tile, so elementwise epilogues (bias,
activation, residual add) fuse into it as they are.  Keeping activations
blocked across kernels (NeoCPU's global layout) is the next step.  Grouped
convolutions other than depthwise stay as they are.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_LAYOUT_TRANSFORM = tvm.ir.Op.get("relax.layout_transform")


def block_size(channels: int, lanes: int) -> int | None:
    """The channel block: ``lanes`` if ``channels`` is a multiple of it, else the
    largest smaller power of two (>= 4) that is."""
    b = lanes
    while b >= 4:
        if channels % b == 0:
            return b
        b //= 2
    return None


def input_block(in_channels: int, out_block: int) -> int | None:
    """The input-channel block of a dense convolution: the output block where it
    divides the input channels; all of them for a stem with a few (RGB: 3)."""
    if in_channels % out_block == 0:
        return out_block
    if in_channels <= out_block:
        return in_channels
    return block_size(in_channels, out_block)


def plan(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """Every function of ``mod`` with its convolutions blocked (see the module doc)."""
    out = mod
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewritten = _BlockConvolutions(mod, lanes).visit_expr(func)
            out = out.with_function(gv, rewritten) if hasattr(out, "with_function") else _replace(out, gv, rewritten)
    return out


def _replace(mod: tvm.IRModule, gv: tvm.ir.GlobalVar, func: relax.Function) -> tvm.IRModule:
    updated = tvm.IRModule({g: f for g, f in mod.functions_items()}, attrs=mod.attrs)
    updated[gv] = func
    return updated


@mutator
class _BlockConvolutions(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int):
        super().__init__(mod)
        self.lanes = lanes

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor naming)
        call = super().visit_call_(call)
        if call.op != _CONV2D:
            return call
        attrs = call.attrs
        if (str(attrs.data_layout), str(attrs.kernel_layout)) != ("NCHW", "OIHW"):
            return call
        if str(attrs.out_layout or "NCHW") != "NCHW":
            return call
        data, weight = call.args
        dshape, wshape = data.ty.shape, weight.ty.shape
        if not all(isinstance(d, tvm.tirx.IntImm) for d in list(dshape) + list(wshape)):
            return call
        channels, out_channels = int(dshape[1]), int(wshape[0])
        groups = int(attrs.groups)
        depthwise = groups == channels == out_channels and int(wshape[1]) == 1
        if groups != 1 and not depthwise:
            return call
        b = block_size(out_channels, self.lanes)
        ib = 1 if depthwise else (input_block(channels, b) if b else None)
        if b is None or ib is None:
            return call
        if depthwise:
            kernel_layout = f"OIHW1i{b}o"
            kh, kw = int(wshape[2]), int(wshape[3])
            packed = relax.op.reshape(relax.op.permute_dims(
                relax.op.reshape(weight, (out_channels // b, b, kh, kw)), [0, 2, 3, 1]),
                (out_channels // b, 1, kh, kw, 1, b))
        else:
            kernel_layout = f"OIHW{ib}i{b}o"
            packed = relax.op.layout_transform(
                weight, index_map=lambda o, i, h, w: (o // b, i // ib, h, w, i % ib, o % b))
        return relax.op.nn.conv2d(
            data, self.builder_.emit(packed), strides=attrs.strides, padding=attrs.padding,
            dilation=attrs.dilation, groups=groups, data_layout="NCHW", kernel_layout=kernel_layout,
            out_layout="NCHW", out_dtype=attrs.out_dtype)
