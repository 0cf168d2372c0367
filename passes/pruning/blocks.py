"""Whole residual blocks removed: ``y = x + f(x)`` becomes ``y = x``.

A removable block is an ``Add(x', f(x))`` (or a two-input ``Sum``) where
``x'`` is ``x`` itself or an Identity chain from it, ``f(x)`` has exactly the
shape of ``x`` and of the Add's output (no broadcasting), and the branch ``f``
(every node that depends on ``x`` and feeds ``f(x)``) is used by nothing but
itself and the Add: no other node and no graph output reads its internals.
The branch may read tensors computed elsewhere (an attention mask); removing
it only drops those reads.  A LayerNorm after the Add (post-LN transformers)
stays: it now normalizes ``x``.

Shapes are compared as shape inference gives them (equal integers or equal
symbols); where it cannot prove them equal (dynamic models whose shapes flow
through computed Reshapes, as Paddle exports), the shapes onnxruntime
produces on the sample inputs stand in, with a note.

A block with a projection shortcut (a Conv on the skip path) changes the
shape or the basis of ``x``: it is not removable and a note says so.

Which blocks go is measured, not guessed: each candidate is replaced in turn
(its Add made an Identity of ``x'``) and the model's outputs on sample inputs
are compared with the original's; the candidate that moves them least goes
first, and with ``greedy`` the rest are measured again after each removal, so
the errors add up honestly.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import runtime
from graphopt.activations import with_outputs
from graphopt.context import PassContext
from graphopt.errors import PassError, first_line
from graphopt.fidelity import MetricAccumulator
from graphopt.ir import Model
from graphopt.pass_base import Option, Pass, PassResult, Tolerance
from graphopt.registry import register_pass
from graphopt.rewrite import (STANDARD_DOMAINS, as_constant, is_graph_output, remove_nodes, replace_all_uses,
                              static_shape)
from graphopt.passes.shapes import annotate_shapes

# Ops whose output on the skip path means a projection shortcut.
PROJECTION_OPS = frozenset({"Conv", "BatchNormalization", "Gemm", "MatMul", "ConvTranspose"})


@dataclasses.dataclass
class Block:
    add: gs.Node
    skip: gs.Tensor  # what the Add's output becomes
    branch: list[gs.Node]
    params: int

    @property
    def label(self) -> str:
        return self.add.name or self.add.outputs[0].name


def _same_shape(*tensors: gs.Tensor) -> bool:
    shapes = [getattr(t, "shape", None) for t in tensors]
    if any(s is None for s in shapes):
        return False
    first = list(shapes[0])
    for s in shapes[1:]:
        if len(s) != len(first):
            return False
        for a, b in zip(first, s):
            known = isinstance(a, int) and isinstance(b, int) and a >= 0
            symbolic = isinstance(a, str) and isinstance(b, str) and a
            if not (known or symbolic) or a != b:
                return False
    return True


def _producer(t: gs.Tensor) -> gs.Node | None:
    inputs = getattr(t, "inputs", [])
    return inputs[0] if len(inputs) == 1 else None


def _root(t: gs.Tensor) -> gs.Tensor:
    """The tensor an Identity chain starts from."""
    seen = 0
    while (p := _producer(t)) is not None and p.op == "Identity" and seen < 64:
        t = p.inputs[0]
        seen += 1
    return t


def _branch(graph: gs.Graph, add: gs.Node, skip: gs.Tensor, fx: gs.Tensor,
            position: dict[int, int]) -> list[gs.Node] | None:
    """The nodes of ``f`` when ``Add(skip, fx)`` is a removable block, else None."""
    x = _root(skip)
    if isinstance(x, gs.Constant) or as_constant(x) is not None:
        return None
    top = _producer(fx)
    if top is None:
        return None
    # ancestors of fx, not walking past x
    ancestors: dict[int, gs.Node] = {}
    stack = [top]
    while stack:
        node = stack.pop()
        if id(node) in ancestors:
            continue
        ancestors[id(node)] = node
        for t in node.inputs:
            if t is x:
                continue
            p = _producer(t)
            if p is not None and id(p) not in ancestors:
                stack.append(p)
    # those that depend on x, in graph order
    depends: set[int] = set()
    branch: list[gs.Node] = []
    for node in sorted(ancestors.values(), key=lambda n: position[id(n)]):
        if any(t is x or (_producer(t) is not None and id(_producer(t)) in depends) for t in node.inputs):
            depends.add(id(node))
            branch.append(node)
    if id(top) not in depends:
        return None
    for node in branch:
        if node.domain not in STANDARD_DOMAINS or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return None
        for out in node.outputs:
            if is_graph_output(graph, out):
                return None
            for consumer in out.outputs:
                if consumer is not add and id(consumer) not in depends:
                    return None
    return branch


def _params(nodes: list[gs.Node]) -> int:
    seen: dict[int, int] = {}
    for node in nodes:
        for t in node.inputs:
            c = as_constant(t)
            if c is not None:
                seen[id(c)] = int(math.prod(c.shape))
        if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
            seen[id(node)] = int(math.prod(node.attrs["value"].shape))
    return sum(seen.values())


def residual_adds(model: Model) -> list[gs.Node]:
    """Add/Sum nodes of two computed inputs: where residual blocks end."""
    graph = model.graph
    out = []
    for node in graph.nodes:
        if node.op not in ("Add", "Sum") or node.domain not in STANDARD_DOMAINS:
            continue
        if len(node.inputs) != 2 or len(node.outputs) != 1:
            continue
        if any(as_constant(t) is not None or _producer(t) is None and not _is_input(graph, t) for t in node.inputs):
            continue
        out.append(node)
    return out


def find_blocks(model: Model, notes: list[str] | None = None,
                observed: dict[str, list[tuple[int, ...]]] | None = None) -> list[Block]:
    """Removable residual blocks of the main graph, in graph order.

    Shapes must match statically; where shape inference cannot tell (dynamic
    models whose shapes flow through computed Reshapes), ``observed`` (tensor
    name -> the shapes onnxruntime produced on the sample inputs) may stand in.
    """
    annotate_shapes(model)
    graph = model.graph
    graph.toposort()
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    blocks = []
    for node in residual_adds(model):
        a, b = node.inputs
        if not _same_shape(a, b, node.outputs[0]) and not _same_observed(observed, a, b, node.outputs[0]):
            continue
        found = None
        for skip, fx in ((a, b), (b, a)):
            branch = _branch(graph, node, skip, fx, position)
            if branch:
                found = Block(node, skip, branch, _params(branch))
                break
        if found is not None:
            blocks.append(found)
        elif notes is not None:
            pa, pb = _producer(_root(a)), _producer(_root(b))
            if pa is not None and pb is not None and pa.op in PROJECTION_OPS and pb.op in PROJECTION_OPS:
                notes.append(f"{node.op} '{node.name or node.outputs[0].name}': both inputs are computed "
                             f"({pa.op} '{pa.name}', {pb.op} '{pb.name}'): a projection shortcut; not removable")
    return blocks


def _static_mismatch(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Both shapes fully known and different: no run can make them equal."""
    sa, sb = static_shape(a), static_shape(b)
    return sa is not None and sb is not None and sa != sb


