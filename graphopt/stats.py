"""Cheap size statistics of a graph, recorded around every pass."""
from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs

from graphopt.ir import iter_graphs


@dataclasses.dataclass(frozen=True)
class GraphStats:
    nodes: int
    initializers: int
    bytes: int
    parameters: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def graph_stats(graph: gs.Graph) -> GraphStats:
    nodes = 0
    consts: dict[str, gs.Constant] = {}
    embedded: dict[int, gs.Constant] = {}
    for g in iter_graphs(graph):
        nodes += len(g.nodes)
        for node in g.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    consts[t.name] = t
            if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
                # Weights some exporters (Paddle) store in Constant nodes.
                embedded[id(node)] = node.attrs["value"]
        for t in g.outputs:
            if isinstance(t, gs.Constant):
                consts[t.name] = t
    nbytes = 0
    params = 0
    for t in list(consts.values()) + list(embedded.values()):
        v = t._values
        shape = v.shape
        n = 1
        for d in shape:
            n *= int(d)
        params += n
        nbytes += int(getattr(v, "nbytes", 0))
    return GraphStats(nodes=nodes, initializers=len(consts), bytes=nbytes, parameters=params)
