"""Shared helpers for before/after pass tests.

The pattern, as in LLVM's IR tests: build a small graph with onnx.helper, run
one pass, then assert on the resulting graph *and* on its numbers in
onnxruntime against the original.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import runtime
from graphopt.context import PassContext
from graphopt.ir import Model
from light_weights import LIGHT_DIR, light_models as _light_models  # noqa: F401  (LIGHT_DIR re-exported)

# Every pass run under the tests (in process or through the CLI in a
# subprocess) must leave the model byte-identical when it reports no change.
os.environ.setdefault("GRAPHOPT_CHECK_UNCHANGED", "1")

LIGHT_MODELS = sorted(_light_models().values())


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 17,
    **kwargs,
) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def vi(name: str, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def apply(proto: onnx.ModelProto, pipeline: str, ctx: PassContext | None = None):
    """Run a pipeline on a copy of ``proto``; returns (model, result, new proto)."""
    model = Model.from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    result = graphopt.optimize(model, pipeline, context=ctx)
    return model, result, model.to_proto()


def ort_run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return runtime.run(runtime.session(proto), feeds)


def random_feeds(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    return runtime.random_inputs(runtime.session(proto), seed=seed)


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, rel: float = 1e-5, feeds=None) -> None:
    feeds = feeds if feeds is not None else random_feeds(before)
    want = ort_run(before, feeds)
    got = ort_run(after, feeds)
    assert list(got) == list(want), f"output names changed: {list(want)} -> {list(got)}"
    for name in want:
        err = runtime.relative_error(got[name], want[name])
        assert err <= rel, f"output {name}: relative error {err:g} > {rel:g}"


def op_types(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


@graphopt.register_pass("test-negate")
class Negate(graphopt.Pass):
    """Breaks the model on purpose: negates the first node's output, so
    --verify-each must catch it."""

    def run(self, model, ctx):
        import onnx_graphsurgeon as gs

        node = model.graph.nodes[0]
        out = node.outputs[0]
        mid = gs.Variable(out.name + "_pre", dtype=out.dtype, shape=out.shape)
        node.outputs[0] = mid
        model.graph.nodes.append(gs.Node("Neg", inputs=[mid], outputs=[out]))
        model.graph.toposort()
        return graphopt.PassResult(changed=True)


@pytest.fixture
def light_models():
    if not LIGHT_MODELS:
        pytest.skip("onnx light models not found")
    return LIGHT_MODELS


@pytest.fixture(autouse=True)
def _no_output_cache(monkeypatch):
    """graphopt opt reuses outputs from ~/.cache/graphopt; tests must run the
    passes (tests of the cache pass --cache-dir, which overrides this)."""
    monkeypatch.setenv("GRAPHOPT_NO_CACHE", "1")
