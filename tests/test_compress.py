"""graphopt compress: the choice meets the target on held-out samples (checked
again on the written model), the TOML rebuilds the same bytes, the budget and
Ctrl-C stop the search with a written result, runs are deterministic, and bad
input is a one-line error."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from conftest import make_model, vi
from graphopt import compress as compress_mod
from graphopt import registry
from graphopt.calibration import open_reader
from graphopt.cli import main
from graphopt.compress import Candidate, choose, default_candidates, measure_latency
from graphopt.fidelity import compare_outputs, parse_fidelity
from graphopt.ir import Model, load
from graphopt.runtime import run, session

F = np.float32
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny_resnet.onnx"
MLP_CANDIDATES = ["quantize-dynamic", 'quantize-static{fidelity="cosine>=0.99"}', "convert-fp16"]


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"w1": (rng.standard_normal((64, 128)) * 0.2).astype(F), "b1": (rng.standard_normal(128) * 0.1).astype(F),
             "w2": (rng.standard_normal((128, 32)) * 0.2).astype(F), "b2": np.zeros(32, F)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["o"], name="fc2"),
             helper.make_node("Add", ["o", "b2"], ["y"], name="fc2_bias")]
    return make_model(nodes, [vi("x", [1, 64])], [vi("y", [1, 32])], inits)


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    onnx.save(_mlp(), path)
    return path


def _compress(model: Path, tmp: Path, *extra: str, name: str = "out",
              candidates=MLP_CANDIDATES) -> tuple[int, Path, Path]:
    out, rep = tmp / f"{name}.onnx", tmp / f"{name}-report"
    argv = ["compress", str(model), "-o", str(out), "--calib", "random:16", "--report", str(rep), "-q",
            "--latency-rounds", "3"]
    for c in candidates or []:
        argv += ["--candidate", c]
    return main(argv + list(extra)), out, rep


@pytest.fixture(scope="module")
def mlp_run(mlp_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    code, out, rep = _compress(mlp_path, tmp, "--objective", "size")
    assert code == 0
    return out, rep, json.loads((rep / "report.json").read_text())


def _heldout_outputs(model_path: Path, report: dict) -> tuple[list, list]:
    """Outputs of the written model and of the original float model on the
    held-out samples the report names, recomputed from scratch."""
    data = open_reader(report["data"]["source"], load(model_path), seed=report["options"]["seed"], quiet=True)
    samples = [data[i] for i in report["data"]["heldout_indices"]]
    return samples, [run(session(onnx.load(str(model_path))), s) for s in samples]


def test_choice_meets_target_on_heldout(mlp_path, mlp_run):
    out, rep, report = mlp_run
    assert report["met"] is True and report["outcome"] == "compressed"
    assert report["data"]["heldout"] == 4 and report["data"]["calibration"] == 12
    assert not set(report["data"]["heldout_indices"]) & set(range(16)) - set(report["data"]["heldout_indices"])
    samples, want = _heldout_outputs(mlp_path, report)
    got = [run(session(onnx.load(str(out))), s) for s in samples]
    values = compare_outputs(got, want)
    assert parse_fidelity(report["options"]["fidelity"]).holds(values)
    assert values["cosine"] == pytest.approx(report["fidelity"]["cosine"], abs=1e-5)
    # size objective: the smallest candidate that met the target, and smaller than the float model
    ok = [c for c in report["candidates"] if c["status"] == "ok" and c["met"]]
    assert report["chosen"]["candidate"] == min(ok, key=lambda c: c["size_bytes"])["pipeline"]
    assert out.stat().st_size < report["model"]["simplified"]["file_bytes"]
    assert report["model"]["after"]["file_bytes"] == out.stat().st_size
    # the float model's structure is unchanged by quantization: same channels per layer
    assert [(l["channels_before"], l["channels_after"]) for l in report["layers"]] == [(128, 128), (32, 32)]


def test_toml_rebuilds_same_bytes(mlp_path, mlp_run, tmp_path):
    out, rep, report = mlp_run
    toml = rep / "compress.toml"
    assert toml.read_text() == report["chosen"]["toml"]
    assert f'pass = "{report["chosen"]["candidate"].split("{")[0]}"' in toml.read_text()
    rebuilt = tmp_path / "rebuilt.onnx"
    assert main(["opt", str(mlp_path), "-o", str(rebuilt), "--config", str(toml), "--no-cache", "-q"]) == 0
    assert rebuilt.read_bytes() == out.read_bytes()


def test_deterministic(mlp_path, mlp_run, tmp_path):
    out, _, report = mlp_run
    code, out2, rep2 = _compress(mlp_path, tmp_path, "--objective", "size")
    assert code == 0
    again = json.loads((rep2 / "report.json").read_text())
    assert out2.read_bytes() == out.read_bytes()
    assert [(c["pipeline"], c["fidelity"], c["size_bytes"]) for c in again["candidates"]] == [
        (c["pipeline"], c["fidelity"], c["size_bytes"]) for c in report["candidates"]]
    # another seed holds out other samples
    code, _, rep3 = _compress(mlp_path, tmp_path, "--objective", "size", "--seed", "5", name="seed5")
    assert code == 0
    assert json.loads((rep3 / "report.json").read_text())["data"]["heldout_indices"] != report["data"][
        "heldout_indices"]


def test_report_command_renders_same_page(mlp_run, tmp_path):
    _, rep, _ = mlp_run
    assert main(["report", str(rep / "report.json"), "-o", str(tmp_path / "page")]) == 0
    assert (tmp_path / "page" / "report.html").read_text() == (rep / "report.html").read_text()


def test_budget_stops_new_candidates(mlp_path, tmp_path, capsys):
    code, out, rep = _compress(mlp_path, tmp_path, "--budget-minutes", "0.00001")
    assert code == 0
    report = json.loads((rep / "report.json").read_text())
    assert report["budget"]["stopped_early"] is True
    assert [c["status"] for c in report["candidates"]] == ["skipped"] * len(MLP_CANDIDATES)
    assert report["met"] is False and report["outcome"] == "not-met"
    assert "no candidate met" in capsys.readouterr().err
    _assert_float_model(mlp_path, out, tmp_path)


def test_budget_allows_started_candidate_to_finish(mlp_path, tmp_path, monkeypatch):
    """The budget is checked before each candidate: spent during the first one,
    it stops the second and the first one's result counts."""
    now = [0.0]
    real = compress_mod._evaluate
    monkeypatch.setattr(compress_mod, "_now", lambda: now[0])

    def evaluate(cand, *args, **kwargs):
        real(cand, *args, **kwargs)
        now[0] += 11 * 60  # the first candidate "takes" 11 minutes

    monkeypatch.setattr(compress_mod, "_evaluate", evaluate)
    code, out, rep = _compress(mlp_path, tmp_path, "--budget-minutes", "10", "--objective", "size")
    report = json.loads((rep / "report.json").read_text())
    statuses = [c["status"] for c in report["candidates"]]
    assert code == 0 and statuses[0] == "ok" and "skipped" in statuses


