"""A model's intermediate values on samples, and incremental runs of edited copies.

Passes that measure what an edit does (pruning trials, least-squares refits)
run a slightly changed model again and again on the same samples.  Most of
each run recomputes values the edit did not touch.  :class:`Activations`
holds one original model and its samples: :meth:`Activations.values` gives
the original's value of any tensor (computed once, kept under a byte budget),
and :meth:`Activations.run` evaluates an edited copy by running only the nodes
whose result can differ from the original's (a node is unchanged when it is
byte-identical, reads the same initializers and only unchanged tensors), fed
with the original's values where the two models still agree.  The numbers are
those of a full run: the same kernels on the same inputs.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from graphopt import runtime

Sample = Mapping[str, np.ndarray]

_SUBGRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def has_subgraphs(graph: onnx.GraphProto) -> bool:
    """Whether a node of ``graph`` holds a subgraph (which may read outer names)."""
    return any(a.type in _SUBGRAPH_TYPES for n in graph.node for a in n.attribute)


def keep_ancestors(graph: onnx.GraphProto, names: Sequence[str]) -> None:
    """Drop the nodes of ``graph`` that none of tensors ``names`` depends on."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    needed, stack = set(), [producer[n] for n in names if n in producer]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        stack.extend(producer[t] for t in graph.node[i].input if t in producer)
    kept = [n for i, n in enumerate(graph.node) if i in needed]
    del graph.node[:]
    graph.node.extend(kept)


