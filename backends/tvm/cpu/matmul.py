"""Register-tiled matrix multiplication (MatMul, Gemm, batched attention products).

One reduction block whose loops are spatial ones and then one reduction,
``out[..., i, j] += a[..., i, k] * b[..., k, j]``: a tile of ``tile_i`` rows by
``tile_j`` columns (whole vectors) accumulates in registers while ``k`` runs
outside it, so each step is ``tile_i`` broadcasts of ``a`` times the vectors
of ``b``'s row; tiles spread over the cores; the fused epilogue (bias,
activation) runs per tile.  Constant right-hand sides arrive as ``[k, j]``
(the frontend's transposes of constants fold at compile time); where their
columns are not whole vectors (a 6625-way classifier), :func:`plan_matmuls`
pads them with zero columns at compile time and slices the product back;
int8 products by constants are computed in float there too.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from graphopt.backends.tvm.cpu.generic import _extent, _inline_producers, _iter_kinds, parallel_vectorize
from graphopt.backends.tvm.cpu.layout import map_functions
from graphopt.backends.tvm.cpu.target import num_cores, parallel_worthwhile, vector_lanes
from graphopt.backends.tvm.cpu.templates import Config, TemplateRule

# Fewer multiply-adds than this are left to the generic rules: tiling does not pay.
_MIN_MACS = 1 << 15


_MATMUL = tvm.ir.Op.get("relax.matmul")


def padded_columns(columns: int, lanes: int) -> int:
    """Columns rounded up to the register tile's width: two vectors where
    there are many columns, one where there are few."""
    step = 2 * lanes if columns >= 4 * lanes else lanes
    return -(-columns // step) * step


# A product of fewer rows reads each weight about once: bound by the
# weight's bytes, it stays int8 (a 2048x1000 classifier as float32 weights
# took 440 us, four times its int8 bytes).
_FLOAT_MIN_ROWS = 8


def _rows(data: relax.Expr) -> int:
    shape = getattr(data.ty, "shape", None)
    try:
        return int(np.prod([int(d) for d in shape][:-1])) if shape is not None else 0
    except (TypeError, ValueError):  # a symbolic dimension
        return _FLOAT_MIN_ROWS


def plan_matmuls(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """``mod`` with every matmul by a constant ``[k, n]`` whose ``n`` is not a
    multiple of ``lanes`` computed on zero-padded columns and sliced back,
    and every int8 one of at least ``_FLOAT_MIN_ROWS`` rows computed in float
    (as int8 convolutions without a dot-product kernel are: exact small
    integers, on FMAs)."""
    return map_functions(mod, lambda: _PlanMatmuls(mod, lanes))


@mutator
class _PlanMatmuls(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int):
        super().__init__(mod)
        self.lanes = lanes

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor naming)
        call = super().visit_call_(call)
        if call.op != _MATMUL or not isinstance(call.args[1], tvm.ir.expr.Constant):
            return call
        weight = call.args[1].value.numpy()
        rank = len(call.ty.shape) if getattr(call.ty, "shape", None) is not None else 0
        if weight.ndim != 2 or weight.dtype.kind not in "fi" or rank < 2:
            return call
        data, out_dtype = call.args[0], call.attrs.out_dtype
        integer = weight.dtype == np.int8 and str(getattr(data.ty, "dtype", "")) in ("uint8", "int8") \
            and str(out_dtype) == "int32" and _rows(call.args[0]) >= _FLOAT_MIN_ROWS
        if integer:
            data = self.builder_.emit(relax.op.astype(data, "float32"))
            weight, out_dtype = weight.astype(np.float32), "float32"
        columns = weight.shape[1]
        padded = padded_columns(columns, self.lanes)
        if columns % self.lanes == 0 or columns < self.lanes:
            if not integer:
                return call
            product = relax.op.matmul(data, relax.const(weight), out_dtype)
        else:
            wide = np.zeros((weight.shape[0], padded), weight.dtype)
            wide[:, :columns] = weight
            product = self.builder_.emit(relax.op.matmul(data, relax.const(wide), out_dtype))
            product = relax.op.strided_slice(product, axes=[rank - 1], begin=[0], end=[columns])
        return relax.op.astype(self.builder_.emit(product), "int32") if integer else product


def _divisors(extent: int, candidates: list[int]) -> list[int]:
    return [c for c in candidates if c <= extent and extent % c == 0]


class Matmul(TemplateRule):
    """Knobs: ``rows`` (tile_i) and ``columns`` (tile_j, whole vectors or
    halves) of the register tile, ``order`` (which operand's tiles run
    outside), ``parallel``."""

    def _matmul(self, sch: s_tir.Schedule):
        """(the inlined blocks, the matmul block) or None."""
        blocks = _inline_producers(sch, list(sch.get_child_blocks(sch.get_sblock("root"))))
        reductions = [b for b in blocks if "R" in _iter_kinds(sch, b)]
        if len(reductions) != 1:
            return None
        kinds = _iter_kinds(sch, reductions[0])
        loops = sch.get_loops(reductions[0])
        if len(loops) != len(kinds) or len(kinds) < 3 or kinds != "S" * (len(kinds) - 1) + "R":
            return None
        return blocks, reductions[0]

    def knobs(self, func: tirx.PrimFunc, target: tvm.target.Target) -> dict[str, list] | None:
        sch = s_tir.Schedule(func)
        found = self._matmul(sch)
        if found is None:
            return None
        *batch, i, j, k = sch.get_loops(found[1])
        m, n, depth = _extent(sch, i), _extent(sch, j), _extent(sch, k)
        if min(m, n, depth) <= 0 or m * n * depth < _MIN_MACS:
            return None
        lanes = vector_lanes(target)
        columns = _divisors(n, [2 * lanes, lanes, lanes // 2, lanes // 4])
        if not columns or columns[0] < 4:
            return None
        rows = _divisors(m, [6, 5, 4, 8, 3, 2]) or [1]
        batches = 1
        for loop in batch:
            batches *= _extent(sch, loop)
        parallel = parallel_worthwhile(target, macs=batches * m * n * depth)
        return {
            "rows": rows,
            "columns": [c for c in columns if c >= 4],
            "order": ["rows", "columns"] if m >= n else ["columns", "rows"],
            "parallel": [parallel, not parallel] if num_cores(target) > 1 else [False],
        }

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target, config: Config) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        found = self._matmul(sch)
        if found is None:
            return None
        blocks, mm = found
        *batch, i, j, k = sch.get_loops(mm)
        tile_i, tile_j, parallel = config["rows"], config["columns"], config["parallel"]
        io, ii = sch.split(i, [None, tile_i])
        jo, ji = sch.split(j, [None, tile_j])
        # The outer operand's slice stays in cache across the other's tiles
        # (by default the larger one's).
        first, second = (io, jo) if config["order"] == "rows" else (jo, io)
        sch.reorder(*batch, first, second, k, ii, ji)
        acc = sch.cache_write(mm, 0, "local")
        sch.reverse_compute_at(acc, second, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(acc)[-1])
        sch.unroll(ii)
        sch.vectorize(ji)
        outer = sch.fuse(*batch, first, second)
        names = [sch.get(b).name_hint for b in blocks]
        skipped = sch.get(acc).name_hint
        for block in blocks[names.index(sch.get(mm).name_hint) + 1:]:
            if sch.get(block).name_hint == skipped:
                continue
            try:
                sch.reverse_compute_at(block, outer, preserve_unit_loops=True)
                last = sch.get_loops(block)[-1]
                if _extent(sch, last) > 1:
                    sch.vectorize(last)
            except Exception:  # the primitive refused this block
                parallel_vectorize(sch, block, target, parallel)
        if parallel and _extent(sch, outer) > 1:
            sch.parallel(outer)
        init = sch.decompose_reduction(mm, k)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch
