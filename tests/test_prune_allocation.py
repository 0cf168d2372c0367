"""prune-channels: sensitivity allocation, the refit-error criterion, ridge and refit options."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from conftest import make_model, ort_run, vi
from graphopt.calibration import open_reader
from graphopt.context import PassContext
from graphopt.errors import UsageError
from graphopt.ir import Model
from graphopt.passes.pruning.allocation import _hull, allocate
from test_pruning_groups import conv, init_shapes

F = np.float32


def _two_groups(seed: int = 0):
    """x -> Conv(32) -> Relu -> Conv(32) -> Relu -> Conv(4) -> y.  The first
    group carries 16 channels twice (half of them at scale 0.5: least squares
    folds them back exactly); every channel of the second is its own."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((32, 3, 3, 3)) * 0.3).astype(F)
    b1 = (rng.standard_normal(32) * 0.1).astype(F)
    w1[16:], b1[16:] = 0.5 * w1[:16], 0.5 * b1[:16]
    inits = {"w1": w1, "b1": b1,
             "w2": (rng.standard_normal((32, 32, 1, 1)) * 0.3).astype(F),
             "b2": (rng.standard_normal(32) * 0.1).astype(F),
             "w3": (rng.standard_normal((4, 32, 3, 3)) * 0.3).astype(F)}
    nodes = [conv("x", "w1", "a", "b1", pads=[1] * 4, name="conv_a"), helper.make_node("Relu", ["a"], ["ra"]),
             conv("ra", "w2", "b", "b2", name="conv_b"), helper.make_node("Relu", ["b"], ["rb"]),
             conv("rb", "w3", "y", pads=[1] * 4, name="conv_y")]
    return make_model(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", [2, 4, 6, 6])], inits)


def _prune(proto, pipeline, n=32):
    model = Model.from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    ctx = PassContext(quiet=True, calibration=open_reader(f"random:{n}", model, seed=3, quiet=True))
    result = graphopt.optimize(model, pipeline, context=ctx)
    return result.records[-1], model.to_proto()


def _error(before, after) -> float:
    rng = np.random.default_rng(21)
    errs = []
    for _ in range(4):
        feeds = {"x": rng.standard_normal((2, 3, 6, 6)).astype(F)}
        want, got = ort_run(before, feeds)["y"], ort_run(after, feeds)["y"]
        errs.append(np.linalg.norm(got - want) / np.linalg.norm(want))
    return float(np.mean(errs))


def test_sensitivity_spends_the_budget_on_the_redundant_group():
    proto = _two_groups()
    uniform, u_model = _prune(proto, "prune-channels{ratio=0.25,allocate=uniform,round-to=1}")
    sens, s_model = _prune(proto, 'prune-channels{ratio=0.25,allocate=sensitivity,budget=channels,round-to=1,'
                                  'sensitivity-ratios="0.25;0.5;0.75"}')
    for record in (uniform, sens):  # the same total: a quarter of the 64 prunable channels
        assert record.stats["channels_before"] == 64 and record.stats["channels_after"] == 48
    u_shapes, s_shapes = init_shapes(u_model), init_shapes(s_model)
    assert u_shapes["w1"][0] == u_shapes["w2"][0] == 24
    assert s_shapes["w1"][0] < s_shapes["w2"][0]  # the insensitive group loses more
    assert s_shapes["w1"][0] + s_shapes["w2"][0] == 48
    alloc = sens.stats["allocation"]
    assert set(alloc) == {k for k in alloc if k.startswith("#")} and len(alloc) == 2
    ratios = sorted(alloc.values())
    assert ratios[1] > ratios[0] and abs(sum(r * 32 for r in ratios) - 16) < 1e-6
    assert all(curve[0] == [0, 0.0] and len(curve) == 4 for curve in sens.stats["sensitivity"].values())
    onnx.checker.check_model(s_model)
    err_u, err_s = _error(proto, u_model), _error(proto, s_model)
    assert err_s < 0.5 * err_u, (err_s, err_u)


def test_sensitivity_respects_round_to_min_channels_and_protect():
    proto = _two_groups()
    record, after = _prune(proto, "prune-channels{ratio=0.25,allocate=sensitivity,round-to=8}")
    shapes = init_shapes(after)
    assert shapes["w1"][0] % 8 == 0 and shapes["w2"][0] % 8 == 0
    assert shapes["w1"][0] + shapes["w2"][0] == 48
    record, after = _prune(proto, "prune-channels{ratio=0.4,allocate=sensitivity,budget=channels,min-channels=20,round-to=1}")
    shapes = init_shapes(after)
    assert shapes["w1"][0] >= 20 and shapes["w2"][0] >= 20
    record, after = _prune(proto, 'prune-channels{ratio=0.25,allocate=sensitivity,budget=channels,round-to=1,protect="conv_a"}')
    shapes = init_shapes(after)
    assert shapes["w1"][0] == 32 and shapes["w2"][0] == 24  # a quarter of the 32 channels left prunable
    assert list(record.stats["allocation"].values()) == [0.25]
    # the default grid: ratio/2, ratio, 3*ratio/2 of the group (4, 8, 12 of 32 channels)
    assert [n for n, _ in record.stats["sensitivity"]["#1"]] == [0, 4, 8, 12]
    feeds = {"x": np.ones((2, 3, 6, 6), F)}
    assert ort_run(after, feeds)["y"].shape == (2, 4, 6, 6)


def test_sensitivity_options_are_checked():
    proto = _two_groups()
    model = Model.from_proto(proto)
    with pytest.raises(UsageError, match="allocate=sensitivity needs calibration"):
        graphopt.optimize(model, "prune-channels{allocate=sensitivity}", context=PassContext(quiet=True))
    with pytest.raises(UsageError, match="sensitivity-ratios"):
        _prune(proto, 'prune-channels{allocate=sensitivity,sensitivity-ratios="0.5;x"}')
    with pytest.raises(UsageError, match="sensitivity-ratios"):
        _prune(proto, 'prune-channels{allocate=sensitivity,sensitivity-ratios="0.5;1.0"}')


def test_ridge_option_changes_the_refit():
    proto = _two_groups(seed=2)
    _, small = _prune(proto, "prune-channels{ratio=0.5,ridge=0,allocate=uniform,round-to=1}")
    _, large = _prune(proto, "prune-channels{ratio=0.5,ridge=100,allocate=uniform,round-to=1}")
    assert init_shapes(small)["w2"] == init_shapes(large)["w2"] == (16, 16, 1, 1)
    assert _error(proto, small) < _error(proto, large)  # heavy shrinkage pulls the refit away from the data


def test_allocate_greedy_on_the_convex_hull():
    """Cheapest error per channel first; a curve's non-convex bump is bridged;
    the last segment is taken in part to meet the budget exactly."""
    curves = {0: [(0, 0.0), (10, 1.0), (20, 2.0)],          # 0.1 per channel
              1: [(0, 0.0), (10, 0.5), (20, 3.0), (30, 3.1)],  # hull: 0.05, then 0.13 to 30
              2: [(0, 0.0), (10, float("inf"))]}               # failed trial: never pruned
    assert _hull(curves[1]) == [(0, 0.0), (10, 0.5), (30, 3.1)]
    removed, err = allocate(curves, 25)
    assert removed == {0: 15, 1: 10, 2: 0} and err == pytest.approx(0.5 + 1.5)
    removed, _ = allocate(curves, 100)
    assert removed == {0: 20, 1: 30, 2: 0}


def _deep_chain(seed: int = 6):
    """x -> Conv(16) -> Relu -> Conv(16) -> Relu -> Conv(16) -> Relu -> Conv(4) -> y."""
    rng = np.random.default_rng(seed)
    inits = {"w1": (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(F),
             "w2": (rng.standard_normal((16, 16, 3, 3)) * 0.3).astype(F),
             "w3": (rng.standard_normal((16, 16, 1, 1)) * 0.3).astype(F),
             "w4": (rng.standard_normal((4, 16, 1, 1)) * 0.3).astype(F)}
    nodes = [conv("x", "w1", "a", pads=[1] * 4, name="c1"), helper.make_node("Relu", ["a"], ["ra"]),
             conv("ra", "w2", "b", pads=[1] * 4, name="c2"), helper.make_node("Relu", ["b"], ["rb"]),
             conv("rb", "w3", "c", name="c3"), helper.make_node("Relu", ["c"], ["rc"]),
             conv("rc", "w4", "y", name="c4")]
    return make_model(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", [2, 4, 6, 6])], inits)


def test_downstream_refit_absorbs_what_the_consumer_cannot():
    """Only c1's channels go (c3 protects the later groups); the consumer c2 is
    refitted either way, refit=downstream also refits c3 and c4 on the pruned
    activations, which brings the output closer."""
    proto = _deep_chain()
    plain, p_model = _prune(proto, 'prune-channels{ratio=0.5,protect="c3"}')
    deep, d_model = _prune(proto, 'prune-channels{ratio=0.5,protect="c3",refit=downstream}')
    assert init_shapes(p_model)["w1"][0] == init_shapes(d_model)["w1"][0] == 8
    assert init_shapes(d_model)["w3"] == (16, 16, 1, 1)
    assert plain.stats["reconstructed"] == 1 and deep.stats["reconstructed"] == 3
    onnx.checker.check_model(d_model)
    err_plain, err_deep = _error(proto, p_model), _error(proto, d_model)
    assert err_deep < err_plain, (err_deep, err_plain)


def test_reconstruction_criterion_removes_what_the_next_layer_can_rebuild():
    """Eight strong channels appear twice; the weak ones are each their own.
    Mean |activation| removes weak unique channels; the refit-error criterion
    removes one of each copy, which the refitted next layer rebuilds exactly."""
    rng = np.random.default_rng(12)
    proto = _two_groups(seed=12)
    w1 = (rng.standard_normal((32, 3, 3, 3)) * 0.3).astype(F)
    b1 = (rng.standard_normal(32) * 0.1).astype(F)
    w1[16:24] *= 4.0
    w1[24:], b1[24:] = w1[16:24], b1[16:24]
    for t in proto.graph.initializer:
        if t.name in ("w1", "b1"):
            t.CopyFrom(onnx.numpy_helper.from_array(w1 if t.name == "w1" else b1, t.name))
    act, a_model = _prune(proto, 'prune-channels{ratio=0.25,criterion=activation,protect="conv_y"}')
    rec, r_model = _prune(proto, 'prune-channels{ratio=0.25,criterion=reconstruction,protect="conv_y"}')
    assert init_shapes(a_model)["w1"][0] == init_shapes(r_model)["w1"][0] == 24
    err_act, err_rec = _error(proto, a_model), _error(proto, r_model)
    assert err_rec < 1e-3 < err_act, (err_rec, err_act)


def test_reconstruction_criterion_through_a_3x3_consumer():
    """The second group is read by a 3x3 Conv (nine columns per channel, block
    updates); at the same ratios the refit-error choice leaves a smaller error
    than mean |activation|."""
    proto = _two_groups(seed=2)
    act, a_model = _prune(proto, "prune-channels{ratio=0.5,criterion=activation,allocate=uniform,round-to=1}")
    rec, r_model = _prune(proto, "prune-channels{ratio=0.5,criterion=reconstruction,allocate=uniform,round-to=1}")
    assert init_shapes(r_model)["w3"] == init_shapes(a_model)["w3"] == (4, 16, 3, 3)
    assert rec.stats["reconstructed"] == 2
    onnx.checker.check_model(r_model)
    assert _error(proto, r_model) < 0.95 * _error(proto, a_model)


def test_refitted_weights_have_no_subnormals():
    """float64 least-squares solutions cast to float32 can land below the
    smallest normal float; such weights run in microcode on x86 (a refitted
    PP-OCRv4 rec convolution ran 40x slower), so every pruning write flushes them."""
    import onnx_graphsurgeon as gs

    from graphopt.passes.pruning.groups import flush_subnormals, replace_constant_input

    tiny = np.finfo(np.float32).tiny
    values = np.array([1.0, tiny / 4, -tiny / 8, 0.0, -2.5, tiny], np.float32)
    assert ((values != 0) & (np.abs(values) < tiny)).sum() == 2
    flushed = flush_subnormals(values)
    np.testing.assert_array_equal(flushed, [1.0, 0.0, 0.0, 0.0, -2.5, tiny])
    assert flush_subnormals(np.arange(3)) is not None  # integers untouched
    w = gs.Constant("w", np.ones((2, 2), np.float32))
    y = gs.Variable("y", dtype=np.float32)
    node = gs.Node("MatMul", inputs=[gs.Variable("x", dtype=np.float32), w], outputs=[y])
    graph = gs.Graph(nodes=[node], inputs=[node.inputs[0]], outputs=[y])
    replace_constant_input(graph, node, 1, np.full((2, 2), tiny / 2, np.float32))
    assert not np.asarray(node.inputs[1].values).any()


def test_sensitivity_scores_trials_on_a_task_metric():
    """sensitivity-metric=NAME: each trial is scored as 1 - the task metric on
    the graph outputs (with the sample's inputs); the redundant group still
    loses more."""
    from graphopt import metrics

    seen_inputs = []

    def fit(reference, candidate, inputs):
        seen_inputs.append(sorted(inputs))
        r, c = reference["y"].astype(np.float64), candidate["y"].astype(np.float64)
        return float(1.0 - np.linalg.norm(c - r) / np.linalg.norm(r))

    metrics.register(metrics.UserMetric("fit", fit, "test"))
    try:
        proto = _two_groups()
        record, after = _prune(proto, 'prune-channels{ratio=0.25,allocate=sensitivity,budget=channels,round-to=1,sensitivity-metric=fit,'
                                      'sensitivity-ratios="0.25;0.5;0.75"}')
        with pytest.raises(UsageError, match="unknown metric 'nope'"):
            _prune(proto, "prune-channels{allocate=sensitivity,sensitivity-metric=nope}")
        with pytest.raises(UsageError, match="needs allocate=sensitivity"):
            _prune(proto, "prune-channels{allocate=uniform,sensitivity-metric=fit}")
    finally:
        metrics.unregister("fit")
    assert seen_inputs and all(names == ["x"] for names in seen_inputs)
    shapes = init_shapes(after)
    assert shapes["w1"][0] < shapes["w2"][0] and shapes["w1"][0] + shapes["w2"][0] == 48
    errors = [e for curve in record.stats["sensitivity"].values() for _, e in curve]
    assert all(0.0 <= e <= 1.0 for e in errors) and max(errors) > 0.0


def test_allocate_by_cost_ranks_error_per_unit_saved():
    """Group 1 costs more error per channel but saves ten times the MACs per
    channel: with a MAC budget it goes first; a segment the budget reaches
    into is taken whole (only measured counts are used)."""
    from graphopt.passes.pruning.allocation import allocate_by_cost

    curves = {0: [(0, 0.0), (4, 0.04), (8, 0.08)], 1: [(0, 0.0), (4, 0.08), (8, 0.16)]}
    costs = {0: {4: 40, 8: 80}, 1: {4: 400, 8: 800}}
    removed, predicted, spent = allocate_by_cost(curves, costs, 600)
    assert removed == {0: 0, 1: 8} and spent == 800
    assert predicted == pytest.approx(0.12)  # the hull's estimate at the budget
    removed, _, spent = allocate_by_cost(curves, costs, 10_000)  # more than all trials reach
    assert removed == {0: 8, 1: 8} and spent == 880


def test_with_data_the_defaults_are_data_driven_and_spend_a_mac_budget():
    """With --calib, plain prune-channels{ratio=R} ranks channels by refit
    error, allocates by measured sensitivity and removes R of the model's
    MACs; kept counts are multiples of the target's lanes (8 unnamed),
    rounded up; without data: l1, uniform."""
    from graphopt.summary import node_macs

    proto = _two_groups()
    record, after = _prune(proto, "prune-channels{ratio=0.25}")
    assert record.stats["settings"] == {"criterion": "reconstruction", "allocate": "sensitivity",
                                        "round_to": 8, "round_up": True}
    shapes = init_shapes(after)
    assert shapes["w1"][0] % 8 == 0 and shapes["w2"][0] % 8 == 0
    macs = [sum(n["macs"] for n in node_macs(Model.from_proto(p))) for p in (proto, after)]
    assert macs[1] <= 0.75 * macs[0] or any("MACs asked for" in n for n in record.notes)
    assert _error(proto, after) < 0.2

    model = Model.from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    ctx = PassContext(quiet=True, vector_lanes=16)
    plain = graphopt.optimize(model, "prune-channels{ratio=0.25}", context=ctx).records[-1]
    assert plain.stats["settings"] == {"criterion": "l1", "allocate": "uniform", "round_to": 16, "round_up": True}
    # 32 channels less a quarter is 24, rounded up to 32: nothing goes
    assert not plain.changed
