"""Clean-up passes: dead code, common subexpressions, no-op nodes."""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Hashable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.context import PassContext
from graphopt.ir import Model, iter_graphs
from graphopt.pass_base import Option, Pass, PassResult
from graphopt.registry import register_pass
from graphopt.rewrite import (STANDARD_DOMAINS, as_constant, is_graph_input, is_graph_output, lacks_annotations,
                              replace_all_uses, sort_nodes, static_shape)
from graphopt.stats import graph_stats
from graphopt.passes.shapes import annotate_shapes

# Ops whose outputs differ between two calls with the same inputs: merging
# two of them would correlate values the model wants independent.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
# Larger constants are loaded to test "all zeros"/"all ones" only up to this
# many elements; lazily stored weights beyond it are never read.
NEUTRAL_CHECK_MAX_ELEMENTS = 1 << 16


@register_pass("eliminate-dead-code")
class EliminateDeadCode(Pass):
    """Remove nodes and constants that no graph output depends on, and sort the graph."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        before = graph_stats(graph)
        graph.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=True, remove_unused_graph_inputs=False)
        sorted_anew = sort_nodes(graph)
        after = graph_stats(graph)
        removed = before.nodes - after.nodes
        return PassResult(
            changed=removed > 0 or after.initializers != before.initializers or sorted_anew,
            stats={"removed_nodes": removed, "removed_constants": before.initializers - after.initializers},
            reason="every node and constant feeds a graph output",
        )


# ----------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------
class Bypasser:
    """Redirects the readers of one tensor to another inside one graph.

    The subgraph rule: when ``old`` is a subgraph output, ``new`` takes its
    name, which is only safe when ``new`` is produced inside that subgraph
    (renaming an outer-scope value would rename it everywhere).
    """

    def __init__(self, model: Model, graph: gs.Graph, top: bool):
        self.graph = graph
        self.top = top
        self.overridable = model.overridable
        self.local = {id(n) for n in graph.nodes}
        self.removed: set[int] = set()

    def can_bypass(self, old: gs.Tensor, new: gs.Tensor) -> bool:
        if old is new or not is_graph_output(self.graph, old):
            return old is not new
        if is_graph_input(self.graph, new) or is_graph_output(self.graph, new):
            return False
        if isinstance(new, gs.Constant) and new.name in self.overridable:
            return False
        if not self.top:
            return len(new.inputs) == 1 and id(new.inputs[0]) in self.local
        return True

    def bypass(self, old: gs.Tensor, new: gs.Tensor) -> bool:
        return self.can_bypass(old, new) and replace_all_uses(self.graph, old, new)

    def drop_if_dead(self, node: gs.Node) -> int:
        """Remove ``node`` and producers it leaves unread; returns how many went."""
        count = 0
        work = [node]
        while work:
            n = work.pop()
            if id(n) in self.removed or not self._is_dead(n):
                continue
            producers = [t.inputs[0] for t in n.inputs if len(t.inputs) == 1]
            self.detach(n)
            count += 1
            work.extend(producers)
        return count

    def detach(self, node: gs.Node) -> None:
        """Unhook ``node``; :meth:`finish` drops it from the graph in one sweep
        (removing from gs's node list one by one compares nodes structurally)."""
        node.inputs.clear()
        node.outputs.clear()
        self.removed.add(id(node))

    def finish(self) -> None:
        if self.removed:
            self.graph.nodes = [n for n in self.graph.nodes if id(n) not in self.removed]

    def _is_dead(self, node: gs.Node) -> bool:
        if id(node) not in self.local:
            return False
        return all(not t.outputs and not is_graph_output(self.graph, t) for t in node.outputs)


def _const_array(tensor: gs.Tensor, overridable: frozenset[str], max_elements: int | None = None) -> np.ndarray | None:
    const = as_constant(tensor, overridable)
    if const is None:
        return None
    if max_elements is not None and math.prod(const.shape) > max_elements:
        return None
    try:
        return np.asarray(const.values)
    except Exception:
        return None


def _int_list(tensor: gs.Tensor, overridable: frozenset[str]) -> list[int] | None:
    array = _const_array(tensor, overridable, max_elements=4096)
    if array is None or array.dtype.kind not in "iu" or array.ndim > 1:
        return None
    return [int(v) for v in array.reshape(-1)]


def _present(node: gs.Node, index: int) -> gs.Tensor | None:
    """The ``index``-th input when given (optional inputs may be missing or empty)."""
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def _rank(tensor: gs.Tensor) -> int | None:
    shape = getattr(tensor, "shape", None)
    return None if shape is None else len(shape)


# ----------------------------------------------------------------------------------
# Common subexpression elimination
# ----------------------------------------------------------------------------------
class _Uncomparable(Exception):
    """An attribute whose equality we cannot decide (subgraphs, unknown kinds)."""


class _ConstantKeys:
    """Value keys of constants: dtype and shape first, bytes only when affordable."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._cache: dict[int, Hashable] = {}

    def key(self, const: gs.Constant) -> Hashable:
        cached = self._cache.get(id(const))
        if cached is None:
            cached = self._cache[id(const)] = self._compute(const)
        return cached

    def _compute(self, const: gs.Constant) -> Hashable:
        try:
            dtype = np.dtype(const.dtype)
        except TypeError:
            return ("id", id(const))
        shape = tuple(int(d) for d in const.shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if dtype.kind not in "biufc" or nbytes > self.max_bytes:
            return ("id", id(const))
        data = np.ascontiguousarray(np.asarray(const.values, dtype=dtype)).tobytes()
        return (dtype.str, shape, hashlib.sha256(data).hexdigest())


def _attr_key(value, consts: _ConstantKeys) -> Hashable:
    if isinstance(value, gs.Graph):
        raise _Uncomparable
    if isinstance(value, gs.Constant):
        return ("tensor", consts.key(value))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_attr_key(v, consts) for v in value))
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, (bool, int, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    raise _Uncomparable


def _node_key(node: gs.Node, consts: _ConstantKeys) -> Hashable | None:
    if node.op in NONDETERMINISTIC_OPS or node.domain not in STANDARD_DOMAINS or not node.outputs:
        return None
    try:
        attrs = tuple(sorted((k, _attr_key(v, consts)) for k, v in node.attrs.items()))
    except _Uncomparable:
        return None
    inputs = tuple(id(t) if t.name else "" for t in node.inputs)
    outputs = tuple(bool(t.name) for t in node.outputs)
    return (node.op, node.domain or "", inputs, attrs, outputs)


@register_pass("cse")
class CommonSubexpressionElimination(Pass):
    """Merge nodes that compute the same value, and identical constants, so the
    model computes and stores each value once."""

    max_constant_bytes = Option(int, 1 << 20, "largest constant (bytes) whose data is compared for merging", min=0)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        try:
            sorted_anew = sort_nodes(model.graph)
        except Exception as exc:  # a cycle: nothing here is safe to merge
            return PassResult(changed=False, notes=[f"cse skipped: graph cannot be sorted ({exc})"])
        consts = _ConstantKeys(self.max_constant_bytes)
        merged_constants = merged_nodes = 0
        for graph in list(iter_graphs(model.graph)):
            bypass = Bypasser(model, graph, top=graph is model.graph)
            merged_constants += self._merge_constants(graph, bypass, consts)
            merged_nodes += self._merge_nodes(graph, bypass, consts)
        return PassResult(
            changed=merged_constants + merged_nodes > 0 or sorted_anew,
            stats={"merged_nodes": merged_nodes, "merged_constants": merged_constants},
            reason="no two nodes compute the same value and no two constants are equal",
        )

    def _merge_constants(self, graph: gs.Graph, bypass: Bypasser, consts: _ConstantKeys) -> int:
        """Merge constants read only inside ``graph``: a constant shared with
        another scope could be replaced by one the other scope cannot see."""
        local = {id(n) for n in graph.nodes}
        seen: dict[int, gs.Constant] = {}
        candidates: dict[tuple, list[gs.Constant]] = {}
        for node in graph.nodes:
            for t in node.inputs:
                if not isinstance(t, gs.Constant) or id(t) in seen or t.name in bypass.overridable:
                    continue
                seen[id(t)] = t
                if is_graph_output(graph, t) or any(id(c) not in local for c in t.outputs):
                    continue
                try:
                    group = (str(t.dtype), tuple(t.shape))
                except Exception:
                    continue
                candidates.setdefault(group, []).append(t)
        merged = 0
        for group in candidates.values():
            if len(group) < 2:
                continue
            reps: dict[Hashable, gs.Constant] = {}
            for const in group:
                key = consts.key(const)
                rep = reps.setdefault(key, const)
                if rep is not const and replace_all_uses(graph, const, rep):
                    merged += 1
        return merged

    def _merge_nodes(self, graph: gs.Graph, bypass: Bypasser, consts: _ConstantKeys) -> int:
        reps: dict[Hashable, gs.Node] = {}
        merged = 0
        for node in list(graph.nodes):
            key = _node_key(node, consts)
            if key is None:
                continue
            rep = reps.setdefault(key, node)
            if rep is node:
                continue
            pairs = [(d, r) for d, r in zip(node.outputs, rep.outputs) if d.name]
            if not self._can_merge(graph, bypass, pairs):
                continue
            for dup, keep in pairs:
                bypass.bypass(dup, keep)
            bypass.detach(node)
            merged += 1
        bypass.finish()
        return merged

    @staticmethod
    def _can_merge(graph: gs.Graph, bypass: Bypasser, pairs: list[tuple[gs.Tensor, gs.Tensor]]) -> bool:
        renamed = [keep for dup, keep in pairs if is_graph_output(graph, dup)]
        if len({id(k) for k in renamed}) != len(renamed):
            return False
        return all(bypass.can_bypass(dup, keep) for dup, keep in pairs)


# ----------------------------------------------------------------------------------
# Identity elimination
# ----------------------------------------------------------------------------------
# A rule looks at one node and returns the tensor its first output equals, or None.
Rule = Callable[["_IdentityRules", gs.Node], "gs.Tensor | None"]

_LAYOUT_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
_SINGLE_INPUT_IDENTITIES = frozenset({"Concat", "Sum", "Mean", "Max", "Min"})
# Ops whose rules need dtypes or shapes from shape inference.
_SHAPE_TYPED_OPS = _LAYOUT_OPS | {"Cast", "CastLike", "Transpose", "Slice", "Expand", "Add", "Sub", "Mul", "Div"}


def _broadcast_keeps_shape(shape, other: tuple[int, ...]) -> bool:
    """True when broadcasting ``shape`` (possibly symbolic) with the static
    ``other`` provably yields ``shape``."""
    if shape is None or len(other) > len(shape):
        return False
    for dim, o in zip(reversed(list(shape)), reversed(other)):
        if o != 1 and not (isinstance(dim, int) and dim == o):
            return False
    return True


class _IdentityRules:
    def __init__(self, model: Model, graph: gs.Graph):
        self.opset = model.opset
        self.graph = graph
        self.overridable = model.overridable
        self._shapes: dict[int, tuple[int, ...] | None] = {}

    # -- shape bookkeeping ------------------------------------------------------------
    def shape_of(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        """Static shape, computed through layout ops where possible (sturdier
        than a model-supplied annotation), else from the annotation."""
        key = id(tensor)
        if key not in self._shapes:
            self._shapes[key] = None  # guards against cycles in broken graphs
            computed = None
            if len(tensor.inputs) == 1 and tensor.inputs[0].op in _LAYOUT_OPS and tensor.inputs[0].outputs[0] is tensor:
                node = tensor.inputs[0]
                in_shape = self.shape_of(node.inputs[0]) if node.inputs else None
                computed = self._layout_shape(node, in_shape) if in_shape is not None else None
            self._shapes[key] = computed if computed is not None else static_shape(tensor)
        return self._shapes[key]

    def _layout_shape(self, node: gs.Node, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        op = node.op
        if op == "Reshape":
            target = _int_list(node.inputs[1], self.overridable) if len(node.inputs) > 1 else None
            return None if target is None else _reshape(shape, target, bool(node.attrs.get("allowzero", 0)))
        if op == "Flatten":
            axis = int(node.attrs.get("axis", 1))
            axis = axis + len(shape) if axis < 0 else axis
            if not 0 <= axis <= len(shape):
                return None
            return (math.prod(shape[:axis]), math.prod(shape[axis:]))
        axes = self._axes(node)
        if op == "Squeeze":
            return _squeeze(shape, axes)
        if op == "Unsqueeze" and axes is not None:
            return _unsqueeze(shape, axes)
        return None

    def _axes(self, node: gs.Node) -> list[int] | None:
        if "axes" in node.attrs:
            return [int(a) for a in node.attrs["axes"]]
        axes = _present(node, 1)
        if axes is None:
            return None
        return _int_list(axes, self.overridable)

    # -- rules ------------------------------------------------------------------------
    def identity(self, node: gs.Node) -> gs.Tensor | None:
        return node.inputs[0] if node.inputs else None

    def single_input(self, node: gs.Node) -> gs.Tensor | None:
        return node.inputs[0] if len(node.inputs) == 1 and len(node.outputs) == 1 else None

    def split(self, node: gs.Node) -> gs.Tensor | None:
        return node.inputs[0] if len(node.outputs) == 1 and node.inputs else None

    def dropout(self, node: gs.Node) -> gs.Tensor | None:
        if self.opset < 7 and not node.attrs.get("is_test", 0):
            return None
        training = _present(node, 2)
        if training is not None:
            value = _const_array(training, self.overridable, max_elements=1)
            if value is None or value.size != 1 or bool(value.reshape(-1)[0]):
                return None
        for mask in node.outputs[1:]:
            if mask.name and (mask.outputs or is_graph_output(self.graph, mask)):
                return None
        return node.inputs[0]

    def cast(self, node: gs.Node) -> gs.Tensor | None:
        x = node.inputs[0]
        try:
            want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
            have = np.dtype(x.dtype) if x.dtype is not None else None
        except Exception:
            return None
        return x if have is not None and have == want else None

    def cast_like(self, node: gs.Node) -> gs.Tensor | None:
        x, like = node.inputs[0], node.inputs[1]
        if x.dtype is None or like.dtype is None:
            return None
        try:
            return x if np.dtype(x.dtype) == np.dtype(like.dtype) else None
        except TypeError:
            return None

    def layout_chain(self, node: gs.Node) -> gs.Tensor | None:
        """Reshape-like ops never reorder data, so any earlier value in a chain
        of them with the same static shape holds the same tensor."""
        out = self.shape_of(node.outputs[0])
        if out is None:
            return None
        found = None
        t = node.inputs[0]
        for _ in range(32):
            if self.shape_of(t) == out:
                found = t
            producer = t.inputs[0] if len(t.inputs) == 1 else None
            if producer is None or producer.op not in _LAYOUT_OPS or producer.domain not in STANDARD_DOMAINS:
                break
            t = producer.inputs[0]
        return found

    def transpose_chain(self, node: gs.Node) -> gs.Tensor | None:
        """Walk back through Transposes composing permutations; an ancestor
        reached by the identity permutation holds the same tensor."""
        perm = self._perm(node)
        if perm is None:
            return None
        t = node.inputs[0]
        for _ in range(32):
            if perm == list(range(len(perm))):
                return t
            producer = t.inputs[0] if len(t.inputs) == 1 else None
            if producer is None or producer.op != "Transpose" or producer.domain not in STANDARD_DOMAINS:
                return None
            inner = self._perm(producer)
            if inner is None or len(inner) != len(perm):
                return None
            perm = [inner[p] for p in perm]
            t = producer.inputs[0]
        return None

    def _perm(self, node: gs.Node) -> list[int] | None:
        if "perm" in node.attrs:
            perm = [int(p) for p in node.attrs["perm"]]
            return perm if sorted(perm) == list(range(len(perm))) else None
        rank = _rank(node.inputs[0])
        return None if rank is None else list(reversed(range(rank)))

    def pad(self, node: gs.Node) -> gs.Tensor | None:
        # Zero pads add nothing in every mode (constant, reflect, edge, wrap).
        if "pads" in node.attrs:
            pads = [int(p) for p in node.attrs["pads"]]
        else:
            given = _present(node, 1)
            pads = _int_list(given, self.overridable) if given is not None else None
        return node.inputs[0] if pads is not None and not any(pads) else None

    def slice(self, node: gs.Node) -> gs.Tensor | None:
        x = node.inputs[0]
        if x.shape is None:
            return None
        rank = len(x.shape)
        if self.opset < 10:
            starts = [int(v) for v in node.attrs.get("starts", [])]
            ends = [int(v) for v in node.attrs.get("ends", [])]
            axes = [int(v) for v in node.attrs["axes"]] if "axes" in node.attrs else list(range(len(starts)))
            steps = [1] * len(starts)
        else:
            starts, ends = (_int_list(node.inputs[i], self.overridable) for i in (1, 2))
            axes_t, steps_t = _present(node, 3), _present(node, 4)
            axes = _int_list(axes_t, self.overridable) if axes_t is not None else list(range(len(starts or [])))
            steps = _int_list(steps_t, self.overridable) if steps_t is not None else [1] * len(starts or [])
        if starts is None or ends is None or axes is None or steps is None:
            return None
        if not len(starts) == len(ends) == len(axes) == len(steps):
            return None
        for start, end, axis, step in zip(starts, ends, axes, steps):
            axis = axis + rank if axis < 0 else axis
            if not 0 <= axis < rank or step != 1:
                return None
            dim = x.shape[axis]
            if not isinstance(dim, int):
                return None
            lo = min(max(start + dim if start < 0 else start, 0), dim)
            hi = min(max(end + dim if end < 0 else end, 0), dim)
            if lo != 0 or hi != dim:
                return None
        return x

    def expand(self, node: gs.Node) -> gs.Tensor | None:
        target = _int_list(node.inputs[1], self.overridable) if len(node.inputs) > 1 else None
        x = node.inputs[0]
        if target is None or not _broadcast_keeps_shape(x.shape, tuple(target)):
            return None
        return x

    def arithmetic(self, node: gs.Node) -> gs.Tensor | None:
        """x+0, x-0, x*1, x/1 when the constant's broadcast cannot enlarge x."""
        if len(node.inputs) != 2:
            return None
        neutral = 0 if node.op in ("Add", "Sub") else 1
        sides = [(0, 1), (1, 0)] if node.op in ("Add", "Mul") else [(0, 1)]
        for xi, ci in sides:
            x, c = node.inputs[xi], node.inputs[ci]
            const = as_constant(c, self.overridable)
            if const is None:
                continue
            if not _broadcast_keeps_shape(x.shape, tuple(int(d) for d in const.shape)):
                continue
            if x.dtype is not None and np.dtype(x.dtype) != np.dtype(const.dtype):
                continue
            value = _const_array(c, self.overridable, max_elements=NEUTRAL_CHECK_MAX_ELEMENTS)
            if value is not None and value.dtype.kind in "biuf" and np.all(value == neutral):
                return x
        return None

    @staticmethod
    def rules() -> dict[str, Rule]:
        table: dict[str, Rule] = {
            "Identity": _IdentityRules.identity,
            "Dropout": _IdentityRules.dropout,
            "Cast": _IdentityRules.cast,
            "CastLike": _IdentityRules.cast_like,
            "Transpose": _IdentityRules.transpose_chain,
            "Pad": _IdentityRules.pad,
            "Slice": _IdentityRules.slice,
            "Expand": _IdentityRules.expand,
            "Split": _IdentityRules.split,
        }
        for op in _LAYOUT_OPS:
            table[op] = _IdentityRules.layout_chain
        for op in _SINGLE_INPUT_IDENTITIES:
            table[op] = _IdentityRules.single_input
        for op in ("Add", "Sub", "Mul", "Div"):
            table[op] = _IdentityRules.arithmetic
        return table


def _reshape(shape: tuple[int, ...], target: list[int], allowzero: bool) -> tuple[int, ...] | None:
    out: list[int] = []
    infer = None
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            if i >= len(shape):
                return None
            out.append(shape[i])
        elif d == -1:
            if infer is not None:
                return None
            infer = i
            out.append(1)
        elif d < 0:
            return None
        else:
            out.append(d)
    total = math.prod(shape)
    if infer is not None:
        rest = math.prod(out)
        if rest == 0 or total % rest:
            return None
        out[infer] = total // rest
    return tuple(out) if math.prod(out) == total else None


def _squeeze(shape: tuple[int, ...], axes: list[int] | None) -> tuple[int, ...] | None:
    rank = len(shape)
    if axes is None:
        return tuple(d for d in shape if d != 1)
    norm = {a + rank if a < 0 else a for a in axes}
    if any(not 0 <= a < rank or shape[a] != 1 for a in norm):
        return None
    return tuple(d for i, d in enumerate(shape) if i not in norm)


def _unsqueeze(shape: tuple[int, ...], axes: list[int]) -> tuple[int, ...] | None:
    rank = len(shape) + len(axes)
    norm = {a + rank if a < 0 else a for a in axes}
    if len(norm) != len(axes) or any(not 0 <= a < rank for a in norm):
        return None
    dims = iter(shape)
    return tuple(1 if i in norm else next(dims) for i in range(rank))


@register_pass("eliminate-identity")
class EliminateIdentity(Pass):
    """Bypass nodes that provably return their input unchanged, so later
    passes see through them and the runtime does not copy for nothing.

    Rules that need a dtype or shape skip when it is unknown.
    """

    infer = Option(bool, True, "run shape inference first so shape- and type-based rules can fire")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if self.infer and lacks_annotations(model, _SHAPE_TYPED_OPS):
            annotate_shapes(model)
        try:
            sorted_anew = sort_nodes(model.graph)
        except Exception as exc:
            return PassResult(changed=False, notes=[f"eliminate-identity skipped: graph cannot be sorted ({exc})"])
        counts: dict[str, int] = {}
        removed = sum(self._run_graph(model, graph, counts) for graph in list(iter_graphs(model.graph)))
        bypassed = sum(counts.values())
        stats: dict[str, int] = {"bypassed": bypassed, "removed_nodes": removed}
        stats.update({f"bypassed_{op}": n for op, n in sorted(counts.items())})
        return PassResult(changed=bypassed > 0 or sorted_anew, stats=stats,
                          reason="no node provably returns its input unchanged")

    def _run_graph(self, model: Model, graph: gs.Graph, counts: dict[str, int]) -> int:
        """Bypass what the rules allow in one graph; returns how many nodes went."""
        rules = _IdentityRules(model, graph)
        table = _IdentityRules.rules()
        bypass = Bypasser(model, graph, top=graph is model.graph)
        removed = 0
        for node in list(graph.nodes):
            rule = table.get(node.op)
            if rule is None or id(node) in bypass.removed or node.domain not in STANDARD_DOMAINS:
                continue
            if not node.inputs or not node.outputs or not node.outputs[0].name:
                continue
            try:
                source = rule(rules, node)
            except (KeyError, IndexError, TypeError, ValueError):
                source = None
            if source is None or not bypass.bypass(node.outputs[0], source):
                continue
            counts[node.op] = counts.get(node.op, 0) + 1
            removed += bypass.drop_if_dead(node)
        bypass.finish()
        return removed
