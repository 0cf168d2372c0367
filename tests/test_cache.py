"""The output cache of ``graphopt opt`` and the ``--quiet``/``--json`` flags.

A hit must write exactly the bytes a fresh run writes, so every hit below is
compared with a ``--no-cache`` run of the same command.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt import cache as gcache
from graphopt.cli import main
from graphopt.runtime import run, session

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny_resnet.onnx"
PIPE = "simplify"


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(gcache.ENV_OFF, raising=False)
    monkeypatch.setenv(gcache.ENV_VAR, str(tmp_path / "envcache"))
    shutil.copy(TINY, tmp_path / "m.onnx")
    return tmp_path


def opt(capsys, *argv: str) -> tuple[int, dict, str]:
    """Run ``graphopt opt ... --json``; returns (exit code, JSON summary, stderr)."""
    code = main(["opt", *argv, "--json"])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # exactly one JSON object on stdout
    return code, json.loads(lines[0]), err


def entries(root: Path) -> list[Path]:
    return sorted(p for p in (root / gcache.LAYOUT).glob("*/*") if not p.name.startswith("."))


def test_miss_then_hit_writes_the_bytes_of_a_fresh_run(capsys, work):
    code, first, _ = opt(capsys, "m.onnx", "-o", "a.onnx", "-p", PIPE, "--cache-dir", "c")
    assert (code, first["cache"], first["status"]) == (0, "miss", "ok")
    code, second, miss_err = opt(capsys, "m.onnx", "-o", "c.onnx", "-p", PIPE, "--cache-dir", "c",
                                 "--report", "r.json")
    assert code == 0 and second["cache"] == "miss"  # the first entry has no report: rerun once to store one
    os.rename("c.onnx", "b.onnx")
    code, third, err = opt(capsys, "m.onnx", "-o", "c.onnx", "-p", PIPE, "--cache-dir", "c", "--report", "r2.json")
    assert code == 0 and third["cache"] == "hit", err
    # The same line as a run (the cache status is in --json and --report).
    assert re.sub(r"[0-9.]+s\)", "", err) == re.sub(r"[0-9.]+s\)", "", miss_err)
    code, fresh, _ = opt(capsys, "m.onnx", "-o", "d.onnx", "-p", PIPE, "--no-cache")
    assert fresh["cache"] == "off"
    assert len(entries(work / "c")) == 1
    data = {n: (work / n).read_bytes() for n in ("a.onnx", "b.onnx", "c.onnx", "d.onnx")}
    assert len(set(data.values())) == 1
    assert third["size"] == fresh["size"] and third["nodes"] == fresh["nodes"]
    assert third["nodes"]["after"] < third["nodes"]["before"]
    # The report of a hit is the stored one, marked as a hit, naming this run's paths.
    miss_report, hit_report = (json.loads((work / n).read_text()) for n in ("r.json", "r2.json"))
    assert miss_report["cache"] == "miss" and hit_report["cache"] == "hit"
    assert hit_report["output"] == "c.onnx" and hit_report["passes"] == miss_report["passes"]
    assert hit_report["cached_seconds"] == miss_report["seconds"]
    # The cached model computes what the input does.
    x = {"input": np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)}
    got, want = (list(run(session(p.read_bytes()), x).values())[0] for p in (work / "c.onnx", TINY))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_every_output_changing_input_is_in_the_key(capsys, work):
    base = ["m.onnx", "-o", "o.onnx", "--cache-dir", "c"]
    variants = [
        ["-p", PIPE],
        ["-p", "simplify,eliminate-dead-code"],  # pipeline text
        ["-p", "sparsify{ratio=0.5}"],  # an option value
        ["-p", "sparsify{ratio=0.6}"],
        ["-p", "sparsify{ratio=0.5}", "--seed", "3"],
        ["-p", PIPE, "--external-data"],
        ["-p", PIPE, "--verify-each", "--tolerance", "0.01"],
        ["-p", "quantize-static", "--calib", "random:2"],
        ["-p", "quantize-static", "--calib", "random:3"],
    ]
    for v in variants:
        code, log, err = opt(capsys, *base, *v)
        assert (code, log["cache"]) == (0, "miss"), (v, err)
    assert len(entries(work / "c")) == len(variants)
    for v in variants:  # and each one is now a hit
        assert opt(capsys, *base, *v)[1]["cache"] == "hit", v
    # The same model under another name and path is the same input ...
    shutil.copy(work / "m.onnx", work / "copy.onnx")
    assert opt(capsys, "copy.onnx", "-o", "o.onnx", "--cache-dir", "c", "-p", PIPE)[1]["cache"] == "hit"
    # ... and one changed byte of it is not.
    proto = onnx.load(str(work / "m.onnx"))
    proto.doc_string = "changed"
    onnx.save(proto, str(work / "copy.onnx"))
    assert opt(capsys, "copy.onnx", "-o", "o.onnx", "--cache-dir", "c", "-p", PIPE)[1]["cache"] == "miss"


def test_key_covers_calibration_contents_and_external_data(tmp_path):
    def key(**parts) -> str:
        k = gcache.CacheKey("test")
        for name, (kind, value) in parts.items():
            getattr(k, f"add_{kind}")(name, value)
        return k.digest()

    folder = tmp_path / "calib"
    (folder / "sub").mkdir(parents=True)
    np.save(folder / "sub" / "a.npy", np.zeros(3, np.float32))
    k1 = key(calib=("calibration", str(folder)))
    np.save(folder / "sub" / "a.npy", np.ones(3, np.float32))
    assert key(calib=("calibration", str(folder))) != k1
    assert key(calib=("calibration", "random:4")) != key(calib=("calibration", "random:5"))
    # Part order does not matter; the command name does.
    a = gcache.CacheKey("x").add_value("seed", 1).add_value("shape", [1, 2]).digest()
    assert a == gcache.CacheKey("x").add_value("shape", [1, 2]).add_value("seed", 1).digest()
    assert a != gcache.CacheKey("y").add_value("shape", [1, 2]).add_value("seed", 1).digest()
    # A model's external-data file is part of it.
    proto = onnx.load(str(TINY))
    onnx.save(proto, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.bin", size_threshold=0)
    k2 = key(model=("model", tmp_path / "ext.onnx"))
    with open(tmp_path / "ext.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02\x03\x04")
    assert key(model=("model", tmp_path / "ext.onnx")) != k2
    versions = gcache.CacheKey("v").add_versions().parts["versions"]
    assert set(versions) >= {"graphopt", "onnx", "onnxruntime", "onnx_graphsurgeon", "numpy"}
    assert "absent" not in versions.values()


def test_hit_with_external_data_under_another_name(capsys, work):
    args = ["-p", PIPE, "--external-data"]
    assert opt(capsys, "m.onnx", "-o", "a.onnx", "--cache-dir", "c", *args)[1]["cache"] == "miss"
    assert opt(capsys, "m.onnx", "-o", "b.onnx", "--cache-dir", "c", *args)[1]["cache"] == "hit"
    (work / "fresh").mkdir()
    assert opt(capsys, "m.onnx", "-o", "fresh/b.onnx", "--no-cache", *args)[0] == 0
    assert (work / "b.onnx").read_bytes() == (work / "fresh" / "b.onnx").read_bytes()
    assert (work / "b.onnx.data").read_bytes() == (work / "fresh" / "b.onnx.data").read_bytes()
    onnx.checker.check_model(str(work / "b.onnx"))


def test_corrupt_or_half_written_entries_are_rebuilt(capsys, work):
    argv = ["m.onnx", "-o", "a.onnx", "--cache-dir", "c", "-p", PIPE]
    assert opt(capsys, *argv)[1]["cache"] == "miss"
    good = (work / "a.onnx").read_bytes()
    (entry,) = entries(work / "c")
    for damage in (
        lambda: (entry / gcache.MODEL_FILE).write_bytes(good[:100]),  # truncated model
        lambda: (entry / gcache.META_FILE).write_text("{not json"),
        lambda: (entry / gcache.MODEL_FILE).unlink(),
        lambda: (entry / gcache.META_FILE).write_text('{"files": 3}'),
    ):
        damage()
        (work / "a.onnx").unlink()
        code, log, err = opt(capsys, *argv)
        assert (code, log["cache"]) == (0, "miss"), err
        assert (work / "a.onnx").read_bytes() == good
        assert opt(capsys, *argv)[1]["cache"] == "hit"
        assert (work / "a.onnx").read_bytes() == good


def test_failed_store_leaves_no_entry(capsys, work, monkeypatch):
    """A crash while storing leaves only a hidden temporary folder, which is no entry."""
    real = shutil.copyfile

    def crash(src, dst, *a, **k):
        if Path(dst).parent.name.startswith(".tmp-"):
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(gcache.shutil, "copyfile", crash)
    code, log, _ = opt(capsys, "m.onnx", "-o", "a.onnx", "--cache-dir", "c", "-p", PIPE)
    assert code == 0 and (work / "a.onnx").exists()  # the output is written all the same
    assert entries(work / "c") == [] and not list((work / "c").rglob(".tmp-*"))
    monkeypatch.setattr(gcache.shutil, "copyfile", real)
    assert opt(capsys, "m.onnx", "-o", "a.onnx", "--cache-dir", "c", "-p", PIPE)[1]["cache"] == "miss"


def test_cache_location_flags_and_environment(capsys, work, monkeypatch):
    argv = ["m.onnx", "-o", "a.onnx", "-p", PIPE]
    assert opt(capsys, *argv)[1]["cache"] == "miss"
    assert len(entries(work / "envcache")) == 1  # GRAPHOPT_CACHE_DIR
    assert opt(capsys, *argv)[1]["cache"] == "hit"
    assert opt(capsys, *argv, "--no-cache")[1]["cache"] == "off"
    for diagnostic in (["--time-passes"], ["--dump-dir", "dumps"]):  # watching the passes run: no cache
        (work / "dumps").mkdir(exist_ok=True)
        assert opt(capsys, *argv, *diagnostic)[1]["cache"] == "off"
    monkeypatch.setenv(gcache.ENV_OFF, "1")
    assert opt(capsys, *argv)[1]["cache"] == "off"
    assert opt(capsys, *argv, "--cache-dir", "c")[1]["cache"] == "miss"  # the flag beats the environment
    monkeypatch.delenv(gcache.ENV_OFF)
    monkeypatch.delenv(gcache.ENV_VAR)
    monkeypatch.setenv("HOME", str(work / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert gcache.default_dir() == work / "home" / ".cache" / "graphopt"
    (work / "file").write_text("")
    code, log, err = opt(capsys, *argv, "--cache-dir", "file/sub")
    assert (code, log["status"], log["exit_code"]) == (2, "error", 2)
    assert "--cache-dir file/sub: cannot create" in log["error"] and log["error"] in err


def test_quiet_and_json(capsys, work):
    assert main(["opt", "m.onnx", "-o", "a.onnx", "-p", "simplify,quantize-static", "--calib", "random:2",
                 "--cache-dir", "c", "-q"]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("", "")
    assert main(["opt", "m.onnx", "-o", "a.onnx", "-p", "simplify,quantize-static", "--calib", "random:2",
                 "--cache-dir", "c", "-q"]) == 0  # a hit is as quiet
    assert capsys.readouterr() == ("", "")
    code, log, err = opt(capsys, "m.onnx", "-o", "b.onnx", "--no-cache", "-q")
    assert code == 0 and err == ""
    assert set(log) == {"command", "status", "exit_code", "output", "cache", "timings", "size", "nodes", "error"}
    assert log["output"] == "b.onnx" and log["size"]["after"] == (work / "b.onnx").stat().st_size
    assert log["size"]["before"] == (work / "m.onnx").stat().st_size and log["error"] is None
    assert log["timings"]["total"] >= log["timings"]["run"] > 0
    # Errors: still one JSON object on stdout, and the one-line error on stderr.
    for argv, exit_code, words in (
        (["m.onnx", "-o", "b.onnx", "-p", "no-such-pass"], 2, "unknown pass 'no-such-pass'"),
        (["missing.onnx", "-o", "b.onnx"], 3, "missing.onnx"),
        (["m.onnx", "-o", "b.onnx", "--print-ir-after", "all"], 2, "--json and --print-ir-after"),
        (["m.onnx", "--seed", "x"], 2, "--seed"),  # the command line itself does not parse
        (["m.onnx"], 2, "-o/--output"),
    ):
        code, log, err = opt(capsys, *argv, "-q")
        assert code == exit_code == log["exit_code"], (argv, err)
        assert log["status"] == "error" and words in log["error"]
        assert err.strip() == f"graphopt: error: {log['error']}"


def test_a_hit_never_overwrites_the_input(capsys, work):
    assert opt(capsys, "m.onnx", "-o", "a.onnx", "--cache-dir", "c", "-p", PIPE)[1]["cache"] == "miss"
    before = (work / "m.onnx").read_bytes()
    code, log, err = opt(capsys, "m.onnx", "-o", "m.onnx", "--cache-dir", "c", "-p", PIPE)
    assert code == 2 and log["status"] == "error" and "m.onnx" in log["error"]
    assert (work / "m.onnx").read_bytes() == before
