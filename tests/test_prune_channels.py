"""prune-channels: options, stats, recovery; graph shapes and onnxruntime numbers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
import graphopt.cli
from conftest import apply, make_model, ort_run, random_feeds, vi
from graphopt import runtime
from graphopt.calibration import open_reader
from graphopt.context import PassContext
from graphopt.errors import UsageError
from graphopt.ir import Model
from test_pruning_groups import conv, init_shapes

F = np.float32


def _chain(c1: int = 32, c2: int = 16, seed: int = 0, bias1=None, w1=None, pads=1):
    """x -> Conv(c1) -> Relu -> Conv(c2) -> Relu -> Conv(4) -> y."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((c1, 3, 3, 3)).astype(F) * 0.3 if w1 is None else w1,
             "b1": rng.standard_normal(c1).astype(F) * 0.1 if bias1 is None else bias1,
             "w2": rng.standard_normal((c2, c1, 1, 1)).astype(F) * 0.3,
             "b2": rng.standard_normal(c2).astype(F) * 0.1,
             "w3": rng.standard_normal((4, c2, 3, 3)).astype(F) * 0.3}
    nodes = [conv("x", "w1", "a", "b1", pads=[pads] * 4), helper.make_node("Relu", ["a"], ["ra"], name="relu1"),
             conv("ra", "w2", "b", "b2"), helper.make_node("Relu", ["b"], ["rb"]),
             conv("rb", "w3", "y", pads=[1, 1, 1, 1])]
    for i, n in enumerate(nodes):
        n.name = n.name or f"{n.op_type.lower()}{i}"
    return make_model(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", [2, 4, 6 + 2 * (pads - 1), 6 + 2 * (pads - 1)])], inits)


def _stats(result):
    return result.records[-1].stats


def _notes(result):
    return result.records[-1].notes


def test_layer_ratio_removes_channels_everywhere():
    proto = _chain()
    _, result, after = apply(proto, "prune-channels{ratio=0.5}")
    shapes = init_shapes(after)
    assert shapes["w1"] == (16, 3, 3, 3) and shapes["b1"] == (16,) and shapes["w2"] == (8, 16, 1, 1)
    assert shapes["w3"] == (4, 8, 3, 3)
    stats = _stats(result)
    assert stats["groups"] == 3 and stats["groups_pruned"] == 2
    assert stats["channels_before"] == 48 and stats["channels_after"] == 24
    assert any("graph output" in n for n in _notes(result))
    onnx.checker.check_model(after)
    feeds = random_feeds(proto)
    want, got = ort_run(proto, feeds)["y"], ort_run(after, feeds)["y"]
    assert got.shape == want.shape and np.isfinite(got).all()
    assert runtime.cosine_similarity(got, want) > 0.3  # lossy, but the same function roughly


def test_pruning_without_data_warns_with_the_measured_output_cosine(capsys):
    """No --calib: nothing recovers what the channels carried, so one warning
    line gives how far the outputs moved on seeded random inputs (also in the
    stats); with data there is no such warning."""
    proto = _chain()
    model = Model.from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    result = graphopt.optimize(model, "prune-channels{ratio=0.5}", context=PassContext(quiet=False))
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning: prune-channels without --calib" in ln]
    cosine = _stats(result)["random_input_cosine"]
    assert len(warnings) == 1 and f"cosine {cosine:.4f}" in warnings[0]
    assert 0.0 < cosine < 0.999  # ratio 0.5 with no recovery moves them
    model = Model.from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    ctx = PassContext(quiet=False, calibration=open_reader("random:8", model, seed=3, quiet=True))
    result = graphopt.optimize(model, "prune-channels{ratio=0.5}", context=ctx)
    assert "without --calib" not in capsys.readouterr().err and "random_input_cosine" not in _stats(result)


def test_round_to_and_min_channels():
    _, _, after = apply(_chain(), "prune-channels{ratio=0.3,round-to=8}")
    shapes = init_shapes(after)
    assert shapes["w1"][0] == 24 and shapes["w2"][0] == 16  # 32-9=23 -> 24; 16-4=12 -> 16 (rounded)
    _, _, after = apply(_chain(), "prune-channels{ratio=0.9,min-channels=10,round-to=1}")
    shapes = init_shapes(after)
    assert shapes["w1"][0] == 10 and shapes["w2"][0] == 10


def test_protect_keeps_group_whole():
    _, result, after = apply(_chain(), 'prune-channels{ratio=0.5,protect="conv0"}')
    shapes = init_shapes(after)
    assert shapes["w1"][0] == 32 and shapes["w2"][0] == 8
    assert any("protected by 'conv0'" in n for n in _notes(result))
    _, _, after = apply(_chain(), 'prune-channels{ratio=0.5,protect="conv2"}')  # its input and output
    assert init_shapes(after)["w2"] == (16, 32, 1, 1)
    _, _, after = apply(_chain(), 'prune-channels{ratio=0.5,protect="relu.*"}')
    assert init_shapes(after)["w1"][0] == 32  # the Relu is a member of conv0's group


def test_global_scope_ranks_across_groups():
    _, result, after = apply(_chain(), "prune-channels{ratio=0.25,scope=global,round-to=1}")
    stats = _stats(result)
    assert stats["channels_before"] - stats["channels_after"] == 12  # floor(0.25 * 48)
    shapes = init_shapes(after)
    assert shapes["w1"][0] + shapes["w2"][0] == 36


def test_options_are_checked():
    with pytest.raises(UsageError, match="criterion=activation needs calibration"):
        apply(_chain(), "prune-channels{criterion=activation}")
    with pytest.raises(UsageError, match="ratio"):
        apply(_chain(), "prune-channels{ratio=1.5}")
    with pytest.raises(UsageError, match="criterion"):
        apply(_chain(), "prune-channels{criterion=random}")


def test_zero_filters_before_relu_are_removed_exactly():
    """Filters with zero weights and a negative bias are exactly zero after the
    ReLU; l1 scores them 0, so pruning that many channels keeps the outputs."""
    rng = np.random.default_rng(1)
    w1 = (rng.standard_normal((32, 3, 3, 3)) * 0.3).astype(F)
    b1 = (rng.standard_normal(32) * 0.1).astype(F)
    dead = rng.choice(32, 8, replace=False)
    w1[dead] = 0
    b1[dead] = -0.5
    proto = _chain(w1=w1, bias1=b1)
    _, result, after = apply(proto, "prune-channels{ratio=0.25,protect=relu3}")
    assert init_shapes(after)["w1"][0] == 24
    feeds = random_feeds(proto)
    assert runtime.relative_error(ort_run(after, feeds)["y"], ort_run(proto, feeds)["y"]) <= 1e-5


def test_constant_channels_fold_into_next_bias_without_calibration():
    """Zero filters with a positive bias are a constant after the ReLU; their
    contribution moves into the next (unpadded) Conv's bias, exactly."""
    rng = np.random.default_rng(2)
    w1 = (rng.standard_normal((32, 3, 3, 3)) * 0.3).astype(F)
    b1 = (rng.standard_normal(32) * 0.1).astype(F)
    dead = rng.choice(32, 8, replace=False)
    w1[dead] = 0
    b1[dead] = rng.uniform(0.2, 1.0, 8).astype(F)
    proto = _chain(w1=w1, bias1=b1)
    _, result, after = apply(proto, "prune-channels{ratio=0.25,protect=relu3}")
    assert init_shapes(after)["w1"][0] == 24
    assert _stats(result)["bias_folded"] == 1
    feeds = random_feeds(proto)
    assert runtime.relative_error(ort_run(after, feeds)["y"], ort_run(proto, feeds)["y"]) <= 1e-5


def _calibrated(proto, pipeline, n=32):
    model = Model.from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    ctx = PassContext(calibration=open_reader(f"random:{n}", model, seed=3, quiet=True))
    result = graphopt.optimize(model, pipeline, context=ctx)
    return result, model.to_proto()


def test_reconstruction_brings_outputs_closer():
    proto = _chain(c1=32, c2=32, seed=4)
    feeds = {"x": np.random.default_rng(9).standard_normal((2, 3, 6, 6)).astype(F)}
    want = ort_run(proto, feeds)["y"]
    plain_result, plain = _calibrated(proto, "prune-channels{ratio=0.5,reconstruct=false,allocate=uniform,round-to=1}")
    rec_result, rec = _calibrated(proto, "prune-channels{ratio=0.5,allocate=uniform,round-to=1}")
    assert init_shapes(plain)["w2"] == init_shapes(rec)["w2"] == (16, 16, 1, 1)
    assert _stats(rec_result)["reconstructed"] == 2
    assert _stats(plain_result)["bias_folded"] == 2
    err_plain = runtime.relative_error(ort_run(plain, feeds)["y"], want)
    err_rec = runtime.relative_error(ort_run(rec, feeds)["y"], want)
    assert err_rec < 0.9 * err_plain


def test_reconstruction_recovers_redundant_channels():
    """Channels that are positive multiples of others (ReLU commutes with the
    scale) carry no new information: least squares folds them into the next
    layer's weights and the outputs come back."""
    rng = np.random.default_rng(8)
    w1 = (rng.standard_normal((32, 3, 3, 3)) * 0.3).astype(F)
    b1 = (rng.standard_normal(32) * 0.1).astype(F)
    w1[16:], b1[16:] = 0.5 * w1[:16], 0.5 * b1[:16]
    proto = _chain(w1=w1, bias1=b1)
    feeds = {"x": np.random.default_rng(9).standard_normal((2, 3, 6, 6)).astype(F)}
    want = ort_run(proto, feeds)["y"]
    _, plain = _calibrated(proto, "prune-channels{ratio=0.5,reconstruct=false,protect=relu3,criterion=l1,allocate=uniform}")
    _, rec = _calibrated(proto, "prune-channels{ratio=0.5,protect=relu3,criterion=l1,allocate=uniform}")
    assert init_shapes(rec)["w1"][0] == 16
    assert runtime.relative_error(ort_run(plain, feeds)["y"], want) > 0.05
    assert runtime.relative_error(ort_run(rec, feeds)["y"], want) < 1e-3


def test_activation_criterion_uses_calibration():
    rng = np.random.default_rng(5)
    w1 = (rng.standard_normal((32, 3, 3, 3)) * 0.3).astype(F)
    w1[:8] *= 1e-3  # filters that never activate much
    proto = _chain(w1=w1, bias1=np.full(32, -0.01, F))
    result, after = _calibrated(proto, "prune-channels{ratio=0.25,criterion=activation,protect=relu3}", n=8)
    kept = onnx.numpy_helper.to_array(next(t for t in after.graph.initializer if t.name == "w1"))
    assert kept.shape[0] == 24 and np.abs(kept).max(axis=(1, 2, 3)).min() > 1e-2


def test_bn_gamma_criterion():
    rng = np.random.default_rng(6)
    gamma = rng.uniform(0.5, 1.5, 16).astype(F)
    gamma[[1, 5, 9, 13]] = 1e-3
    inits = {"w1": rng.standard_normal((16, 3, 3, 3)).astype(F), "s": gamma, "t": np.zeros(16, F),
             "m": np.zeros(16, F), "v": np.ones(16, F), "w2": rng.standard_normal((4, 16, 1, 1)).astype(F)}
    nodes = [conv("x", "w1", "a", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "s", "t", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]), conv("r", "w2", "y")]
    proto = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])], inits)
    _, _, after = apply(proto, "prune-channels{ratio=0.25,criterion=bn-gamma,round-to=1}")
    kept = onnx.numpy_helper.to_array(next(t for t in after.graph.initializer if t.name == "s"))
    assert kept.shape == (12,) and kept.min() > 0.4


