"""Schedules for the kernels that are not convolutions or GEMVs.

* ``Injective``: every block spatial (elementwise chains, layout transforms,
  concatenation, padding, broadcasts): producers inlined into the last block
  where they can be, its loops fused, split by the vector lanes, the outer
  part parallel and the inner part vectorized.
* ``SpatialReduction``: one reduction block whose output is indexed by all its
  spatial loops (pooling, reductions over a window): spatial loops outside the
  reduction, except the innermost, which stays inside so that it vectorizes
  (a channel block in NCHW[b]c); outer loops parallel.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from graphopt.backends.tvm.cpu.target import parallel_worthwhile, vector_lanes


def _extent(sch: s_tir.Schedule, loop) -> int:
    value = sch.get(loop).extent
    return int(value) if isinstance(value, tirx.IntImm) else -1


def _iter_kinds(sch: s_tir.Schedule, block) -> str:
    kinds = []
    for iv in sch.get(block).iter_vars:
        kinds.append("S" if iv.iter_type == tirx.IterVar.DataPar else "R")
    return "".join(kinds)


def _inline_producers(sch: s_tir.Schedule, blocks: list) -> list:
    """Inline every block but the last that can be; returns the blocks left."""
    left = []
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except Exception:  # the primitive refused this block
            left.append(block)
    return left + blocks[-1:]


def loop_product(sch: s_tir.Schedule, block) -> int:
    """The iterations of ``block``'s loop nest."""
    total = 1
    for loop in sch.get_loops(block):
        total *= max(_extent(sch, loop), 1)
    return total


