"""Channel dependency analysis: which tensor dimensions must lose the same channels.

Removing output channel k of a Conv is only correct when every tensor that
carries channel k loses it too: the Conv's bias, the BatchNormalization after
it, the per-channel constants of elementwise ops, the other producers of a
residual Add, the slice of a Concat that the channels land in, the input-channel
slice of every Conv/Gemm/MatMul that reads them.  This module finds those sets.

The model: every channel dimension is a *space* of ``size`` channels, created
by a producer (a Conv's output channels, a Gemm/MatMul's output features) or,
frozen, where the analysis meets channels it cannot follow.  The channel axis of
a tensor is a *layout*: an axis and a list of segments, each a range of one
space whose channels are each ``inner`` consecutive elements wide (a Flatten
turns a channel into a run of H*W features; a depthwise Conv with multiplier m
into m channels).  Ops that need two tensors to carry the same channels
(residual Add, Mul, Concat along another axis) merge their spaces
(union-find); a merged set is a *group*, pruned as one.

Anything the analysis cannot prove safe freezes the spaces it touches, with a
reason: graph outputs (their shapes stay), unknown ops, shape reads, a Reshape
that splits the channel axis (channel shuffle), LRN (mixes neighbouring
channels), grouped convolutions, weights that are not constants.

What pruning must change is recorded as *edits* (slice this constant input
along this axis by this layout; rewrite this Split's sizes, this Slice's
bounds, this Reshape's shape, this Conv's group), applied by
:meth:`ChannelAnalysis.apply` once kept channels are chosen.  A constant that
several nodes read is copied, so each reader gets its own slice.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.rewrite import STANDARD_DOMAINS, as_constant, fresh_name, is_graph_output

from graphopt.passes.folding import outer_refs, topological_order
from graphopt.passes.shapes import annotate_shapes


# ----------------------------------------------------------------------------------
# Generic helpers (public: the other pruning passes use them)
# ----------------------------------------------------------------------------------
def take_along(values: np.ndarray, indices: Sequence[int] | np.ndarray, axis: int) -> np.ndarray:
    """``values`` restricted to ``indices`` along ``axis`` (a copy, contiguous)."""
    return np.ascontiguousarray(np.take(np.asarray(values), np.asarray(indices, dtype=np.int64), axis=axis))


def flush_subnormals(values: np.ndarray) -> np.ndarray:
    """Subnormal floats set to zero.  Least-squares refits computed in float64
    leave values below float32's smallest normal; x86 multiplies them in
    microcode, and one such weight tensor made a refitted 1x1 convolution of
    PP-OCRv4 rec 40x slower in onnxruntime (29 ms instead of 0.7)."""
    if values.dtype.kind != "f" or not values.size:
        return values
    tiny = np.finfo(values.dtype).tiny
    small = (values != 0) & (np.abs(values) < tiny)
    if not small.any():
        return values
    out = values.copy()
    out[small] = 0
    return out


def replace_constant_input(graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray,
                           taken: set[str] | None = None) -> gs.Constant:
    """Give ``node`` new constant values at input ``index``.

    A gs.Constant read by this node alone (and not a graph output) is updated in
    place, keeping its name, so an initializer that old exporters also list as
    a graph input stays consistent on export; a shared constant or one made by a
    Constant node is replaced by a fresh constant for this reader only.
    """
    old = node.inputs[index]
    values = flush_subnormals(np.ascontiguousarray(values))
    if isinstance(old, gs.Constant) and len(old.outputs) == 1 and not is_graph_output(graph, old):
        old.values = values
        return old
    if taken is None:
        taken = set(graph.tensors().keys())
    new = gs.Constant(fresh_name(taken, (old.name or "pruned") + "_pruned"), values)
    node.inputs[index] = new
    return new


def _prod(dims: Iterable[int]) -> int:
    return int(math.prod(dims))


def _shape(t: gs.Tensor) -> list | None:
    shape = getattr(t, "shape", None)
    return None if shape is None else list(shape)


def _static(t: gs.Tensor) -> list[int] | None:
    s = _shape(t)
    if s is None or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s):
        return None
    return [int(d) for d in s]


def _rank(t: gs.Tensor) -> int | None:
    s = _shape(t)
    return None if s is None else len(s)


def _absent(t: gs.Tensor | None) -> bool:
    return t is None or (isinstance(t, gs.Variable) and not t.name)


# ----------------------------------------------------------------------------------
# Spaces, segments, layouts
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Seg:
    """Channels ``lo..hi`` of space ``space``, each ``inner`` consecutive elements."""

    space: int
    lo: int
    hi: int
    inner: int = 1

    @property
    def length(self) -> int:
        return (self.hi - self.lo) * self.inner


@dataclasses.dataclass
class Layout:
    axis: int
    segs: list[Seg]

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segs)


@dataclasses.dataclass
class _Space:
    size: int
    parent: int
    roots: list[str] = dataclasses.field(default_factory=list)
    members: list[str] = dataclasses.field(default_factory=list)
    reasons: list[str] = dataclasses.field(default_factory=list)
    nodes: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class Edit:
    """One change pruning makes; ``kind``: ``slice`` (constant input ``index`` of
    ``node`` along ``axis`` by ``layout``), ``group``, ``split``, ``range``
    (Slice bounds), ``entry`` (one entry of a shape/sizes input).  ``role`` names
    what a sliced constant is: out-weight, in-weight, bias, scale, shift, const."""

    kind: str
    node: gs.Node
    index: int = 0
    axis: int = 0
    segs: list[Seg] = dataclasses.field(default_factory=list)
    role: str = "const"
    extra: Any = None


@dataclasses.dataclass
class ChannelGroup:
    """A set of coupled channel dimensions pruned together."""

    id: int
    size: int
    roots: list[str]
    members: list[str]
    reasons: list[str]

    @property
    def prunable(self) -> bool:
        return not self.reasons


# Ops that keep every channel where it is and never mix channels.
UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu_", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Identity", "Cast", "Erf",
    "Gelu", "Mish", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu", "Clip", "Not",
    "IsNaN", "IsInf", "Swish",
})
ELEMENTWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Less",
    "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
})
POOL_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                        "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})
CONSUMER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


class ChannelAnalysis:
    """The channel groups of a model and the edits that pruning them needs.

    Build with :func:`analyze`.  ``groups()`` lists them; ``apply(keep)``
    removes channels (``keep``: group id -> sorted kept channel indices; groups
    not named keep everything).  ``sources`` (root weights), ``bn_scales``,
    ``probes`` (tensors read by Conv/Gemm/MatMul) and ``consumers`` feed the
    importance criteria and reconstruction.
    """

    def __init__(self, model: Model):
        self.model = model
        self.graph = model.graph
        self.opset = model.opset
        self._overridable = frozenset(model.info.initializer_inputs) if model.info.ir_version >= 4 else frozenset()
        self.spaces: list[_Space] = []
        self.layouts: dict[int, Layout] = {}   # id(tensor) -> layout
        self.tensors: dict[int, gs.Tensor] = {}
        self.edits: list[Edit] = []
        self.sources: list[Edit] = []      # root (and depthwise) weights: importance
        self.bn_scales: list[Edit] = []
        self.probes: list[tuple[gs.Tensor, Layout, gs.Node]] = []
        self.consumers: list[tuple[gs.Node, Layout]] = []
        self._zero_ok: dict[int, bool] = {}

    # -- union-find ---------------------------------------------------------------
    def find(self, s: int) -> int:
        while self.spaces[s].parent != s:
            self.spaces[s].parent = self.spaces[self.spaces[s].parent].parent
            s = self.spaces[s].parent
        return s

    def _new_space(self, size: int, root: str | None = None, reason: str | None = None) -> int:
        sid = len(self.spaces)
        self.spaces.append(_Space(size=size, parent=sid))
        if root:
            self.spaces[sid].roots.append(root)
            self.spaces[sid].nodes.add(root)
        if reason:
            self.spaces[sid].reasons.append(reason)
        return sid

    def _union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if b < a:
            a, b = b, a
        sa, sb = self.spaces[a], self.spaces[b]
        sb.parent = a
        sa.roots += sb.roots
        sa.members += sb.members
        sa.reasons += [r for r in sb.reasons if r not in sa.reasons]
        sa.nodes |= sb.nodes

    def freeze(self, layout: Layout | None, reason: str) -> None:
        if layout is None:
            return
        for s in layout.segs:
            space = self.spaces[self.find(s.space)]
            if reason not in space.reasons:
                space.reasons.append(reason)

    def _member(self, layout: Layout, text: str, node: gs.Node | None = None) -> None:
        for s in {self.find(s.space) for s in layout.segs}:
            self.spaces[s].members.append(text)
            if node is not None and node.name:
                self.spaces[s].nodes.add(node.name)

    # -- layouts ------------------------------------------------------------------
    def layout(self, t: gs.Tensor | None) -> Layout | None:
        if t is None:
            return None
        return self.layouts.get(id(t))

    def _set(self, t: gs.Tensor, layout: Layout | None) -> None:
        if layout is not None and not _absent(t):
            self.layouts[id(t)] = layout
            self.tensors[id(t)] = t

    def _frozen_layout(self, t: gs.Tensor, axis: int, reason: str) -> Layout | None:
        s = _shape(t)
        if s is None or axis >= len(s) or not isinstance(s[axis], int):
            return None
        return Layout(axis, [Seg(self._new_space(int(s[axis]), reason=reason), 0, int(s[axis]))])

    def _const(self, t: gs.Tensor | None) -> np.ndarray | None:
        """The values of a constant input (small ones: shapes, axes, sizes)."""
        if _absent(t):
            return None
        c = as_constant(t, self._overridable)
        return None if c is None else np.asarray(c.values)

    def _const_shape(self, t: gs.Tensor | None) -> tuple[int, ...] | None:
        """The shape of a constant input without reading its values (weights)."""
        if _absent(t):
            return None
        c = as_constant(t, self._overridable)
        return None if c is None else tuple(int(d) for d in c.shape)

    def _unify(self, a: Layout, b: Layout, where: str) -> bool:
        """Make two layouts carry the same channels; freezes both when their
        segments cannot be matched one to one."""
        ok = len(a.segs) == len(b.segs)
        pairs = list(zip(a.segs, b.segs)) if ok else []
        for x, y in pairs:
            if x.inner != y.inner or x.hi - x.lo != y.hi - y.lo:
                ok = False
            elif self.find(x.space) == self.find(y.space):
                ok = ok and x.lo == y.lo
            elif not (x.lo == 0 and y.lo == 0 and x.hi == self.spaces[x.space].size
                      and y.hi == self.spaces[y.space].size):
                ok = False
        if not ok:
            reason = f"{where} combines channel ranges that do not line up"
            self.freeze(a, reason)
            self.freeze(b, reason)
            return False
        for x, y in pairs:
            self._union(x.space, y.space)
        return True

    @staticmethod
    def extract(layout: Layout, start: int, end: int) -> list[Seg] | None:
        """The segments covering elements ``start..end`` of a layout, or None when
        the range cuts through a channel."""
        out: list[Seg] = []
        off = 0
        for s in layout.segs:
            a, b = max(start, off), min(end, off + s.length)
            if a < b:
                r0, r1 = a - off, b - off
                if r0 % s.inner or r1 % s.inner:
                    return None
                out.append(Seg(s.space, s.lo + r0 // s.inner, s.lo + r1 // s.inner, s.inner))
            off += s.length
        return out

    def indices(self, segs: Sequence[Seg], keep: dict[int, np.ndarray]) -> np.ndarray:
        """Kept element indices of a layout, given kept channels per group."""
        out = []
        off = 0
        for s in segs:
            k = keep.get(self.find(s.space))
            ch = np.arange(s.lo, s.hi) if k is None else k[(k >= s.lo) & (k < s.hi)]
            ch = ch - s.lo
            out.append(off + (ch[:, None] * s.inner + np.arange(s.inner)[None, :]).ravel())
            off += s.length
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    # -- edits ----------------------------------------------------------------------
    def _slice(self, node: gs.Node, index: int, axis: int, layout: Layout | list[Seg], role: str) -> Edit:
        segs = layout.segs if isinstance(layout, Layout) else layout
        edit = Edit("slice", node, index, axis, list(segs), role)
        self.edits.append(edit)
        return edit

    # -- the walk -----------------------------------------------------------------
    def run(self) -> None:
        annotate_shapes(self.model)
        for node in topological_order(self.graph):
            ins = [self.layout(t) for t in node.inputs]
            refs = outer_refs(node)
            if refs:
                for t in refs:
                    self.freeze(self.layout(t), f"read inside a subgraph of {node.op} '{node.name}'")
            if node.domain not in STANDARD_DOMAINS:
                self._unknown(node, ins, f"custom op {node.domain}::{node.op} '{node.name}'")
                continue
            handler: Callable | None = getattr(self, f"_op_{node.op}", None)
            if handler is None:
                if node.op in UNARY_OPS:
                    handler = self._unary
                elif node.op in ELEMENTWISE_OPS:
                    handler = self._elementwise
                elif node.op in POOL_OPS:
                    handler = self._pool
                elif node.op in REDUCE_OPS:
                    handler = self._reduce
            if handler is None:
                if any(ins):
                    self._unknown(node, ins, f"{node.op} '{node.name}' is not understood by the analysis")
                continue
            handler(node, ins)
        for t in self.graph.outputs:
            self.freeze(self.layout(t), f"tensor '{t.name}' is a graph output")

    def _unknown(self, node: gs.Node, ins: list, reason: str) -> None:
        for lay in ins:
            self.freeze(lay, reason)

    def _unary(self, node: gs.Node, ins: list) -> None:
        lay = ins[0] if ins else None
        if lay is None:
            return
        for extra in ins[1:]:
            self.freeze(extra, f"{node.op} '{node.name}' reads channels as a parameter")
        for out in node.outputs:
            self._set(out, lay)
        if node.name:
            for seg in lay.segs:
                self.spaces[self.find(seg.space)].nodes.add(node.name)

    _op_Dropout = _unary

    def _op_Softmax(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        rank = _rank(node.inputs[0])
        default = -1 if self.opset >= 13 else 1
        axis = int(node.attrs.get("axis", default))
        if rank is None:
            self.freeze(lay, f"{node.op} '{node.name}' has an unknown rank")
            return
        axis %= rank
        mixes = lay.axis == axis if self.opset >= 13 else lay.axis >= axis
        if mixes:
            self.freeze(lay, f"{node.op} '{node.name}' normalizes across the channels")
            return
        self._set(node.outputs[0], lay)

    _op_LogSoftmax = _op_Softmax
    _op_Hardmax = _op_Softmax

    def _op_LRN(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        if int(node.attrs.get("size", 1)) == 1:
            self._set(node.outputs[0], lay)
        else:
            self.freeze(lay, f"LRN '{node.name}' mixes neighbouring channels")

    def _pool(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        if lay.axis > 1:
            self.freeze(lay, f"{node.op} '{node.name}' pools over the channel axis")
            return
        self._set(node.outputs[0], lay)
        if len(node.outputs) > 1 and not _absent(node.outputs[1]) and node.outputs[1].outputs:
            self.freeze(lay, f"{node.op} '{node.name}' returns indices")

    def _axes(self, node: gs.Node, input_index: int) -> list[int] | None | str:
        """Axes from the attribute or the input; None if absent, 'unknown' if not constant."""
        if "axes" in node.attrs:
            return [int(a) for a in node.attrs["axes"]]
        if len(node.inputs) > input_index and not _absent(node.inputs[input_index]):
            v = self._const(node.inputs[input_index])
            return "unknown" if v is None else [int(a) for a in np.ravel(v)]
        return None

    def _reduce(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        rank = _rank(node.inputs[0])
        axes = self._axes(node, 1)
        if rank is None or axes == "unknown":
            self.freeze(lay, f"{node.op} '{node.name}' reduces over axes the analysis cannot see")
            return
        if axes is None or not axes:
            noop = int(node.attrs.get("noop_with_empty_axes", 0))
            axes = [] if noop else list(range(rank))
        axes = [a % rank for a in axes]
        if lay.axis in axes:
            self.freeze(lay, f"{node.op} '{node.name}' reduces over the channels")
            return
        keepdims = int(node.attrs.get("keepdims", 1))
        axis = lay.axis if keepdims else lay.axis - sum(a < lay.axis for a in axes)
        self._set(node.outputs[0], Layout(axis, lay.segs))

    def _elementwise(self, node: gs.Node, ins: list) -> None:
        tracked = [(i, lay) for i, lay in enumerate(ins) if lay is not None]
        if not tracked:
            return
        out = node.outputs[0]
        rank = _rank(out)
        where = f"{node.op} '{node.name}'"
        if rank is None:
            for _, lay in tracked:
                self.freeze(lay, f"{where} has an unknown output rank")
            return
        aligned = {lay.axis + rank - _rank(node.inputs[i]) for i, lay in tracked if _rank(node.inputs[i]) is not None}
        if len(aligned) != 1 or any(_rank(node.inputs[i]) is None for i, _ in tracked):
            for _, lay in tracked:
                self.freeze(lay, f"{where} broadcasts channels onto different axes")
            return
        axis = aligned.pop()
        first = tracked[0][1]
        ok = True
        for i, t in enumerate(node.inputs):
            lay = ins[i]
            if lay is not None:
                if lay is not first:
                    ok = self._unify(first, lay, where) and ok
                continue
            if _absent(t):
                continue
            r = _rank(t)
            j = None if r is None else axis - (rank - r)
            if r is not None and (j < 0 or (isinstance(_shape(t)[j], int) and _shape(t)[j] == 1)):
                continue  # broadcast along the channels
            const = self._const_shape(t)
            if const is not None and j is not None and len(const) == r and const[j] == first.length:
                self._slice(node, i, j, first, "shift" if node.op in ("Add", "Sub") else "const")
                continue
            self.freeze(first, f"{where} mixes the channels with a tensor the analysis does not follow")
            ok = False
        self._member(first, where, node)
        self._set(out, Layout(axis, first.segs))

    # -- producers / consumers -------------------------------------------------------
    def _consumer_input(self, node: gs.Node, lay: Layout | None, weight_axis: int, data: gs.Tensor) -> None:
        if lay is None:
            return
        self._slice(node, 1, weight_axis, lay, "in-weight")
        self._member(lay, f"{node.op} '{node.name}' input channels", node)
        self.probes.append((data, lay, node))
        self.consumers.append((node, lay))

    def _root(self, node: gs.Node, size: int) -> Layout:
        return Layout(1, [Seg(self._new_space(size, root=node.name or node.op), 0, size)])

    def _op_Conv(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        w = self._const_shape(node.inputs[1]) if len(node.inputs) > 1 else None
        where = f"Conv '{node.name}'"
        if w is None or len(w) < 3:
            self.freeze(lay, f"{where} has a weight that is not a constant")
            return
        has_bias = len(node.inputs) > 2 and not _absent(node.inputs[2])
        if has_bias and self._const_shape(node.inputs[2]) is None:
            self.freeze(lay, f"{where} has a bias that is not a constant")
            return
        if lay is not None and lay.axis != 1:
            self.freeze(lay, f"{where} reads the channels on axis {lay.axis}")
            lay = None
        group = int(node.attrs.get("group", 1))
        m, cg = w[0], w[1]
        if group == 1:
            self._consumer_input(node, lay, 1, node.inputs[0])
            out = self._root(node, m)
            self.sources.append(self._slice(node, 1, 0, out, "out-weight"))
            if has_bias:
                self._slice(node, 2, 0, out, "bias")
            self._set(node.outputs[0], out)
            return
        if cg == 1 and m % group == 0 and lay is not None and lay.length == group \
                and all(s.inner == 1 for s in lay.segs):
            mult = m // group
            segs = [Seg(s.space, s.lo, s.hi, mult) for s in lay.segs]
            self.sources.append(self._slice(node, 1, 0, segs, "out-weight"))
            if has_bias:
                self._slice(node, 2, 0, segs, "bias")
            self.edits.append(Edit("group", node, segs=list(lay.segs)))
            self._member(lay, f"{where} (depthwise)", node)
            self._set(node.outputs[0], Layout(1, segs))
            return
        if cg == 1 and m % group == 0 and lay is None:
            reason = f"{where} (depthwise) reads channels the analysis does not follow"
        else:
            reason = f"{where} is a grouped convolution (group={group})"
        self.freeze(lay, reason)
        out = self._root(node, m)
        self.freeze(out, reason)
        self._set(node.outputs[0], out)

    def _op_ConvTranspose(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        w = self._const_shape(node.inputs[1]) if len(node.inputs) > 1 else None
        where = f"ConvTranspose '{node.name}'"
        has_bias = len(node.inputs) > 2 and not _absent(node.inputs[2])
        if w is None or len(w) < 3 or (has_bias and self._const_shape(node.inputs[2]) is None):
            self.freeze(lay, f"{where} has a weight or bias that is not a constant")
            return
        if lay is not None and lay.axis != 1:
            self.freeze(lay, f"{where} reads the channels on axis {lay.axis}")
            lay = None
        group = int(node.attrs.get("group", 1))
        c, mg = w[0], w[1]
        if group == 1:
            if lay is not None:
                self._slice(node, 1, 0, lay, "in-weight")
                self._member(lay, f"{where} input channels", node)
                self.probes.append((node.inputs[0], lay, node))
            out = self._root(node, mg)
            self.sources.append(self._slice(node, 1, 1, out, "out-weight"))
            if has_bias:
                self._slice(node, 2, 0, out, "bias")
            self._set(node.outputs[0], out)
            return
        if c == group and lay is not None and lay.length == group and all(s.inner == 1 for s in lay.segs):
            segs = [Seg(s.space, s.lo, s.hi, mg) for s in lay.segs]
            self.sources.append(self._slice(node, 1, 0, lay, "out-weight"))
            if has_bias:
                self._slice(node, 2, 0, segs, "bias")
            self.edits.append(Edit("group", node, segs=list(lay.segs)))
            self._member(lay, f"{where} (depthwise)", node)
            self._set(node.outputs[0], Layout(1, segs))
            return
        reason = f"{where} is a grouped convolution (group={group})"
        self.freeze(lay, reason)
        out = self._root(node, mg * group)
        self.freeze(out, reason)
        self._set(node.outputs[0], out)

    def _op_Gemm(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        where = f"Gemm '{node.name}'"
        b = self._const_shape(node.inputs[1])
        for extra in ins[1:]:
            self.freeze(extra, f"{where} reads the channels as a weight")
        if b is None or len(b) != 2 or int(node.attrs.get("transA", 0)):
            self.freeze(lay, f"{where} has a non-constant weight or transA")
            return
        trans_b = int(node.attrs.get("transB", 0))
        if lay is not None and lay.axis != 1:
            self.freeze(lay, f"{where} reads the channels on axis {lay.axis}")
            lay = None
        self._consumer_input(node, lay, 1 if trans_b else 0, node.inputs[0])
        n = b[0 if trans_b else 1]
        out = self._root(node, n)
        self.sources.append(self._slice(node, 1, 0 if trans_b else 1, out, "out-weight"))
        if len(node.inputs) > 2 and not _absent(node.inputs[2]):
            c = self._const_shape(node.inputs[2])
            if c is None:
                self.freeze(out, f"{where} has a bias that is not a constant")
            elif len(c) >= 1 and c[-1] == n and n != 1:
                self._slice(node, 2, len(c) - 1, out, "bias")
        self._set(node.outputs[0], out)

    def _op_MatMul(self, node: gs.Node, ins: list) -> None:
        lay, lay_b = ins[0], ins[1] if len(ins) > 1 else None
        where = f"MatMul '{node.name}'"
        b = self._const_shape(node.inputs[1])
        ra = _rank(node.inputs[0])
        if b is None or len(b) != 2 or ra is None or ra < 2 or lay_b is not None:
            self.freeze(lay, f"{where} multiplies by a tensor that is not a constant matrix")
            self.freeze(lay_b, f"{where} multiplies by a tensor that is not a constant matrix")
            return
        if lay is not None and lay.axis != ra - 1:
            self._set(node.outputs[0], lay)  # a row/batch axis passes through
            self._member(lay, where, node)
            return
        self._consumer_input(node, lay, 0, node.inputs[0])
        n = b[1]
        space = self._new_space(n, root=node.name or node.op)
        out = Layout(ra - 1, [Seg(space, 0, n)])
        self.sources.append(self._slice(node, 1, 1, out, "out-weight"))
        self._set(node.outputs[0], out)

    def _norm_params(self, node: gs.Node, lay: Layout, indices: Sequence[int], roles: Sequence[str]) -> bool:
        where = f"{node.op} '{node.name}'"
        for i, role in zip(indices, roles):
            if len(node.inputs) <= i or _absent(node.inputs[i]):
                continue
            v = self._const_shape(node.inputs[i])
            if v is None or len(v) != 1 or v[0] != lay.length:
                self.freeze(lay, f"{where} has a parameter that is not a per-channel constant")
                return False
        for i, role in zip(indices, roles):
            if len(node.inputs) > i and not _absent(node.inputs[i]):
                edit = self._slice(node, i, 0, lay, role)
                if role == "scale":
                    self.bn_scales.append(edit)
        return True

    def _op_BatchNormalization(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        if lay.axis != 1 or any(not _absent(o) and o.outputs for o in node.outputs[1:]):
            self.freeze(lay, f"BatchNormalization '{node.name}' is not a plain inference BN on axis 1")
            return
        if self._norm_params(node, lay, (1, 2, 3, 4), ("scale", "shift", "mean", "var")):
            self._member(lay, f"BatchNormalization '{node.name}'", node)
            self._set(node.outputs[0], lay)

    def _op_InstanceNormalization(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        if lay.axis != 1:
            self.freeze(lay, f"InstanceNormalization '{node.name}' normalizes the channel axis")
            return
        if self._norm_params(node, lay, (1, 2), ("scale", "shift")):
            self._member(lay, f"InstanceNormalization '{node.name}'", node)
            self._set(node.outputs[0], lay)

    def _op_LayerNormalization(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        rank = _rank(node.inputs[0])
        where = f"LayerNormalization '{node.name}'"
        if rank is None or any(not _absent(o) and o.outputs for o in node.outputs[1:]):
            self.freeze(lay, f"{where}: unknown rank or statistics outputs in use")
            return
        axis = int(node.attrs.get("axis", -1)) % rank
        if lay.axis < axis:
            self._set(node.outputs[0], lay)
            return
        if axis != rank - 1 or lay.axis != rank - 1:
            self.freeze(lay, f"{where} normalizes over several axes including the channels")
            return
        # Normalizing over the channels: pruning changes the statistics (lossy,
        # like pruning itself); scale and bias lose the same channels.
        if self._norm_params(node, lay, (1, 2), ("scale", "shift")):
            self._member(lay, where, node)
            self._set(node.outputs[0], lay)

    # -- data movement -------------------------------------------------------------
    def _op_Concat(self, node: gs.Node, ins: list) -> None:
        tracked = [lay for lay in ins if lay is not None]
        if not tracked:
            return
        rank = _rank(node.outputs[0])
        where = f"Concat '{node.name}'"
        if rank is None:
            for lay in tracked:
                self.freeze(lay, f"{where} has an unknown rank")
            return
        axis = int(node.attrs.get("axis", 0)) % rank
        if any(lay.axis != tracked[0].axis for lay in tracked):
            for lay in tracked:
                self.freeze(lay, f"{where} joins channels on different axes")
            return
        if tracked[0].axis != axis:
            self._elementwise(node, ins)
            return
        segs: list[Seg] = []
        for t, lay in zip(node.inputs, ins):
            if lay is None:
                lay = self._frozen_layout(t, axis, f"{where} joins them with channels the analysis does not follow")
                if lay is None:
                    for other in tracked:
                        self.freeze(other, f"{where} has an input of unknown shape")
                    return
            segs += lay.segs
        out = Layout(axis, segs)
        self._member(out, where, node)
        self._set(node.outputs[0], out)

    def _op_Split(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        rank = _rank(node.inputs[0])
        where = f"Split '{node.name}'"
        if rank is None:
            self.freeze(lay, f"{where} has an unknown rank")
            return
        axis = int(node.attrs.get("axis", 0)) % rank
        if axis != lay.axis:
            for out in node.outputs:
                self._set(out, lay)
            return
        sizes = None
        if "split" in node.attrs:
            sizes = [int(s) for s in node.attrs["split"]]
        elif len(node.inputs) > 1 and not _absent(node.inputs[1]):
            v = self._const(node.inputs[1])
            sizes = None if v is None else [int(s) for s in np.ravel(v)]
            if v is None:
                self.freeze(lay, f"{where} has split sizes that are not constant")
                return
        else:
            n = len(node.outputs)
            if lay.length % n:
                self.freeze(lay, f"{where} splits unevenly")
                return
            sizes = [lay.length // n] * n
        if sum(sizes) != lay.length or len(sizes) != len(node.outputs):
            self.freeze(lay, f"{where} has split sizes that do not add up")
            return
        parts, off = [], 0
        for size in sizes:
            sub = self.extract(lay, off, off + size)
            if sub is None:
                self.freeze(lay, f"{where} cuts through a channel")
                return
            parts.append(sub)
            off += size
        self.edits.append(Edit("split", node, axis=axis, segs=list(lay.segs), extra=parts))
        self._member(lay, where, node)
        for out, sub in zip(node.outputs, parts):
            self._set(out, Layout(axis, sub))

    def _op_Slice(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        where = f"Slice '{node.name}'"
        rank = _rank(node.inputs[0])
        if self.opset < 10:
            starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
            axes = node.attrs.get("axes")
            steps = None
        else:
            vals = [self._const(node.inputs[i]) if len(node.inputs) > i and not _absent(node.inputs[i]) else None
                    for i in range(1, 5)]
            starts, ends, axes, steps = vals
            if (len(node.inputs) > 3 and not _absent(node.inputs[3]) and axes is None) or \
                    (len(node.inputs) > 4 and not _absent(node.inputs[4]) and steps is None):
                self.freeze(lay, f"{where} has axes or steps that are not constant")
                return
        if rank is None:
            self.freeze(lay, f"{where} has an unknown rank")
            return
        n = None if starts is None else len(np.ravel(starts))
        axes_l = list(range(n or 0)) if axes is None else [int(a) % rank for a in np.ravel(axes)]
        if lay.axis not in axes_l and (axes is not None or starts is not None):
            self._set(node.outputs[0], lay)
            return
        if starts is None or ends is None:
            self.freeze(lay, f"{where} has bounds that are not constant")
            return
        p = axes_l.index(lay.axis)
        step = 1 if steps is None else int(np.ravel(steps)[p])
        if step != 1:
            self.freeze(lay, f"{where} takes every {step}th channel")
            return
        dim = lay.length
        s, e = int(np.ravel(starts)[p]), int(np.ravel(ends)[p])
        s = min(max(s + dim if s < 0 else s, 0), dim)
        e = min(max(e + dim if e < 0 else e, 0), dim)
        sub = self.extract(lay, s, max(s, e))
        if sub is None or not sub:
            self.freeze(lay, f"{where} cuts through a channel")
            return
        self.edits.append(Edit("range", node, index=p, axis=lay.axis, segs=list(lay.segs), extra=(s, sub)))
        self._member(lay, where, node)
        self._set(node.outputs[0], Layout(lay.axis, sub))

    def _op_Transpose(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        rank = _rank(node.inputs[0])
        perm = node.attrs.get("perm")
        if perm is None:
            if rank is None:
                self.freeze(lay, f"Transpose '{node.name}' has an unknown rank")
                return
            perm = list(range(rank))[::-1]
        self._set(node.outputs[0], Layout(list(perm).index(lay.axis), lay.segs))

    def _op_Squeeze(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        shape = _shape(node.inputs[0])
        axes = self._axes(node, 1)
        if axes == "unknown" or shape is None or (axes is None and _static(node.inputs[0]) is None):
            self.freeze(lay, f"Squeeze '{node.name}' has axes the analysis cannot see")
            return
        rank = len(shape)
        axes = [a % rank for a in axes] if axes is not None else [i for i, d in enumerate(shape) if d == 1]
        if lay.axis in axes:
            self.freeze(lay, f"Squeeze '{node.name}' removes the channel axis")
            return
        self._set(node.outputs[0], Layout(lay.axis - sum(a < lay.axis for a in axes), lay.segs))

    def _op_Unsqueeze(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        axes = self._axes(node, 1)
        rank = _rank(node.outputs[0])
        if axes in ("unknown", None) or rank is None:
            self.freeze(lay, f"Unsqueeze '{node.name}' has axes the analysis cannot see")
            return
        axes = sorted(a % rank for a in axes)
        kept = [i for i in range(rank) if i not in axes]
        self._set(node.outputs[0], Layout(kept[lay.axis], lay.segs))

    def _op_Flatten(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        shape = _static(node.inputs[0])
        where = f"Flatten '{node.name}'"
        if shape is None:
            self.freeze(lay, f"{where} has an input of unknown shape")
            return
        k = int(node.attrs.get("axis", 1)) % (len(shape) + 1) if shape else 0
        a = lay.axis
        if a >= k and _prod(shape[k:a]) == 1:
            f = _prod(shape[a + 1:])
            segs = [Seg(s.space, s.lo, s.hi, s.inner * f) for s in lay.segs]
            self._member(lay, where, node)
            self._set(node.outputs[0], Layout(1, segs))
        else:
            self.freeze(lay, f"{where} folds the channels into the batch axis")

    def _op_Reshape(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        where = f"Reshape '{node.name}'"
        src, dst = _static(node.inputs[0]), _static(node.outputs[0])
        target = self._const(node.inputs[1]) if len(node.inputs) > 1 else None
        if src is None or dst is None or target is None:
            self.freeze(lay, f"{where} has a shape the analysis cannot see or rewrite")
            return
        target = [int(v) for v in np.ravel(target)]
        a = lay.axis
        pre = _prod(src[:a])
        for b in range(len(dst)):
            if _prod(dst[:b]) != pre:
                continue
            for j in range(len(src) - a):
                f = _prod(src[a + 1:a + 1 + j])
                if dst[b] == src[a] * f and _prod(src[a + 1 + j:]) == _prod(dst[b + 1:]):
                    entry = target[b]
                    if entry == 0 and not (b == a and f == 1) or int(node.attrs.get("allowzero", 0)) and entry == 0:
                        continue
                    segs = [Seg(s.space, s.lo, s.hi, s.inner * f) for s in lay.segs]
                    if entry > 0:
                        self.edits.append(Edit("entry", node, index=1, axis=b, segs=segs))
                    self._member(lay, where, node)
                    self._set(node.outputs[0], Layout(b, segs))
                    return
        self.freeze(lay, f"{where} splits or reorders the channel axis (e.g. a channel shuffle)")

    def _op_Resize(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        where = f"{node.op} '{node.name}'"
        for extra in ins[1:]:
            self.freeze(extra, f"{where} reads channels as a parameter")
        if "scales" in node.attrs:  # Upsample-7
            if float(node.attrs["scales"][lay.axis]) != 1.0:
                self.freeze(lay, f"{where} scales the channel axis")
                return
            self._set(node.outputs[0], lay)
            return
        scale_index = 1 if node.op == "Upsample" or self.opset < 11 else 2
        sizes_index = None if node.op == "Upsample" or self.opset < 11 else 3
        if sizes_index is not None and len(node.inputs) > sizes_index and not _absent(node.inputs[sizes_index]):
            sizes = self._const(node.inputs[sizes_index])
            if sizes is None or "axes" in node.attrs:
                self.freeze(lay, f"{where} has sizes that are not constant")
                return
            self.edits.append(Edit("entry", node, index=sizes_index, axis=lay.axis, segs=list(lay.segs)))
        elif len(node.inputs) > scale_index and not _absent(node.inputs[scale_index]):
            scales = self._const(node.inputs[scale_index])
            if scales is None or "axes" in node.attrs or float(np.ravel(scales)[lay.axis]) != 1.0:
                self.freeze(lay, f"{where} has scales that are not constant or scale the channels")
                return
        self._member(lay, where, node)
        self._set(node.outputs[0], lay)

    _op_Upsample = _op_Resize

    def _op_Pad(self, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None:
            return
        for extra in ins[1:]:
            self.freeze(extra, f"Pad '{node.name}' reads channels as a parameter")
        pads = node.attrs.get("pads") if self.opset < 11 else (
            self._const(node.inputs[1]) if len(node.inputs) > 1 else None)
        rank = _rank(node.inputs[0])
        has_axes = len(node.inputs) > 3 and not _absent(node.inputs[3])
        if pads is None or rank is None or has_axes:
            self.freeze(lay, f"Pad '{node.name}' has pads the analysis cannot see")
            return
        pads = [int(p) for p in np.ravel(pads)]
        if pads[lay.axis] or pads[lay.axis + rank]:
            self.freeze(lay, f"Pad '{node.name}' pads the channel axis")
            return
        self._set(node.outputs[0], lay)

    # -- results --------------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        out = []
        for sid, space in enumerate(self.spaces):
            if self.find(sid) != sid:
                continue
            out.append(ChannelGroup(sid, space.size, list(space.roots), list(space.members), list(space.reasons)))
        return out

    def group_nodes(self, gid: int) -> set[str]:
        return set(self.spaces[self.find(gid)].nodes)

    def apply(self, keep: dict[int, np.ndarray]) -> int:
        """Remove every channel not in ``keep[group id]`` from every coupled
        tensor; returns how many edits changed something.  Call once."""
        keep = {self.find(g): np.sort(np.asarray(k, dtype=np.int64)) for g, k in keep.items()}
        for g, k in keep.items():
            if self.spaces[g].reasons:
                raise ValueError(f"group {g} is not prunable: {self.spaces[g].reasons[0]}")
            if len(k) == 0 or k.min() < 0 or k.max() >= self.spaces[g].size:
                raise ValueError(f"group {g}: kept channels out of range")
        taken = set(self.graph.tensors().keys())
        changed = 0
        # Compose the slices of each constant input, then write it once.
        pending: dict[tuple[int, int], tuple[gs.Node, int, np.ndarray]] = {}
        for e in self.edits:
            if e.kind != "slice":
                continue
            idx = self.indices(e.segs, keep)
            full = sum(s.length for s in e.segs)
            if len(idx) == full:
                continue
            key = (id(e.node), e.index)
            if key not in pending:
                pending[key] = (e.node, e.index, np.asarray(as_constant(e.node.inputs[e.index], self._overridable).values))
            node, i, values = pending[key]
            pending[key] = (node, i, take_along(values, idx, e.axis))
        for node, i, values in pending.values():
            replace_constant_input(self.graph, node, i, values, taken)
            changed += 1
        for e in self.edits:
            if e.kind == "slice":
                continue
            full = sum(s.length for s in e.segs)
            n = len(self.indices(e.segs, keep))
            if e.kind == "group":
                if n != full:
                    e.node.attrs["group"] = n
                    changed += 1
            elif e.kind == "split":
                sizes = [len(self.indices(p, keep)) for p in e.extra]
                if n == full:
                    continue
                self._write_split(e.node, sizes, taken)
                changed += 1
            elif e.kind == "range":
                start, sub = e.extra
                if n == full:
                    continue
                kept = self.indices(e.segs, keep)
                new_start = int(np.sum(kept < start))
                new_end = new_start + len(self.indices(sub, keep))
                self._write_range(e.node, e.index, new_start, new_end, taken)
                changed += 1
            elif e.kind == "entry":
                if n == full:
                    continue
                values = np.array(as_constant(e.node.inputs[e.index], self._overridable).values).copy()
                values.reshape(-1)[e.axis] = n
                replace_constant_input(self.graph, e.node, e.index, values, taken)
                changed += 1
        self.graph.cleanup()
        return changed

    def _write_split(self, node: gs.Node, sizes: list[int], taken: set[str]) -> None:
        node.attrs.pop("num_outputs", None)
        if self.opset < 13:
            node.attrs["split"] = sizes
            return
        values = np.array(sizes, dtype=np.int64)
        if len(node.inputs) > 1 and not _absent(node.inputs[1]):
            replace_constant_input(self.graph, node, 1, values, taken)
        else:
            const = gs.Constant(fresh_name(taken, (node.name or "split") + "_sizes"), values)
            node.inputs[1:] = [const]

    def _write_range(self, node: gs.Node, p: int, start: int, end: int, taken: set[str]) -> None:
        if self.opset < 10:
            starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
            starts[p], ends[p] = start, end
            node.attrs["starts"], node.attrs["ends"] = starts, ends
            return
        for i, v in ((1, start), (2, end)):
            values = np.array(as_constant(node.inputs[i], self._overridable).values).copy()
            values.reshape(-1)[p] = v
            replace_constant_input(self.graph, node, i, values, taken)


def analyze(model: Model) -> ChannelAnalysis:
    """Run the dependency analysis on ``model`` (shapes are inferred first)."""
    analysis = ChannelAnalysis(model)
    analysis.run()
    return analysis


def channel_groups(model: Model | Any) -> list[ChannelGroup]:
    """The channel groups of a model (a :class:`Model`, ``onnx.ModelProto`` or path):
    root producers, coupled members, channel count, and why a group is not
    prunable."""
    import onnx

    from graphopt.ir import load

    if isinstance(model, onnx.ModelProto):
        model = Model.from_proto(model)
    elif not isinstance(model, Model):
        model = load(model)
    return analyze(model).groups()


def protect(analysis: ChannelAnalysis, patterns: Sequence[str]) -> None:
    """Freeze every group that a node whose name matches a pattern (an exact
    name or a regular expression matched in full) produces, reads or passes
    on: a protected Conv keeps both its output and its input channels."""
    compiled = []
    for p in patterns:
        try:
            compiled.append((p, re.compile(p)))
        except re.error:
            compiled.append((p, re.compile(re.escape(p))))
    for g in analysis.groups():
        for name in analysis.group_nodes(g.id):
            hit = next((p for p, rx in compiled if name == p or rx.fullmatch(name)), None)
            if hit is not None:
                analysis.spaces[g.id].reasons.append(f"protected by '{hit}'")
                break


def format_groups(groups: Sequence[ChannelGroup], members: int = 6) -> str:
    """Text for ``graphopt inspect --groups``."""
    lines = []
    prunable = sum(g.prunable for g in groups)
    lines.append(f"channel groups: {len(groups)} ({prunable} prunable)")
    for g in groups:
        state = "prunable" if g.prunable else "left alone: " + "; ".join(g.reasons[:2]) + (
            f" (+{len(g.reasons) - 2} more)" if len(g.reasons) > 2 else "")
        roots = ", ".join(g.roots[:4]) + (f" (+{len(g.roots) - 4})" if len(g.roots) > 4 else "")
        lines.append(f"  #{g.id} [{g.size} channels] roots: {roots or '-'}; {state}")
        if g.members:
            shown = ", ".join(g.members[:members]) + (f", ... ({len(g.members)} in all)" if len(g.members) > members else "")
            lines.append(f"      members: {shown}")
    return "\n".join(lines)


def group_dict(g: ChannelGroup) -> dict[str, Any]:
    return {"id": g.id, "size": g.size, "roots": g.roots, "members": g.members, "prunable": g.prunable,
            "reasons": g.reasons}


__all__ = ["ChannelAnalysis", "ChannelGroup", "Edit", "Layout", "Seg", "analyze", "channel_groups",
           "flush_subnormals", "format_groups", "protect", "replace_constant_input", "take_along"]
