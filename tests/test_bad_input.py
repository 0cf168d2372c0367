"""Bad input through the CLI: every expected failure is one line, the documented
exit code, no traceback, and no output (or temporary) file left behind.

Exit codes: 2 usage or bad option, 3 unreadable or invalid model, 4 a pass or a
verification failed, 130 interrupted.  Most cases run ``graphopt.cli.main``
in-process; a few run the real console script.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.cli import main
from graphopt.pass_base import Pass

from conftest import make_model, vi

PIPE = "infer-shapes,eliminate-dead-code"


@graphopt.register_pass("test-interrupt")
class Interrupt(Pass):
    """Simulates Ctrl-C in the middle of a pass."""

    def run(self, model, ctx):
        raise KeyboardInterrupt


@graphopt.register_pass("test-pass-error")
class Refuse(Pass):
    """A pass that refuses the model with an expected error."""

    def run(self, model, ctx):
        raise graphopt.PassError("this model has no Relu I like")


# -- helpers --------------------------------------------------------------------------
def good_model() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
    return make_model(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        {"w": w},
    )


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line_error(err: str, *names: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("graphopt: error: "), line
    assert "internal error" not in line, line
    for name in names:
        assert str(name) in line, f"'{name}' not named in: {line}"
    return line


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with a good model, an output folder, and cwd set there."""
    monkeypatch.chdir(tmp_path)
    onnx.save(good_model(), str(tmp_path / "good.onnx"))
    (tmp_path / "out").mkdir()
    return tmp_path


def check_failure(capsys, work: Path, argv: list[str], code: int, *names: str) -> str:
    out_dir = work / "out"
    before_out = listing(out_dir)
    good_hash = sha(work / "good.onnx")
    got, err = run_cli(capsys, argv)
    assert got == code, f"exit {got}, expected {code}: {err}"
    line = assert_one_line_error(err, *names)
    assert listing(out_dir) == before_out, "output or temporary files left behind"
    assert sha(work / "good.onnx") == good_hash
    return line


# -- unreadable or invalid models: exit 3 --------------------------------------------
def _write_bad_models(work: Path) -> None:
    good = good_model()
    data = good.SerializeToString()
    (work / "empty.onnx").write_bytes(b"")
    (work / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (work / "random.onnx").write_bytes(np.random.default_rng(7).bytes(4096))
    # valid protobufs that are not models
    (work / "tensor.onnx").write_bytes(numpy_helper.from_array(np.ones(3, np.float32), "t").SerializeToString())
    (work / "graph.onnx").write_bytes(good.graph.SerializeToString())
    (work / "node.onnx").write_bytes(good.graph.node[0].SerializeToString())
    no_graph = onnx.ModelProto(ir_version=8, producer_name="x")
    no_graph.opset_import.add(domain="", version=17)
    (work / "nograph.onnx").write_bytes(no_graph.SerializeToString())
    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    bad.graph.node[0].domain = "no.such.domain"
    onnx.save(bad, str(work / "baddomain.onnx"))
    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    bad.graph.node[0].op_type = "NoSuchOp"
    onnx.save(bad, str(work / "badop.onnx"))


@pytest.mark.parametrize(
    "name,names",
    [
        ("missing.onnx", ["missing.onnx", "no such file"]),
        ("empty.onnx", ["empty.onnx"]),
        ("truncated.onnx", ["truncated.onnx"]),
        ("random.onnx", ["random.onnx"]),
        ("tensor.onnx", ["tensor.onnx"]),
        ("graph.onnx", ["graph.onnx"]),
        ("node.onnx", ["node.onnx"]),
        ("nograph.onnx", ["nograph.onnx"]),
        ("baddomain.onnx", ["baddomain.onnx", "no.such.domain"]),
        ("badop.onnx", ["badop.onnx", "NoSuchOp"]),
    ],
)
@pytest.mark.parametrize("command", ["opt", "inspect"])
def test_bad_model_file(capsys, work, name, names, command):
    _write_bad_models(work)
    argv = ["opt", name, "-o", "out/o.onnx", "-p", PIPE] if command == "opt" else ["inspect", name, "--json"]
    check_failure(capsys, work, argv, 3, *names)


def test_folder_instead_of_model(capsys, work):
    (work / "adir").mkdir()
    check_failure(capsys, work, ["opt", "adir", "-o", "out/o.onnx", "-p", PIPE], 3, "adir", "not a file")


def _external_model(work: Path) -> Path:
    w = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [1, 32])], [vi("y", [1, 32])],
                       {"w": w})
    src = work / "ext.onnx"
    onnx.save_model(proto, str(src), save_as_external_data=True, location="ext.bin", size_threshold=0)
    return src