def _assert_float_model(model: Path, out: Path, tmp_path: Path) -> None:
    simplified = tmp_path / "simplified.onnx"
    assert main(["opt", str(model), "-o", str(simplified), "-p", "simplify", "--no-cache", "-q"]) == 0
    assert out.read_bytes() == simplified.read_bytes()


def test_unmeetable_target_keeps_float_model(mlp_path, tmp_path, capsys):
    code, out, rep = _compress(mlp_path, tmp_path, "--fidelity", "max-abs<=0", candidates=["quantize-dynamic"])
    assert code == 0
    report = json.loads((rep / "report.json").read_text())
    assert report["met"] is False and report["outcome"] == "not-met"
    assert report["candidates"][0]["status"] == "ok" and report["candidates"][0]["met"] is False
    assert "no candidate met max-abs<=0" in capsys.readouterr().err
    assert report["chosen"]["pipeline"] == "simplify"
    _assert_float_model(mlp_path, out, tmp_path)


def test_interrupt_keeps_best_so_far(mlp_path, tmp_path, monkeypatch, capsys):
    real = compress_mod._evaluate

    def evaluate(cand, *args, **kwargs):
        if cand.index == 2:
            raise KeyboardInterrupt
        real(cand, *args, **kwargs)

    monkeypatch.setattr(compress_mod, "_evaluate", evaluate)
    code, out, rep = _compress(mlp_path, tmp_path, "--objective", "size")
    assert code == 130
    report = json.loads((rep / "report.json").read_text())
    assert report["interrupted"] is True
    assert [c["status"] for c in report["candidates"]] == ["ok", "skipped", "skipped"]
    assert report["chosen"]["candidate"] == MLP_CANDIDATES[0]
    assert out.exists() and not list(tmp_path.glob(".out.onnx.*"))
    assert "interrupted" in capsys.readouterr().err


