"""Constant folding: evaluate what does not depend on the graph inputs, once, ahead of time.

How ``fold-constants`` works, and why:

1. **Static shapes.**  ``Shape`` (with ``start``/``end``) and ``Size`` of a tensor
   whose shape is fully known become constants even when the tensor itself is
   not constant.  Shapes come from the dtype/shape annotations that
   ``infer-shapes`` writes on the tensors; the pass runs that inference itself
   when the graph carries none.  This is what unlocks most folding in exported
   models (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains).

2. **Plan.**  Walking the nodes in topological order, a node is *foldable* when
   every input (and every outer-scope tensor its subgraphs read) is a constant
   or the output of a foldable node, and when folding it is safe: not
   nondeterministic, not a weight ``DequantizeLinear`` (that would undo QDQ
   quantization), in a domain onnxruntime knows, and not able to blow memory
   (output sizes are checked against ``max-bytes`` *before* evaluation; ops that
   can create tensors much larger than their inputs are only folded when their
   output shape is known).  Only the foldable outputs that something outside the
   folded set reads are *materialized*; the growth guard (``allow-growth``)
   refuses materialized outputs that would grow the model.

3. **Evaluate.**  All foldable nodes go into ONE onnxruntime model whose outputs
   are the materialized tensors; it runs once.  Session creation is the main
   cost, so batching is what keeps the pass fast.  If onnxruntime refuses the
   batch, it is split in halves (recursively, down to single nodes) so that
   what can be evaluated still is and what cannot stays as it was.

4. **Replace.**  Each materialized tensor becomes a ``gs.Constant`` with the
   *same name* (output is deterministic and graph outputs keep their names and
   dtypes), and folded nodes nobody reads any more are removed.  Values that
   are not plain tensors (sequences, optionals, maps), or that fail a size or
   type check, are not substituted: their producers stay and are remembered
   as blocked for the rest of the run.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt import runtime
from graphopt.errors import first_line
from graphopt.context import PassContext
from graphopt.ir import Model, node_subgraphs
from graphopt.pass_base import Option, Pass, PassResult
from graphopt.registry import register_pass
from graphopt.rewrite import is_graph_output, legalize_scalar_operands, remove_nodes, replace_all_uses

# Ops whose result differs between runs: folding would freeze one sample.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)

# Ops whose output can be far larger than their inputs.  Folded only when the
# output shape (and so its size) is known before evaluation.
GROWTH_OPS = frozenset(
    {
        "ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Pad", "Upsample", "OneHot", "EyeLike",
        "Loop", "Scan", "RandomNormal", "RandomUniform", "Col2Im", "CenterCropPad", "MelWeightMatrix",
        "BlackmanWindow", "HannWindow", "HammingWindow", "STFT", "DFT", "ConvTranspose", "MaxUnpool",
        "ScatterND", "ScatterElements", "Scatter", "Einsum", "MatMul", "Gemm", "MatMulInteger",
        "QLinearMatMul", "NonZero", "TfIdfVectorizer",
    }
)

# Domains onnxruntime's CPU provider implements.  Other domains are only tried
# when the model defines the op as a local function.
ORT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"})

# Element types that onnxruntime's Python API hands back as numpy arrays and
# that gs can write back as an initializer.
_PLAIN_DTYPES = frozenset(
    np.dtype(t)
    for t in (
        np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
        np.uint8, np.uint16, np.uint32, np.uint64, np.bool_,
    )
)
_PLAIN_ORT_TYPES = frozenset(f"tensor({n})" for n in (
    "float16", "float", "double", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"
))

_BLOCKED_KEY = "fold-constants/blocked"
_TRIED_SHAPES_KEY = "fold-constants/inferred"
_BUDGET_KEY = "fold-constants/growth-budget"
_MAX_ROUNDS = 4


class _EvalError(Exception):
    """onnxruntime could not build or run an evaluation model."""


# ----------------------------------------------------------------------------------
# Tensor facts
# ----------------------------------------------------------------------------------
def _static_shape(tensor: gs.Tensor) -> list[int | None] | None:
    """The tensor's shape with unknown dims as None; None when even the rank is unknown."""
    shape = tensor.shape
    if shape is None:
        return None
    return [d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape]