def test_missing_external_data(capsys, work):
    _external_model(work)
    (work / "ext.bin").unlink()
    check_failure(capsys, work, ["opt", "ext.onnx", "-o", "out/o.onnx", "-p", PIPE], 3, "ext.onnx", "'w'", "ext.bin")


def test_escaping_external_data_path(capsys, work):
    src = _external_model(work)
    proto = onnx.load(str(src), load_external_data=False)
    for e in proto.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../ext.bin"
    onnx.save(proto, str(src))
    check_failure(capsys, work, ["opt", "ext.onnx", "-o", "out/o.onnx", "-p", PIPE], 3, "ext.onnx", "'w'", "../ext.bin")


def test_output_onto_input_external_data_is_refused(capsys, work):
    _external_model(work)
    before = sha(work / "ext.bin")
    got, err = run_cli(capsys, ["opt", "ext.onnx", "-o", "ext.bin", "-p", PIPE])
    assert got == 2
    assert_one_line_error(err, "ext.bin")
    assert sha(work / "ext.bin") == before


def test_output_over_input_is_refused(capsys, work):
    check_failure(capsys, work, ["opt", "good.onnx", "-o", "good.onnx", "-p", PIPE], 2, "good.onnx")


# -- bad pipelines, options and configs: exit 2 --------------------------------------
@pytest.mark.parametrize(
    "pipeline,names",
    [
        ("no-such-pass", ["no-such-pass"]),
        ("eliminate-dead-codee", ["eliminate-dead-codee", "eliminate-dead-code"]),  # with a suggestion
        ("eliminate-dead-code{frobnicate=1}", ["eliminate-dead-code", "frobnicate"]),
        ("fixpoint{max-iterations=abc}(eliminate-dead-code)", ["max-iterations", "abc"]),
        ("fixpoint{max-iterations=0}(eliminate-dead-code)", ["max-iterations"]),
        ("fixpoint{rounds=3}(eliminate-dead-code)", ["rounds"]),
        ("fixpoint(eliminate-dead-code", ["fixpoint(eliminate-dead-code", "')'"]),
        ("eliminate-dead-code,,infer-shapes", ["column"]),
        ("eliminate-dead-code)", ["column"]),
        ("infer-shapes(eliminate-dead-code)", ["infer-shapes"]),
        ("eliminate-dead-code{", ["column"]),
        ("", ["empty"]),
        ("   ", ["empty"]),
    ],
)
def test_bad_pipeline(capsys, work, pipeline, names):
    check_failure(capsys, work, ["opt", "good.onnx", "-o", "out/o.onnx", "-p", pipeline], 2, *names)


@pytest.mark.parametrize(
    "argv,names",
    [
        (["--frobnicate"], ["--frobnicate"]),
        (["--seed", "abc"], ["--seed"]),
        (["--tolerance", "lots"], ["--tolerance"]),
        (["--tolerance", "-1"], ["--tolerance"]),
        (["--tolerance", "nan"], ["--tolerance"]),
        (["--input-shape", "x=2xa"], ["--input-shape", "x=2xa"]),
        (["--input-shape", "x"], ["--input-shape"]),
        (["--input-shape", "=2x3"], ["--input-shape"]),
        (["--input-shape", "x=2x-3"], ["--input-shape"]),
        (["--input-shape", "nosuch=2x3"], ["--input-shape", "nosuch"]),
        (["--inputs", "missing.npz"], ["--inputs", "missing.npz"]),
        (["--inputs", "good.onnx"], ["--inputs", "good.onnx"]),  # not an npz
    ],
)
def test_bad_option(capsys, work, argv, names):
    check_failure(capsys, work, ["opt", "good.onnx", "-o", "out/o.onnx", "-p", PIPE, *argv], 2, *names)


def test_inputs_with_wrong_name(capsys, work):
    np.savez(work / "wrong.npz", not_x=np.zeros((2, 3), np.float32))
    argv = ["opt", "good.onnx", "-o", "out/o.onnx", "-p", PIPE, "--verify-each", "--inputs", "wrong.npz"]
    check_failure(capsys, work, argv, 2, "--inputs", "not_x")
    np.savez(work / "partial.npz", x=np.zeros((2, 3), np.float32), extra=np.zeros(1))
    argv[-1] = "partial.npz"
    check_failure(capsys, work, argv, 2, "--inputs", "extra")


def test_inputs_with_right_name_work(capsys, work):
    np.savez(work / "ok.npz", x=np.ones((2, 3), np.float32))
    argv = ["opt", "good.onnx", "-o", "out/o.onnx", "-p", PIPE, "--verify-each", "--inputs", "ok.npz", "-q"]
    assert run_cli(capsys, argv)[0] == 0
    assert listing(work / "out") == ["o.onnx"]