def test_failed_candidate_is_recorded_not_fatal(mlp_path, tmp_path):
    code, out, rep = _compress(mlp_path, tmp_path, "--objective", "size",
                               candidates=["quantize-static{exclude-regex=\"(\"}", "quantize-dynamic"])
    report = json.loads((rep / "report.json").read_text())
    assert code == 0
    assert report["candidates"][0]["status"] == "failed" and report["candidates"][0]["error"]
    assert report["chosen"]["candidate"] == "quantize-dynamic"


def test_unchanged_candidate_is_not_measured(mlp_path, tmp_path):
    code, _, rep = _compress(mlp_path, tmp_path, "--objective", "size",
                             candidates=["quantize-dynamic", "quantize-dynamic"])
    report = json.loads((rep / "report.json").read_text())
    assert code == 0
    assert report["candidates"][1]["status"] == "unchanged" and "candidate 1" in report["candidates"][1]["error"]


@pytest.mark.parametrize("argv, message", [
    (["--fidelity", "cosine>=2"], "--fidelity 'cosine>=2': cosine threshold must be in"),
    (["--objective", "speed"], "invalid choice: 'speed'"),
    (["--candidate", "no-such-pass"], "no-such-pass"),
    (["--budget-minutes", "0"], "--budget-minutes must be > 0"),
    (["--holdout", "1"], "--holdout must be in (0, 1)"),
    (["--calib", "random:1"], "compress needs at least 2"),
    (["--calib", "missing.npz"], "--calib missing.npz: no such file"),
    (["--report", "/nonexistent/dir/rep"], "--report /nonexistent/dir/rep: parent folder"),
])
def test_bad_input_one_line(mlp_path, tmp_path, capsys, argv, message):
    base = ["compress", str(mlp_path), "-o", str(tmp_path / "o.onnx"), "--calib", "random:8"]
    code = main(base + argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("graphopt: error: ") and message in err
    assert not (tmp_path / "o.onnx").exists()


def test_missing_model_one_line(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "o.onnx"), "--calib", "random:4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.onnx: no such model file" in err


def test_default_candidates_follow_model_and_target(mlp_path, monkeypatch):
    spec = parse_fidelity("top1>=0.99")
    mlp = load(mlp_path)
    mlp_cands = default_candidates(mlp, spec, "latency", None)
    assert mlp_cands[0] == "quantize-dynamic" and 'quantize-dynamic{fidelity="top1>=0.99"}' in mlp_cands
    assert "convert-fp16" not in mlp_cands
    assert "convert-fp16" in default_candidates(mlp, spec, "latency", "cuda")
    assert "convert-fp16" in default_candidates(mlp, spec, "size", None)
    conv = load(EXAMPLE)
    conv_cands = default_candidates(conv, spec, "latency", "x86_64")
    assert conv_cands[0] == "quantize-static" and 'quantize-static{fidelity="top1>=0.99"}' in conv_cands
    if "prune-channels" in registry.passes():
        assert "prune-channels{ratio=0.1}" in conv_cands
    # a pass that is not registered: its candidates are left out, with a note
    known = {k: v for k, v in registry.passes().items() if k != "prune-channels"}
    monkeypatch.setattr(registry, "passes", lambda: known)
    notes: list[str] = []
    cands = default_candidates(conv, spec, "latency", None, notes.append)
    assert not any("prune-channels" in c for c in cands)
    assert notes and all("prune-channels" in n and "not available" in n for n in notes)


def test_choose_prefers_smaller_file_among_latency_ties(tmp_path):
    base = tmp_path / "b.onnx"
    base.write_bytes(b"x" * 1000)

    def c(i, ratio, size, met=True):
        return Candidate(i, f"p{i}", status="ok", met=met, ratio=ratio, size_bytes=size)

    chosen, outcome = choose([c(1, 0.60, 900), c(2, 0.61, 500), c(3, 0.40, 100, met=False)], "latency", base)
    assert outcome == "compressed" and chosen.index == 2
    assert choose([c(1, 0.99, 900)], "latency", base) == (None, "no-gain")
    assert choose([c(1, 0.5, 2000)], "size", base) == (None, "no-gain")
    assert choose([c(1, 0.5, 900, met=False)], "size", base) == (None, "not-met")


class _ScriptedSession:
    """Stands in for an onnxruntime session: each run is logged by name and
    advances a fake clock by the next scripted duration, so the run order and
    the statistic taken over the timings can be asserted exactly."""

    def __init__(self, name: str, durations_ms: list[float], clock: list[float], log: list[str]):
        self.name, self.durations, self.clock, self.log = name, list(durations_ms), clock, log

    def get_inputs(self) -> list:
        return []

    def get_outputs(self) -> list:
        return []

    def run(self, names, feed) -> list:
        self.log.append(self.name)
        self.clock[0] += self.durations.pop(0) / 1e3
        return []


def test_measure_latency_interleaved(monkeypatch):
    """Warm-up runs are not timed; the timed runs alternate base/candidate with
    the order flipping every round (machine noise hits both alike); the
    figures are medians (one outlier run does not move them), baseline first."""
    clock, log = [0.0], []
    monkeypatch.setattr(compress_mod, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    warmup = [1000.0, 1000.0]  # timed, they would make the medians 50 and 400
    base = _ScriptedSession("base", warmup + [1.0, 50.0, 2.0], clock, log)
    cand = _ScriptedSession("cand", warmup + [400.0, 3.0, 4.0], clock, log)
    assert measure_latency(base, cand, {}, rounds=3) == pytest.approx((2.0, 4.0))  # means: 17.7, 135.7
    assert log == ["base", "cand"] * 2 + ["base", "cand", "cand", "base", "base", "cand"]
    assert not base.durations and not cand.durations  # 2 warm-ups + 3 rounds each, no extra run


def _wide_mlp(hidden: int = 2048) -> onnx.ModelProto:
    """Same interface as _mlp (x: 1x64 -> y: 1x32) with ~180x its MACs."""
    rng = np.random.default_rng(1)
    inits = {"w1": (rng.standard_normal((64, 1024)) * 0.1).astype(F),
             "w2": (rng.standard_normal((1024, hidden)) * 0.03).astype(F),
             "w3": (rng.standard_normal((hidden, 32)) * 0.03).astype(F)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["y"])]
    return make_model(nodes, [vi("x", [1, 64])], [vi("y", [1, 32])], inits)


def test_measure_latency_ranks_a_costlier_model_slower(mlp_path):
    """Real onnxruntime timings, ordered only (the machine is shared and noisy):
    with a MAC ratio this large the medians cannot tie or swap, whichever of the
    two models is passed as the baseline."""
    small, wide = onnx.load(str(mlp_path)), _wide_mlp()
    macs = [graphopt.inspect(Model.from_proto(m))["macs"] for m in (small, wide)]
    assert macs[1] > 150 * macs[0]
    small_sess, wide_sess = session(small, threads=1), session(wide, threads=1)
    feed = {"x": np.ones((1, 64), F)}
    base_ms, cand_ms = measure_latency(small_sess, wide_sess, feed, rounds=7)
    assert 0 < base_ms < cand_ms
    base_ms, cand_ms = measure_latency(wide_sess, small_sess, feed, rounds=7)
    assert base_ms > cand_ms > 0


def test_conv_model_with_pruning_and_compile(tmp_path):
    """tiny_resnet: a structured-pruning candidate changes the per-layer table;
    --target compiles the result through the backend registry."""
    pytest.importorskip("graphopt.backends")
    cands = ["prune-channels{ratio=0.25,reconstruct=false}",
             "prune-channels{ratio=0.25,reconstruct=false},quantize-static"]
    if "prune-channels" not in registry.passes():
        pytest.skip("prune-channels is not registered")
    code, out, rep = _compress(EXAMPLE, tmp_path, "--objective", "size", "--fidelity", "cosine>=0.9",
                               "--target", "cpu", "--backend", "onnxruntime", candidates=cands)
    assert code == 0
    report = json.loads((rep / "report.json").read_text())
    assert report["chosen"]["candidate"] == cands[1]
    changed = [l for l in report["layers"] if l["channels_after"] < l["channels_before"]]
    assert changed and all(l["macs_after"] < l["macs_before"] for l in changed)
    assert report["compile"]["ok"] is True
    assert (Path(report["compile"]["artifact"]) / "manifest.json").exists()
    # the kept channels are really what the written model has
    model = load(out)
    import onnx_graphsurgeon as gs

    convs = {n.name: n for n in model.graph.nodes if n.op == "Conv"}
    for layer in changed:
        w = convs[layer["name"]].inputs[1]
        shape = w.shape if isinstance(w, gs.Constant) else w.inputs[0].inputs[0].shape
        assert shape[0] == layer["channels_after"]


@pytest.mark.slow
def test_default_search_on_conv_model(tmp_path):
    """The generated candidate list end to end (latency objective): the
    choice meets the target on the held-out samples and rebuilds byte for byte."""
    code, out, rep = _compress(EXAMPLE, tmp_path, candidates=None)
    assert code == 0
    report = json.loads((rep / "report.json").read_text())
    assert len(report["candidates"]) >= 4
    assert all(c["status"] in ("ok", "failed", "unchanged") for c in report["candidates"])
    if report["met"]:
        samples, want = _heldout_outputs(EXAMPLE, report)
        got = [run(session(onnx.load(str(out))), s) for s in samples]
        assert parse_fidelity(report["options"]["fidelity"]).holds(compare_outputs(got, want))
    rebuilt = tmp_path / "rebuilt.onnx"
    assert main(["opt", str(EXAMPLE), "-o", str(rebuilt), "--config", str(rep / "compress.toml"), "--no-cache",
                 "-q"]) == 0
    assert rebuilt.read_bytes() == out.read_bytes()


def test_samples_of_different_shapes_rebuild(tmp_path):
    """Calibration samples whose shapes differ (a dynamic sequence length) are
    kept as a folder of .npz files, which the TOML names; the rebuild matches."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 64)) * 0.3).astype(F)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                        helper.make_node("Add", ["h", "b"], ["y"], name="bias")],
                       [vi("x", [1, "T", 64])], [vi("y", [1, "T", 64])], {"w": w, "b": np.full(64, 0.1, F)})
    src = tmp_path / "seq.onnx"
    onnx.save(model, src)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        np.savez(data / f"{i:02d}.npz", x=rng.standard_normal((1, 3 + i, 64)).astype(F))
    out, rep = tmp_path / "o.onnx", tmp_path / "rep"
    assert main(["compress", str(src), "-o", str(out), "--calib", str(data), "--report", str(rep), "-q",
                 "--objective", "size", "--latency-rounds", "2", "--candidate", "quantize-static"]) == 0
    report = json.loads((rep / "report.json").read_text())
    assert report["met"] is True
    kept = rep / "calibration"
    assert kept.is_dir() and len(list(kept.glob("*.npz"))) == report["data"]["calibration"]
    rebuilt = tmp_path / "rebuilt.onnx"
    assert main(["opt", str(src), "-o", str(rebuilt), "--config", str(rep / "compress.toml"), "--no-cache", "-q"]) == 0
    assert rebuilt.read_bytes() == out.read_bytes()
