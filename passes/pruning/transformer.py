"""prune-heads and prune-neurons: structured pruning of transformer encoders.

Both passes shrink weight matrices for real, so the pruned model does less
work in any runtime (no masks, no sparse kernels).

``prune-heads`` removes whole attention heads from multi-head attention as
PyTorch/Hugging Face exporters write it::

    q|k|v = Reshape(x Wq|Wk|Wv [+ b], [B, S, H, D]) -> Transpose   (k: [0,2,3,1])
    p     = Softmax(q k [* or / scale] [+ mask])
    y     = Reshape(Transpose(p v), [B, S, H*D]) Wo [+ bo]

Removing head ``h`` drops columns ``h*D:(h+1)*D`` of Wq, Wk, Wv and their biases,
the same rows of Wo, and rewrites the head count in the split Reshapes and the
hidden size in the merge Reshape (constant shapes, or a constant element of a
``Concat`` that builds the shape at run time).  Nothing is changed unless the
whole pattern is proven: every tensor between the projections and Wo has no
other reader and is no graph output, the Transposes compose to the expected
permutations, scale factors are scalars, and anything added to the scores
(an attention mask) broadcasts over the head axis (size 1, proven by symbolic
shape inference) or is a constant with one slice per head (sliced too).

``prune-neurons`` removes intermediate units of feed-forward blocks:
``x W1 [+ b1] -> elementwise activation (Relu, Gelu, the Erf form of Gelu,
x*Sigmoid(x), ...) -> W2``: columns of W1/b1, rows of W2, and entries of any
per-unit constant inside the activation.

Importance, per layer (heads and neurons are ranked within their own block):

* ``l1``/``l2`` (the default without calibration data): the norm of the unit's
  input weights times the norm of its output weights.  For a head that is
  ``|[Wv_h; bv_h]| * |Wo_h|``: a head's output is a convex mix of rows of
  ``x Wv_h + bv_h`` projected by ``Wo_h``, so these bound it; Wq/Wk only decide
  the mix.  For a neuron: ``|[W1_j; b1_j]| * |W2_j|``.
* ``activation`` (the default with ``--calib``): the norm of each unit's actual
  contribution to the block's output over the calibration samples:
  ``|ctx_h Wo_h|`` for a head, ``|a_j| * |W2_j|`` for a neuron.  The removed
  units' mean output over the samples is then folded into the next bias
  (``compensate``), so a unit whose output is constant goes without a trace.

PyTorch's scaled-dot-product-attention export is matched too: ``Shape``
readers that gather only other axes than the heads, a shape-keeping Reshape
of the context, and ``Where(IsNaN(p), 0, p)`` after Softmax.  Fused QKV
projections (one MatMul split three ways), other readers of the attention's
intermediate tensors, gated FFNs and fused attention operators are left alone
with a note.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.context import PassContext
from graphopt.errors import PassError, UsageError, first_line
from graphopt.ir import Model
from graphopt.pass_base import Option, Pass, PassResult, Tolerance
from graphopt.registry import register_pass
from graphopt.rewrite import STANDARD_DOMAINS, as_constant, fresh_name, is_graph_output


CRITERIA = ("auto", "l1", "l2", "activation")
# Removing units is lossy by design; this bound only catches a broken rewrite
# in --verify-each (a pruned model still tracks the original's direction).
_TOLERANCE = Tolerance(relative=None, cosine=0.5, lossy=True)

_UNARY = frozenset({
    "Relu", "Gelu", "Sigmoid", "Tanh", "Erf", "Exp", "Softplus", "Softsign", "Elu", "Selu", "Celu", "LeakyRelu",
    "HardSigmoid", "HardSwish", "Mish", "Neg", "Abs", "Sqrt", "Reciprocal", "Identity", "ThresholdedRelu",
})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})
_MS_ACT = frozenset({"Gelu", "FastGelu", "BiasGelu", "QuickGelu"})
_ACTIVATIONS = (_UNARY - {"Identity", "Neg", "Abs"}) | {"Clip"}


# ----------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------
class _Unproven(Exception):
    """The pattern could not be proven; the message says why."""


def _name(node: gs.Node) -> str:
    return node.name or f"{node.op}({', '.join(t.name for t in node.outputs)})"


def _infer_shapes(model: Model) -> dict[str, list]:
    """Tensor name -> dims (int, or a symbol / None when unknown).

    onnxruntime's symbolic shape inference first: it follows shapes computed at
    run time (Shape/Gather/Concat, Expand, Where), which is what proves that an
    attention mask has one row for all heads.  onnx's own inference otherwise.
    """
    # The full proto: symbolic inference gives up on data-less weight stubs.
    proto = model.to_proto()
    inferred = None
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception:
        inferred = None
    if inferred is None:
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
        except Exception:
            inferred = proto
    out: dict[str, list] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    for t in proto.graph.initializer:
        out[t.name] = list(t.dims)
    return out


class _Graph:
    """Read access to the graph with the facts every matcher needs."""

    def __init__(self, model: Model):
        self.model = model
        self.graph = model.graph
        self.overridable = model.overridable
        self._shapes: dict[str, list] | None = None
        self.opset = model.opset
        self.benign: set[int] = set()  # Shape nodes that read only dims pruning keeps

    @property
    def shapes(self) -> dict[str, list]:
        if self._shapes is None:
            self._shapes = _infer_shapes(self.model)
        return self._shapes

    def const(self, tensor: gs.Tensor) -> np.ndarray | None:
        c = as_constant(tensor, self.overridable)
        return None if c is None else np.asarray(c.values)

    def producer(self, tensor: gs.Tensor) -> gs.Node | None:
        return tensor.inputs[0] if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 else None

    def private(self, tensor: gs.Tensor, what: str, head_axis: int | None = None) -> gs.Node:
        """The only reader of ``tensor``; raises when anything else observes it.

        With ``head_axis`` (of a rank-4 tensor), ``Shape`` readers whose every
        use is a Gather of another axis are allowed: pruning keeps those dims.
        """
        if is_graph_output(self.graph, tensor):
            raise _Unproven(f"{what} '{tensor.name}' is a graph output")
        readers = [n for n in tensor.outputs if head_axis is None or not self._reads_other_dims(n, head_axis)]
        if len(readers) != 1:
            names = ", ".join(sorted({n.op for n in readers})) or "nothing"
            raise _Unproven(f"{what} '{tensor.name}' has other readers ({names})")
        return readers[0]

    def _reads_other_dims(self, node: gs.Node, head_axis: int) -> bool:
        if node.op != "Shape" or not _is_std(node) or node.attrs.get("start", 0) != 0 or "end" in node.attrs:
            return False
        out = node.outputs[0]
        if is_graph_output(self.graph, out) or not out.outputs:
            return False
        for gather in out.outputs:
            index = self.const(gather.inputs[1]) if gather.op == "Gather" and len(gather.inputs) == 2 else None
            if index is None or gather.attrs.get("axis", 0) != 0 or gather.inputs[0] is not out:
                return False
            if any(int(i) % 4 == head_axis for i in index.reshape(-1)):
                return False
        self.benign.add(id(node))
        return True

    def rank(self, tensor: gs.Tensor) -> int | None:
        dims = self.shapes.get(tensor.name)
        return None if dims is None else len(dims)


@dataclasses.dataclass
class _Linear:
    """``x W [+ b]`` with a constant 2-D W (and 1-D b over W's columns)."""

    matmul: gs.Node
    weight: np.ndarray
    add: gs.Node | None = None
    bias_index: int = -1
    bias: np.ndarray | None = None

    @property
    def output(self) -> gs.Tensor:
        return (self.add or self.matmul).outputs[0]


def _is_std(node: gs.Node) -> bool:
    return node.domain in STANDARD_DOMAINS


def _linear_ending_at(g: _Graph, tensor: gs.Tensor, what: str) -> _Linear:
    node = g.producer(tensor)
    add = None
    bias = None
    bias_index = -1
    if node is not None and node.op == "Add" and _is_std(node):
        for i in (0, 1):
            b = g.const(node.inputs[i])
            other = node.inputs[1 - i]
            if b is not None and b.ndim == 1 and g.producer(other) is not None and g.producer(other).op == "MatMul":
                add, bias, bias_index = node, b, i
                g.private(other, f"{what} projection")
                node = g.producer(other)
                break
    if node is None or node.op != "MatMul" or not _is_std(node):
        found = "a graph input" if node is None else f"{node.op} '{_name(node)}'"
        hint = " (a fused QKV projection is not handled)" if node is not None and node.op in ("Split", "Slice") else ""
        raise _Unproven(f"{what} does not come from MatMul(x, W)[+b]: found {found}{hint}")
    w = g.const(node.inputs[1])
    if w is None or w.ndim != 2:
        raise _Unproven(f"{what} projection '{_name(node)}' has no constant 2-D weight")
    if bias is not None and bias.shape[0] != w.shape[1]:
        raise _Unproven(f"{what} projection '{_name(node)}': bias size {bias.shape[0]} != {w.shape[1]}")
    return _Linear(node, w, add, bias_index, bias)


def _output_bias(g: _Graph, matmul: gs.Node, width: int) -> tuple[gs.Node, int, np.ndarray] | None:
    """The constant bias Add right after ``matmul`` (its only reader), as (node, input, values)."""
    out = matmul.outputs[0]
    if is_graph_output(g.graph, out) or len(out.outputs) != 1:
        return None
    add = out.outputs[0]
    if add.op != "Add" or not _is_std(add) or len(add.inputs) != 2:
        return None
    i = 1 if add.inputs[0] is out else 0
    b = g.const(add.inputs[i])
    return (add, i, b) if b is not None and b.shape == (width,) else None


def _compensate(bias: tuple[gs.Node, int, np.ndarray] | None, delta: np.ndarray | None, new: _NewTensors) -> bool:
    """Add the removed units' mean output to the next bias, so the block's mean output stays put."""
    if bias is None or delta is None:
        return False
    node, i, b = bias
    node.inputs[i] = new.const(node.inputs[i].name + "_pruned", (b.astype(np.float64) + delta).astype(b.dtype))
    return True


def _scalar_operand(g: _Graph, node: gs.Node) -> int | None:
    """Index of the non-constant input of Mul/Div by a one-element constant (Div: the dividend)."""
    if node.op not in ("Mul", "Div") or not _is_std(node) or len(node.inputs) != 2:
        return None
    for i in ((0,) if node.op == "Div" else (0, 1)):
        c = g.const(node.inputs[1 - i])
        if c is not None and c.size == 1 and c.ndim <= 1 and g.const(node.inputs[i]) is None:
            return i
    return None


def _compose(total: list[int], perm: list[int]) -> list[int]:
    return [total[i] for i in perm]


def _perm(node: gs.Node, rank: int) -> list[int]:
    perm = node.attrs.get("perm")
    return list(perm) if perm is not None else list(range(rank))[::-1]


class _NewTensors:
    """Fresh constants and tensors for a rewrite, and the nodes it adds."""

    def __init__(self, graph: gs.Graph):
        self.taken = set(graph.tensors().keys())
        self.nodes: list[gs.Node] = []
        self._small: dict[tuple, gs.Constant] = {}
        self.concats: dict[tuple, gs.Variable] = {}  # (Concat, changes) -> its pruned copy

    def const(self, base: str, values: np.ndarray) -> gs.Constant:
        values = np.ascontiguousarray(values)
        key = (values.dtype.str, values.shape, values.tobytes()) if values.size <= 16 else None
        if key is not None and key in self._small:
            return self._small[key]  # one tensor for equal new shapes
        made = gs.Constant(fresh_name(self.taken, base), values)
        if key is not None:
            self._small[key] = made
        return made

    def var(self, base: str, dtype) -> gs.Variable:
        return gs.Variable(fresh_name(self.taken, base), dtype=dtype)


# ----------------------------------------------------------------------------------
# Shapes that a Reshape reads: a constant, or a Concat of pieces
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class _ShapeSource:
    """The shape input of a Reshape, entry by entry (None: computed at run time)."""

    reshape: gs.Node
    values: list[int | None]
    concat: gs.Node | None = None
    pieces: list[tuple[int, int, np.ndarray | None]] = dataclasses.field(default_factory=list)  # start, len, value
    computed: list[gs.Tensor] = dataclasses.field(default_factory=list)

    def rewrite(self, changes: dict[int, int], new: _NewTensors) -> None:
        """Give the Reshape a shape with ``changes`` applied (a new tensor; others may share the old one)."""
        if not changes:
            return
        if self.concat is None:
            arr = np.array(self.values, dtype=np.int64)
            for pos, v in changes.items():
                arr[pos] = v
            self.reshape.inputs[1] = new.const(self.reshape.inputs[1].name + "_pruned", arr)
            return
        key = (id(self.concat), tuple(sorted(changes.items())))
        if key in new.concats:  # Q, K and V often share one shape
            self.reshape.inputs[1] = new.concats[key]
            return
        inputs = list(self.concat.inputs)
        for k, (start, length, value) in enumerate(self.pieces):
            touched = {p - start: v for p, v in changes.items() if start <= p < start + length}
            if touched:
                arr = np.array(value, dtype=np.int64).reshape(-1)
                for i, v in touched.items():
                    arr[i] = v
                inputs[k] = new.const(self.concat.inputs[k].name + "_pruned", arr)
        out = new.var(self.concat.outputs[0].name + "_pruned", np.int64)
        node = gs.Node("Concat", name=out.name, attrs=dict(self.concat.attrs), inputs=inputs, outputs=[out])
        new.nodes.append(node)
        new.concats[key] = out
        self.reshape.inputs[1] = out


def _shape_source(g: _Graph, reshape: gs.Node) -> _ShapeSource:
    if reshape.attrs.get("allowzero", 0):
        raise _Unproven(f"Reshape '{_name(reshape)}' uses allowzero=1")
    shape = reshape.inputs[1]
    c = g.const(shape)
    if c is not None:
        return _ShapeSource(reshape, [int(v) for v in c.reshape(-1)])
    node = g.producer(shape)
    if node is None or node.op != "Concat" or not _is_std(node) or node.attrs.get("axis", 0) not in (0, -1):
        raise _Unproven(f"Reshape '{_name(reshape)}': shape is neither constant nor a Concat")
    src = _ShapeSource(reshape, [], concat=node)
    for piece in node.inputs:
        value = g.const(piece)
        if value is not None:
            length = int(value.size)
            src.values.extend(int(v) for v in value.reshape(-1))
        else:
            dims = g.shapes.get(piece.name)
            if dims is None or len(dims) != 1 or not isinstance(dims[0], int) or dims[0] <= 0:
                raise _Unproven(f"Reshape '{_name(reshape)}': length of shape piece '{piece.name}' is unknown")
            length = dims[0]
            src.values.extend([None] * length)
            src.computed.append(piece)
        src.pieces.append((len(src.values) - length, length, value))
    return src


def _depends_on(tensors: list[gs.Tensor], region: list[gs.Tensor], skip: set[int]) -> bool:
    """Whether any of ``tensors`` is computed from a tensor in ``region`` (forward search from the
    region, not through the ``skip`` nodes)."""
    wanted = {id(t) for t in tensors}
    seen: set[int] = set()
    stack = list(region)
    while stack:
        t = stack.pop()
        if id(t) in wanted:
            return True
        if id(t) in seen:
            continue
        seen.add(id(t))
        for node in t.outputs:
            if id(node) not in skip:
                stack.extend(node.outputs)
    return False


# ----------------------------------------------------------------------------------
# Attention heads
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Projection:
    linear: _Linear
    split: _ShapeSource
    head_pos: int | None  # entry of the split shape holding the head count (None: -1)


@dataclasses.dataclass
class _Attention:
    softmax: gs.Node
    q: _Projection
    k: _Projection
    v: _Projection
    merge: _ShapeSource
    hidden_pos: int | None  # entry of the merge shape holding H*D (None: -1)
    out: _Linear
    out_bias: tuple[gs.Node, int, np.ndarray] | None
    heads: int
    dim: int
    per_head: list[tuple[gs.Node, int, int]]  # (node, input, axis): constants with one slice per head
    region: list[gs.Tensor]
    reshapes: list[tuple[_ShapeSource, int | None]]  # shape-keeping Reshapes of the context (entry of H)

    @property
    def context(self) -> gs.Tensor:
        return self.out.matmul.inputs[0]

    @property
    def label(self) -> str:
        return _name(self.softmax)


def _projection(g: _Graph, tensor: gs.Tensor, want: list[int], what: str, region: list[gs.Tensor]) -> _Projection:
    """Walk back from the QK/PV MatMul operand through Transposes and scalar scales to the split Reshape."""
    perms: list[list[int]] = []
    t = tensor
    axis = 1  # of the heads, in the tensor at hand: [B, H, S, D] at the MatMul
    while True:
        node = g.producer(t)
        if node is None:
            raise _Unproven(f"{what} comes from a graph input")
        g.private(t, what, axis)
        region.append(t)
        if node.op == "Transpose" and _is_std(node):
            perms.append(_perm(node, 4))
            if len(perms[-1]) != 4:
                raise _Unproven(f"{what}: Transpose of rank {len(perms[-1])}")
            axis = perms[-1][axis]
            t = node.inputs[0]
        elif _scalar_operand(g, node) is not None:
            t = node.inputs[_scalar_operand(g, node)]
        elif node.op == "Reshape" and _is_std(node):
            break
        else:
            hint = " (a fused QKV projection is not handled)" if node.op in ("Split", "Slice") else ""
            raise _Unproven(f"{what}: unexpected {node.op} '{_name(node)}'{hint}")
    total = [0, 1, 2, 3]
    for p in reversed(perms):
        if len(p) != 4:
            raise _Unproven(f"{what}: Transpose of rank {len(p)}")
        total = _compose(total, p)
    if total != want:
        raise _Unproven(f"{what}: Transposes compose to {total}, expected {want}")
    reshape = node
    data = reshape.inputs[0]
    g.private(data, what)
    region.append(data)
    linear = _linear_ending_at(g, data, what)
    if linear.add is not None:
        region.append(linear.matmul.outputs[0])
    split = _shape_source(g, reshape)
    return _Projection(linear, split, None)


def _split_heads(g: _Graph, proj: _Projection, what: str) -> tuple[int, int]:
    """(heads, head dim) from the split Reshape; records which entry to rewrite."""
    vals = proj.split.values
    n = proj.linear.weight.shape[1]
    if len(vals) != 4:
        raise _Unproven(f"{what}: split Reshape '{_name(proj.split.reshape)}' has rank {len(vals)}, expected 4")
    h, d = vals[2], vals[3]
    if h is not None and h > 0 and d is not None and d > 0 and h * d == n:
        proj.head_pos = 2
    elif h == -1 and d is not None and d > 0 and n % d == 0:
        h, proj.head_pos = n // d, None
    elif h is not None and h > 0 and d == -1 and n % h == 0:
        d, proj.head_pos = n // h, 2
    else:
        raise _Unproven(f"{what}: split Reshape '{_name(proj.split.reshape)}' shape {vals} does not split {n} "
                        "into heads")
    rank = g.rank(proj.split.reshape.inputs[0])
    for i in (0, 1):
        if vals[i] == 0 and (rank == 1 if i == 0 else rank is None or rank < 3):
            raise _Unproven(f"{what}: split Reshape '{_name(proj.split.reshape)}' copies input dim {i}")
    return h, d


def _scores_chain(g: _Graph, softmax: gs.Node, region: list[gs.Tensor],
                  per_head: list[tuple[gs.Node, int, int]]) -> gs.Node:
    """Walk back from Softmax to the QK MatMul through scale and mask ops; returns the MatMul."""
    t = softmax.inputs[0]
    for _ in range(8):
        g.private(t, "attention scores", 1)
        region.append(t)
        node = g.producer(t)
        if node is None:
            raise _Unproven("attention scores come from a graph input")
        if node.op == "MatMul" and _is_std(node):
            return node
        if node.op not in ("Add", "Sub", "Mul", "Div", "Where") or not _is_std(node):
            raise _Unproven(f"attention scores pass through {node.op} '{_name(node)}'")
        chain = [i for i, x in enumerate(node.inputs) if _leads_to_matmul(g, x)]
        if node.op == "Where":
            chain = [i for i in chain if i > 0]
        if node.op in ("Sub", "Div"):
            chain = [i for i in chain if i == 0]
        if len(chain) != 1:
            raise _Unproven(f"attention scores: cannot tell the scores from the mask at '{_name(node)}'")
        for i, x in enumerate(node.inputs):
            if i != chain[0]:
                axis = _head_agnostic(g, x, node)
                if axis is not None:
                    per_head.append((node, i, axis))
        t = node.inputs[chain[0]]
    raise _Unproven("attention scores: too many ops between QK MatMul and Softmax")


def _leads_to_matmul(g: _Graph, t: gs.Tensor, depth: int = 8) -> bool:
    node = g.producer(t)
    while node is not None and depth > 0:
        if node.op == "MatMul":
            return len(t.outputs) == 1
        if node.op not in ("Add", "Sub", "Mul", "Div", "Where") or len(t.outputs) != 1:
            return False
        nxt = [x for x in node.inputs if g.producer(x) is not None and len(x.outputs) == 1]
        if len(nxt) != 1:
            return any(_leads_to_matmul(g, x, depth - 1) for x in nxt)
        t = nxt[0]
        node = g.producer(t)
        depth -= 1
    return False


def _head_agnostic(g: _Graph, x: gs.Tensor, node: gs.Node) -> int | None:
    """Check a mask/bias operand of the scores: None when it broadcasts over heads,
    else the axis along which it holds one slice per head (a constant, sliced too)."""
    c = g.const(x)
    dims = list(c.shape) if c is not None else g.shapes.get(x.name)
    if dims is None:
        raise _Unproven(f"attention mask '{x.name}' at '{_name(node)}' has unknown rank")
    if len(dims) > 4:
        raise _Unproven(f"attention mask '{x.name}' has rank {len(dims)}")
    if len(dims) < 3:
        return None
    axis = len(dims) - 3
    if dims[axis] == 1:
        return None
    if c is not None:
        return axis  # checked against the head count later
    raise _Unproven(f"attention mask '{x.name}' at '{_name(node)}' may differ per head (dim {dims[axis]})")


def _nan_guard(g: _Graph, probs: gs.Tensor, region: list[gs.Tensor]) -> gs.Tensor:
    """Step over ``Where(IsNaN(p), c, p)`` (scaled-dot-product-attention exports
    zero fully masked rows this way): elementwise, so it keeps the heads apart."""
    readers = probs.outputs
    if len(readers) != 2 or is_graph_output(g.graph, probs):
        return probs
    isnan = next((n for n in readers if n.op == "IsNaN" and _is_std(n)), None)
    where = next((n for n in readers if n.op == "Where" and _is_std(n)), None)
    if isnan is None or where is None or len(where.inputs) != 3 or where.inputs[0] is not isnan.outputs[0]:
        return probs
    if where.inputs[2] is not probs or g.const(where.inputs[1]) is None or g.const(where.inputs[1]).size != 1:
        return probs
    g.private(isnan.outputs[0], "attention NaN guard")
    region.extend([probs, isnan.outputs[0]])
    return where.outputs[0]


def _keeps_shape(g: _Graph, reshape: gs.Node) -> bool:
    """A rank-4 Reshape whose output shape provably equals its input's (symbolic shape inference)."""
    a = g.shapes.get(reshape.inputs[0].name)
    b = g.shapes.get(reshape.outputs[0].name)
    return a is not None and a == b and len(a) == 4 and all(d is not None for d in a)


def _identity_reshape(g: _Graph, reshape: gs.Node, axis: int, heads: int) -> tuple[_ShapeSource, int | None]:
    """A shape-keeping Reshape inside the attention (SDPA exports write one): which entry holds the heads."""
    src = _shape_source(g, reshape)
    if len(src.values) != 4:
        raise _Unproven(f"Reshape '{_name(reshape)}' changes rank")
    head = src.values[axis]
    if head in (-1, 0):
        return src, None
    if head == heads:
        return src, axis
    raise _Unproven(f"Reshape '{_name(reshape)}': head entry {head} is not {heads}, -1 or 0")


def _match_attention(g: _Graph, softmax: gs.Node) -> _Attention:
    # Before opset 13 Softmax normalizes over all axes from `axis` (default 1) on.
    axis = softmax.attrs.get("axis", -1 if g.opset >= 13 else 1)
    if axis not in (-1, 3):
        raise _Unproven(f"Softmax over axis {axis}")
    region: list[gs.Tensor] = []
    per_head: list[tuple[gs.Node, int, int]] = []
    probs = _nan_guard(g, softmax.outputs[0], region)
    pv = g.private(probs, "attention probabilities", 1)
    region.append(probs)
    if pv.op != "MatMul" or pv.inputs[0] is not probs:
        raise _Unproven(f"attention probabilities feed {pv.op} '{_name(pv)}', not P x V")
    qk = _scores_chain(g, softmax, region, per_head)
    q = _projection(g, qk.inputs[0], [0, 2, 1, 3], "query", region)
    k = _projection(g, qk.inputs[1], [0, 2, 3, 1], "key", region)
    v = _projection(g, pv.inputs[1], [0, 2, 1, 3], "value", region)
    shapes = {what: _split_heads(g, p, what) for what, p in (("query", q), ("key", k), ("value", v))}
    if len(set(shapes.values())) != 1:
        raise _Unproven(f"query/key/value disagree on (heads, head dim): {shapes}")
    heads, dim = shapes["query"]
    for node, i, ax in per_head:
        if g.const(node.inputs[i]).shape[ax] != heads:
            raise _Unproven(f"attention mask '{node.inputs[i].name}' does not match {heads} heads")
    # P x V -> Transpose(s) -> merge Reshape -> Wo
    t = pv.outputs[0]
    total = [0, 1, 2, 3]
    reshapes: list[tuple[_ShapeSource, int | None]] = []
    while True:
        axis = total.index(1)
        node = g.private(t, "attention context", axis)
        region.append(t)
        if node.op == "Transpose" and _is_std(node):
            total = _compose(total, _perm(node, 4))
            t = node.outputs[0]
        elif node.op == "Reshape" and _is_std(node) and node.inputs[0] is t and _keeps_shape(g, node):
            reshapes.append(_identity_reshape(g, node, axis, heads))
            t = node.outputs[0]
        elif node.op == "Reshape" and _is_std(node) and node.inputs[0] is t:
            break
        else:
            raise _Unproven(f"attention context passes through {node.op} '{_name(node)}'")
    if total != [0, 2, 1, 3]:
        raise _Unproven(f"attention context: Transposes compose to {total}, expected [0, 2, 1, 3]")
    merge = _shape_source(g, node)
    hidden = heads * dim
    vals = merge.values
    if len(vals) < 2 or vals[-1] not in (hidden, -1):
        raise _Unproven(f"merge Reshape '{_name(node)}' shape {vals} does not end in {hidden} or -1")
    if any(vals[i] == 0 for i in range(2, len(vals))):
        raise _Unproven(f"merge Reshape '{_name(node)}' copies a head axis")
    ctx_t = node.outputs[0]
    mm = g.private(ctx_t, "attention output")
    region.append(ctx_t)
    w = g.const(mm.inputs[1]) if mm.op == "MatMul" and _is_std(mm) and mm.inputs[0] is ctx_t else None
    if w is None or w.ndim != 2 or w.shape[0] != hidden:
        raise _Unproven(f"attention output feeds {mm.op} '{_name(mm)}', not a MatMul with a {hidden}-row weight")
    out = _Linear(mm, w)
    for src in (q.split, k.split, v.split, merge):
        if src.computed and _depends_on(src.computed, region, g.benign):
            raise _Unproven(f"Reshape '{_name(src.reshape)}': its shape is computed from the heads themselves")
    for src, _ in reshapes:
        if src.computed and _depends_on(src.computed, region, g.benign):
            raise _Unproven(f"Reshape '{_name(src.reshape)}': its shape is computed from the heads themselves")
    return _Attention(softmax, q, k, v, merge, None if vals[-1] == -1 else len(vals) - 1, out,
                      _output_bias(g, mm, w.shape[1]), heads, dim, per_head, region, reshapes)


# ----------------------------------------------------------------------------------
# FFN neurons
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class _FFN:
    first: _Linear
    second: gs.Node
    second_weight: np.ndarray
    out_bias: tuple[gs.Node, int, np.ndarray] | None
    act_nodes: list[gs.Node]
    per_unit: list[tuple[gs.Node, int]]  # constants with one entry per unit (1-D, sliced too)
    region: list[gs.Tensor]

    @property
    def width(self) -> int:
        return self.first.weight.shape[1]

    @property
    def activation(self) -> gs.Tensor:
        return self.second.inputs[0]

    @property
    def label(self) -> str:
        return _name(self.first.matmul)


class _NotCandidate(Exception):
    """Not a feed-forward block at all: skipped without a note."""


def _match_ffn(g: _Graph, matmul: gs.Node) -> _FFN:
    """Match ``matmul`` as the first projection of a feed-forward block.

    Raises _NotCandidate for anything without an activation (plain linears,
    residual adds), _Unproven for an activation block that cannot be proven.
    """
    w1 = g.const(matmul.inputs[1])
    if w1 is None or w1.ndim != 2:
        raise _NotCandidate
    first = _Linear(matmul, w1)
    out = matmul.outputs[0]
    readers = out.outputs
    if len(readers) == 1 and readers[0].op == "Add" and _is_std(readers[0]) and not is_graph_output(g.graph, out):
        add = readers[0]
        bi = 1 if add.inputs[0] is out else 0
        b = g.const(add.inputs[bi])
        if b is not None and b.shape == (w1.shape[1],):
            first = _Linear(matmul, w1, add, bi, b)
    width = w1.shape[1]
    h = first.output
    inside: set[int] = {id(h)}
    act_nodes: list[gs.Node] = []
    per_unit: list[tuple[gs.Node, int]] = []
    region = [h] + ([matmul.outputs[0]] if first.add is not None else [])
    second: gs.Node | None = None

    def fail(why: str):
        if any(n.op in _ACTIVATIONS or n.domain == "com.microsoft" for n in act_nodes):
            return _Unproven(why)
        return _NotCandidate()

    frontier = [h]
    while frontier:
        t = frontier.pop()
        if is_graph_output(g.graph, t):
            raise fail(f"'{t.name}' is a graph output")
        for node in t.outputs:
            if any(node is n for n in act_nodes) or node is second:
                continue
            if node.op == "MatMul" and _is_std(node) and node.inputs[0] is t and t is not h:
                w2 = g.const(node.inputs[1])
                if w2 is None or w2.ndim != 2 or w2.shape[0] != width:
                    raise fail(f"activation feeds MatMul '{_name(node)}' without a {width}-row weight")
                if second is not None:
                    raise fail("activation feeds two MatMuls")
                second = node
                continue
            if not _elementwise(g, node, inside, width, per_unit):
                raise fail(f"activation is read by {node.op} '{_name(node)}'")
            act_nodes.append(node)
            for o in node.outputs:
                inside.add(id(o))
                region.append(o)
                frontier.append(o)
    if second is None:
        raise fail("the activation reaches no second MatMul")
    for node in act_nodes:
        for x in node.inputs:
            if x.name and id(x) not in inside and g.const(x) is None:
                raise fail(f"'{_name(node)}' reads '{x.name}' from outside the block")
    if not any(n.op in _ACTIVATIONS or n.domain == "com.microsoft" for n in act_nodes):
        raise _NotCandidate
    w2 = g.const(second.inputs[1])
    return _FFN(first, second, w2, _output_bias(g, second, w2.shape[1]), act_nodes, per_unit, region)


def _elementwise(g: _Graph, node: gs.Node, inside: set[int], width: int,
                 per_unit: list[tuple[gs.Node, int]]) -> bool:
    """Whether ``node`` works unit by unit; records its per-unit constant inputs."""
    if node.domain == "com.microsoft" and node.op in _MS_ACT:
        pass
    elif not _is_std(node):
        return False
    elif node.op in _UNARY:
        return len(node.inputs) == 1
    elif node.op == "Clip":
        return all(x.name == "" or g.const(x) is not None and g.const(x).size == 1 for x in node.inputs[1:])
    elif node.op not in _BINARY:
        return False
    if len(node.outputs) != 1:
        return False
    # Non-constant inputs are checked once the whole block is known (they must
    # be the block's own tensors); constants must be scalars or one per unit.
    found = []
    for i, x in enumerate(node.inputs):
        c = None if id(x) in inside or x.name == "" else g.const(x)
        if c is None or c.size == 1 and c.ndim <= 1:
            continue
        if c.shape != (width,):
            return False
        found.append((node, i))
    per_unit.extend(found)
    return True


# ----------------------------------------------------------------------------------
# Importance
# ----------------------------------------------------------------------------------
def _norm(a: np.ndarray, axis, p: int) -> np.ndarray:
    a = np.abs(a.astype(np.float64))
    return a.sum(axis=axis) if p == 1 else np.sqrt((a * a).sum(axis=axis))


def _collect(model: Model, ctx: PassContext, tensors: list[gs.Tensor], reduce: Callable[[str, np.ndarray], None],
             what: str) -> None:
    """Run the model over the calibration samples with ``tensors`` as extra outputs."""
    from graphopt import runtime
    from graphopt.activations import with_outputs

    names = [t.name for t in tensors]
    proto = with_outputs(model, names)
    try:
        sess = runtime.session(proto, source_dir=model.source_dir)
        for sample in ctx.calibration.track(f"{what}: measuring"):
            outs = sess.run(names, {k: v for k, v in sample.items()})
            for n, arr in zip(names, outs):
                reduce(n, np.asarray(arr))
    except (UsageError, PassError):
        raise
    except Exception as exc:
        raise PassError(f"{what}: cannot run the model on the calibration data: {first_line(exc)}") from None


def _resolve_criterion(pass_name: str, criterion: str, ctx: PassContext) -> str:
    if criterion == "auto":
        return "activation" if ctx.calibration is not None else "l2"
    if criterion == "activation" and ctx.calibration is None:
        raise UsageError(f"pass '{pass_name}': criterion=activation needs calibration data (--calib)")
    return criterion


def _head_scores(att: _Attention, p: int) -> np.ndarray:
    d = att.dim
    wv = att.v.linear.weight
    if att.v.linear.bias is not None:
        wv = np.vstack([wv, att.v.linear.bias[None, :]])
    cols = _norm(wv.reshape(wv.shape[0], att.heads, d), axis=(0, 2), p=p)
    rows = _norm(att.out.weight.reshape(att.heads, d, -1), axis=(1, 2), p=p)
    return cols * rows


def _keep_sorted(scores: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the ``keep`` highest scores, in their original order (ties: lower index kept)."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:keep])


# ----------------------------------------------------------------------------------
# Passes
# ----------------------------------------------------------------------------------
def _finish(model: Model, new: _NewTensors | None) -> None:
    """Add the new nodes and drop what the rewrite left unread (old weights and shapes)."""
    if new is None:
        return
    model.graph.nodes.extend(new.nodes)
    model.graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
    model.graph.toposort()


def _prune_const(node: gs.Node, i: int, full: np.ndarray, kept: np.ndarray, new: _NewTensors) -> int:
    """Replace constant input ``i`` of ``node`` (whose values are ``full``) by ``kept``,
    a slice of it; the number of values removed."""
    node.inputs[i] = new.const(node.inputs[i].name + "_pruned", kept)
    return full.size - kept.size


def _forget_shapes(tensors: list[gs.Tensor]) -> None:
    for t in tensors:
        if isinstance(t, gs.Variable):
            t.shape = None


@register_pass("prune-heads")
class PruneHeads(Pass):
    """Remove the least important attention heads of every multi-head attention
    (Q/K/V columns, Wo rows, head counts in the Reshapes)."""

    tolerance = _TOLERANCE

    ratio = Option(float, 0.25, "fraction of heads removed per attention layer", min=0.0, max=1.0)
    criterion = Option(str, "auto", "head importance: l1/l2 weight norms, activation (needs --calib), "
                       "auto (activation with --calib, else l2)", choices=CRITERIA)
    min_heads = Option(int, 1, "heads kept at least per layer", min=1)
    compensate = Option(bool, True, "with calibration data: fold the removed heads' mean output into the "
                        "output projection's bias")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        g = _Graph(model)
        notes: list[str] = []
        found: list[_Attention] = []
        for node in list(model.graph.nodes):
            if node.op in ("Attention", "MultiHeadAttention") and node.domain == "com.microsoft":
                notes.append(f"fused {node.op} '{_name(node)}' left alone (packed weights are not sliced)")
            if node.op != "Softmax" or not _is_std(node):
                continue
            try:
                found.append(_match_attention(g, node))
            except _Unproven as why:
                notes.append(f"attention at Softmax '{_name(node)}' left alone: {why}")
        stats: dict = {"layers": len(found), "layers_pruned": 0, "heads_before": 0, "heads_after": 0,
                       "params_removed": 0}
        if not found:
            if not notes:
                notes.append("no multi-head attention found")
            return PassResult(False, stats, notes)
        criterion = _resolve_criterion(self.name, self.criterion, ctx)
        stats["criterion"] = criterion
        means: list[np.ndarray | None] = [None] * len(found)
        if criterion == "activation":
            scores, means = self._activation_scores(model, ctx, found)
        else:
            scores = [_head_scores(a, 1 if criterion == "l1" else 2) for a in found]
        stats["compensated"] = 0
        new = _NewTensors(model.graph)
        for att, score, mean in zip(found, scores, means):
            remove = min(int(self.ratio * att.heads + 1e-9), max(att.heads - self.min_heads, 0))
            stats["heads_before"] += att.heads
            stats["heads_after"] += att.heads - remove
            if remove <= 0:
                continue
            keep = _keep_sorted(score, att.heads - remove)
            if self.compensate and mean is not None:
                gone = np.setdiff1d(np.arange(att.heads), keep)
                cols = (gone[:, None] * att.dim + np.arange(att.dim)[None, :]).reshape(-1)
                stats["compensated"] += _compensate(att.out_bias, mean[cols] @ att.out.weight[cols, :], new)
            stats["params_removed"] += self._rewrite(att, keep, new)
            stats["layers_pruned"] += 1
        _finish(model, new if stats["layers_pruned"] else None)
        return PassResult(stats["layers_pruned"] > 0, stats, notes)

    def _activation_scores(self, model: Model, ctx: PassContext,
                           found: list[_Attention]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per layer: the norm of each head's contribution to the output projection,
        and the mean context vector (for compensation)."""
        sums = {a.context.name: np.zeros(a.heads) for a in found}
        firsts = {a.context.name: np.zeros(a.heads * a.dim) for a in found}
        rows = {a.context.name: 0 for a in found}
        by_name = {a.context.name: a for a in found}

        def reduce(name: str, arr: np.ndarray) -> None:
            a = by_name[name]
            x = arr.reshape(-1, a.heads, a.dim).astype(np.float64)
            w = a.out.weight.astype(np.float64).reshape(a.heads, a.dim, -1)
            for h in range(a.heads):
                sums[name][h] += float(((x[:, h, :] @ w[h]) ** 2).sum())
            firsts[name] += x.reshape(len(x), -1).sum(axis=0)
            rows[name] += len(x)

        _collect(model, ctx, [a.context for a in found], reduce, self.name)
        return ([np.sqrt(sums[a.context.name]) for a in found],
                [firsts[a.context.name] / max(rows[a.context.name], 1) for a in found])

    @staticmethod
    def _rewrite(att: _Attention, keep: np.ndarray, new: _NewTensors) -> int:
        d = att.dim
        cols = (keep[:, None] * d + np.arange(d)[None, :]).reshape(-1)
        removed = 0
        for proj in (att.q, att.k, att.v):
            lin = proj.linear
            removed += _prune_const(lin.matmul, 1, lin.weight, lin.weight[:, cols], new)
            if lin.add is not None:
                removed += _prune_const(lin.add, lin.bias_index, lin.bias, lin.bias[cols], new)
            proj.split.rewrite({proj.head_pos: len(keep)} if proj.head_pos is not None else {}, new)
        removed += _prune_const(att.out.matmul, 1, att.out.weight, att.out.weight[cols, :], new)
        att.merge.rewrite({att.hidden_pos: len(cols)} if att.hidden_pos is not None else {}, new)
        for src, pos in att.reshapes:
            src.rewrite({pos: len(keep)} if pos is not None else {}, new)
        for node, i, axis in att.per_head:
            c = np.asarray(as_constant(node.inputs[i]).values)
            node.inputs[i] = new.const(node.inputs[i].name + "_pruned", np.take(c, keep, axis=axis))
            removed += c.size - c.size // att.heads * len(keep)
        _forget_shapes(att.region)
        return int(removed)


@register_pass("prune-neurons")
class PruneNeurons(Pass):
    """Remove the least important intermediate units of every feed-forward block
    (MatMul -> elementwise activation -> MatMul)."""

    tolerance = _TOLERANCE

    ratio = Option(float, 0.25, "fraction of units removed per feed-forward block", min=0.0, max=1.0)
    criterion = Option(str, "auto", "unit importance: l1/l2 weight norms, activation (needs --calib), "
                       "auto (activation with --calib, else l2)", choices=CRITERIA)
    round_to = Option(int, 1, "keep a multiple of this many units (rounded up; hardware-friendly sizes)", min=1)
    compensate = Option(bool, True, "with calibration data: fold the removed units' mean output into the "
                        "second projection's bias")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        g = _Graph(model)
        notes: list[str] = []
        found: list[_FFN] = []
        claimed: set[int] = set()
        for node in list(model.graph.nodes):
            if node.op != "MatMul" or not _is_std(node) or id(node) in claimed:
                continue
            try:
                ffn = _match_ffn(g, node)
            except _NotCandidate:
                continue
            except _Unproven as why:
                notes.append(f"feed-forward block at '{_name(node)}' left alone: {why}")
                continue
            found.append(ffn)
            claimed.add(id(ffn.second))
        stats: dict = {"blocks": len(found), "blocks_pruned": 0, "neurons_before": 0, "neurons_after": 0,
                       "params_removed": 0}
        if not found:
            if not notes:
                notes.append("no feed-forward block (MatMul -> activation -> MatMul) found")
            return PassResult(False, stats, notes)
        criterion = _resolve_criterion(self.name, self.criterion, ctx)
        stats["criterion"] = criterion
        p = 1 if criterion == "l1" else 2
        if criterion == "activation":
            acts, means = self._activation_norms(model, ctx, found)
        stats["compensated"] = 0
        new = _NewTensors(model.graph)
        for i, ffn in enumerate(found):
            width = ffn.width
            keep_n = width - int(self.ratio * width + 1e-9)
            keep_n = min(width, max(self.round_to, math.ceil(keep_n / self.round_to) * self.round_to))
            stats["neurons_before"] += width
            stats["neurons_after"] += keep_n
            if keep_n >= width:
                continue
            out_norm = _norm(ffn.second_weight, axis=1, p=p)
            if criterion == "activation":
                score = acts[i] * out_norm
            else:
                w1 = ffn.first.weight
                if ffn.first.bias is not None:
                    w1 = np.vstack([w1, ffn.first.bias[None, :]])
                score = _norm(w1, axis=0, p=p) * out_norm
            keep = _keep_sorted(score, keep_n)
            if self.compensate and criterion == "activation":
                gone = np.setdiff1d(np.arange(width), keep)
                stats["compensated"] += _compensate(ffn.out_bias, means[i][gone] @ ffn.second_weight[gone, :], new)
            stats["params_removed"] += self._rewrite(ffn, keep, new)
            stats["blocks_pruned"] += 1
        _finish(model, new if stats["blocks_pruned"] else None)
        return PassResult(stats["blocks_pruned"] > 0, stats, notes)

    def _activation_norms(self, model: Model, ctx: PassContext,
                          found: list[_FFN]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per block: the L2 norm and the mean of each unit's activation."""
        sums = {f.activation.name: np.zeros(f.width) for f in found}
        firsts = {f.activation.name: np.zeros(f.width) for f in found}
        rows = {f.activation.name: 0 for f in found}

        def reduce(name: str, arr: np.ndarray) -> None:
            a = arr.astype(np.float64).reshape(-1, arr.shape[-1])
            sums[name] += (a * a).sum(axis=0)
            firsts[name] += a.sum(axis=0)
            rows[name] += len(a)

        _collect(model, ctx, [f.activation for f in found], reduce, self.name)
        return ([np.sqrt(sums[f.activation.name]) for f in found],
                [firsts[f.activation.name] / max(rows[f.activation.name], 1) for f in found])

    @staticmethod
    def _rewrite(ffn: _FFN, keep: np.ndarray, new: _NewTensors) -> int:
        first = ffn.first
        removed = 0
        removed += _prune_const(first.matmul, 1, first.weight, first.weight[:, keep], new)
        if first.add is not None:
            removed += _prune_const(first.add, first.bias_index, first.bias, first.bias[keep], new)
        for node, i in ffn.per_unit:
            c = np.asarray(as_constant(node.inputs[i]).values)
            node.inputs[i] = new.const(node.inputs[i].name + "_pruned", c[keep])
            removed += c.size - len(keep)
        removed += _prune_const(ffn.second, 1, ffn.second_weight, ffn.second_weight[keep, :], new)
        _forget_shapes(ffn.region)
        return int(removed)