@pytest.mark.parametrize(
    "argv,names",
    [
        ([], ["command"]),
        (["frobnicate"], ["frobnicate"]),
        (["opt", "good.onnx"], ["-o"]),
        (["opt"], ["input"]),
        (["inspect"], ["model"]),
        (["passes", "--yaml"], ["--yaml"]),
    ],
)
def test_bad_command_line(capsys, work, argv, names):
    check_failure(capsys, work, argv, 2, *names)


@pytest.mark.parametrize(
    "text,names",
    [
        ("[[pipeline]\npass = 'x'\n", ["cfg.toml", "TOML"]),
        ("pipeline = \"eliminate-dead-code\"\n[runn]\nseed = 1\n", ["cfg.toml", "runn"]),
        ("[run]\nseeed = 1\n", ["cfg.toml", "seeed"]),
        ("[run]\nseed = 'abc'\n", ["cfg.toml", "seed"]),
        ("[run]\nverify-each = 3\n", ["cfg.toml", "verify-each"]),
        ("[[pipeline]]\npass = 'no-such-pass'\n", ["no-such-pass"]),
        ("[[pipeline]]\npass = 'eliminate-dead-code'\nfoo = 1\n", ["eliminate-dead-code", "foo"]),
        ("[[pipeline]]\nnot-a-pass = 1\n", ["cfg.toml"]),
        ("pipeline = 3\n", ["cfg.toml", "pipeline"]),
        ("pipeline = 'fixpoint(eliminate-dead-code'\n", ["fixpoint(eliminate-dead-code"]),
        ("\xff\xfe garbage", ["cfg.toml"]),
    ],
)
def test_bad_config(capsys, work, text, names):
    (work / "cfg.toml").write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    check_failure(capsys, work, ["opt", "good.onnx", "-o", "out/o.onnx", "--config", "cfg.toml"], 2, *names)


def test_missing_config(capsys, work):
    check_failure(capsys, work, ["opt", "good.onnx", "-o", "out/o.onnx", "--config", "nope.toml"], 2, "nope.toml")


def test_config_and_pipeline_both(capsys, work):
    (work / "cfg.toml").write_text("pipeline = 'eliminate-dead-code'\n")
    argv = ["opt", "good.onnx", "-o", "out/o.onnx", "--config", "cfg.toml", "-p", PIPE]
    check_failure(capsys, work, argv, 2, "--config")


def test_missing_output_folder(capsys, work):
    check_failure(capsys, work, ["opt", "good.onnx", "-o", "nope/o.onnx", "-p", PIPE], 2, "nope")
    assert not (work / "nope").exists()


def test_output_is_a_folder(capsys, work):
    check_failure(capsys, work, ["opt", "good.onnx", "-o", "out", "-p", PIPE], 2, "out", "folder")


def test_report_in_missing_folder(capsys, work):
    argv = ["opt", "good.onnx", "-o", "out/o.onnx", "-p", PIPE, "--report", "nope/r.json"]
    check_failure(capsys, work, argv, 2, "--report", "nope")


def test_bad_model_checked_after_options(capsys, work):
    """A bad option is reported (exit 2) before the model is even read."""
    check_failure(capsys, work, ["opt", "missing.onnx", "-o", "out/o.onnx", "-p", "no-such-pass"], 2, "no-such-pass")


# -- pass failures: exit 4 ------------------------------------------------------------
def test_pass_error(capsys, work):
    check_failure(capsys, work, ["opt", "good.onnx", "-o", "out/o.onnx", "-p", "test-pass-error"], 4,
                  "test-pass-error", "no Relu I like")


def test_verification_failure(capsys, work):
    argv = ["opt", "good.onnx", "-o", "out/o.onnx", "-p", "test-negate", "--verify-each"]
    check_failure(capsys, work, argv, 4, "test-negate")


def test_no_output_written_on_late_failure(capsys, work):
    """A failure after some passes ran (and changed the model) leaves nothing."""
    argv = ["opt", "good.onnx", "-o", "out/o.onnx", "-p", "infer-shapes,test-negate,test-pass-error"]
    check_failure(capsys, work, argv, 4, "test-pass-error")


# -- interruption: exit 130 -----------------------------------------------------------
def test_keyboard_interrupt_during_pass(capsys, work):
    argv = ["opt", "good.onnx", "-o", "out/o.onnx", "-p", "infer-shapes,test-interrupt"]
    line = check_failure(capsys, work, argv, 130)
    assert "interrupted" in line


