"""The template search (``--tune-minutes``): every configuration it may pick
computes the default's numbers, winners are recorded and reused, bad
databases and targets are one-line errors, Ctrl-C keeps what was measured."""
from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import parser

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from graphopt.backends.tvm import schedule  # noqa: E402
from graphopt.backends.tvm.cpu import search  # noqa: E402
from graphopt.backends.tvm.cpu.templates import default_config, kernel_key  # noqa: E402
from graphopt.backends.tvm.targets import host_llvm  # noqa: E402
from graphopt.errors import UsageError  # noqa: E402

F = np.float32


def _model() -> onnx.ModelProto:
    """A strided 3x3 convolution with odd channels, a 1x1 with bias and
    HardSwish, and a projection matmul: two templates, three kernels."""
    rng = np.random.default_rng(0)
    model = parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 5, 17, 19] x) => (float[1, 24, 64] y) {
            c = Conv <pads = [1, 0, 2, 1], strides = [2, 2]> (x, w0)
            r = Relu (c)
            d = Conv (r, w1, b1)
            h = HardSwish (d)
            shape = Constant <value = int64[3] {1, 24, 81}> ()
            f = Reshape (h, shape)
            y = MatMul (f, w2)
        }""")
    weights = {"w0": (16, 5, 3, 3), "w1": (24, 16, 1, 1), "b1": (24,), "w2": (81, 64)}
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(F), name) for name, s in weights.items())
    return model


def _kernels(model: onnx.ModelProto) -> tuple[tvm.IRModule, tvm.target.Target]:
    target = schedule._normalized_target(tvm.target.Target(host_llvm()))
    mod = schedule.bind_params(from_onnx(model, shape_dict={"x": [1, 5, 17, 19]}))
    return schedule.lower_to_kernels(mod, target), target


def _run(ex, x: np.ndarray) -> np.ndarray:
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def _onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_the_search_finds_the_template_kernels_most_expensive_first():
    mod, target = _kernels(_model())
    kernels = search.tunable_kernels(mod, target)
    rules = [type(k.rule).__name__ for k in kernels]
    assert sorted(rules) == ["BlockedConv2D", "BlockedConv2D", "Matmul"]
    costs = [k.cost for k in kernels]
    assert costs == sorted(costs, reverse=True) and costs[0] > 1
    for k in kernels:
        assert set(k.knobs) >= {"columns", "parallel"} and all(k.knobs.values())


def test_every_knob_value_computes_the_defaults_numbers():
    """What the search may choose is safe: one knob away from the default,
    every value of every knob, on each kernel, matches the default exactly
    enough (the search checks this too, but a wrong template must fail here)."""
    mod, target = _kernels(_model())
    device = search.LocalDevice()
    checked = 0
    for kernel in search.tunable_kernels(mod, target):
        inputs = search._arguments(kernel.func, seed=1)
        default = default_config(kernel.knobs)
        reference = search.measure(device, kernel.rule.schedule(kernel.func, target, default).mod["main"], target,
                                   inputs)
        for knob, values in kernel.knobs.items():
            for value in values[1:]:
                sch = kernel.rule.schedule(kernel.func, target, {**default, knob: value})
                got = search.measure(device, sch.mod["main"], target, inputs)
                assert search.same_numbers(got.outputs, reference.outputs), (kernel.name, knob, value)
                checked += 1
    assert checked >= 8


def test_winners_are_recorded_applied_and_reused(tmp_path, capsys):
    model = _model()
    x = np.random.default_rng(2).standard_normal((1, 5, 17, 19)).astype(F)
    db = tmp_path / "db"
    ex = schedule.build(from_onnx(model, shape_dict={"x": list(x.shape)}), tvm.target.Target(host_llvm()),
                        tune_minutes=0.2, tune_db=db)
    np.testing.assert_allclose(_run(ex, x), _onnxruntime(model, x), rtol=1e-4, atol=1e-4)
    summary = schedule.last_summary()["template_search"]
    assert summary["kernels"] == 3 and summary["searched"] == 3 and summary["measured"] >= 3
    data = json.loads((db / search.DB_FILE).read_text())
    (records,) = data["targets"].values()
    assert len(records) == 3
    for rec in records.values():
        assert rec["secs"] > 0 and rec["secs"] <= rec["default_secs"] and rec["measured"] >= 1
    assert "template search over 3 of 3 kernels" in capsys.readouterr().err

    ex2 = schedule.build(from_onnx(model, shape_dict={"x": list(x.shape)}), tvm.target.Target(host_llvm()),
                         tune_minutes=0.2, tune_db=db)
    assert schedule.last_summary()["template_search"]["from_database"] == 3
    assert schedule.last_summary()["template_search"]["measured"] == 0
    assert "already in the tuning database" in capsys.readouterr().err
    np.testing.assert_allclose(_run(ex2, x), _onnxruntime(model, x), rtol=1e-4, atol=1e-4)


def test_a_recorded_choice_changes_the_schedule_and_a_stale_one_is_ignored():
    mod, target = _kernels(_model())
    kernel = next(k for k in search.tunable_kernels(mod, target) if type(k.rule).__name__ == "BlockedConv2D")
    default = default_config(kernel.knobs)
    other = {**default, "columns": kernel.knobs["columns"][1]}
    rule = type(kernel.rule)({kernel_key(kernel.func): other})
    chosen = rule.apply(kernel.func, target, False).mod["main"].script()
    plain = type(kernel.rule)().apply(kernel.func, target, False).mod["main"].script()
    assert chosen != plain
    stale = type(kernel.rule)({kernel_key(kernel.func): {**default, "columns": 999}})
    assert stale.apply(kernel.func, target, False).mod["main"].script() == plain
    assert stale.configured(kernel.func, target) == (default, default)


def test_the_key_is_the_kernels_structure_not_its_name():
    mod, _ = _kernels(_model())
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    keys = [kernel_key(f) for f in funcs]
    assert len(set(keys)) == len(keys)
    assert kernel_key(funcs[0].with_attr("global_symbol", "renamed")) == keys[0]


def test_measuring_through_an_rpc_session():
    """The remote path: the kernel is exported as a tar, uploaded, loaded and
    timed through an RPC session (a local one here: no tracker needed)."""
    mod, target = _kernels(_model())
    kernel = search.tunable_kernels(mod, target)[0]
    device = search.RemoteDevice(tvm.rpc.LocalSession())
    inputs = search._arguments(kernel.func, seed=0)
    sch = kernel.rule.schedule(kernel.func, target, default_config(kernel.knobs))
    remote = search.measure(device, sch.mod["main"], target, inputs)
    local = search.measure(search.LocalDevice(), sch.mod["main"], target, inputs)
    device.close()
    assert remote.secs > 0 and search.same_numbers(remote.outputs, local.outputs)


def test_ctrl_c_keeps_the_kernels_measured_so_far(tmp_path, monkeypatch):
    mod, target = _kernels(_model())
    calls = itertools.count()
    real = search.measure

    def interrupted(*args, **kwargs):
        if next(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "measure", interrupted)
    database = search.TemplateDatabase.open(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        search.search(mod, target, 5.0, database, progress=False)
    saved = search.TemplateDatabase.open(tmp_path).records
    (records,) = saved.values()
    assert records and any(not r["complete"] for r in records.values())


def test_corrupt_database_is_a_one_line_usage_error(tmp_path):
    (tmp_path / search.DB_FILE).write_text("{not json")
    with pytest.raises(UsageError, match=f"tune database .*{search.DB_FILE}"):
        search.TemplateDatabase.open(tmp_path)


def test_a_target_this_machine_cannot_run_needs_rpc():
    mod, _ = _kernels(_model())
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 2})
    with pytest.raises(UsageError, match="--tune-minutes measures on this machine.*aarch64.*--rpc"):
        search.search(mod, arm, 1.0, search.TemplateDatabase(), progress=False)


def test_gpu_targets_are_tuned_with_trials_not_templates():
    mod, _ = _kernels(_model())
    with pytest.raises(UsageError, match="--tune-trials"):
        search.search(mod, tvm.target.Target({"kind": "cuda", "arch": "sm_80"}), 1.0, search.TemplateDatabase(),
                      progress=False)


def test_compile_tune_minutes_from_the_command_line(tmp_path):
    """As a user runs it: the winners land in --tune-db, the manifest says
    what was searched, the artifact matches onnxruntime."""
    from graphopt.backends import load_runner
    from graphopt.cli import main

    model = _model()
    onnx.save(model, tmp_path / "m.onnx")
    db, art = tmp_path / "db", tmp_path / "art"
    assert main(["compile", str(tmp_path / "m.onnx"), "--target", "x86_64", "-o", str(art),
                 "--tune-minutes", "0.1", "--tune-db", str(db), "-q"]) == 0
    tuning = json.loads((art / "manifest.json").read_text())["tuning"]
    assert tuning["minutes"] == 0.1 and tuning["template_search"]["kernels"] == 3
    assert (db / search.DB_FILE).is_file()
    x = np.random.default_rng(3).standard_normal((1, 5, 17, 19)).astype(F)
    np.testing.assert_allclose(load_runner(art)({"x": x})["y"], _onnxruntime(model, x), rtol=1e-4, atol=1e-4)
    assert main(["compile", str(tmp_path / "m.onnx"), "--target", "x86_64", "-o", str(tmp_path / "bad"),
                 "--tune-minutes", "-2", "-q"]) == 2
    assert not (tmp_path / "bad").exists()
