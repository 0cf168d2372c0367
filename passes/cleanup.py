"""Clean-up passes: dead code, common subexpressions, no-op nodes."""
from __future__ import annotations

from graphopt.context import PassContext
from graphopt.ir import Model
from graphopt.pass_base import Pass, PassResult
from graphopt.registry import register_pass
from graphopt.stats import graph_stats


@register_pass("eliminate-dead-code")
class EliminateDeadCode(Pass):
    """Remove nodes and constants that no graph output depends on, and sort the graph."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        before = graph_stats(graph)
        graph.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=True, remove_unused_graph_inputs=False)
        graph.toposort()
        after = graph_stats(graph)
        removed = before.nodes - after.nodes
        return PassResult(
            changed=removed > 0 or after.initializers != before.initializers,
            stats={"removed_nodes": removed, "removed_constants": before.initializers - after.initializers},
        )