def test_keyboard_interrupt_during_save_leaves_no_temp_files(capsys, work, monkeypatch):
    import graphopt.files as files

    real_replace = os.replace

    def interrupted_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted_replace)
    argv = ["opt", "good.onnx", "-o", "out/o.onnx", "-p", PIPE]
    check_failure(capsys, work, argv, 130)
    monkeypatch.setattr(files.os, "replace", real_replace)
    # and with external data: both temp files go
    argv = ["opt", "good.onnx", "-o", "out/o.onnx", "-p", PIPE, "--external-data"]
    monkeypatch.setattr(files.os, "replace", interrupted_replace)
    check_failure(capsys, work, argv, 130)


def test_existing_output_kept_on_failure(capsys, work):
    """A failing run does not truncate or delete an output file from an earlier run."""
    (work / "out" / "o.onnx").write_bytes(b"old")
    check_failure(capsys, work, ["opt", "good.onnx", "-o", "out/o.onnx", "-p", "test-pass-error"], 4)
    assert (work / "out" / "o.onnx").read_bytes() == b"old"


# -- the real console script ---------------------------------------------------------
def _console_script() -> list[str]:
    exe = shutil.which("graphopt")
    return [exe] if exe else [sys.executable, "-m", "graphopt.cli"]


def test_console_script_bad_model(work):
    (work / "random.onnx").write_bytes(np.random.default_rng(1).bytes(1000))
    proc = subprocess.run(
        _console_script() + ["opt", "random.onnx", "-o", "out/o.onnx", "-p", PIPE],
        capture_output=True, text=True, cwd=work, timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert_one_line_error(proc.stderr, "random.onnx")
    assert proc.stdout == ""
    assert listing(work / "out") == []


def test_console_script_bad_option(work):
    proc = subprocess.run(
        _console_script()
        + ["opt", "good.onnx", "-o", "out/o.onnx", "-p", "fixpoint{max-iterations=abc}(infer-shapes)"],
        capture_output=True, text=True, cwd=work, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, "max-iterations")
    assert listing(work / "out") == []


def test_console_script_sigint(work):
    """A real Ctrl-C (SIGINT) while a pass runs: exit 130, one line, no output."""
    script = textwrap.dedent(
        """
        import signal, sys, time
        from pathlib import Path
        import graphopt
        from graphopt.cli import main

        # As in a terminal: a test run started in the background inherits an
        # ignored SIGINT, and Python then never raises KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.default_int_handler)

        @graphopt.register_pass("test-sleep")
        class Sleep(graphopt.Pass):
            '''Sleeps, so the test can interrupt it.'''
            def run(self, model, ctx):
                Path("started").write_text("1")
                time.sleep(60)
                return graphopt.PassResult(changed=False)

        sys.exit(main(sys.argv[1:]))
        """
    )
    (work / "runner.py").write_text(script)
    proc = subprocess.Popen(
        [sys.executable, "runner.py", "opt", "good.onnx", "-o", "out/o.onnx", "-p", "infer-shapes,test-sleep"],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (work / "started").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "pass never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert_one_line_error(err, "interrupted")
    assert listing(work / "out") == []


def test_console_script_onnxruntime_failure_is_one_line(work):
    """onnxruntime failing under --verify-each: still exactly one line on stderr."""
    proto = make_model(
        [helper.make_node("Reshape", ["x", "s"], ["y"])],
        [vi("x", [2, 3]), vi("s", [2], TensorProto.INT64)],
        [vi("y", [None, None])],
    )
    onnx.save(proto, str(work / "reshape.onnx"))  # random shape values cannot fit 2x3
    proc = subprocess.run(
        _console_script() + ["opt", "reshape.onnx", "-o", "out/o.onnx", "-p", PIPE, "--verify-each"],
        capture_output=True, text=True, cwd=work, timeout=120,
    )
    assert proc.returncode == 3, proc.stderr  # the input model itself cannot run
    assert listing(work / "out") == []
    assert_one_line_error(proc.stderr, "onnxruntime")


def test_unwritable_output_folder(capsys, work, monkeypatch):
    """An OSError while writing (permission denied, disk full) is one line, exit 2, no files."""
    import graphopt.files as files

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    real_write = files.os.replace
    monkeypatch.setattr(files.os, "replace", no_space)
    check_failure(capsys, work, ["opt", "good.onnx", "-o", "out/o.onnx", "-p", PIPE], 2, "out/o.onnx", "No space")
    monkeypatch.setattr(files.os, "replace", real_write)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", denied)
    check_failure(capsys, work, ["opt", "good.onnx", "-o", "out/o.onnx", "-p", PIPE], 2, "out/o.onnx",
                  "Permission denied")


def test_unreadable_model_file(capsys, work, monkeypatch):
    real_open = open

    def denied_open(file, *args, **kwargs):
        if str(file).endswith("good.onnx"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied_open)
    check_failure(capsys, work, ["opt", "good.onnx", "-o", "out/o.onnx", "-p", PIPE], 3, "good.onnx")