def _itemsize(dtype: Any) -> int | None:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        if isinstance(dtype, int) and dtype:  # an onnx element type gs could not map to numpy
            bits = {onnx.TensorProto.BFLOAT16: 16}.get(dtype, 8)
            return max(1, bits // 8)
        return None
    return None if dt.kind == "O" else dt.itemsize


def known_nbytes(tensor: gs.Tensor) -> int | None:
    """Bytes of a tensor from its annotations (never loads lazy values); None if unknown."""
    shape = _static_shape(tensor)
    if shape is None or any(d is None for d in shape) or tensor.dtype is None:
        return None
    size = _itemsize(tensor.dtype)
    return None if size is None else math.prod(shape) * size


def constant_nbytes(tensor: gs.Constant) -> int | None:
    """Bytes of a constant without loading lazy values; strings count their characters."""
    if tensor.dtype is not None and _itemsize(tensor.dtype) is None:  # strings
        values = tensor._values
        if isinstance(values, LazyValues):
            proto = values.tensor
            return sum(len(s) for s in proto.string_data) if isinstance(proto, onnx.TensorProto) else None
        return sum(len(str(v).encode()) for v in np.asarray(values).flat)
    return known_nbytes(tensor)


def _is_absent(tensor: gs.Tensor) -> bool:
    """An omitted optional input (empty name)."""
    return isinstance(tensor, gs.Variable) and not tensor.name and not tensor.inputs


def _nested_nodes(node: gs.Node) -> Iterator[gs.Node]:
    """Every node inside ``node``'s subgraphs, recursively."""
    for sub in node_subgraphs(node):
        for inner in sub.nodes:
            yield inner
            yield from _nested_nodes(inner)


def outer_refs(node: gs.Node) -> list[gs.Tensor]:
    """Tensors that ``node``'s subgraphs read from the enclosing scope."""
    if not any(True for _ in node_subgraphs(node)):
        return []
    produced: set[int] = set()
    inner_nodes = list(_nested_nodes(node))

    def collect(graph: gs.Graph) -> None:
        produced.update(id(t) for t in graph.inputs)
        for n in graph.nodes:
            produced.update(id(t) for t in n.outputs)
            for sub in node_subgraphs(n):
                collect(sub)

    for sub in node_subgraphs(node):
        collect(sub)
    refs: dict[int, gs.Tensor] = {}
    for n in inner_nodes:
        for t in n.inputs:
            if id(t) not in produced and not _is_absent(t):
                refs.setdefault(id(t), t)
    return list(refs.values())


def topological_order(graph: gs.Graph) -> list[gs.Node]:
    """Nodes in a stable topological order that counts subgraph reads as edges.

    Ties keep the original order, so the result is deterministic.  Nodes caught
    in a cycle (an invalid graph) are appended in their original order.
    """
    nodes = list(graph.nodes)
    index = {id(n): i for i, n in enumerate(nodes)}
    producer = {id(t): index[id(n)] for n in nodes for t in n.outputs}
    deps: list[set[int]] = []
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        d = {producer[id(t)] for t in list(n.inputs) + outer_refs(n) if id(t) in producer} - {i}
        deps.append(d)
        for j in d:
            users[j].append(i)
    missing = [len(d) for d in deps]
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    seen = set(order)
    order += [i for i in range(len(nodes)) if i not in seen]
    return [nodes[i] for i in order]


# ----------------------------------------------------------------------------------
# Static Shape / Size
# ----------------------------------------------------------------------------------
def static_shape_value(node: gs.Node) -> np.ndarray | None:
    """The value of a ``Shape`` or ``Size`` node when its input's shape settles it."""
    if (node.domain or "") not in ("", "ai.onnx") or node.op not in ("Shape", "Size") or not node.inputs:
        return None
    if len(node.outputs) != 1:
        return None
    src = node.inputs[0]
    if getattr(src, "type", "tensor_type") != "tensor_type" or _is_absent(src):
        return None
    shape = _static_shape(src)
    if shape is None:
        return None
    if node.op == "Size":
        return None if any(d is None for d in shape) else np.array(math.prod(shape), dtype=np.int64)
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    # Python slicing clamps and wraps negative indices exactly as the spec says.
    dims = shape[start:] if end is None else shape[start : int(end)]
    if any(d is None for d in dims):
        return None
    return np.array(dims, dtype=np.int64)


# ----------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Plan:
    """What one round evaluates: foldable nodes in order and the tensors to materialize."""

    nodes: list[gs.Node]
    materialize: list[gs.Variable]
    source_bytes: dict[int, int]  # id(node) -> bytes of the constants it is computed from


@dataclasses.dataclass
class _Stats:
    folded_nodes: int = 0
    folded_shapes: int = 0
    constants: int = 0
    sessions: int = 0
    failed_sessions: int = 0
    blocked: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    def note(self, msg: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(msg)


@register_pass("fold-constants")
class FoldConstants(Pass):
    """Evaluate constant subgraphs and static Shape/Size with onnxruntime, replacing them by initializers."""

    max_bytes = Option(int, 64 * 2**20, "largest constant created or read (bytes)", min=0)
    allow_growth = Option(
        bool, False, "fold nodes whose outputs are much larger than the constants they come from"
    )
    growth_bytes = Option(
        int, 4096, "growth guard: bytes of larger-than-source outputs allowed in one optimization run", min=0
    )
    growth_ratio = Option(
        float, 2.0, "growth guard: outputs up to this many times the constants they come from are fine", min=0.0
    )
    keep_dequantize = Option(bool, True, "keep DequantizeLinear of constant (quantized) weights")
    keep_if_conditions = Option(
        bool, True, "leave the computation of an If condition that depends on inputs as it is (see if_condition_cones)"
    )
    fold_shapes = Option(bool, True, "fold Shape and Size of tensors whose shape is statically known")

    # -- entry point ------------------------------------------------------------------
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        stats = _Stats()
        blocked: dict[int, gs.Node] = ctx.scratch.setdefault(_BLOCKED_KEY, {})
        # Bytes still allowed to outputs larger than what they are computed from,
        # shared by every round of the run so a fixpoint cannot multiply it.
        self._budget = ctx.scratch.setdefault(_BUDGET_KEY, [self.growth_bytes])
        # Before shape inference, which cannot size a Range with shape-[1] operands.
        changed = legalize_scalar_operands(graph) > 0
        self._ensure_shapes(model, ctx)
        for _ in range(_MAX_ROUNDS):
            progressed = False
            if self.fold_shapes:
                progressed |= self._fold_static_shapes(graph, stats)
            progressed |= self._inline_constant_ifs(graph, stats)
            plan = self._plan(graph, blocked)
            if plan.nodes:
                progressed |= self._fold(model, plan, blocked, stats)
            # A folded one-element value may now sit where a scalar is required.
            progressed |= legalize_scalar_operands(graph) > 0
            changed |= progressed
            if not progressed:
                break
        return PassResult(
            changed=changed,
            stats={
                "folded_nodes": stats.folded_nodes,
                "folded_shapes": stats.folded_shapes,
                "constants": stats.constants,
                "sessions": stats.sessions,
                "failed_sessions": stats.failed_sessions,
                "blocked": stats.blocked,
            },
            notes=stats.notes,
            reason="nothing left that depends only on constants or on static shapes",
        )

    def _ensure_shapes(self, model: Model, ctx: PassContext) -> None:
        """Run shape inference when some tensor has no shape and inference was not
        tried on it yet in this run (the pass run on its own, or new tensors).
        Shapes drive the static Shape/Size folds and the size checks."""
        graph = model.graph
        tried: set[str] = ctx.scratch.setdefault(_TRIED_SHAPES_KEY, set())
        unknown = {
            t.name
            for n in graph.nodes
            for t in list(n.outputs) + (list(n.inputs[:1]) if n.op in ("Shape", "Size") else [])
            if isinstance(t, gs.Variable) and t.name and t.shape is None and not is_graph_output(graph, t)
        }
        if unknown - tried:
            tried.update(unknown)
            _annotate(model)

    # -- static shapes ------------------------------------------------------------------
    def _fold_static_shapes(self, graph: gs.Graph, stats: _Stats) -> bool:
        protected = if_condition_cones(graph, topological_order(graph)) if self.keep_if_conditions else set()
        folded = []
        for node in list(graph.nodes):
            if id(node) in protected:
                continue
            value = static_shape_value(node)
            if value is None:
                continue
            if self._substitute(graph, node.outputs[0], value, stats):
                folded.append(node)
        remove_nodes(graph, folded)
        stats.folded_shapes += len(folded)
        return bool(folded)

    # -- If with a constant condition ---------------------------------------------------
    def _inline_constant_ifs(self, graph: gs.Graph, stats: _Stats) -> bool:
        """Replace each If whose condition is a constant by the branch it takes.

        onnxruntime does the same when it creates a session.  Doing it here lets
        the taken branch fold with the rest, and drops the other branch, which
        may no longer type-check once its outer values are constants (onnx's
        expanded AffineGrid: the 2-D branch squeezes a 3-D theta).
        """
        inlined = 0
        for node in list(graph.nodes):
            if node.op != "If" or (node.domain or "") not in ("", "ai.onnx") or not node.inputs:
                continue
            cond = node.inputs[0]
            if not isinstance(cond, gs.Constant) or cond.values.size != 1:
                continue
            branch = node.attrs.get("then_branch" if bool(cond.values.reshape(-1)[0]) else "else_branch")
            if not isinstance(branch, gs.Graph) or len(branch.outputs) != len(node.outputs):
                continue
            _inline_branch(graph, node, branch)
            inlined += 1
            stats.note(f"inlined If '{node.name}': its condition is the constant {bool(cond.values.reshape(-1)[0])}")
        stats.folded_nodes += inlined
        return inlined > 0

    # -- planning -----------------------------------------------------------------------
    def _plan(self, graph: gs.Graph, blocked: dict[int, gs.Node]) -> _Plan:
        """Choose the foldable nodes; block producers of materialized outputs that fail
        a size check known before evaluation, and plan again until stable."""
        order = topological_order(graph)
        local_functions = {(f.domain or "", f.name): f for f in getattr(graph, "functions", [])}
        protected = if_condition_cones(graph, order) if self.keep_if_conditions else set()
        while True:
            plan = self._plan_once(graph, order, {**blocked, **dict.fromkeys(protected)}, local_functions)
            budget = [self._budget[0]]  # a trial copy: evaluation settles the real one
            late = [t for t in plan.materialize if not self._size_ok_before(t, plan, budget)]
            if not late:
                return plan
            for t in late:
                blocked[id(t.inputs[0])] = t.inputs[0]

    def _plan_once(self, graph, order, blocked, local_functions) -> _Plan:
        inputs = {id(t) for t in graph.inputs}
        folded: set[int] = set()  # ids of outputs of foldable nodes
        producer_bytes: dict[int, int] = {}  # id(tensor) -> source bytes
        nodes: list[gs.Node] = []
        source_bytes: dict[int, int] = {}
        for node in order:
            if id(node) in blocked or not node.outputs or not self._kind_ok(node, local_functions):
                continue
            if not any(t.outputs or is_graph_output(graph, t) for t in node.outputs):
                continue  # dead: eliminate-dead-code's business
            deps = list(node.inputs) + outer_refs(node)
            src = 0
            ok = True
            for t in deps:
                if _is_absent(t):
                    continue
                if id(t) in inputs:
                    ok = False
                elif isinstance(t, gs.Constant):
                    nb = constant_nbytes(t)
                    if nb is None or nb > self.max_bytes:
                        ok = False
                    else:
                        src += nb
                elif id(t) in folded:
                    src += producer_bytes[id(t)]
                else:
                    ok = False
                if not ok:
                    break
            if not ok or not self._outputs_bounded(node):
                continue
            # A Constant node's value is already stored in the model: turning it
            # into an initializer does not grow anything.
            src += _constant_node_bytes(node)
            nodes.append(node)
            source_bytes[id(node)] = src
            for t in node.outputs:
                folded.add(id(t))
                producer_bytes[id(t)] = src
        members = {id(n) for n in nodes}
        owner = {id(inner): id(n) for n in graph.nodes for inner in _nested_nodes(n)}
        materialize: list[gs.Variable] = []
        for node in nodes:
            for t in node.outputs:
                if _is_absent(t) or not t.name:
                    continue
                readers_outside = any(owner.get(id(c), id(c)) not in members for c in t.outputs)
                if readers_outside or is_graph_output(graph, t):
                    materialize.append(t)
        return _Plan(nodes, materialize, source_bytes)

    def _kind_ok(self, node: gs.Node, local_functions: dict) -> bool:
        """Whether an op may be folded at all, whatever its inputs."""
        domain = node.domain or ""
        if domain not in ORT_DOMAINS:
            func = local_functions.get((domain, node.op))
            if func is None:
                return False
            return all(self._kind_ok(n, {}) for n in func.nodes)
        if domain in ("", "ai.onnx") and node.op in NONDETERMINISTIC_OPS:
            return False
        if node.op == "Dropout" and not _dropout_is_inference(node):
            return False
        if node.op == "DequantizeLinear" and self.keep_dequantize and node.inputs:
            x = node.inputs[0]
            if not isinstance(x, gs.Variable) or x.inputs:
                # A constant (or constant-computed) quantized weight: keep QDQ.
                if _is_integer(x.dtype):
                    return False
        for inner in _nested_nodes(node):
            if (inner.domain or "") in ("", "ai.onnx") and inner.op in NONDETERMINISTIC_OPS:
                return False
            if inner.op == "Dropout" and not _dropout_is_inference(inner):
                return False
        return True

    def _outputs_bounded(self, node: gs.Node) -> bool:
        """Refuse, before evaluating, outputs known to exceed ``max-bytes`` and outputs of
        size-growing ops (or subgraphs holding them) whose size is unknown."""
        grows = node.op in GROWTH_OPS or any(n.op in GROWTH_OPS for n in _nested_nodes(node))
        for t in node.outputs:
            if _is_absent(t):
                continue
            nb = known_nbytes(t)
            if nb is None:
                if grows:
                    return False
            elif nb > self.max_bytes:
                return False
        return True

    def _size_ok_before(self, tensor: gs.Variable, plan: _Plan, budget: list[int]) -> bool:
        nb = known_nbytes(tensor)
        if nb is None:
            return True  # checked again on the value
        return self._size_ok(nb, plan.source_bytes.get(id(tensor.inputs[0]), 0), budget)

    def _size_ok(self, nbytes: int, source: int, budget: list[int]) -> bool:
        """Within ``max-bytes``, and not growing the model: no larger than
        ``growth-ratio`` times the constants it comes from, or paid from the run's
        ``growth-bytes`` budget (so ConstantOfShape-generated weights stay generated)."""
        if nbytes > self.max_bytes:
            return False
        if self.allow_growth or nbytes <= self.growth_ratio * source:
            return True
        if nbytes <= budget[0]:
            budget[0] -= nbytes
            return True
        return False

    # -- evaluation ---------------------------------------------------------------------
    def _fold(self, model: Model, plan: _Plan, blocked: dict[int, gs.Node], stats: _Stats) -> bool:
        graph = model.graph
        wanted = [t.name for t in plan.materialize]
        f_outputs = {t.name for n in plan.nodes for t in n.outputs if t.name}
        values = self._evaluate(model, plan.nodes, wanted, {}, f_outputs, blocked, stats)
        changed = False
        for t in plan.materialize:
            producer = t.inputs[0] if t.inputs else None
            value = values.get(t.name)
            if producer is None or t.name not in values:
                continue
            if not self._value_ok(t, value, plan.source_bytes.get(id(producer), 0)):
                blocked[id(producer)] = producer
                stats.blocked += 1
                stats.note(f"kept {producer.op} '{producer.name}': output '{t.name}' not folded")
                continue
            if self._substitute(graph, t, value, stats):
                changed = True
        removed = _remove_dead(graph, plan.nodes)
        stats.folded_nodes += removed
        return changed or removed > 0

    def _value_ok(self, tensor: gs.Variable, value: Any, source: int) -> bool:
        """A value may replace ``tensor``: a plain array of the annotated type and shape
        within the size limits."""
        if not isinstance(value, np.ndarray):
            return False
        if value.dtype.kind in "OUS":
            if not all(isinstance(v, str) for v in value.flat):
                return False
        elif value.dtype not in _PLAIN_DTYPES:
            return False
        elif tensor.dtype is not None:
            try:
                if np.dtype(tensor.dtype) != value.dtype:
                    return False
            except TypeError:
                return False
        shape = _static_shape(tensor)
        if shape is not None and (
            len(shape) != value.ndim or any(d is not None and d != v for d, v in zip(shape, value.shape))
        ):
            return False
        return self._size_ok(_value_nbytes(value), source, self._budget)

    def _evaluate(
        self,
        model: Model,
        nodes: list[gs.Node],
        wanted: list[str],
        known: dict[str, np.ndarray],
        f_outputs: set[str],
        blocked: dict[int, gs.Node],
        stats: _Stats,
    ) -> dict[str, Any]:
        """Values of ``wanted`` computed by ``nodes``; on failure split the batch in two
        (a topological prefix and the rest) until single nodes, which get blocked."""
        if not nodes or not wanted:
            return {}
        try:
            return self._run_batch(model, nodes, wanted, known, stats)
        except _EvalError as exc:
            stats.failed_sessions += 1
            if len(nodes) == 1:
                blocked[id(nodes[0])] = nodes[0]
                stats.blocked += 1
                stats.note(f"onnxruntime cannot evaluate {nodes[0].op} '{nodes[0].name}': {exc}")
                return {}
        half = len(nodes) // 2
        first, second = nodes[:half], nodes[half:]
        first_names = {t.name for n in first for t in n.outputs if t.name}
        needed_later = {t.name for n in second for t in list(n.inputs) + outer_refs(n)} & first_names
        want_first = sorted(needed_later | (set(wanted) & first_names))
        got = self._evaluate(model, first, want_first, known, f_outputs, blocked, stats)
        known2 = dict(known)
        known2.update({k: v for k, v in got.items() if isinstance(v, np.ndarray) and v.dtype in _PLAIN_DTYPES})
        available = set(known2)
        runnable: list[gs.Node] = []
        for n in second:
            deps = [t.name for t in list(n.inputs) + outer_refs(n) if t.name in f_outputs]
            if all(d in available for d in deps):
                runnable.append(n)
                available.update(t.name for t in n.outputs if t.name)
        second_names = {t.name for n in runnable for t in n.outputs if t.name}
        got2 = self._evaluate(
            model, runnable, [w for w in wanted if w in second_names], known2, f_outputs, blocked, stats
        )
        out = {k: v for k, v in got.items() if k in wanted}
        out.update(got2)
        return out

    def _run_batch(
        self, model: Model, nodes: list[gs.Node], wanted: list[str], known: dict[str, np.ndarray], stats: _Stats
    ) -> dict[str, Any]:
        stats.sessions += 1
        try:
            proto = build_eval_model(model, nodes, wanted, known)
            sess = runtime.session(proto, source_dir=model.source_dir, optimize=False)
            outs = sess.run(wanted, {})
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:
            raise _EvalError(first_line(exc, limit=200)) from None
        return dict(zip(wanted, outs))

    # -- rewriting ----------------------------------------------------------------------
    def _substitute(self, graph: gs.Graph, tensor: gs.Tensor, value: np.ndarray, stats: _Stats) -> bool:
        if not substitute_constant(graph, tensor, value):
            return False
        stats.constants += 1
        return True


def substitute_constant(graph: gs.Graph, tensor: gs.Tensor, value: np.ndarray) -> bool:
    """Make readers of ``tensor`` read a constant with the same name and value."""
    name = tensor.name
    const = gs.Constant(name, _constant_values(value))
    if is_graph_output(graph, tensor):
        # replace_all_uses moves the name onto the constant.
        const.name = name + "__folding"
        return replace_all_uses(graph, tensor, const)
    tensor.name = _unique_name(graph, name + "__folded")
    if not replace_all_uses(graph, tensor, const):
        tensor.name = name
        return False
    return True


def materialize(model: Model, tensors: Sequence[gs.Tensor]) -> list[str]:
    """Evaluate the constant subgraphs behind ``tensors`` (e.g. weights an
    exporter computes with ConstantOfShape or Transpose) and make them
    initializers, whatever their size: for a pass that must edit the values.
    Tensors that depend on graph inputs, or on nondeterministic ops, are left
    alone.  Returns the names materialized."""
    graph = model.graph
    inputs = {id(t) for t in graph.inputs}
    cone: dict[int, gs.Node] = {}
    wanted: list[gs.Tensor] = []
    for tensor in tensors:
        found: dict[int, gs.Node] = {}
        stack, ok = [tensor], True
        while stack and ok:
            t = stack.pop()
            if isinstance(t, gs.Constant) or _is_absent(t) or id(t) in found:
                continue
            if id(t) in inputs or len(t.inputs) != 1:
                ok = False
                break
            node = t.inputs[0]
            if node.op in NONDETERMINISTIC_OPS or (node.domain or "") not in ORT_DOMAINS:
                ok = False
                break
            if id(node) not in found and id(node) not in cone:
                found[id(node)] = node
                stack.extend(list(node.inputs) + outer_refs(node))
        if ok and found:
            cone.update(found)
            wanted.append(tensor)
    if not wanted:
        return []
    nodes = [n for n in topological_order(graph) if id(n) in cone]
    try:
        proto = build_eval_model(model, nodes, [t.name for t in wanted], {})
        values = runtime.session(proto, source_dir=model.source_dir, optimize=False).run(
            [t.name for t in wanted], {})
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception:
        return []
    done = [t.name for t, v in zip(wanted, values) if isinstance(v, np.ndarray) and substitute_constant(graph, t, v)]
    _remove_dead(graph, nodes)
    return done


def _inline_branch(graph: gs.Graph, node: gs.Node, branch: gs.Graph) -> None:
    """Put ``branch``'s nodes where the If ``node`` was and make the If's readers
    read the branch outputs.  gs shares tensor objects across scopes, so outer
    values the branch reads are already the parent's tensors; names the branch
    defines that the parent also uses (a sibling subgraph may) are renamed."""
    taken = set(graph.tensors().keys()) - {t.name for t in node.outputs}
    for inner in branch.nodes:
        for t in inner.outputs:
            if t.name in taken:
                t.name = _unique_name(graph, t.name + "__inlined")
            taken.add(t.name)
    at = next(i for i, n in enumerate(graph.nodes) if n is node)
    moved = list(branch.nodes)
    bridges: list[gs.Node] = []
    outputs = list(node.outputs)
    result = list(branch.outputs)
    node.inputs.clear()
    node.outputs.clear()
    for out, value in zip(outputs, result):
        # An If output that is a graph output keeps its name; a branch output that
        # cannot take that name (an outer value, or a graph input/output itself)
        # is passed through an Identity.
        if value.inputs and any(value.inputs[0] is n for n in moved) and replace_all_uses(graph, out, value):
            continue
        bridges.append(gs.Node("Identity", name=_unique_name(graph, (node.name or "If") + "__inlined"),
                               inputs=[value], outputs=[out]))
    graph.nodes[at:at + 1] = moved + bridges
    branch.nodes.clear()


def _value_nbytes(value: np.ndarray) -> int:
    if value.dtype.kind in "OUS":
        return sum(len(str(v).encode()) for v in value.flat)
    return int(value.nbytes)


def _constant_values(value: np.ndarray) -> Any:
    """Values for a new gs.Constant.  Strings go through a TensorProto (gs writes
    numpy values with ``tobytes``, which cannot hold strings); ``np.array`` keeps
    0-d arrays 0-d, unlike ``np.ascontiguousarray``."""
    if value.dtype.kind in "OUS":
        return LazyValues(onnx.numpy_helper.from_array(value.astype(object), ""))
    return np.array(value, order="C", copy=True)


def _annotate(model: Model) -> None:
    """Shape inference for the size checks; a model it cannot handle keeps its
    annotations (folding then only gets more conservative)."""
    from graphopt.passes.shapes import annotate_shapes

    try:
        annotate_shapes(model)
    except Exception:
        pass


def if_condition_cones(graph: gs.Graph, order: Sequence[gs.Node]) -> set[int]:
    """Ids of the nodes that compute the condition of an If that depends on graph inputs.

    onnxruntime inlines an If whose condition is an initializer when it creates a
    session, and then re-checks the inlined branch with the shapes it now knows.
    Models that are only valid while the branch stays opaque (onnx's own expanded
    AffineGrid feeds 1-element tensors to Range) then no longer load.  Leaving
    the condition's computation as it was keeps such models loadable; an If
    whose inputs are all constant is folded whole and is not concerned.
    """
    dynamic = {id(t) for t in graph.inputs}
    ifs: list[gs.Node] = []
    for node in order:
        deps = list(node.inputs) + outer_refs(node)
        if any(id(t) in dynamic for t in deps):
            dynamic.update(id(t) for t in node.outputs)
            if node.op == "If" and node.inputs:
                ifs.append(node)
    cone: set[int] = set()
    stack = [n.inputs[0] for n in ifs]
    seen: set[int] = set()
    while stack:
        t = stack.pop()
        if id(t) in seen or not t.inputs:
            continue
        seen.add(id(t))
        producer = t.inputs[0]
        if id(producer) not in cone:
            cone.add(id(producer))
            stack.extend(list(producer.inputs) + outer_refs(producer))
    return cone


def _dropout_is_inference(node: gs.Node) -> bool:
    """Dropout is a deterministic identity unless training_mode may be true."""
    if len(node.inputs) < 3 or _is_absent(node.inputs[2]):
        return True
    mode = node.inputs[2]
    if not isinstance(mode, gs.Constant) or (known_nbytes(mode) or 0) > 64:
        return False
    return not bool(np.any(mode.values))


def _is_integer(dtype: Any) -> bool:
    try:
        return np.dtype(dtype).kind in "iu"
    except TypeError:
        # int4/uint4/int2... come as onnx element types gs cannot map to numpy.
        return isinstance(dtype, int) and dtype in _ONNX_INT_TYPES


_ONNX_INT_TYPES = frozenset(
    getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "INT2", "UINT2") if hasattr(onnx.TensorProto, n)
)


def _unique_name(graph: gs.Graph, base: str) -> str:
    names = graph.tensors().keys()
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    return name


def _constant_node_bytes(node: gs.Node) -> int:
    if node.op != "Constant" or (node.domain or "") not in ("", "ai.onnx"):
        return 0
    total = 0
    for value in node.attrs.values():
        if isinstance(value, gs.Constant):
            total += constant_nbytes(value) or 0
        elif isinstance(value, (list, tuple)):
            total += 8 * len(value)
        elif isinstance(value, (str, bytes)):
            total += len(value)
        else:
            total += 8
    return total


def _remove_dead(graph: gs.Graph, nodes: Sequence[gs.Node]) -> int:
    """Remove the folded nodes nobody reads any more (last ones first)."""
    present = {id(n) for n in graph.nodes}
    outputs = {id(t) for t in graph.outputs}
    dead: list[gs.Node] = []
    for node in reversed(nodes):
        if id(node) not in present:
            continue
        if any(t.outputs or id(t) in outputs for t in node.outputs):
            continue
        dead.append(node)
        # Detach now, so the producers of its inputs may become dead too.
        node.inputs.clear()
    remove_nodes(graph, dead)
    return len(dead)


def build_eval_model(
    model: Model, nodes: Sequence[gs.Node], wanted: Sequence[str], known: dict[str, np.ndarray]
) -> onnx.ModelProto:
    """A model that computes ``wanted`` from ``nodes``, their constant inputs and
    already ``known`` values.  Outputs are left untyped: onnxruntime infers them."""
    graph_nodes = [OnnxExporter.export_node(n) for n in nodes]
    inits: dict[str, onnx.TensorProto] = {}
    for name, value in known.items():
        inits[name] = onnx.numpy_helper.from_array(value, name)
    for n in nodes:
        for t in n.inputs:
            if isinstance(t, gs.Constant) and t.name not in inits:
                inits[t.name] = OnnxExporter.export_tensor_proto(t)
    outputs = []
    for name in wanted:
        vi = onnx.ValueInfoProto()
        vi.name = name
        outputs.append(vi)
    g = onnx.helper.make_graph(graph_nodes, "fold_constants", [], outputs, list(inits.values()))
    opsets = dict(model.info.opset_imports)
    opsets.setdefault("", 17)
    for n in _all_nodes(nodes):
        opsets.setdefault(n.domain or "", 1)
    functions = [OnnxExporter.export_function(f) for f in getattr(model.graph, "functions", [])]
    proto = onnx.helper.make_model(
        g,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in sorted(opsets.items()) if d != "ai.onnx"],
        functions=functions,
    )
    proto.ir_version = max(model.info.ir_version, 4 if not functions else 8)
    return proto


def _all_nodes(nodes: Iterable[gs.Node]) -> Iterator[gs.Node]:
    for n in nodes:
        yield n
        yield from _nested_nodes(n)


