"""Layout planning at the Relax level: convolution weights packed for NCHW[b]c.

Each dense NCHW ``relax.nn.conv2d`` gets its weight packed to OIHW[i]i[b]o,
``b`` the target's fp32 vector lanes or a smaller power of two (>= 4) that
divides the output channels, else whole vectors with the last one
zero-padded and sliced off (``i`` = ``b`` where it divides the input
channels, else their largest divisor up to ``b``: all of them for an RGB
stem); a depthwise one whose channels ``b`` divides gets OIHW1i[b]o; by a
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


def plan(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """Every function of ``mod`` with its convolutions blocked (see the module doc)."""
    return map_functions(mod, lambda: _BlockConvolutions(mod, lanes))


def map_functions(mod: tvm.IRModule, make_mutator) -> tvm.IRModule:
    """``mod`` with each Relax function rewritten by a fresh ``make_mutator()``."""
    out = tvm.IRModule({g: f for g, f in mod.functions_items()}, attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gv] = make_mutator().visit_expr(func)
    return out


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
        if depthwise:
            b = block_size(out_channels, self.lanes)
            if b is None:
                return call
            kh, kw = int(wshape[2]), int(wshape[3])
            packed = relax.op.reshape(relax.op.permute_dims(
                relax.op.reshape(weight, (out_channels // b, b, kh, kw)), [0, 2, 3, 1]),
                (out_channels // b, 1, kh, kw, 1, b))
            return self._conv(call, data, packed, f"OIHW1i{b}o")
        b, padded = output_block(out_channels, self.lanes)
        ib = input_block(channels, b)
        if padded != out_channels:
            weight = self.builder_.emit(relax.op.nn.pad(weight, [0, padded - out_channels, 0, 0, 0, 0, 0, 0]))
        packed = relax.op.layout_transform(
            weight, index_map=lambda o, i, h, w: (o // b, i // ib, h, w, i % ib, o % b))
        conv = self._conv(call, data, packed, f"OIHW{ib}i{b}o")
        if padded == out_channels:
            return conv
        return relax.op.strided_slice(self.builder_.emit(conv), axes=[1], begin=[0], end=[out_channels])

    def _conv(self, call: relax.Call, data: relax.Expr, packed: relax.Expr, kernel_layout: str) -> relax.Call:
        attrs = call.attrs
        return relax.op.nn.conv2d(
            data, self.builder_.emit(packed), strides=attrs.strides, padding=attrs.padding,
            dilation=attrs.dilation, groups=attrs.groups, data_layout="NCHW", kernel_layout=kernel_layout,
            out_layout="NCHW", out_dtype=attrs.out_dtype)
