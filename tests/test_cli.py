"""The ``graphopt`` command: passes, inspect, and opt with its instruments.

Commands run in-process through ``graphopt.cli.main`` (fast); determinism is
also checked across two real processes with different hash seeds.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from graphopt.cli import main
from graphopt.pass_base import Option, Pass, PassResult

from conftest import assert_same_outputs, make_model, vi

PIPE = "infer-shapes,eliminate-dead-code"


@graphopt.register_pass("test-cli-options")
class WithOptions(Pass):
    """A pass with one option of each kind (for the listing)."""

    ratio = Option(float, 0.25, "a ratio")
    mode = Option(str, "fast", "how", choices=("fast", "slow"))
    min_count = Option(int, 3, "a count", min=0)
    flag = Option(bool, False, "a flag")

    def run(self, model, ctx):
        return PassResult(changed=False)


def conv_gemm_model() -> onnx.ModelProto:
    """x[1,3,8,8] -Conv(4x3x3x3, pad 1)-> [1,4,8,8] -Relu-> -Flatten-> [1,256] -Gemm(256x10)-> [1,10],
    plus a dead Relu branch that eliminate-dead-code removes."""
    rng = np.random.default_rng(0)
    inits = {
        "W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "B": rng.standard_normal((4,)).astype(np.float32),
        "G": rng.standard_normal((256, 10)).astype(np.float32),
        "C": rng.standard_normal((10,)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "G", "C"], ["y"], name="gemm"),
        helper.make_node("Relu", ["x"], ["dead"], name="dead_relu"),
    ]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 10])], inits)


# By hand: Conv has 1*4*8*8 = 256 outputs, each 3*3*3 = 27 MACs -> 6912;
# Gemm has 1*10 outputs, each 256 MACs -> 2560.
CONV_MACS = 1 * 4 * 8 * 8 * (3 * 3 * 3)
GEMM_MACS = 1 * 10 * 256
PARAMS = 4 * 3 * 3 * 3 + 4 + 256 * 10 + 10


@pytest.fixture
def model_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "m.onnx"
    onnx.save(conv_gemm_model(), str(path))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- passes ---------------------------------------------------------------------------
def test_passes_lists_passes_and_options(capsys):
    code, out, err = run(capsys, "passes")
    assert code == 0
    assert "Passes:" in out
    for name in ("infer-shapes", "eliminate-dead-code", "test-cli-options"):
        assert re.search(rf"^\s+{re.escape(name)}\s", out, re.M), name
    assert "ratio=float (default 0.25): a ratio" in out
    assert "mode=fast|slow (default fast): how" in out
    assert "min-count=int (default 3): a count" in out
    assert "flag=bool (default false): a flag" in out
    assert "Named pipelines:" in out and "simplify" in out


def test_passes_json(capsys):
    code, out, err = run(capsys, "passes", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"passes", "pipelines"}
    p = data["passes"]["test-cli-options"]
    assert p["summary"] == "A pass with one option of each kind (for the listing)."
    assert p["options"]["ratio"] == {"type": "float", "default": 0.25, "doc": "a ratio"}
    assert p["options"]["min-count"]["type"] == "int"
    assert p["options"]["mode"]["type"] == "fast|slow"
    assert "infer-shapes" in data["passes"] and "eliminate-dead-code" in data["passes"]
    assert "pipeline" in data["pipelines"]["simplify"]


# -- inspect --------------------------------------------------------------------------
def test_inspect_json_macs_and_params(capsys, model_path):
    code, out, err = run(capsys, "inspect", model_path, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["macs"] == CONV_MACS + GEMM_MACS == 9472
    assert data["params"] == PARAMS == 2682
    assert data["param_bytes"] == PARAMS * 4
    per_node = {n["name"]: n["macs"] for n in data["per_node"]}
    assert per_node["conv"] == CONV_MACS
    assert per_node["gemm"] == GEMM_MACS
    assert per_node["relu"] == 0
    assert data["nodes"] == 5
    assert data["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 3, 8, 8]}]
    assert [o["name"] for o in data["outputs"]] == ["y"]
    assert data["ops"]["Relu"] == 2


def test_inspect_macs_grouped_conv_transposed_gemm_and_matmul(capsys, tmp_path):
    rng = np.random.default_rng(0)
    inits = {
        "W": rng.standard_normal((8, 2, 3, 3)).astype(np.float32),  # group=2: 4 input channels
        "G": rng.standard_normal((10, 8 * 4 * 4)).astype(np.float32),  # transB: [N, K]
        "M": rng.standard_normal((10, 5)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="gconv", group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "G"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "M"], ["y"], name="matmul"),
    ]
    proto = make_model(nodes, [vi("x", [2, 4, 8, 8])], [vi("y", [2, 5])], inits)
    onnx.save(proto, str(tmp_path / "g.onnx"))
    code, out, err = run(capsys, "inspect", tmp_path / "g.onnx", "--json")
    assert code == 0, err
    per_node = {n["name"]: n["macs"] for n in json.loads(out)["per_node"]}
    # conv: output [2,8,4,4] = 256 elements, each (4/2)*3*3 = 18 MACs
    assert per_node["gconv"] == 2 * 8 * 4 * 4 * 18
    # gemm: [2,128] x [128,10] -> 20 outputs x 128
    assert per_node["gemm"] == 2 * 10 * 128
    # matmul: [2,10] x [10,5] -> 10 outputs x 10
    assert per_node["matmul"] == 2 * 5 * 10


def test_inspect_text(capsys, model_path):
    code, out, err = run(capsys, "inspect", model_path, "--per-node")
    assert code == 0, err
    assert "MACs: 9,472" in out
    assert "parameters: 2,682" in out
    assert re.search(r"conv\s+Conv\s+6,912", out)


# -- opt ------------------------------------------------------------------------------
def test_opt_writes_an_equivalent_model(capsys, model_path):
    code, out, err = run(capsys, "opt", model_path, "-o", "o.onnx", "-p", PIPE)
    assert code == 0, err
    assert re.match(r"graphopt: wrote o\.onnx \(5 -> 4 nodes, [0-9.]+ KB -> [0-9.]+ KB, [0-9.]+s\)\n$", err), err
    assert out == ""
    got = onnx.load("o.onnx")
    onnx.checker.check_model(got)
    assert "dead_relu" not in [n.name for n in got.graph.node]
    assert_same_outputs(conv_gemm_model(), got)


def test_opt_quiet(capsys, model_path):
    code, out, err = run(capsys, "opt", model_path, "-o", "o.onnx", "-p", PIPE, "-q")
    assert (code, out, err) == (0, "", "")


def test_report(capsys, model_path):
    code, out, err = run(capsys, "opt", model_path, "-o", "o.onnx", "-p", PIPE, "--report", "r.json", "-q")
    assert code == 0, err
    report = json.loads(Path("r.json").read_text())
    assert report["pipeline"] == PIPE
    assert report["output"] == "o.onnx"
    assert report["changed"] is True
    assert [p["pass"] for p in report["passes"]] == ["infer-shapes", "eliminate-dead-code"]
    for rec in report["passes"]:
        assert set(rec) >= {"pass", "text", "round", "changed", "seconds", "before", "after", "stats"}
        assert rec["seconds"] >= 0
    dce = report["passes"][1]
    assert dce["changed"] is True
    assert dce["before"]["nodes"] == 5 and dce["after"]["nodes"] == 4
    assert dce["stats"]["removed_nodes"] == 1
    before, after = report["model"]["before"], report["model"]["after"]
    for totals in (before, after):
        assert set(totals) >= {"file_bytes", "nodes", "params", "param_bytes", "macs"}
    assert before["nodes"] == 5 and after["nodes"] == 4
    assert before["macs"] == after["macs"] == CONV_MACS + GEMM_MACS
    assert before["params"] == after["params"] == PARAMS
    assert before["file_bytes"] == model_path.stat().st_size
    assert after["file_bytes"] == Path("o.onnx").stat().st_size
    assert report["seconds"] >= 0
    assert sorted(p.name for p in Path(".").iterdir()) == ["m.onnx", "o.onnx", "r.json"]


def test_report_with_fixpoint_rounds(capsys, model_path):
    code, _, err = run(capsys, "opt", model_path, "-o", "o.onnx", "-p", f"fixpoint({PIPE})", "--report", "r.json")
    assert code == 0, err
    passes = json.loads(Path("r.json").read_text())["passes"]
    assert passes[0]["round"] == 1
    assert {p["round"] for p in passes} >= {1, 2}
    assert passes[-1]["changed"] is False


def test_time_passes_table(capsys, model_path):
    code, out, err = run(capsys, "opt", model_path, "-o", "o.onnx", "-p", PIPE, "--time-passes", "-q")
    assert code == 0, err
    lines = err.splitlines()
    assert "pass execution timing report" in lines[0]
    assert re.search(r"seconds\s+share\s+runs\s+changed\s+pass", lines[1])
    body = "\n".join(lines[2:])
    for name in ("infer-shapes", "eliminate-dead-code", "total"):
        assert re.search(rf"^\s*[0-9.]+\s+[0-9.]+%\s+\d+\s+\d*\s+{re.escape(name)}$", body, re.M), (name, err)


def test_print_ir_after_all(capsys, model_path):
    code, out, err = run(capsys, "opt", model_path, "-o", "o.onnx", "-p", PIPE, "--print-ir-after", "all", "-q")
    assert code == 0, err
    headers = re.findall(r"^// ----- IR after (\S+) \(changed: (true|false)\) -----$", err, re.M)
    assert headers == [("infer-shapes", "true"), ("eliminate-dead-code", "true")]
    first, second = err.split("// ----- IR after eliminate-dead-code")
    assert "Relu(%x)" in first  # the dead branch is still there after infer-shapes
    assert "Relu(%x)" not in second
    assert "Conv(%x, @W:float32[4x3x3x3]" in second


def test_print_ir_after_one_pass(capsys, model_path):
    code, out, err = run(capsys, "opt", model_path, "-o", "o.onnx", "-p", PIPE,
                         "--print-ir-after", "eliminate-dead-code", "-q")
    assert code == 0, err
    assert re.findall(r"IR after (\S+)", err) == ["eliminate-dead-code"]


def test_dump_dir(capsys, model_path):
    code, out, err = run(capsys, "opt", model_path, "-o", "o.onnx", "-p", PIPE, "--dump-dir", "dumps", "-q")
    assert code == 0, err
    files = sorted(p.name for p in Path("dumps").iterdir())
    assert files == ["000-input.onnx", "001-infer-shapes.onnx", "002-eliminate-dead-code.onnx"]
    counts = [len(onnx.load(f"dumps/{f}").graph.node) for f in files]
    assert counts == [5, 5, 4]
    assert Path("dumps/002-eliminate-dead-code.onnx").read_bytes() == Path("o.onnx").read_bytes()
    for f in files:
        assert_same_outputs(conv_gemm_model(), onnx.load(f"dumps/{f}"))


def test_config_equals_pipeline_text(capsys, model_path):
    Path("c1.toml").write_text(
        '[[pipeline]]\npass = "infer-shapes"\n\n[[pipeline]]\npass = "eliminate-dead-code"\n'
    )
    Path("c2.toml").write_text(f'pipeline = "{PIPE}"\n')
    assert run(capsys, "opt", model_path, "-o", "p.onnx", "-p", PIPE, "-q")[0] == 0
    assert run(capsys, "opt", model_path, "-o", "c1.onnx", "--config", "c1.toml", "-q")[0] == 0
    assert run(capsys, "opt", model_path, "-o", "c2.onnx", "--config", "c2.toml", "-q")[0] == 0
    ref = Path("p.onnx").read_bytes()
    assert Path("c1.onnx").read_bytes() == ref
    assert Path("c2.onnx").read_bytes() == ref


def test_config_run_options(capsys, model_path):
    Path("c.toml").write_text(
        f'pipeline = "{PIPE}"\n[run]\ntime-passes = true\nreport = "r.json"\nverify-each = true\nseed = 3\n'
    )
    code, out, err = run(capsys, "opt", model_path, "-o", "o.onnx", "--config", "c.toml", "-q")
    assert code == 0, err
    assert "pass execution timing report" in err
    report = json.loads(Path("r.json").read_text())
    # --verify-each recorded the error of every changing pass
    assert all("verify" in p["stats"] for p in report["passes"] if p["changed"])


def test_flags_override_config(capsys, model_path):
    Path("c.toml").write_text(f'pipeline = "{PIPE}"\n[run]\nreport = "from-config.json"\n')
    code, out, err = run(capsys, "opt", model_path, "-o", "o.onnx", "--config", "c.toml", "--report", "flag.json",
                         "-q")
    assert code == 0, err
    assert Path("flag.json").exists() and not Path("from-config.json").exists()


def test_external_data_flag(capsys, model_path):
    code, out, err = run(capsys, "opt", model_path, "-o", "o.onnx", "-p", PIPE, "--external-data", "-q")
    assert code == 0, err
    assert Path("o.onnx.data").exists()
    got = onnx.load("o.onnx")
    assert_same_outputs(conv_gemm_model(), got)


def test_write_shapes_flag(capsys, model_path):
    """The output annotates only what the input did; --write-shapes writes every inferred shape."""
    for flag, want in (((), set()), (("--write-shapes",), {"c", "r", "f"})):
        code, _, err = run(capsys, "opt", model_path, "-o", "o.onnx", "-p", "simplify", "-q", "--no-cache", *flag)
        assert code == 0, err
        got = onnx.load("o.onnx")
        assert {v.name for v in got.graph.value_info} == want
        assert_same_outputs(conv_gemm_model(), got)


def test_verify_each_with_pinned_inputs(capsys, model_path):
    np.savez("in.npz", x=np.ones((1, 3, 8, 8), np.float32))
    code, out, err = run(capsys, "opt", model_path, "-o", "o.onnx", "-p", PIPE, "--verify-each",
                         "--inputs", "in.npz", "--tolerance", "0", "-q")
    assert code == 0, err


def test_output_is_deterministic_in_process(capsys, model_path):
    for name in ("a.onnx", "b.onnx"):
        assert run(capsys, "opt", model_path, "-o", name, "-p", PIPE, "-q")[0] == 0
    assert Path("a.onnx").read_bytes() == Path("b.onnx").read_bytes()


def test_output_is_deterministic_across_processes(model_path):
    exe = shutil.which("graphopt")
    cmd = [exe] if exe else [sys.executable, "-m", "graphopt.cli"]
    for name, seed in (("a.onnx", "1"), ("b.onnx", "2")):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run(cmd + ["opt", str(model_path), "-o", name, "-p", PIPE, "-q"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
    assert Path("a.onnx").read_bytes() == Path("b.onnx").read_bytes()


def test_default_pipeline(capsys, model_path):
    """The default pipeline (simplify); skipped until its passes exist."""
    from graphopt.api import DEFAULT_PIPELINE
    from graphopt.errors import UsageError
    from graphopt.pipeline import parse

    try:
        parse(DEFAULT_PIPELINE)
    except UsageError as exc:
        pytest.skip(f"default pipeline not available yet: {exc}")
    code, out, err = run(capsys, "opt", model_path, "-o", "o.onnx", "--verify-each", "-q")
    assert code == 0, err
    got = onnx.load("o.onnx")
    assert "dead_relu" not in [n.name for n in got.graph.node]
    assert_same_outputs(conv_gemm_model(), got, rel=1e-4)
    assert run(capsys, "opt", model_path, "-o", "o2.onnx", "-q")[0] == 0
    assert Path("o2.onnx").read_bytes() == Path("o.onnx").read_bytes()


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"graphopt {graphopt.__version__}"
