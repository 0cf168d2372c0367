"""Fidelity budget: spec parsing, metric math, sensitivity ranking and the
budget search in quantize-dynamic / quantize-static, and `graphopt opt --fidelity`."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import apply, make_model, vi
from graphopt import runtime
from graphopt.calibration import open_reader
from graphopt.cli import main
from graphopt.context import PassContext
from graphopt.errors import UsageError
from graphopt.fidelity import compare_outputs, parse_fidelity, row_cosines

F = np.float32


# ==================================================================================
# Spec
# ==================================================================================
def test_parse_spec():
    spec = parse_fidelity("cosine>=0.99")
    assert [(t.metric, t.op, t.threshold) for t in spec.targets] == [("cosine", ">=", 0.99)]
    spec = parse_fidelity(" cosine >= 0.99 , top1>=0.98,max-abs<=0.05")
    assert spec.metrics == ("cosine", "top1", "max-abs")
    assert str(spec) == "cosine>=0.99,top1>=0.98,max-abs<=0.05"
    assert spec.holds({"cosine": 0.995, "top1": 0.99, "max-abs": 0.01})
    assert not spec.holds({"cosine": 0.995, "top1": 0.97, "max-abs": 0.01})
    assert not spec.holds({"cosine": float("nan"), "top1": 1.0, "max-abs": 0.0})


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("cosine=0.99", "cannot read"),
    ("cosine>=abc", "not a number"),
    ("cosine>=inf", "not a number"),
    ("psnr>=30", "unknown metric 'psnr'"),
    ("cosine<=0.99", "bounded from below"),
    ("max-abs>=0.1", "bounded from above"),
    ("cosine>=1.5", "must be in"),
    ("top1>=0.9,", "cannot read"),
])
def test_bad_spec_is_one_line_usage_error(text, words):
    with pytest.raises(UsageError) as err:
        parse_fidelity(text)
    msg = str(err.value)
    assert words in msg and "\n" not in msg and "--fidelity" in msg


# ==================================================================================
# Metrics
# ==================================================================================
def test_row_cosines_and_rows():
    ref = np.array([[[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]], F)  # [1, 3, 2]: three token rows
    cand = np.array([[[1.0, 1.0], [0.0, 5.0], [0.0, 0.0]]], F)
    cos = row_cosines(cand, ref)
    assert cos.shape == (3,)
    assert np.allclose(cos, [1 / np.sqrt(2), 1.0, 1.0])  # both-zero row counts as 1
    assert row_cosines(np.array([1.0, 0.0]), np.array([0.0, 0.0]))[0] == 0.0  # one side zero
    assert row_cosines(np.array([np.nan, 1.0]), np.array([1.0, 1.0]))[0] == -1.0
    assert row_cosines(np.ones((2, 3, 4, 5)), np.ones((2, 3, 4, 5))).shape == (2,)  # rank 4: per batch item
    assert row_cosines(np.ones((4, 5)), np.ones((4, 5))).shape == (4,)  # rank 2: per row


def test_compare_outputs_worst_case_top1_maxabs():
    ref = [{"y": np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], F), "idx": np.array([1], np.int64)},
           {"y": np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], F), "idx": np.array([1], np.int64)}]
    cand = [{"y": np.array([[1.0, 2.0, 3.5], [3.0, 2.0, 1.0]], F), "idx": np.array([7], np.int64)},
            {"y": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], F), "idx": np.array([7], np.int64)}]
    v = compare_outputs(cand, ref)
    assert v["cosine"] == pytest.approx(0.0)  # [0,1,0] vs [0,0,1]: the worst row decides
    assert v["top1"] == pytest.approx(3 / 4)
    assert v["max-abs"] == pytest.approx(1.0)
    assert 0.0 < v["mean-cosine"] < 1.0
    same = compare_outputs(ref, ref)
    assert same == {"cosine": pytest.approx(1.0), "mean-cosine": pytest.approx(1.0), "top1": 1.0, "top5": 1.0,
                    "max-abs": 0.0}
    assert v["top5"] == 1.0  # three classes: every reference argmax is among the candidate's top 5


def test_top5_counts_the_reference_argmax_among_the_candidates_five_best():
    ref = [{"y": np.eye(8, dtype=F)[[0, 7]]}]           # argmax 0 and 7
    cand = [{"y": np.array([[0, 9, 8, 7, 6, 5, 1, 2], [0, 9, 8, 7, 6, 5, 1, 2]], F)}]  # top 5: 1..5
    v = compare_outputs(cand, ref)
    assert v["top1"] == 0.0 and v["top5"] == 0.0
    cand[0]["y"][0, 0] = 5.5                              # class 0 enters the top 5 of row 0
    assert compare_outputs(cand, ref)["top5"] == 0.5
    assert parse_fidelity("top5>=0.5").holds(compare_outputs(cand, ref))


# ==================================================================================
# A model with one very sensitive node
# ==================================================================================
def outlier_model(seq: int = 8, hidden: int = 32, outlier: float = 100.0, seed: int = 0) -> onnx.ModelProto:
    """Four MatMuls; the activation of ``mm_b`` has a huge outlier channel
    (its weight row is scaled down, so the float output is ordinary), which
    per-tensor activation quantization cannot represent."""
    rng = np.random.default_rng(seed)

    def w(k, n):
        return (rng.standard_normal((k, n)) / np.sqrt(k)).astype(F)

    c = np.ones(hidden, F)
    c[3] = outlier
    wb = w(hidden, hidden)
    wb[3, :] /= outlier
    inits = {"wa": w(hidden, hidden), "c": c, "wb": wb, "wc": w(hidden, hidden), "wd": w(hidden, hidden)}
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"], name="mm_a"),
        helper.make_node("Mul", ["a", "c"], ["ao"], name="outlier"),
        helper.make_node("MatMul", ["ao", "wb"], ["b"], name="mm_b"),
        helper.make_node("MatMul", ["b", "wc"], ["cc"], name="mm_c"),
        helper.make_node("Relu", ["cc"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "wd"], ["y"], name="mm_d"),
    ]
    return make_model(nodes, [vi("x", [1, seq, hidden])], [vi("y", [1, seq, hidden])], inits)


def _data(proto, n=16, seed=3):
    return open_reader(f"random:{n}", proto, seed=seed, quiet=True)


def _ctx(proto, n=16, **options):
    return PassContext(calibration=_data(proto, n), quiet=True, options=dict(options))


def _heldout_cosine(before, after, n=16, seed=3, fraction=0.5):
    _, held = _data(before, n, seed).split(fraction, 0)
    ref, got = runtime.session(before), runtime.session(after)
    return compare_outputs([runtime.run(got, s) for s in held], [runtime.run(ref, s) for s in held])["cosine"]


def test_dynamic_budget_keeps_exactly_the_sensitive_node():
    proto = outlier_model()
    _, plain, plain_out = apply(proto, "quantize-dynamic", _ctx(proto))
    assert "fidelity" not in plain.records[0].stats
    assert _heldout_cosine(proto, plain_out) < 0.999  # without a budget the target is missed

    # recipe=fixed: the node-level budget alone (no smoothing to fall back on)
    _, result, out = apply(proto, 'quantize-dynamic{fidelity="cosine>=0.999",recipe=fixed}', _ctx(proto))
    rec = result.records[0]
    fid = rec.stats["fidelity"]
    assert [k["node"] for k in fid["kept_float"]] == ["mm_b"]  # stops at the target: nothing more in float
    assert fid["kept_float"][0]["error"]["cosine"] < 0.999 and fid["met"] and fid["feasible"]
    assert fid["heldout"]["cosine"] >= 0.999 and fid["heldout"]["samples"] == 8
    assert fid["ranking"]["top"][0]["node"] == "mm_b"
    assert fid["sessions"] == 1  # the switched model: probes are runs, not builds
    assert rec.stats["quantized"] == 3 and rec.stats["kept_float"] == 1
    assert any("mm_b" in n and "kept 1 of 4" in n for n in rec.notes)
    assert _heldout_cosine(proto, out) >= 0.999  # the written model, measured independently
    ops = {n.name: n.op_type for n in out.graph.node}
    assert ops["mm_b"] == "MatMul" and sum(op == "DynamicQuantizeMatMul" for op in ops.values()) == 3


def test_dynamic_recipe_search_smooths_the_outlier_instead_of_keeping_float():
    proto = outlier_model()
    _, result, out = apply(proto, 'quantize-dynamic{fidelity="cosine>=0.999"}', _ctx(proto))
    stats = result.records[0].stats
    fid, recipe = stats["fidelity"], stats["recipe"]
    # every recipe was measured on the ranking samples; the chosen one smooths
    assert len(recipe["tried"]) == 10 and "smoothing" in recipe["chosen"] and "no smoothing" not in recipe["chosen"]
    plain = next(t for t in recipe["tried"] if t["recipe"] == "per-tensor, no smoothing")
    chosen = next(t for t in recipe["tried"] if t["recipe"] == recipe["chosen"])
    assert chosen["cosine"] > plain["cosine"] and plain["cosine"] < 0.999
    # smoothing alone meets the target: every node quantized, held-out checked
    assert fid["met"] and fid["kept_float"] == [] and stats["quantized"] == 4 and stats["smoothed"] >= 1
    assert _heldout_cosine(proto, out) >= 0.999


def test_dynamic_budget_met_without_keeping_anything():
    proto = outlier_model(outlier=1.0)
    _, result, _ = apply(proto, 'quantize-dynamic{fidelity="cosine>=0.9"}', _ctx(proto))
    fid = result.records[0].stats["fidelity"]
    assert fid["kept_float"] == [] and fid["met"] and fid["evaluations"] == 1
    assert result.records[0].stats["quantized"] == 4


def test_dynamic_budget_unreachable_quantizes_nothing():
    proto = outlier_model()
    _, result, out = apply(proto, 'quantize-dynamic{fidelity="max-abs<=0.0000001"}', _ctx(proto))
    rec = result.records[0]
    assert rec.stats["quantized"] == 0 and rec.changed == bool(rec.stats["smoothed"])
    assert rec.stats["fidelity"]["feasible"] is False
    assert any("cannot be met" in n for n in rec.notes)
    assert "DynamicQuantizeMatMul" not in {n.op_type for n in out.graph.node}


def test_budget_is_deterministic_and_context_option_applies():
    proto = outlier_model()
    outs = []
    for _ in range(2):
        _, result, out = apply(proto, "quantize-dynamic{format=onnx}", _ctx(proto, fidelity="cosine>=0.999"))
        outs.append((out.SerializeToString(), json.dumps(result.records[0].stats, sort_keys=True)))
    assert outs[0] == outs[1]
    assert "fidelity" in json.loads(outs[0][1])
    # an explicit empty pass option turns the run-wide budget off
    _, result, _ = apply(proto, 'quantize-dynamic{fidelity=""}', _ctx(proto, fidelity="cosine>=0.999"))
    assert "fidelity" not in result.records[0].stats


def test_budget_with_grouped_probes():
    proto = outlier_model()
    _, result, _ = apply(proto, 'quantize-dynamic{fidelity="cosine>=0.999",fidelity-probes=2,recipe=fixed}',
                         _ctx(proto))
    fid = result.records[0].stats["fidelity"]
    assert fid["ranking"]["grouped"] and fid["ranking"]["probes"] == 2
    assert fid["heldout"]["cosine"] >= 0.999 and "mm_b" in [k["node"] for k in fid["kept_float"]]


def test_static_budget_keeps_sensitive_nodes():
    proto = outlier_model()
    _, plain, plain_out = apply(proto, "quantize-static", _ctx(proto))
    assert _heldout_cosine(proto, plain_out) < 0.95
    _, result, out = apply(proto, 'quantize-static{fidelity="cosine>=0.95"}', _ctx(proto))
    fid = result.records[0].stats["fidelity"]
    kept = {k["node"] for k in fid["kept_float"]}
    assert kept and kept <= {"outlier", "mm_b"} and fid["met"]
    assert result.records[0].stats["quantized_nodes"] > 0
    assert _heldout_cosine(proto, out) >= 0.95


def test_budget_needs_two_samples_and_calibration():
    proto = outlier_model()
    with pytest.raises(UsageError, match="at least 2"):
        apply(proto, 'quantize-dynamic{fidelity="cosine>=0.99"}', _ctx(proto, n=1))
    with pytest.raises(UsageError, match="calibration"):
        apply(proto, 'quantize-dynamic{fidelity="cosine>=0.99"}', PassContext(quiet=True))
    with pytest.raises(UsageError, match="unknown metric"):
        apply(proto, 'quantize-dynamic{fidelity="snr>=3"}', PassContext(quiet=True))


# ==================================================================================
# CLI
# ==================================================================================
@pytest.fixture
def files(tmp_path):
    proto = outlier_model()
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).standard_normal((16, 1, 8, 32)).astype(F))
    return tmp_path


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: ")
    return lines[0]


def test_cli_fidelity_without_calib(files, capsys):
    rc = main(["opt", str(files / "m.onnx"), "-o", str(files / "o.onnx"), "-p", "quantize-dynamic",
               "--fidelity", "cosine>=0.99"])
    assert rc == 2 and "--calib" in _one_error_line(capsys)
    assert not (files / "o.onnx").exists()


@pytest.mark.parametrize("spec", ["cosine", "cosine>=2", "l2<=1"])
def test_cli_bad_fidelity_spec(files, capsys, spec):
    rc = main(["opt", str(files / "m.onnx"), "-o", str(files / "o.onnx"), "-p", "quantize-dynamic",
               "--calib", str(files / "d.npz"), "--fidelity", spec])
    assert rc == 2 and spec in _one_error_line(capsys)


def test_cli_fidelity_without_quantization_pass(files, capsys):
    rc = main(["opt", str(files / "m.onnx"), "-o", str(files / "o.onnx"), "-p", "simplify",
               "--calib", str(files / "d.npz"), "--fidelity", "cosine>=0.99"])
    assert rc == 2 and "no pass" in _one_error_line(capsys)


def test_cli_fidelity_report_lists_kept_nodes(files):
    rc = main(["opt", str(files / "m.onnx"), "-o", str(files / "o.onnx"), "-p", "quantize-dynamic{recipe=fixed}",
               "-q", "--calib", str(files / "d.npz"), "--fidelity", "cosine>=0.999", "--report", str(files / "r.json")])
    assert rc == 0
    report = json.loads((files / "r.json").read_text())
    fid = report["passes"][0]["stats"]["fidelity"]
    assert fid["target"] == "cosine>=0.999" and fid["met"]
    assert [k["node"] for k in fid["kept_float"]] == ["mm_b"]
    assert set(fid["kept_float"][0]["error"]) >= {"cosine", "top1", "max-abs"}
    assert fid["heldout"]["cosine"] >= 0.999
    assert any("kept 1 of 4" in n for n in report["passes"][0]["notes"])
