"""Unstructured and N:M weight sparsity: zeros written into Conv/Gemm/MatMul weights.

The model keeps its ops and shapes; what changes is how many weights are zero,
which sparse kernels (N:M on sparse tensor cores) and external compression
turn into speed or size.  The shared weight discovery used by the weight
compression passes (``share-weights``, ``binarize``) lives here too.

Layouts, so that one view serves every op: a weight is seen as a matrix of
rows ``[R, K]`` with the reduction (input-channel) axis last, which is where
N:M groups are formed, as sparse tensor cores want it:

* Conv ``[O, C/g, kh, kw]`` -> ``[O*kh*kw, C/g]`` (groups along input channels);
* Gemm ``[N, K]`` (transB=1) as is, ``[K, N]`` transposed;
* MatMul ``[..., K, N]`` -> ``[...*N, K]``.

The output-channel axis (per-channel statistics) is 0 for Conv and transB=1
Gemm, the last axis otherwise.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.context import PassContext
from graphopt.errors import UsageError
from graphopt.ir import Model
from graphopt.pass_base import Option, Pass, PassResult, Tolerance
from graphopt.registry import register_pass
from graphopt.rewrite import STANDARD_DOMAINS, as_constant, is_graph_output

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


# ----------------------------------------------------------------------------------
# Weight sites shared by the weight compression passes
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class WeightSite:
    """One constant weight tensor and the nodes that read it as their weight."""

    const: gs.Constant  # holds the values (an initializer, or a Constant node's value)
    holder: gs.Tensor  # what the nodes read (the initializer itself, or the Constant node's output)
    nodes: list[gs.Node]
    perm: tuple[int, ...]  # transpose to [..., K]: rows view = w.transpose(perm).reshape(-1, K)
    out_axis: int  # output-channel axis of the stored array

    @property
    def name(self) -> str:
        return self.const.name or self.holder.name

    @property
    def label(self) -> str:
        node = self.nodes[0]
        return f"{node.op} '{node.name or node.outputs[0].name}'"

    def load(self) -> np.ndarray:
        return np.asarray(self.const.values)

    def store(self, values: np.ndarray) -> None:
        self.const.values = np.ascontiguousarray(values.astype(self.const.values.dtype, copy=False))

    # views ----------------------------------------------------------------------
    def to_rows(self, w: np.ndarray) -> np.ndarray:
        """``[R, K]``, reduction axis last."""
        t = np.transpose(w, self.perm)
        return t.reshape(-1, t.shape[-1])

    def from_rows(self, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        permuted = tuple(shape[p] for p in self.perm)
        return np.ascontiguousarray(np.transpose(rows.reshape(permuted), np.argsort(self.perm)))

    def to_channels(self, w: np.ndarray) -> np.ndarray:
        """``[O, L]``: one row per output channel."""
        return np.moveaxis(w, self.out_axis, 0).reshape(w.shape[self.out_axis], -1)

    def from_channels(self, ch: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        moved = (shape[self.out_axis],) + tuple(d for i, d in enumerate(shape) if i != self.out_axis)
        return np.ascontiguousarray(np.moveaxis(ch.reshape(moved), 0, self.out_axis))


def _layout(node: gs.Node, rank: int) -> tuple[tuple[int, ...], int] | None:
    if node.op == "Conv":
        if rank < 3:
            return None
        return (0,) + tuple(range(2, rank)) + (1,), 0
    if node.op == "Gemm":
        if rank != 2:
            return None
        return ((0, 1), 0) if int(node.attrs.get("transB", 0)) else ((1, 0), 1)
    if node.op == "MatMul":
        if rank < 2:
            return None
        return tuple(range(rank - 2)) + (rank - 1, rank - 2), rank - 1
    return None


def check_ops(pass_name: str, ops: Iterable[str]) -> tuple[str, ...]:
    ops = tuple(ops)
    bad = [op for op in ops if op not in WEIGHT_OPS]
    if bad or not ops:
        raise UsageError(f"pass '{pass_name}': option 'ops' must list ops among {','.join(WEIGHT_OPS)}, "
                         f"got '{','.join(ops)}'")
    return ops


def find_weight_sites(model: Model, ops: Iterable[str], min_size: int, notes: list[str],
                      exclude: Iterable[str] = ()) -> list[WeightSite]:
    """Constant float weights (input 1) of the given ops in the main graph, in
    graph order, each once; weights also read elsewhere, in another layout,
    or smaller than ``min_size`` elements are left alone with a note."""
    ops = set(ops)
    exclude = set(exclude)
    overridable = model.overridable
    graph = model.graph
    seen: set[int] = set()
    sites: list[WeightSite] = []
    small = 0
    for node in graph.nodes:
        if node.op not in ops or node.domain not in STANDARD_DOMAINS or len(node.inputs) < 2:
            continue
        holder = node.inputs[1]
        const = as_constant(holder, overridable)
        if const is None or id(const) in seen:
            continue
        seen.add(id(const))
        label = f"{node.op} '{node.name or node.outputs[0].name}'"
        if node.name and node.name in exclude:
            notes.append(f"{label}: excluded; left alone")
            continue
        dtype = np.dtype(const.dtype) if const.dtype is not None else None
        if dtype is None or dtype.kind != "f":
            notes.append(f"{label}: weight is not a float tensor; left alone")
            continue
        shape = tuple(const.shape)
        layout = _layout(node, len(shape))
        if layout is None:
            notes.append(f"{label}: weight of rank {len(shape)} has no known layout; left alone")
            continue
        if math.prod(shape) < min_size:
            small += 1
            continue
        readers = list(holder.outputs)
        if is_graph_output(graph, holder) or not all(_reads_as_weight(r, holder, ops, layout, len(shape))
                                                     for r in readers):
            notes.append(f"{label}: weight '{const.name}' is also read elsewhere or in another layout; left alone")
            continue
        sites.append(WeightSite(const, holder, readers, layout[0], layout[1]))
    if small:
        notes.append(f"{small} weight tensor(s) under min-size={min_size} elements left alone")
    return sites


def _reads_as_weight(node: gs.Node, holder: gs.Tensor, ops: set[str], layout, rank: int) -> bool:
    return (node.op in ops and node.domain in STANDARD_DOMAINS and len(node.inputs) >= 2
            and node.inputs[1] is holder and sum(t is holder for t in node.inputs) == 1
            and _layout(node, rank) == layout)


# ----------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------
def magnitude_mask(scores: np.ndarray, count: int) -> np.ndarray:
    """Bool mask (True = keep) that drops exactly ``count`` entries of smallest
    score; ties are broken by position, so the result is deterministic.
    Linear time (a partition, not a sort): ResNet-50 sized models are common."""
    flat = scores.reshape(-1)
    keep = np.ones(flat.size, bool)
    count = min(max(count, 0), flat.size)
    if count:
        kth = np.partition(flat, count - 1)[count - 1]
        below = flat < kth
        keep &= ~below
        ties = np.flatnonzero(flat == kth)[: count - int(np.count_nonzero(below))]
        keep[ties] = False
    return keep.reshape(scores.shape)


def nm_mask(rows: np.ndarray, n: int, m: int) -> np.ndarray:
    """Bool mask over ``[R, K]`` (K a multiple of m) keeping the n largest
    magnitudes of every m consecutive values along K."""
    groups = np.abs(rows).reshape(-1, m)
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return keep.reshape(rows.shape)


def compressed_sizes(nnz: int, size: int, rows: int, itemsize: int) -> dict[str, int]:
    """Storage estimates of a sparse weight: CSR (int32 column indices and row
    pointers) and a bitmask of nonzeros plus the packed values."""
    return {
        "csr_bytes": nnz * (itemsize + 4) + (rows + 1) * 4,
        "bitmask_bytes": -(-size // 8) + nnz * itemsize,
    }


@register_pass("sparsify")
class Sparsify(Pass):
    """Magnitude pruning of Conv/Gemm/MatMul weights, unstructured or N:M (zeros written in).

    The graph is unchanged; sparse kernels or external compression turn the
    zeros into speed or size."""

    # Lossy by request: how far the outputs move is the ratio's doing (a compact
    # model at 30% can fall to cosine 0.5), so --verify-each only catches outputs
    # that are unrelated or anti-correlated, NaN or reshaped; fidelity is measured
    # by the caller (BENCHMARKS.md).
    tolerance = Tolerance(relative=None, cosine=0.0, lossy=True)

    ratio = Option(float, 0.5, "fraction of weights set to zero, in [0, 1) (unstructured pruning)", min=0.0)
    scope = Option(str, "layer", "layer: the ratio in every tensor; global: one threshold over all eligible "
                   "weights, each tensor's magnitudes divided by its RMS", choices=("layer", "global"))
    n = Option(int, 0, "N of N:M sparsity: keep n of every m consecutive weights along the reduction axis", min=0)
    m = Option(int, 0, "M of N:M sparsity (e.g. n=2,m=4 for sparse tensor cores)", min=0)
    min_size = Option(int, 1024, "weights with fewer elements than this are left alone", min=1)
    ops = Option(list, list(WEIGHT_OPS), "op types whose weight (input 1) is pruned")
    exclude_nodes = Option(list, [], "node names whose weights are left alone")

    def __init__(self, **options):
        super().__init__(**options)
        where = f"pass '{self.name}'"
        if not self.ratio < 1.0:
            raise UsageError(f"{where}: option 'ratio' must be in [0, 1), got '{self.ratio:g}'")
        if bool(self.n) != bool(self.m):
            raise UsageError(f"{where}: options 'n' and 'm' go together (e.g. n=2,m=4)")
        if self.m:
            if not 0 < self.n < self.m:
                raise UsageError(f"{where}: N:M sparsity needs 0 < n < m, got n={self.n}, m={self.m}")
            if self.m > 256:
                raise UsageError(f"{where}: option 'm' must be at most 256, got '{self.m}'")
            if self.is_set("ratio") or self.is_set("scope"):
                raise UsageError(f"{where}: options 'ratio'/'scope' do not apply to N:M sparsity (n, m)")
        check_ops(self.name, self.ops)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        notes: list[str] = []
        sites = find_weight_sites(model, self.ops, self.min_size, notes, self.exclude_nodes)
        weights = [(site, site.load()) for site in sites]
        masks: list[tuple[WeightSite, np.ndarray, np.ndarray]] = []
        if self.m:
            for site, w in weights:
                rows = site.to_rows(w)
                if rows.shape[1] % self.m:
                    notes.append(f"{site.label}: reduction size {rows.shape[1]} is not a multiple of m={self.m}; "
                                 f"left alone")
                    continue
                masks.append((site, w, site.from_rows(nm_mask(rows, self.n, self.m), w.shape)))
        elif self.ratio > 0 and self.scope == "layer":
            for site, w in weights:
                masks.append((site, w, magnitude_mask(np.abs(w), int(round(self.ratio * w.size)))))
        elif self.ratio > 0 and weights:
            scores = []
            for _, w in weights:
                a = np.abs(w.astype(np.float32)).reshape(-1)
                rms = math.sqrt(float(np.dot(a, a)) / max(a.size, 1))
                scores.append(a / np.float32(rms) if rms > 0 else a)
            sizes = [s.size for s in scores]
            keep = magnitude_mask(np.concatenate(scores), int(round(self.ratio * sum(sizes))))
            for (site, w), part in zip(weights, np.split(keep, np.cumsum(sizes)[:-1])):
                masks.append((site, w, part.reshape(w.shape)))
        stats = self._apply(masks)
        if not sites:
            notes.append("no eligible weight")
        return PassResult(changed=stats["zeroed"] > 0, stats=stats, notes=notes)

    def _apply(self, masks) -> dict:
        per_tensor: dict[str, float] = {}
        total = zeros = zeroed = dense = csr = bitmask = nm_bytes = 0
        for site, w, keep in masks:
            new = np.where(keep, w, np.zeros((), w.dtype))
            was_zero = int(np.count_nonzero(w == 0))
            nz = int(np.count_nonzero(new))
            zeroed += w.size - nz - was_zero
            if w.size - nz > was_zero:
                site.store(new)
            per_tensor[site.name] = round(1.0 - nz / w.size, 6)
            total += w.size
            zeros += w.size - nz
            item = w.dtype.itemsize
            dense += w.nbytes
            est = compressed_sizes(nz, w.size, site.to_rows(w).shape[0], item)
            csr += est["csr_bytes"]
            bitmask += est["bitmask_bytes"]
            if self.m:
                kept = w.size // self.m * self.n
                nm_bytes += kept * item + -(-kept * max(1, math.ceil(math.log2(self.m))) // 8)
        stats = {
            "tensors": len(masks),
            "zeroed": zeroed,
            "sparsity": round(zeros / total, 6) if total else 0.0,
            "dense_bytes": dense,
            "csr_bytes": csr,
            "bitmask_bytes": bitmask,
            "per_tensor": per_tensor,
        }
        if self.m:
            stats["pattern"] = f"{self.n}:{self.m}"
            stats["nm_bytes"] = nm_bytes  # kept values + ceil(log2 m)-bit index per kept value
        return stats
