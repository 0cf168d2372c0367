"""graphopt.activations: the original's values, and edited copies that rerun only what changed."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper as nh
import onnx.parser
import pytest

from graphopt import activations as act
from graphopt import runtime

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1)
    r = Relu (a)
    b = Conv (r, w2)
    s = Add (b, r)
    y = Sigmoid (s)
}
"""


def _model(seed: int = 0) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(MODEL)
    rng = np.random.default_rng(seed)
    proto.graph.initializer.extend([
        nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
        nh.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w2"),
    ])
    return proto


def _samples(n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _full_run(proto: onnx.ModelProto, names: list[str], samples) -> list[dict[str, np.ndarray]]:
    sess = runtime.session(act.with_outputs(proto, names), optimize=False)
    return [dict(zip(names, sess.run(names, s))) for s in samples]


def _with_w2(proto: onnx.ModelProto, w2: np.ndarray) -> onnx.ModelProto:
    edited = onnx.ModelProto.FromString(proto.SerializeToString())
    for i, t in enumerate(edited.graph.initializer):
        if t.name == "w2":
            edited.graph.initializer[i].CopyFrom(nh.from_array(w2, "w2"))
    return edited


@pytest.fixture
def sessions(monkeypatch):
    """The graphs onnxruntime sessions are built on, as node op lists."""
    built: list[list[str]] = []
    real = runtime.session

    def spy(proto, **kwargs):
        p = proto if isinstance(proto, onnx.ModelProto) else onnx.ModelProto.FromString(proto)
        built.append([n.op_type for n in p.graph.node])
        return real(proto, **kwargs)

    monkeypatch.setattr(runtime, "session", spy)
    return built


def test_values_are_the_original_model_values_read_only():
    proto, samples = _model(), _samples()
    cache = act.Activations(proto, samples)
    got = cache.values(["r", "y", "x"])
    want = _full_run(proto, ["r", "y"], samples)
    for g, w, s in zip(got, want, samples):
        np.testing.assert_array_equal(g["r"], w["r"])
        np.testing.assert_array_equal(g["y"], w["y"])
        np.testing.assert_array_equal(g["x"], s["x"])  # a graph input is the sample itself
        with pytest.raises(ValueError):
            g["r"][...] = 0  # shared between callers: read-only


def test_edited_copy_reruns_only_the_changed_nodes(sessions):
    proto, samples = _model(), _samples()
    cache = act.Activations(proto, samples)
    cache.values(["y"])
    edited = _with_w2(proto, np.full((4, 4, 1, 1), 0.25, np.float32))
    sessions.clear()
    got = cache.run(edited, ["y", "a"])
    # the first Conv and Relu are unchanged: their value is fed, not recomputed
    assert sessions[-1] == ["Conv", "Add", "Sigmoid"]
    want = _full_run(edited, ["y", "a"], samples)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["y"], w["y"])
        np.testing.assert_array_equal(g["a"], w["a"])
    before = cache.values(["y"])
    assert not np.array_equal(got[0]["y"], before[0]["y"])


def test_unchanged_copy_runs_nothing_new(sessions):
    proto, samples = _model(), _samples()
    cache = act.Activations(proto, samples)
    want = cache.values(["y"])
    sessions.clear()
    got = cache.run(onnx.ModelProto.FromString(proto.SerializeToString()), ["y"])
    assert sessions == []
    assert got[0]["y"] is want[0]["y"]


def test_changed_node_attribute_is_seen():
    proto, samples = _model(), _samples()
    cache = act.Activations(proto, samples)
    edited = onnx.ModelProto.FromString(proto.SerializeToString())
    sigmoid = edited.graph.node[-1]
    sigmoid.op_type = "Tanh"
    got = cache.run(edited, ["y"])
    np.testing.assert_allclose(got[0]["y"], np.tanh(_full_run(proto, ["s"], samples)[0]["s"]), rtol=1e-6)


def test_budget_keeps_only_what_was_asked_last():
    proto, samples = _model(), _samples()
    cache = act.Activations(proto, samples, budget_bytes=1)
    cache.values(["r"])
    cache.values(["y"])
    assert list(cache._cache) == ["y"]
    once = act.Activations(proto, samples)
    once.values(["r"], keep=False)
    assert not once._cache


SUBGRAPH = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[2] x, bool c) => (float[2] y) {
    t = Relu (x)
    y = If (c) <then_branch = g1 () => (float[2] o1) { o1 = Neg (t) },
               else_branch = g2 () => (float[2] o2) { o2 = Abs (t) }>
}
"""


def test_model_with_subgraphs_runs_whole():
    proto = onnx.parser.parse_model(SUBGRAPH)
    samples = [{"x": np.array([1.0, -2.0], np.float32), "c": np.array(True)}]
    cache = act.Activations(proto, samples)
    edited = onnx.ModelProto.FromString(proto.SerializeToString())
    edited.graph.node[0].op_type = "Sigmoid"  # read by both branches through the outer scope
    got = cache.run(edited, ["y"])
    np.testing.assert_allclose(got[0]["y"], -1 / (1 + np.exp(-samples[0]["x"])), rtol=1e-6)


def test_values_start_from_what_is_kept(sessions):
    proto, samples = _model(), _samples()
    cache = act.Activations(proto, samples)
    cache.values(["r"])
    sessions.clear()
    got = cache.values(["y"])
    assert sessions == [["Conv", "Add", "Sigmoid"]]  # from the kept Relu on
    want = _full_run(proto, ["y"], samples)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["y"], w["y"])
