"""A graphopt plug-in living outside the graphopt tree.

``strip-docs`` drops the documentation strings of the model and its graphs (and,
optionally, the model's metadata), which are dead weight in a deployed file.
``ort-pinned`` is the onnxruntime backend with the session settings pinned in
the artifact (one thread, basic graph optimizations), for reproducible timing
on a shared machine.  ``top1_agree`` is a task metric for fidelity specs.
None registers itself: graphopt finds them through the ``graphopt.passes``,
``graphopt.backends`` and ``graphopt.metrics`` entry points.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from graphopt.backends.base import CompileOptions, CompileResult
from graphopt.backends.onnxruntime import DEFAULT_SESSION, OnnxRuntimeBackend
from graphopt.context import PassContext
from graphopt.ir import Model, iter_graphs
from graphopt.pass_base import Option, Pass, PassResult


class StripDocs(Pass):
    """Drop the doc strings of the model and its graphs (and the metadata, if asked)."""

    name = "strip-docs"
    metadata = Option(bool, False, "also drop the model's metadata_props (key/value pairs)")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        stripped_graphs = 0
        for graph in iter_graphs(model.graph):
            if getattr(graph, "doc_string", None):
                graph.doc_string = ""
                stripped_graphs += 1
        model_doc = bool(model.info.doc_string)
        model.info.doc_string = ""
        notes = []
        dropped = 0
        if self.metadata:
            dropped = len(model.info.metadata_props)
            model.info.metadata_props = []
        elif model.info.metadata_props:
            notes.append(f"kept {len(model.info.metadata_props)} metadata entries (metadata=false)")
        return PassResult(
            changed=model_doc or stripped_graphs > 0 or dropped > 0,
            stats={"model_doc": int(model_doc), "graph_docs": stripped_graphs, "metadata_dropped": dropped},
            notes=notes,
        )


class PinnedOrtBackend(OnnxRuntimeBackend):
    """onnxruntime with one thread and basic graph optimizations, pinned in the artifact."""

    name = "ort-pinned"
    SESSION = {"graph_optimization_level": "ORT_ENABLE_BASIC", "intra_op_num_threads": 1}

    def targets(self) -> dict[str, str]:
        return {"cpu": "onnxruntime's CPU execution provider, one thread"}

    def compile(self, model: Any, target: str, options: CompileOptions, folder: Path) -> CompileResult:
        result = super().compile(model, target, options, folder)
        result.extra["session"] = dict(result.extra.get("session", DEFAULT_SESSION), **self.SESSION)
        return result


def top1_agreement(reference, candidate, inputs) -> float:
    """A task metric (entry point ``graphopt.metrics``): the share of rows of
    the first output whose argmax the candidate keeps."""
    import numpy as np

    name = next(iter(reference))
    ref, cand = np.asarray(reference[name]), np.asarray(candidate[name])
    return float(np.mean(ref.reshape(-1, ref.shape[-1]).argmax(-1) == cand.reshape(-1, ref.shape[-1]).argmax(-1)))