def with_outputs(model: Any, names: Sequence[str], only: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` (a proto or anything with ``to_proto()``) with
    ``names`` as extra outputs; with ``only``, those are its only outputs and
    the nodes they do not depend on are dropped (so a tensor early in the
    network costs only the layers before it)."""
    proto = model if isinstance(model, onnx.ModelProto) else model.to_proto()
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    # Mid-edit, intermediate shape annotations may still be the old ones;
    # onnxruntime would trust them.  Let it infer shapes itself.
    del proto.graph.value_info[:]
    if only and not has_subgraphs(proto.graph):  # subgraphs read outer names: keep all
        keep_ancestors(proto.graph, names)
        del proto.graph.output[:]
    present = {o.name for o in proto.graph.output}
    for name in names:
        if name not in present:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            present.add(name)
    return proto


def collect(model: Any, names: Sequence[str], samples: Iterable[Sample], max_samples: int = 64,
            source_dir: Path | None = None, only: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """The values of tensors ``names`` for each sample (at most ``max_samples``);
    ``source_dir`` finds the external weights of a proto (a Model knows its
    own); ``only``: run just the nodes they depend on."""
    proto = with_outputs(model, names, only)
    source_dir = getattr(model, "source_dir", None) or source_dir
    sess = runtime.session(proto, source_dir=source_dir, optimize=False)
    for i, sample in enumerate(samples):
        if i >= max_samples:
            break
        yield dict(zip(names, sess.run(list(names), dict(sample))))


class Activations:
    """The original model ``proto`` on fixed ``samples``: its values of any
    tensor, and runs of edited copies that recompute only what changed.
    Values are read-only arrays shared between callers; at most
    ``budget_bytes`` of them are kept (least recently used go first)."""

    def __init__(self, proto: onnx.ModelProto, samples: Iterable[Sample], source_dir: Path | None = None,
                 budget_bytes: int = 1 << 30):
        self.proto = proto
        self.samples = [dict(s) for s in samples]
        self.source_dir = source_dir
        self.budget_bytes = budget_bytes
        self._inputs = {i.name for i in proto.graph.input}
        self._initializers = {t.name: t.SerializeToString() for t in proto.graph.initializer}
        self._nodes = {n.output[0]: n.SerializeToString() for n in proto.graph.node if n.output}
        self._producer = {o: n for n in proto.graph.node for o in n.output if o}
        self._incremental = not has_subgraphs(proto.graph) and not proto.graph.sparse_initializer
        self._cache: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self._bytes = 0

    def values(self, names: Sequence[str], keep: bool = True) -> list[dict[str, np.ndarray]]:
        """The original's values of ``names``, one dict per sample; ``keep``:
        remember the ones computed now (a caller that reads them once says no)."""
        names = list(dict.fromkeys(names))
        missing = [n for n in names if n not in self._cache and n not in self._inputs]
        columns: dict[str, list[np.ndarray]] = {n: [] for n in missing}
        for values in self._compute(missing):
            for n, v in values.items():
                # a copy: onnxruntime's array can hold its session's whole arena alive
                v = np.array(v, copy=True)
                v.flags.writeable = False
                columns[n].append(v)
        for n in names:
            if n in self._cache:
                self._cache.move_to_end(n)
                columns[n] = self._cache[n]
        out = [{n: (s[n] if n in self._inputs else columns[n][i]) for n in names}
               for i, s in enumerate(self.samples)]
        if keep:
            for n in missing:
                self._cache[n] = columns[n]
                self._bytes += sum(v.nbytes for v in columns[n])
            self._evict(keep=set(names))
        return out

    def _compute(self, names: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """The original's values of ``names`` per sample, starting from the
        values already kept (callers that walk the network front to back pay
        for each layer about once)."""
        if not names or not self.samples:
            return iter(())
        known = set(self._cache) | self._inputs
        if self._incremental:
            nodes = _ancestors(self.proto.graph, names, self._producer, stop=known)
            produced = {o for n in nodes for o in n.output}
            frontier = list(dict.fromkeys(t for n in nodes for t in n.input
                                          if t and t not in produced and t not in self._initializers))
            if all(t in known for t in frontier) and any(t not in self._inputs for t in frontier):
                for t in frontier:
                    if t in self._cache:
                        self._cache.move_to_end(t)
                return self._run_part(self.proto, nodes, frontier, names, self.values(frontier), self.source_dir)
        return collect(self.proto, names, self.samples, len(self.samples), self.source_dir, only=True)

    @staticmethod
    def _run_part(model: onnx.ModelProto, nodes, frontier, names, feeds, source_dir) -> Iterator[dict[str, np.ndarray]]:
        """``nodes`` of ``model`` alone, fed ``frontier`` from ``feeds``: the values of ``names`` per sample."""
        sess = runtime.session(_submodel(model, nodes, frontier, names, feeds[0]), source_dir=source_dir,
                               optimize=False)
        for feed in feeds:
            yield dict(zip(names, sess.run(list(names), {t: feed[t] for t in frontier})))

    def _evict(self, keep: set[str]) -> None:
        for name in list(self._cache):
            if self._bytes <= self.budget_bytes:
                break
            if name not in keep:
                self._bytes -= sum(v.nbytes for v in self._cache.pop(name))

    def run(self, edited: onnx.ModelProto, names: Sequence[str],
            source_dir: Path | None = None) -> list[dict[str, np.ndarray]]:
        """The values of ``names`` in ``edited`` (a changed copy of the original
        over the same graph inputs), one dict per sample."""
        names = list(dict.fromkeys(names))
        source_dir = source_dir or self.source_dir
        if not self.samples:
            return []
        if not self._incremental or has_subgraphs(edited.graph) or edited.graph.sparse_initializer:
            return list(collect(edited, names, self.samples, len(self.samples), source_dir, only=True))
        clean, producer = self._unchanged(edited)
        dirty_names = [n for n in names if n not in clean]
        if not dirty_names:
            return self.values(names)
        nodes = _ancestors(edited.graph, dirty_names, producer, stop=clean)
        produced = {o for n in nodes for o in n.output}
        initializers = {t.name for t in edited.graph.initializer}
        frontier = list(dict.fromkeys(t for n in nodes for t in n.input
                                      if t and t not in produced and t not in initializers))
        unknown = [t for t in frontier if t not in clean]
        if unknown:  # read but neither produced nor an input: let onnxruntime name it
            return list(collect(edited, names, self.samples, len(self.samples), source_dir, only=True))
        fed = self.values(frontier + [n for n in names if n in clean])
        return [{n: values[n] if n in values else feed[n] for n in names}
                for feed, values in zip(fed, self._run_part(edited, nodes, frontier, dirty_names, fed, source_dir))]

    def _unchanged(self, edited: onnx.ModelProto) -> tuple[set[str], dict[str, onnx.NodeProto]]:
        """Tensors of ``edited`` whose values are the original's, and the
        producer of every tensor."""
        clean = {i.name for i in edited.graph.input if i.name in self._inputs}
        clean |= {t.name for t in edited.graph.initializer
                  if self._initializers.get(t.name) == t.SerializeToString()}
        producer = {}
        for node in edited.graph.node:  # graph order is topological
            for o in node.output:
                producer[o] = node
            if (node.output and self._nodes.get(node.output[0]) == node.SerializeToString()
                    and all(not t or t in clean for t in node.input)):
                clean.update(o for o in node.output if o)
        return clean, producer


def _ancestors(graph: onnx.GraphProto, names: Sequence[str], producer: Mapping[str, onnx.NodeProto],
               stop: set[str]) -> list[onnx.NodeProto]:
    """The nodes ``names`` depend on, not looking past tensors in ``stop``; in
    graph order."""
    needed: set[int] = set()
    stack = [producer[n] for n in names if n in producer]
    while stack:
        node = stack.pop()
        if id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(producer[t] for t in node.input if t and t not in stop and t in producer)
    return [n for n in graph.node if id(n) in needed]


def _submodel(edited: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], inputs: Sequence[str],
              outputs: Sequence[str], example: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """``edited`` cut down to ``nodes``, reading ``inputs`` (typed after
    ``example``) and producing ``outputs``."""
    sub = onnx.ModelProto()
    sub.CopyFrom(edited)
    graph = sub.graph
    read = {t for n in nodes for t in n.input}
    kept_init = [t for t in graph.initializer if t.name in read]
    del graph.node[:], graph.input[:], graph.output[:], graph.value_info[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept_init)
    for name in inputs:
        dtype = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(example[name]).dtype)
        graph.input.append(onnx.helper.make_tensor_value_info(name, dtype, None))
    for name in outputs:
        graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return sub
