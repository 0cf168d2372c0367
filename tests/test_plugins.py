"""Plug-ins found through entry points: tests/plugin_sample is installed into a
temporary folder and graphopt runs in a subprocess with it on PYTHONPATH, the
way a user's environment would see an installed plug-in package."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import make_model, vi

SAMPLE = Path(__file__).resolve().parent / "plugin_sample"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    if importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None:
        pytest.skip("pip and setuptools are needed to install the sample plug-in")
    tmp = tmp_path_factory.mktemp("plugin")
    src, site = tmp / "src", tmp / "site"
    shutil.copytree(SAMPLE, src)  # pip builds in the source folder; keep the tree clean
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--no-index", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), GRAPHOPT_NO_CACHE="1")
    return env


def graphopt(env, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *argv], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def documented_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "b"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])],
                       {"b": np.arange(3, dtype=np.float32)}, doc_string="how this model was trained")
    model.graph.doc_string = "the graph"
    helper.set_model_props(model, {"author": "someone", "license": "none"})
    return model


def test_plugin_pass_is_listed_and_runs_in_a_pipeline(plugin_env, tmp_path):
    listing = graphopt(plugin_env, "passes")
    assert listing.returncode == 0 and listing.stderr == "", listing.stderr
    assert "strip-docs" in listing.stdout and "metadata=bool (default false)" in listing.stdout
    info = json.loads(graphopt(plugin_env, "passes", "--json").stdout)["passes"]["strip-docs"]
    assert info["module"] == "graphopt_plugin_sample"

    onnx.save(documented_model(), str(tmp_path / "m.onnx"))
    for options, keeps_metadata in (("", True), ("{metadata=true}", False)):
        proc = graphopt(plugin_env, "opt", "m.onnx", "-o", "o.onnx", "-p", f"strip-docs{options},simplify",
                        "--report", "r.json", "--verify-each", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        before, after = onnx.load(str(tmp_path / "m.onnx")), onnx.load(str(tmp_path / "o.onnx"))
        assert before.doc_string and before.graph.doc_string
        assert after.doc_string == "" and after.graph.doc_string == ""
        assert bool(after.metadata_props) is keeps_metadata
        record = json.loads((tmp_path / "r.json").read_text())["passes"][0]
        assert record["pass"].startswith("strip-docs") and record["changed"]
        assert [op.op_type for op in after.graph.node] == [op.op_type for op in before.graph.node]
        x = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
        from graphopt.runtime import run, session

        got, want = (run(session(m.SerializeToString()), x)["y"] for m in (after, before))
        np.testing.assert_array_equal(got, want)


def test_plugin_backend_compiles_and_runs(plugin_env, tmp_path):
    onnx.save(documented_model(), str(tmp_path / "m.onnx"))
    unknown = graphopt(plugin_env, "compile", "m.onnx", "--backend", "nope", "-t", "cpu", "-o", "art", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "ort-pinned" in unknown.stderr  # listed among the known backends
    proc = graphopt(plugin_env, "compile", "m.onnx", "--backend", "ort-pinned", "-t", "cpu", "-o", "art",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["backend"] == "ort-pinned"
    assert manifest["session"]["intra_op_num_threads"] == 1
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    proc = graphopt(plugin_env, "run", "art", "--inputs", "in.npz", "--outputs", "out.npz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["y"], np.maximum(x, 0) + np.arange(3, dtype=np.float32), rtol=1e-6)
    bad_target = graphopt(plugin_env, "compile", "m.onnx", "--backend", "ort-pinned", "-t", "cuda", "-o", "a2",
                          cwd=tmp_path)
    assert bad_target.returncode == 2 and "known: cpu" in bad_target.stderr


def test_without_the_plugin_the_pass_is_unknown(plugin_env, tmp_path):
    env = dict(plugin_env, PYTHONPATH=str(ROOT))
    onnx.save(documented_model(), str(tmp_path / "m.onnx"))
    proc = graphopt(env, "opt", "m.onnx", "-o", "o.onnx", "-p", "strip-docs", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown pass 'strip-docs'" in proc.stderr


def test_plugin_metric_is_named_in_a_fidelity_spec(plugin_env, tmp_path):
    """An installed package's ``graphopt.metrics`` entry point is a metric a
    fidelity spec names without --metric."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("MatMul", ["m", "w2"], ["y"])]
    model = make_model(nodes, [vi("x", [4, 16])], [vi("y", [4, 10])],
                       {"w": rng.standard_normal((16, 16)).astype(np.float32),
                        "w2": rng.standard_normal((16, 10)).astype(np.float32)})
    onnx.save(model, tmp_path / "mm.onnx")
    proc = graphopt(plugin_env, "opt", str(tmp_path / "mm.onnx"), "-o", str(tmp_path / "q.onnx"), "-p",
                    "quantize-static", "--calib", "random:16", "--fidelity", "top1_agree>=0.5",
                    "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    passes = json.loads((tmp_path / "r.json").read_text())["passes"]
    fidelity = next(p["stats"]["fidelity"] for p in passes if p["pass"] == "quantize-static")
    assert fidelity["target"] == "top1_agree>=0.5" and fidelity["heldout"]["top1_agree"] >= 0.5
