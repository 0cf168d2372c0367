"""Channel-blocked 2-D convolution: compute, legalization and schedule.

Layout NCHW[b]c (data and output: ``[N, C/b, H, W, b]``); weights OIHW[b]i[b]o
(``[O/b, I/b, KH, KW, b, b]``) for a dense convolution and OIHW1i[b]o
(``[C/b, 1, KH, KW, 1, b]``) for a depthwise one, packed at compile time.  A
vector of ``b`` output channels is the innermost axis of both the output and
the weights, so the inner loop is one vector FMA per input channel and tap:
the output column's input value broadcast, times ``b`` weights.

The schedule keeps a register tile of ``tile_w`` output columns by one vector
of output channels in ``tile_w`` accumulators (NeoCPU's ``reg_n``), runs the
reduction (input-channel blocks, kernel rows and columns, channels within a
block) around it, writes the tile once, applies the fused epilogue (bias,
activation, residual add, the layout transform back) while the rows are
still in cache, and spreads the output rows over the cores.
"""
from __future__ import annotations

import re
from typing import Any

import tvm
from tvm import relax, s_tir, te, tirx

from graphopt.backends.tvm.cpu.generic import loop_product
from graphopt.backends.tvm.cpu.target import int8_dot, num_cores, parallel_worthwhile, vector_registers
from graphopt.backends.tvm.cpu.templates import Config, TemplateRule

DENSE = "conv2d_nchwc"
DENSE_INT8 = "conv2d_nchwc_int8"
DEPTHWISE = "depthwise_conv2d_nchwc"
PACK = "pack_nchwc"
UNPACK = "unpack_nchwc"
_BLOCKED_KERNEL = re.compile(r"^OIHW(\d+)i(\d+)o$")
# uint8 x int8 -> int32 on dot-product instructions: [O/b, I/4, KH, KW, b, 4],
# four input channels of one output channel adjacent (one 32-bit lane).
_INT8_KERNEL = re.compile(r"^OIHW(\d+)o4i$")
INT8_GROUP = 4


# ---------------------------------------------------------------- compute


