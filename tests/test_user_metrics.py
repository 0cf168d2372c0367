"""User metrics (graphopt.metrics): ``--metric NAME=file.py:function`` or
``NAME=module:function``, named in fidelity specs like a built-in, called once
per held-out sample as ``function(reference, candidate, inputs)`` (mean over
samples); they drive the quantization budget and compress's acceptance, and a
bad spec or a failing metric is a one-line error with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import make_model, vi
from graphopt import metrics
from graphopt.errors import UsageError
from graphopt.fidelity import compare_outputs, parse_fidelity

ROOT = Path(__file__).resolve().parents[1]

METRICS_PY = textwrap.dedent('''
    import numpy as np

    def agreement(reference, candidate, inputs):
        """1 - worst absolute difference relative to the reference's range; checks it sees the inputs."""
        assert set(inputs) == {"x"}, sorted(inputs)
        r, c = reference["y"], candidate["y"]
        return float(1.0 - np.abs(c - r).max() / (np.abs(r).max() + 1e-12))

    def broken(reference, candidate, inputs):
        raise KeyError("boxes")

    def not_finite(reference, candidate, inputs):
        return float("nan")
''')


@pytest.fixture
def metric_file(tmp_path):
    path = tmp_path / "task_metrics.py"
    path.write_text(METRICS_PY)
    yield path
    for name in ("agree", "bad", "nan"):
        metrics.unregister(name)


def _cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"w": (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32),
             "w2": (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32),
             "gw": (rng.standard_normal((8 * 4 * 4, 10)) * 0.1).astype(np.float32),
             "shape": np.array([1, -1], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c2", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "gw"], ["y"])]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 10])], inits)


def graphopt(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *argv], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def test_a_spec_names_a_user_metric_beside_built_ins(metric_file):
    metrics.register(metrics.load(f"agree={metric_file}:agreement"))
    spec = parse_fidelity("agree>=0.85,cosine>=0.5")
    assert [u.name for u in spec.user] == ["agree"] and spec.metrics == ("agree", "cosine")
    ref = [{"y": np.array([[1.0, -2.0, 4.0]])}, {"y": np.array([[2.0, 2.0, 2.0]])}]
    cand = [{"y": np.array([[1.0, -2.0, 3.0]])}, {"y": np.array([[2.0, 2.0, 2.0]])}]
    inputs = [{"x": np.zeros(1)}, {"x": np.ones(1)}]
    values = compare_outputs(cand, ref, inputs, spec.user)
    assert values["agree"] == pytest.approx((0.75 + 1.0) / 2)  # the mean over samples
    assert spec.holds(values) and not parse_fidelity("agree>=0.9").holds(values)


def test_quantization_budget_stops_at_the_user_metric_target(metric_file, tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(_cnn(), model)
    kept = {}
    for target in ("0.5", "0.97"):
        out, report = tmp_path / f"q{target}.onnx", tmp_path / f"r{target}.json"
        proc = graphopt("opt", str(model), "-o", str(out), "-p", "quantize-static", "--calib", "random:24",
                        "--metric", f"agree={metric_file}:agreement", "--fidelity", f"agree>={target}",
                        "--report", str(report))
        assert proc.returncode == 0, proc.stderr
        stats = next(p["stats"] for p in json.loads(report.read_text())["passes"] if p["pass"] == "quantize-static")
        fidelity = stats["fidelity"]
        assert fidelity["target"] == f"agree>={target}" and fidelity["met"]
        assert fidelity["heldout"]["agree"] >= float(target)
        kept[target] = len(fidelity["kept_float"])
    assert kept["0.5"] == 0 < kept["0.97"]  # the tighter task target keeps nodes in float


def test_compress_accepts_on_the_user_metric(metric_file, tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(_cnn(), model)
    proc = graphopt("compress", str(model), "-o", str(tmp_path / "c.onnx"), "--calib", "random:24",
                    "--metric", f"agree={metric_file}:agreement", "--fidelity", "agree>=0.97",
                    "--report", str(tmp_path / "rep"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["fidelity"]["target"] == "agree>=0.97" and report["fidelity"]["agree"] >= 0.97
    scored = [c for c in report["candidates"] if c["status"] == "ok"]
    assert scored and all("agree" in c["fidelity"] for c in scored)
    assert all(c["met"] == (c["fidelity"]["agree"] >= 0.97) for c in scored)  # accepted on the user metric
    assert "agree 0." in (tmp_path / "rep" / "report.html").read_text()  # the HTML's candidate table shows it
    rebuild = (tmp_path / "rep" / "compress.toml").read_text().splitlines()[0]
    assert rebuild.endswith(f"--metric agree={metric_file}:agreement")  # the config needs the metric to rebuild


@pytest.mark.parametrize("flags,message", [
    (["--metric", "nonsense"], "expected NAME=module:function"),
    (["--metric", "agree=missing_file.py:f"], "no such file"),
    (["--metric", "cosine={file}:agreement"], "'cosine' is a built-in metric"),
    (["--metric", "agree={file}:missing"], "has no function 'missing'"),
    (["--metric", "agree=no_such_module_here:f"], "cannot import module 'no_such_module_here'"),
    (["--metric", "bad={file}:broken", "--fidelity", "bad>=0.9"], "metric 'bad'"),
    (["--metric", "nan={file}:not_finite", "--fidelity", "nan>=0.9"], "returned nan"),
    (["--metric", "agree={file}:agreement", "--fidelity", "agree<=0.9"], "higher-is-better"),
    (["--fidelity", "box_f1>=0.9"], "unknown metric 'box_f1'"),
])
def test_bad_metric_specs_are_one_line_errors(metric_file, tmp_path, flags, message):
    model = tmp_path / "cnn.onnx"
    onnx.save(_cnn(), model)
    out = tmp_path / "q.onnx"
    proc = graphopt("opt", str(model), "-o", str(out), "-p", "quantize-static", "--calib", "random:16",
                    *[f.format(file=metric_file) for f in flags])
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("graphopt: error:") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_metric_that_raises_names_itself(metric_file):
    metric = metrics.load(f"bad={metric_file}:broken")
    with pytest.raises(UsageError, match=r"metric 'bad' \(.*broken\) raised KeyError: 'boxes'"):
        metric.score({"y": np.zeros(1)}, {"y": np.zeros(1)}, {})