def test_initializers_listed_as_inputs_stay_consistent():
    """IR 3 models list every initializer as a graph input; the pruned shapes must match."""
    proto = _chain()
    proto.ir_version = 3
    proto.opset_import[0].version = 9
    for t in proto.graph.initializer:
        proto.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(proto)
    _, _, after = apply(proto, "prune-channels{ratio=0.5}")
    onnx.checker.check_model(after)
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in after.graph.input}
    for t in after.graph.initializer:
        assert inputs[t.name] == list(t.dims)
    assert inputs["w1"] == [16, 3, 3, 3]
    feeds = {"x": np.zeros((2, 3, 6, 6), F)}
    assert ort_run(after, feeds)["y"].shape == (2, 4, 6, 6)


def test_nothing_prunable_is_no_change():
    rng = np.random.default_rng(7)
    proto = make_model([conv("x", "w", "y")], [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])],
                       {"w": rng.standard_normal((4, 3, 1, 1)).astype(F)})
    _, result, after = apply(proto, "prune-channels")
    assert not result.records[-1].changed and init_shapes(after)["w"] == (4, 3, 1, 1)


def test_bn_statistics_reestimated_without_reconstruction():
    rng = np.random.default_rng(11)
    inits = {"w1": (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(F),
             "w2": (rng.standard_normal((8, 16, 1, 1)) * 0.3).astype(F),
             "s": np.ones(8, F), "t": np.zeros(8, F), "m": np.zeros(8, F), "v": np.ones(8, F),
             "w3": (rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(F)}
    nodes = [conv("x", "w1", "a", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["ra"]),
             conv("ra", "w2", "b"), helper.make_node("BatchNormalization", ["b", "s", "t", "m", "v"], ["bn"],
                                                     name="bn"),
             helper.make_node("Relu", ["bn"], ["rb"], name="relu_b"), conv("rb", "w3", "y")]
    proto = make_model(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", [1, 4, 6, 6])], inits)
    result, after = _calibrated(proto, "prune-channels{ratio=0.5,reconstruct=false,protect=relu_b}", n=8)
    assert _stats(result)["bn_reestimated"] == 1 and init_shapes(after)["w1"][0] == 8
    mean = onnx.numpy_helper.to_array(next(t for t in after.graph.initializer if t.name.startswith("m")))
    assert mean.shape == (8,) and np.abs(mean).max() > 0  # measured, no longer the zeros it had


def test_reconstruction_after_simplify_on_a_residual_net(tmp_path):
    """Recovery runs the half-pruned model: stale shape annotations of the
    unpruned graph must not reach onnxruntime (the bundled example's
    downsampling block used to fail there)."""
    from pathlib import Path

    from graphopt.cli import main

    src = Path(__file__).resolve().parents[1] / "examples" / "tiny_resnet.onnx"
    out = tmp_path / "p.onnx"
    rc = main(["opt", str(src), "-o", str(out), "-q", "--no-cache", "-p", "simplify,prune-channels{ratio=0.25}",
               "--calib", "random:16"])
    assert rc == 0
    before, after = onnx.load(str(src)), onnx.load(str(out))
    onnx.checker.check_model(after)
    feeds = random_feeds(before, seed=5)
    want, got = ort_run(before, feeds), ort_run(after, feeds)
    assert all(got[k].shape == want[k].shape for k in want)
    params = lambda m: sum(int(np.prod(t.dims)) for t in m.graph.initializer)  # noqa: E731
    assert params(after) < 0.8 * params(before)


def _computed_weight_chain(tmp_path):
    """The chain with its first weight made by ConstantOfShape, as onnx's light
    models make all of theirs."""
    proto = _chain()
    shape = np.array([32, 3, 3, 3], np.int64)
    proto.graph.initializer.remove(next(t for t in proto.graph.initializer if t.name == "w1"))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(shape, "w1_shape"))
    fill = onnx.numpy_helper.from_array(np.array([0.05], F), "")
    proto.graph.node.insert(0, helper.make_node("ConstantOfShape", ["w1_shape"], ["w1"], value=fill))
    path = tmp_path / "computed.onnx"
    onnx.save(proto, str(path))
    return proto, path


def test_computed_weights_are_evaluated_and_pruned(tmp_path, capsys):
    proto, src = _computed_weight_chain(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert graphopt.cli.main(["opt", str(src), "-o", str(out), "-p", "prune-channels{ratio=0.5}",
                              "--report", str(report), "--no-cache"]) == 0
    import json

    record = json.loads(report.read_text())["passes"][0]
    assert record["changed"] and record["stats"]["channels_after"] < record["stats"]["channels_before"]
    assert any("ConstantOfShape" in n for n in record["notes"])
    got = onnx.load(str(out))
    w1 = next(t for t in got.graph.initializer if t.name == "w1")
    assert w1.dims[0] == 16  # the Conv fed by the computed weight lost half its channels
    feeds = random_feeds(proto)
    assert ort_run(got, feeds)["y"].shape == ort_run(proto, feeds)["y"].shape


def test_asked_for_pass_that_prunes_nothing_says_why(tmp_path, capsys):
    """Only a Conv feeding a graph output: no prunable group.  The pass says so
    on stderr and in the report, in one line, and the model is written unchanged."""
    rng = np.random.default_rng(0)
    proto = make_model([conv("x", "w", "y")], [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 2, 2])],
                       {"w": rng.standard_normal((4, 3, 3, 3)).astype(F)})
    src, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(proto, str(src))
    assert graphopt.cli.main(["opt", str(src), "-o", str(out), "-p", "prune-channels{ratio=0.3}",
                              "--report", str(report), "--no-cache"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "changed nothing" in line]
    assert len(notes) == 1 and notes[0].startswith("graphopt: note: prune-channels changed nothing: ")
    assert "graph output" in notes[0]
    import json

    assert json.loads(report.read_text())["notes"] == [notes[0].removeprefix("graphopt: note: ")]


def test_passes_of_a_named_pipeline_do_not_report_doing_nothing(tmp_path, capsys):
    proto = _chain()
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(proto, str(src))
    assert graphopt.cli.main(["opt", str(src), "-o", str(out), "--no-cache"]) == 0
    assert "changed nothing" not in capsys.readouterr().err


@pytest.mark.parametrize("attrs", [
    "pads = [1, 2, 0, 1], strides = [2, 1]",
    "pads = [2, 2, 2, 2], dilations = [2, 2]",
    "auto_pad = \"SAME_UPPER\", strides = [2, 2]",
    "auto_pad = \"VALID\"",
])
def test_im2col_rows_reproduce_onnxruntime_conv(attrs):
    """Sampled patch rows times the flattened kernel are the Conv's outputs at
    those positions, padding included."""
    import onnx.parser

    from graphopt import runtime
    from graphopt.ir import Model
    from graphopt.passes.pruning.recovery import im2col

    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[2, 3, 9, 7] x, float[5, 3, 3, 3] w) => (float[2, 5, ?, ?] y) {{
        y = Conv <{attrs}> (x, w)
    }}"""
    proto = onnx.parser.parse_model(text)
    x = rng.standard_normal((2, 3, 9, 7)).astype(np.float32)
    want = runtime.session(proto).run(None, {"x": x, "w": w})[0]
    node = Model.from_proto(proto).graph.nodes[0]
    rows, pos = im2col(x, node, (3, 3), rng=np.random.default_rng(0), max_rows=40)
    got = rows @ w.reshape(5, -1).T
    np.testing.assert_allclose(got, want[pos[:, 0], :, pos[:, 1], pos[:, 2]], rtol=1e-4, atol=1e-4)
    assert len(pos) == min(40, want.shape[0] * want.shape[2] * want.shape[3])