def parallel_vectorize(sch: s_tir.Schedule, block, target: tvm.target.Target, parallel: bool | None = None,
                       rows: bool = True) -> None:
    """Fuse ``block``'s loops, vectorize by the lanes, and run the outer part on
    all cores if ``parallel`` (None: if its size makes that worthwhile)."""
    lanes = vector_lanes(target)
    loops = sch.get_loops(block)
    if not loops:
        return
    innermost = _extent(sch, loops[-1])
    if rows and len(loops) > 1 and innermost > lanes and innermost % lanes:
        # Rows of whole vectors and a scalar tail: a vector spanning two rows
        # would compute each lane's indices with a division (resizing a
        # 162-wide map ran 8x slower).
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        if parallel_worthwhile(target, elements=loop_product(sch, block)) if parallel is None else parallel:
            sch.parallel(outer)
        vectorize_with_tail(sch, loops[-1], lanes)
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    total = _extent(sch, fused)
    if total <= 0:
        return
    vec = lanes if total % lanes == 0 else (lanes // 2 if total % max(lanes // 2, 1) == 0 else 1)
    if vec > 1:
        outer, inner = sch.split(fused, [None, vec])
        sch.vectorize(inner)
    else:
        outer = fused
    if parallel_worthwhile(target, elements=total) if parallel is None else parallel:
        sch.parallel(outer)


class GuardedRule(dl.cpu.base.CPUScheduleRule):
    """A rule whose ``_apply`` may meet a schedule primitive that refuses the
    kernel: it then declines, and the next rule of the list tries."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self._apply(func, target)
        except Exception:  # a schedule primitive refused this kernel
            return None

    def _apply(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        raise NotImplementedError


class Injective(dl.cpu.base.CPUScheduleRule):
    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        for rows in (True, False):  # rows with scalar tails where loop partitioning works, else flat
            try:
                sch = s_tir.Schedule(func)
                blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
                if not blocks or any("R" in _iter_kinds(sch, b) for b in blocks):
                    return None
                for block in _inline_producers(sch, blocks):
                    parallel_vectorize(sch, block, target, rows=rows)
                return sch
            except Exception:  # the primitive refused this block
                continue
        return None


class SpatialReduction(GuardedRule):
    def _apply(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        blocks = _inline_producers(sch, list(sch.get_child_blocks(sch.get_sblock("root"))))
        reductions = [b for b in blocks if "R" in _iter_kinds(sch, b)]
        if len(reductions) != 1:
            return None
        red = reductions[0]
        kinds = _iter_kinds(sch, red)
        loops = sch.get_loops(red)
        if len(loops) != len(kinds) or not kinds.startswith("S") or kinds.index("R") == 0:
            return None
        spatial = [l for l, k in zip(loops, kinds) if k == "S"]
        reduce = [l for l, k in zip(loops, kinds) if k == "R"]
        lanes = vector_lanes(target)
        parallel = parallel_worthwhile(target, elements=loop_product(sch, red))
        inner = spatial[-1]
        vectorize = 1 < _extent(sch, inner) <= 4 * lanes and len(spatial) > 1
        outer_spatial = spatial[:-1] if vectorize else spatial
        sch.reorder(*outer_spatial, *reduce, *([inner] if vectorize else []))
        outer = sch.fuse(*outer_spatial) if len(outer_spatial) > 1 else outer_spatial[0]
        names = [sch.get(b).name_hint for b in blocks]
        for block in blocks[names.index(sch.get(red).name_hint) + 1:]:
            try:
                sch.reverse_compute_at(block, outer, preserve_unit_loops=True)
                last = sch.get_loops(block)[-1]
                if _extent(sch, last) > 1:
                    sch.vectorize(last)
            except Exception:  # the primitive refused this block
                parallel_vectorize(sch, block, target, parallel)
        if parallel and _extent(sch, outer) > 1:
            sch.parallel(outer)
        # Vectorized while the block is still a reduction (with its init):
        # afterwards its update block no longer qualifies.
        if vectorize:
            sch.vectorize(inner)
        init = sch.decompose_reduction(red, reduce[0])
        if vectorize:
            sch.vectorize(sch.get_loops(init)[-1])
        return sch


def vectorize_with_tail(sch: s_tir.Schedule, loop, lanes: int) -> None:
    """Vectorize ``loop`` by ``lanes``; a remainder that is not a whole vector
    becomes a scalar loop of its own (a predicated vector loop would
    scalarize every iteration)."""
    extent = _extent(sch, loop)
    if extent < lanes:
        if extent > 1:
            sch.vectorize(loop)
        return
    main = extent // lanes * lanes
    if main != extent:
        loop = sch.loop_partition(loop, [main, None])[0]
    sch.vectorize(sch.split(loop, [None, lanes])[1])


class RowReduction(GuardedRule):
    """Kernels made of steps over the same rows, each along one inner axis,
    some of them reductions (softmax, layer normalization, log-softmax): all
    steps of a row run together while it is in cache, rows over the cores,
    the elementwise steps vectorized."""

    def _apply(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        try:
            return self._rows(func, target, tails=True)
        except Exception:  # loop partitioning fails on some kernels (log-softmax): whole vectors only
            return self._rows(func, target, tails=False)

    def _rows(self, func: tirx.PrimFunc, target: tvm.target.Target, tails: bool) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        kinds = [_iter_kinds(sch, b) for b in blocks]
        last = kinds[-1]
        if len(blocks) < 2 or "R" in last or len(last) < 2 or not any("R" in k for k in kinds):
            return None
        row_scalar = "S" * (len(last) - 1)  # a per-row value: the mean, the variance
        if any(len(sch.get_loops(b)) != len(k) or not (k == row_scalar or (len(k) == len(last) and "R" not in k[:-1]))
               for b, k in zip(blocks, kinds)):
            return None
        rows = sch.get_loops(blocks[-1])[:-1]
        row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        for block in reversed(blocks[:-1]):
            sch.compute_at(block, row, preserve_unit_loops=True)
        lanes = vector_lanes(target)
        parallel = parallel_worthwhile(target, elements=loop_product(sch, blocks[-1]) * len(blocks))
        inner = [sch.get_loops(b)[-1] for b, kind in zip(blocks, kinds) if kind[-1] == "S" and kind != row_scalar]
        for loop in inner:  # partitioning a loop replaces its block: loops first, then the primitives
            if tails:
                vectorize_with_tail(sch, loop, lanes)
            elif _extent(sch, loop) % lanes == 0:
                sch.vectorize(sch.split(loop, [None, lanes])[1])
        if parallel:
            sch.parallel(row)
        return sch
