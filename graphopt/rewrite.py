"""Graph-editing helpers that keep the graph's interface intact.

The one rule every pass must respect: graph input and output *names* never
change.  When a value that is a graph output is replaced, the replacement is
renamed to the output's name, or the rewrite is refused.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.inputs)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> bool:
    """Make every consumer of ``old`` read ``new``; False (and no change) if impossible.

    ``old`` is normally the output of a node about to become dead.  If ``old``
    is a graph output, ``new`` takes its name and place, which is only possible
    when ``new`` is not itself a graph input or output.  Subgraphs share tensor
    objects with their outer scope in gs, so a rename reaches them too.
    """
    if old is new:
        return False
    if is_graph_output(graph, old):
        if is_graph_input(graph, new) or is_graph_output(graph, new):
            return False
        name = old.name
        old.name = name + "__replaced"
        new.name = name
        if new.dtype is None and old.dtype is not None:
            new.dtype = old.dtype
        if getattr(new, "shape", None) is None and old.shape is not None and isinstance(new, gs.Variable):
            new.shape = old.shape
        graph.outputs = [new if t is old else t for t in graph.outputs]
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new
    return True


def remove_node(graph: gs.Graph, node: gs.Node) -> None:
    """Detach ``node`` so the next cleanup drops it."""
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)