def _same_observed(observed, *tensors: gs.Tensor) -> bool:
    if not observed:
        return False
    seen = [observed.get(t.name) for t in tensors]
    return all(seen) and all(s == seen[0] for s in seen)


def observe_shapes(model: Model, tensors: list[gs.Tensor], samples) -> dict[str, list[tuple[int, ...]]]:
    """The shape each of ``tensors`` takes in onnxruntime, per sample."""
    proto = with_outputs(model, [t.name for t in tensors])
    try:
        sess = runtime.session(proto, source_dir=model.source_dir)
        runs = [runtime.run(sess, s) for s in samples]
    except Exception as exc:
        raise PassError(f"pass 'prune-blocks': onnxruntime cannot run the model: {first_line(exc)}") from None
    names = {t.name for t in tensors}
    out: dict[str, list[tuple[int, ...]]] = {}
    for run in runs:
        for name, value in run.items():
            if name in names:
                out.setdefault(name, []).append(tuple(np.shape(value)))
    return out


def _is_input(graph: gs.Graph, t: gs.Tensor) -> bool:
    return any(i is t for i in graph.inputs)


# ----------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------
class _Probe:
    """Outputs of the model with one Add turned into an Identity of its skip input."""

    def __init__(self, model: Model, samples: list[dict[str, np.ndarray]]):
        self.proto = model.to_proto()
        self.source_dir = model.source_dir
        self.samples = samples
        self.by_output = {n.output[0]: n for n in self.proto.graph.node if len(n.output) == 1}

    def outputs(self, block: Block | None) -> list[dict[str, np.ndarray]]:
        node = None
        saved = None
        if block is not None:
            node = self.by_output[block.add.outputs[0].name]
            saved = onnx.NodeProto()
            saved.CopyFrom(node)
            del node.input[:]
            node.input.append(block.skip.name)
            del node.attribute[:]
            node.op_type = "Identity"
            node.domain = ""
        try:
            sess = runtime.session(self.proto, source_dir=self.source_dir)
            return [runtime.run(sess, s) for s in self.samples]
        except Exception as exc:
            what = f" with block '{block.label}' removed" if block is not None else ""
            raise PassError(f"pass 'prune-blocks': onnxruntime cannot run the model{what}: "
                            f"{first_line(exc)}") from None
        finally:
            if node is not None:
                node.CopyFrom(saved)