def _blocked_input(data: te.Tensor, b: int, pad: tuple[int, int, int, int]) -> te.Tensor:
    """NCHW data as [N, C/b, H + pads, W + pads, b], zero-padded: the copy
    padding needs anyway also blocks the channels."""
    top, left, bottom, right = pad
    n, c, h, w = data.shape

    def value(i, j, y, x, k):
        inside = tirx.all(y >= top, y < h + top, x >= left, x < w + left)
        return tirx.if_then_else(inside, data[i, j * b + k, y - top, x - left], tirx.const(0, data.dtype))

    return te.compute((n, c // b, h + top + bottom, w + left + right, b), value, name=PACK)


def _padded(data: te.Tensor, pad: tuple[int, int, int, int]) -> te.Tensor:
    """Blocked data [N, C/b, H, W, b] zero-padded in H and W (itself without padding)."""
    top, left, bottom, right = pad
    if not any(pad):
        return data
    n, cb, h, w, b = data.shape

    def value(i, j, y, x, k):
        inside = tirx.all(y >= top, y < h + top, x >= left, x < w + left)
        return tirx.if_then_else(inside, data[i, j, y - top, x - left, k], tirx.const(0, data.dtype))

    return te.compute((n, cb, h + top + bottom, w + left + right, b), value, name=PACK)


def _int8_input(data: te.Tensor, pad: tuple[int, int, int, int]) -> te.Tensor:
    """NCHW 8-bit data (channels a multiple of 4) blocked by 16 channels, or
    by 4 where 16 does not divide them, zero-padded."""
    n, c = (int(d) for d in data.shape[:2])
    return _blocked_input(data, 16 if c % 16 == 0 else INT8_GROUP, pad)


def _unblocked(out: te.Tensor) -> te.Tensor:
    """[N, C/b, H, W, b] back to NCHW, computed at the register tile."""
    n, cb, h, w, b = out.shape
    return te.compute((n, cb * b, h, w), lambda i, c, y, x: out[i, c // b, y, x, c % b], name=UNPACK)


def _source(data: te.Tensor, b: int, pad: tuple[int, int, int, int]) -> te.Tensor:
    return _padded(data, pad) if len(data.shape) == 5 else _blocked_input(data, b, pad)


def _out_size(size, kernel: int, stride: int, dilation: int, before: int, after: int) -> int:
    return (int(size) + before + after - dilation * (kernel - 1) - 1) // stride + 1


def _geometry(data: te.Tensor, kh: int, kw: int, strides, padding, dilation):
    h, w = data.shape[2], data.shape[3]
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilation)
    top, left, bottom, right = (int(p) for p in padding)
    oh = _out_size(h, kh, sh, dh, top, bottom)
    ow = _out_size(w, kw, sw, dw, left, right)
    return (sh, sw), (dh, dw), (top, left, bottom, right), oh, ow


def conv2d_nchwc(data: te.Tensor, weight: te.Tensor, strides, padding, dilation, out_dtype: str,
                 out_blocked: bool = False) -> te.Tensor:
    """Dense convolution computed blocked, weight [O/b, I/ib, KH, KW, ib, b]:
    data NCHW or [N, C/ib, H, W, ib]; output NCHW or [N, O/b, OH, OW, b]."""
    oc_blocks, ic_blocks, kh, kw, ib, ob = (int(d) for d in weight.shape)
    (sh, sw), (dh, dw), pad, oh, ow = _geometry(data, kh, kw, strides, padding, dilation)
    src = _source(data, ib, pad)
    rc = te.reduce_axis((0, ic_blocks), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    ri = te.reduce_axis((0, ib), "ri")
    out = te.compute(
        (data.shape[0], oc_blocks, oh, ow, ob),
        lambda i, o, y, x, c: te.sum(
            src[i, rc, y * sh + ry * dh, x * sw + rx * dw, ri].astype(out_dtype)
            * weight[o, rc, ry, rx, ri, c].astype(out_dtype),
            axis=[rc, ry, rx, ri],
        ),
        name=DENSE,
    )
    return out if out_blocked else _unblocked(out)


def conv2d_nchwc_int8(data: te.Tensor, weight: te.Tensor, strides, padding, dilation, out_dtype: str,
                      out_blocked: bool = False) -> te.Tensor:
    """uint8 (or int8) x int8 dense convolution, weight [O/b, I/4, KH, KW, b, 4]:
    the innermost reduction is the four input channels one dot-product lane
    (VNNI ``vpdpbusd``, Arm ``sdot``/``usdot``) sums.  Data NCHW or
    [N, C/sb, H, W, sb] (sb a multiple of 4); output NCHW or
    [N, O/b, OH, OW, b], int32."""
    oc_blocks, groups, kh, kw, ob, _ = (int(d) for d in weight.shape)
    (sh, sw), (dh, dw), pad, oh, ow = _geometry(data, kh, kw, strides, padding, dilation)
    src = _padded(data, pad) if len(data.shape) == 5 else _int8_input(data, pad)
    per_block = int(src.shape[4]) // INT8_GROUP  # groups of four in one block of the source
    rc = te.reduce_axis((0, groups), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    r4 = te.reduce_axis((0, INT8_GROUP), "r4")
    out = te.compute(
        (data.shape[0], oc_blocks, oh, ow, ob),
        lambda i, o, y, x, c: te.sum(
            src[i, rc // per_block, y * sh + ry * dh, x * sw + rx * dw, rc % per_block * INT8_GROUP + r4]
            .astype(out_dtype) * weight[o, rc, ry, rx, c, r4].astype(out_dtype),
            axis=[rc, ry, rx, r4],
        ),
        name=DENSE_INT8,
    )
    return out if out_blocked else _unblocked(out)


def depthwise_conv2d_nchwc(data: te.Tensor, weight: te.Tensor, strides, padding, dilation,
                           out_dtype: str, out_blocked: bool = False) -> te.Tensor:
    """Depthwise convolution computed blocked, weight [C/b, 1, KH, KW, 1, b]:
    data NCHW or [N, C/b, H, W, b]; output NCHW or [N, C/b, OH, OW, b]."""
    c_blocks, _, kh, kw, _, b = (int(d) for d in weight.shape)
    (sh, sw), (dh, dw), pad, oh, ow = _geometry(data, kh, kw, strides, padding, dilation)
    src = _source(data, b, pad)
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    out = te.compute(
        (data.shape[0], c_blocks, oh, ow, b),
        lambda i, o, y, x, c: te.sum(
            src[i, o, y * sh + ry * dh, x * sw + rx * dw, c].astype(out_dtype)
            * weight[o, 0, ry, rx, 0, c].astype(out_dtype),
            axis=[ry, rx],
        ),
        name=DEPTHWISE,
    )
    return out if out_blocked else _unblocked(out)


# ---------------------------------------------------------------- legalization


_BLOCKED_DATA = re.compile(r"^NCHW(\d+)c$")


def blocked_kind(attrs: Any) -> tuple[str, bool] | None:
    """("dense"|"dense_int8"|"depthwise", output blocked) for a conv2d whose
    weight graphopt packed, its data and output NCHW or NCHW[b]c."""
    data_layout, out_layout = str(attrs.data_layout), str(attrs.out_layout or attrs.data_layout)
    if not all(layout == "NCHW" or _BLOCKED_DATA.match(layout) for layout in (data_layout, out_layout)):
        return None
    out_blocked = out_layout != "NCHW"
    if _INT8_KERNEL.match(str(attrs.kernel_layout)):
        return ("dense_int8", out_blocked) if int(attrs.groups) == 1 else None
    m = _BLOCKED_KERNEL.match(str(attrs.kernel_layout))
    if not m:
        return None
    i = int(m.group(1))
    if int(attrs.groups) == 1:
        return "dense", out_blocked
    if i == 1 and int(attrs.groups) > 1:
        return "depthwise", out_blocked
    return None


def legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``relax.nn.conv2d`` in a blocked layout to graphopt's compute; any other
    layout to TVM's own legalization."""
    kind = blocked_kind(call.attrs)
    if kind is None:
        default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")
        return default(bb, call)
    out_dtype = str(call.attrs.out_dtype or "")
    if out_dtype in ("", "None", "void"):
        out_dtype = str(call.args[0].ty.dtype)
    compute, name = {"dense": (conv2d_nchwc, DENSE), "dense_int8": (conv2d_nchwc_int8, DENSE_INT8),
                     "depthwise": (depthwise_conv2d_nchwc, DEPTHWISE)}[kind[0]]
    return bb.call_te(
        compute, call.args[0], call.args[1],
        [int(s) for s in call.attrs.strides], [int(p) for p in call.attrs.padding],
        [int(d) for d in call.attrs.dilation], out_dtype, kind[1],
        primfunc_name_hint=name,
    )


# ---------------------------------------------------------------- schedule


def column_tile(width: int, limit: int = 14) -> int:
    """Output columns per register tile: the largest divisor of ``width`` up to
    ``limit`` (so no column is left for a tail), else ``limit`` with a tail."""
    for t in range(min(limit, width), 0, -1):
        if width % t == 0 and t >= max(2, min(limit, width) // 2):
            return t
    return min(limit, width)


def register_tile(width: int, channel_blocks: int, registers: int) -> tuple[int, int]:
    """(columns, channel vectors) of the register tile.  Each step of the
    reduction loads one weight vector per channel vector and broadcasts one
    input value per column, then issues columns x vectors FMAs: two vectors
    need 2 + columns loads for 2 x columns FMAs, which keeps the FMA units
    busy where one vector is bound by its loads.  Accumulators, the weight
    vectors and a broadcast must fit the vector registers."""
    vectors = 2 if channel_blocks % 2 == 0 else 1
    return column_tile(width, column_limit(registers, vectors)), vectors


def column_limit(registers: int, vectors: int = 2) -> int:
    """The most output columns a register tile of ``vectors`` channel vectors
    holds: accumulators, the weight vectors and one broadcast in registers."""
    return min(14, (registers - vectors - 1) // vectors)


class BlockedConv2D(TemplateRule):
    """Schedule the kernels that hold a blocked convolution (dense or depthwise).

    Knobs: ``columns`` and ``vectors`` of the register tile, ``parallel``
    (rows over the cores or not), ``order`` of the parallel rows
    (``channels``: a block of output channels outside the output rows, its
    weights reused across the rows; ``rows``: an input row reused across
    the channel blocks)."""

    def knobs(self, func: tirx.PrimFunc, target: tvm.target.Target) -> dict[str, list] | None:
        sch = s_tir.Schedule(func)
        conv = _find_block(sch, (DENSE, DENSE_INT8, DEPTHWISE))
        if conv is None:
            return None
        loops = sch.get_loops(conv)
        width, blocks = _extent(sch, loops[3]), _extent(sch, loops[1])
        registers = vector_registers(target)
        columns, vectors = register_tile(width, blocks, registers)
        parallel = parallel_worthwhile(target, macs=loop_product(sch, conv))
        other_vectors = [v for v in (1, 2, 4) if v != vectors and blocks % v == 0 and column_limit(registers, v) >= 2]
        other_columns = sorted({column_tile(width, limit) for limit in (4, 6, 8, 10, 12, 14)} - {columns})
        return {
            "columns": [columns, *other_columns],
            "vectors": [vectors, *other_vectors],
            "parallel": [parallel, not parallel] if num_cores(target) > 1 else [False],
            "order": ["channels", "rows"],
        }

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target, config: Config) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        conv = _find_block(sch, (DENSE, DENSE_INT8, DEPTHWISE))
        if conv is None:
            return None
        _schedule(sch, conv, target, config)
        return sch


def _find_block(sch: s_tir.Schedule, names: tuple[str, ...]):
    for name in names:
        try:
            return sch.get_sblock(name)
        except Exception:  # no such block
            continue
    return None


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _schedule(sch: s_tir.Schedule, conv, target: tvm.target.Target, config: Config) -> None:
    loops = sch.get_loops(conv)
    n, oc, oh, ow, oc_inner = loops[:5]
    reduction = loops[5:]
    # int8: the four channels of one dot-product lane stay inside the vector.
    dot = reduction.pop() if sch.get(conv).name_hint == DENSE_INT8 else None
    columns, vectors, parallel = config["columns"], config["vectors"], config["parallel"]
    oc_outer, oc_tile = sch.split(oc, [None, vectors])
    ow_outer, ow_tile = sch.split(ow, [None, columns])
    outer = (n, oc_outer, oh) if config["order"] == "channels" else (n, oh, oc_outer)
    sch.reorder(*outer, ow_outer, *reduction, ow_tile, oc_tile, oc_inner, *([dot] if dot else []))
    # The tile accumulates in a local buffer the compiler keeps in registers.
    acc = sch.cache_write(conv, 0, "local")
    sch.reverse_compute_at(acc, ow_outer, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.unroll(oc_tile)
    sch.unroll(ow_tile)
    if dot is None:  # int8: the dot-product intrinsic covers it
        sch.vectorize(oc_inner)
    rows = sch.fuse(*outer)
    # The blocked, zero-padded copy of the input is made in parallel up front.
    pack = _find_block(sch, (PACK,))
    if pack is not None:
        _parallel_vectorized(sch, pack, parallel)
    # Elementwise work on the epilogue's other operands (the residual's
    # dequantize) is inlined into the epilogue instead of making its own
    # pass over a full tensor.
    for block in _blocks_before(sch, conv):
        if sch.get(block).name_hint != PACK:
            try:
                sch.compute_inline(block)
            except Exception:  # not inlinable: it stays a pass of its own
                _parallel_vectorized(sch, block, parallel)
    # Unblocking and the fused epilogue (bias, activation, residual add) run
    # per output row, right after it, while it is in cache.
    for block in _inline_chain(sch, _blocks_after(sch, conv, skip=acc)):
        try:
            sch.reverse_compute_at(block, rows, preserve_unit_loops=True)
            inner = sch.get_loops(block)[-1]
            if _extent(sch, inner) > 1:
                sch.vectorize(inner)
        except Exception:  # the primitive refused this block
            _parallel_vectorized(sch, block, parallel)
    if parallel:
        sch.parallel(rows)
    init = sch.decompose_reduction(conv, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])
    if dot is not None:
        sch.tensorize(sch.get_loops(conv)[-2], int8_dot(target).intrinsic)


def _inline_chain(sch: s_tir.Schedule, blocks: list) -> list:
    """Inline every elementwise step of the epilogue into its consumer, so the
    chain (unblocking, bias, activation, residual add) makes one pass over the
    output instead of one buffer each; returns the blocks left."""
    left = []
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except Exception:  # an output, or not inlinable: keep it as a step
            left.append(block)
    return left + blocks[-1:]


def _blocks_before(sch: s_tir.Schedule, block) -> list:
    """The root's blocks before ``block`` in program order."""
    children = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in children]
    return children[:names.index(sch.get(block).name_hint)]


def _blocks_after(sch: s_tir.Schedule, block, skip) -> list:
    """The root's blocks after ``block`` in program order (the fused epilogue)."""
    children = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in children]
    at = names.index(sch.get(block).name_hint)
    skipped = sch.get(skip).name_hint
    return [b for b, name in zip(children[at + 1:], names[at + 1:]) if name != skipped]


def _parallel_vectorized(sch: s_tir.Schedule, block, parallel: bool) -> None:
    """An injective block: outer loops fused (and parallel), the innermost vectorized."""
    loops = sch.get_loops(block)
    if not loops:
        return
    if len(loops) > 1:
        outer = sch.fuse(*loops[:-1])
        if parallel:
            sch.parallel(outer)
    if _extent(sch, loops[-1]) > 1:
        sch.vectorize(loops[-1])
