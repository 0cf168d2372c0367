"""``graphopt compile`` and ``graphopt run`` end to end (in-process): outputs
against onnxruntime, timings, and one-line errors with their exit codes that
leave no partial output behind."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt import runtime
from graphopt.cli import main
from graphopt.errors import ExitCode

from conftest import make_model, vi

pytest.importorskip("tvm")


def small_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    inits = {"W": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
             "G": rng.standard_normal((4 * 6 * 6, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["img", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "G"], ["logits"], name="fc")]
    return make_model(nodes, [vi("img", ["B", 2, 6, 6])], [vi("logits", ["B", 3])], inits)


@pytest.fixture
def files(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), model)
    inputs = tmp_path / "in.npz"
    np.savez(inputs, img=np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32))
    return model, inputs


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), err
    return lines[0]


def test_compile_and_run_tvm_matches_onnxruntime(files, tmp_path, capsys):
    model, inputs = files
    art = tmp_path / "art"
    assert main(["compile", str(model), "--target", "x86_64", "-o", str(art), "--input-shape", "img=1x2x6x6"]) == 0
    assert f"wrote {art}" in capsys.readouterr().err
    assert json.loads((art / "manifest.json").read_text())["backend"] == "tvm"

    assert main(["run", str(art), "--inputs", str(inputs), "--outputs", str(tmp_path / "tvm.npz"),
                 "--repeat", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("median ") and "over 3 runs" in out.out
    assert main(["run", str(model), "--inputs", str(inputs), "--outputs", str(tmp_path / "ort.npz"), "-q"]) == 0
    got, want = np.load(tmp_path / "tvm.npz"), np.load(tmp_path / "ort.npz")
    assert list(got.files) == ["logits"]
    assert runtime.relative_error(got["logits"], want["logits"]) <= 1e-5
    feed = {"img": np.load(inputs)["img"]}
    reference = runtime.run(runtime.session(small_cnn()), feed)["logits"]
    assert runtime.relative_error(want["logits"], reference) <= 1e-6


def test_compile_onnxruntime_backend(files, tmp_path):
    model, inputs = files
    art = tmp_path / "ort"
    assert main(["compile", str(model), "--backend", "onnxruntime", "--target", "cpu", "-o", str(art), "-q"]) == 0
    assert main(["run", str(art), "--inputs", str(inputs), "--outputs", str(tmp_path / "o.npz"), "-q"]) == 0
    feed = {"img": np.load(inputs)["img"]}
    np.testing.assert_array_equal(np.load(tmp_path / "o.npz")["logits"],
                                  runtime.run(runtime.session(small_cnn()), feed)["logits"])


def test_compile_armv7_from_the_cli(files, tmp_path, capsys):
    """Cross-compiled through the CLI; a machine without arm-linux-gnueabihf-gcc
    links with zig (the test extra installs ziglang)."""
    model, _ = files
    art = tmp_path / "armv7"
    assert main(["compile", str(model), "--target", "armv7", "-o", str(art), "--input-shape", "img=1x2x6x6"]) == 0
    assert f"wrote {art}" in capsys.readouterr().err
    lib = (art / "model.so").read_bytes()
    assert lib[:5] == b"\x7fELF\x01" and int.from_bytes(lib[18:20], "little") == 40  # 32-bit, EM_ARM
    assert int.from_bytes(lib[0x24:0x28], "little") & 0x400  # EF_ARM_ABI_FLOAT_HARD, as mfloat-abi=hard asks
    cc = json.loads((art / "manifest.json").read_text())["target"]["cc"]
    assert cc in ("arm-linux-gnueabihf-gcc", "zig cc -target arm-linux-gnueabihf")


@pytest.mark.parametrize("args, code, message", [
    (["--target", "nosuch"], ExitCode.USAGE, "--target 'nosuch': unknown target"),
    (["--target", "x86_64", "--backend", "nosuch"], ExitCode.USAGE, "--backend 'nosuch': unknown backend"),
    (["--target", "x86_64", "--input-shape", "img=1x2xA"], ExitCode.USAGE, "--input-shape 'img=1x2xA'"),
    (["--target", "x86_64"], ExitCode.USAGE, "input 'img' has a dynamic shape"),
    (["--target", "x86_64", "--rpc", "nohostport"], ExitCode.USAGE, "--rpc 'nohostport': expected HOST:PORT:KEY"),
])
def test_compile_errors(files, tmp_path, capsys, args, code, message):
    model, _ = files
    assert main(["compile", str(model), "-o", str(tmp_path / "out"), *args]) == code
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_compile_bad_model_and_unsupported_op(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert main(["compile", str(bad), "--target", "x86_64", "-o", str(tmp_path / "out")]) == ExitCode.BAD_MODEL
    assert "bad.onnx" in one_error_line(capsys)

    nodes = [helper.make_node("Celu", ["x"], ["y"], name="celu0")]
    onnx.save(make_model(nodes, [vi("x", [2])], [vi("y", [2])]), tmp_path / "celu.onnx")
    assert main(["compile", str(tmp_path / "celu.onnx"), "--target", "x86_64",
                 "-o", str(tmp_path / "out")]) == ExitCode.PASS_FAILED
    assert "node 'celu0' (Celu): op not supported" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "celu.onnx"]


def test_run_errors(files, tmp_path, capsys):
    model, inputs = files
    outputs = tmp_path / "o.npz"
    cases = [
        (["--inputs", str(tmp_path / "missing.npz")], ExitCode.USAGE, "missing.npz: no such file"),
        (["--inputs", str(model)], ExitCode.USAGE, "not a readable .npz"),
    ]
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((1, 2, 6, 6), np.float32))
    cases.append((["--inputs", str(wrong)], ExitCode.USAGE, "'image' is not an input of the model (inputs: img)"))
    f64 = tmp_path / "f64.npz"
    np.savez(f64, img=np.zeros((1, 2, 6, 6)))
    cases.append((["--inputs", str(f64)], ExitCode.USAGE, "input 'img' has dtype float64, the model expects float32"))
    cases.append((["--inputs", str(inputs), "--repeat", "-1"], ExitCode.USAGE, "--repeat must be >= 0"))
    for args, code, message in cases:
        assert main(["run", str(model), *args, "--outputs", str(outputs)]) == code, args
        assert message in one_error_line(capsys)
        assert not outputs.exists()

    assert main(["run", str(tmp_path), "--inputs", str(inputs)]) == ExitCode.BAD_MODEL
    assert "not a graphopt artifact" in one_error_line(capsys)
    assert main(["run", str(tmp_path / "nope"), "--inputs", str(inputs)]) == ExitCode.BAD_MODEL
    assert "no such file or artifact folder" in one_error_line(capsys)