def _score(outputs, reference, metric: str) -> dict[str, float]:
    acc = MetricAccumulator()
    rel = []
    for cand, ref in zip(outputs, reference):
        acc.add(cand, ref)
        rel.append(max((runtime.relative_error(cand[k], v) for k, v in ref.items()
                        if np.asarray(v).dtype.kind == "f"), default=0.0))
    values = acc.values()
    out = {"mean_cosine": values["mean-cosine"], "cosine": values["cosine"], "relative_error": float(np.mean(rel))}
    out["error"] = 1.0 - out["mean_cosine"] if metric == "cosine" else out["relative_error"]
    return out


@register_pass("prune-blocks")
class PruneBlocks(Pass):
    """Remove the residual blocks (y = x + f(x) -> y = x) whose removal moves the outputs least.

    Measured on sample inputs: --calib, else --inputs, else seeded random data."""

    # Lossy by request (count): as sparsify, --verify-each only catches a broken model.
    tolerance = Tolerance(relative=None, cosine=0.0, lossy=True)

    count = Option(int, 1, "how many blocks to remove", min=1)
    samples = Option(int, 4, "sample inputs to measure on (--calib, else --inputs, else seeded random)", min=1)
    metric = Option(str, "cosine", "ranking: cosine (1 - mean row cosine, see graphopt.fidelity) or relative "
                    "(max|new - old| / max|old|)", choices=("cosine", "relative"))
    greedy = Option(bool, True, "measure the remaining blocks again after each removal")
    exclude_nodes = Option(list, [], "names of Add/Sum nodes whose blocks stay")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        notes: list[str] = []
        if not residual_adds(model):
            return PassResult(False, {"candidates": 0, "removed": []}, ["no Add/Sum of two computed tensors"])
        samples = self._samples(model, ctx)
        observed = self._observe(model, samples, notes)
        blocks = [b for b in find_blocks(model, notes, observed) if b.add.name not in set(self.exclude_nodes)]
        stats: dict[str, Any] = {"candidates": len(blocks), "removed": []}
        if not blocks:
            return PassResult(False, stats, notes + ["no removable residual block"])
        probe = _Probe(model, samples)
        reference = probe.outputs(None)
        removed: list[dict[str, Any]] = []
        ranking: list[dict[str, Any]] = []
        while len(removed) < self.count and blocks:
            scored = []
            for block in blocks:
                scored.append((_score(probe.outputs(block), reference, self.metric), block))
            order = {id(n): i for i, n in enumerate(model.graph.nodes)}
            scored.sort(key=lambda sb: (sb[0]["error"], -sb[1].params, order[id(sb[1].add)]))
            if not ranking:
                ranking = [{"block": b.label, "error": _round(s["error"]), "params": b.params} for s, b in scored]
            picks = [scored[0]] if self.greedy else _disjoint(scored, self.count - len(removed))
            for s, block in picks:
                removed.append({"block": block.label, "nodes": len(block.branch), "params": block.params,
                                "mean_cosine": _round(s["mean_cosine"]), "cosine": _round(s["cosine"]),
                                "relative_error": _round(s["relative_error"])})
                _remove(model, block)
            if len(removed) >= self.count:
                break
            blocks = [b for b in find_blocks(model, None, observed) if b.add.name not in set(self.exclude_nodes)]
            probe = _Probe(model, samples)
        model.graph.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=True, remove_unused_graph_inputs=False)
        model.graph.toposort()
        if len(removed) < self.count:
            notes.append(f"only {len(removed)} removable block(s); count={self.count}")
        stats.update(removed=removed, removed_params=sum(r["params"] for r in removed), samples=len(samples),
                     ranking=ranking[:16])
        if not self.greedy and len(removed) > 1:
            final = _score(_Probe(model, samples).outputs(None), reference, self.metric)
            stats["final"] = {k: _round(v) for k, v in final.items() if k != "error"}
        return PassResult(changed=bool(removed), stats=stats, notes=notes)

    @staticmethod
    def _observe(model: Model, samples, notes: list[str]) -> dict[str, list[tuple[int, ...]]] | None:
        """Shapes from onnxruntime for the Adds whose shapes inference left unknown."""
        annotate_shapes(model)
        unknown = [n for n in residual_adds(model) if not _same_shape(n.inputs[0], n.inputs[1], n.outputs[0])
                   and not _static_mismatch(n.inputs[0], n.inputs[1])]
        if not unknown:
            return None
        notes.append(f"{len(unknown)} Add/Sum node(s) have shapes that shape inference cannot prove equal; their "
                     f"shapes were taken from onnxruntime on the {len(samples)} sample input(s)")
        return observe_shapes(model, [t for n in unknown for t in list(n.inputs) + list(n.outputs)], samples)

    def _samples(self, model: Model, ctx: PassContext) -> list[dict[str, np.ndarray]]:
        if ctx.calibration is not None:
            return [dict(s) for s in itertools.islice(iter(ctx.calibration), self.samples)]
        if ctx.inputs:
            return [dict(ctx.inputs)]
        try:
            sess = runtime.session(model.to_proto(), source_dir=model.source_dir)
        except Exception as exc:
            raise PassError(f"pass '{self.name}': onnxruntime cannot load the model: {first_line(exc)}") from None
        return [runtime.random_inputs(sess, seed=ctx.seed * 1000 + i, shapes=ctx.input_shapes)
                for i in range(self.samples)]


def _disjoint(scored, count: int):
    """The best ``count`` candidates of which none contains another."""
    picks: list = []
    taken: set[int] = set()
    for s, block in scored:
        ids = {id(n) for n in block.branch} | {id(block.add)}
        if ids & taken:
            continue
        picks.append((s, block))
        taken |= ids
        if len(picks) == count:
            break
    return picks


def _remove(model: Model, block: Block) -> None:
    graph = model.graph
    out = block.add.outputs[0]
    if replace_all_uses(graph, out, block.skip):
        remove_nodes(graph, [block.add])
    else:  # the Add's output is a graph output and the skip is a graph input/output
        block.add.op = "Identity"
        block.add.domain = ""
        block.add.attrs.clear()
        block.add.inputs.clear()
        block.add.inputs.append(block.skip)


def _round(v: float) -> float:
    return float(f"{v:.6g}") if math.isfinite(v) else v
