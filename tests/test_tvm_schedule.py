"""graphopt.backends.tvm.schedule: builds run and match onnxruntime; RPC addresses fail in one line."""
from __future__ import annotations

import json
import socket

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from graphopt.backends.tvm import schedule  # noqa: E402
from graphopt.errors import UsageError  # noqa: E402

HOST = tvm.target.Target({"kind": "llvm"})


def _conv_model(rng: np.random.Generator) -> onnx.ModelProto:
    w = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal((8,)).astype(np.float32), "B")
    fc = numpy_helper.from_array(rng.standard_normal((8 * 6 * 6, 10)).astype(np.float32), "FC")
    shape = numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "FC"], ["m"]),
        helper.make_node("Softmax", ["m"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [w, b, fc, shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _run(ex, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("keep_params", [False, True])
def test_untuned_build_matches_onnxruntime(keep_params):
    rng = np.random.default_rng(0)
    model = _conv_model(rng)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    mod = from_onnx(model, shape_dict={"x": [1, 4, 6, 6]}, keep_params_in_input=keep_params)
    ex = schedule.build(mod, HOST, progress=False)
    out = _run(ex, x)
    ref = _ort(model, x)
    assert out.shape == ref.shape == (1, 10)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_cpu_target_gets_num_cores():
    target = schedule._normalized_target(HOST)
    assert int(target.attrs["num-cores"]) >= 1


def test_kept_weights_are_bound():
    rng = np.random.default_rng(1)
    mod = from_onnx(_conv_model(rng), shape_dict={"x": [1, 4, 6, 6]}, keep_params_in_input=True)
    assert len(mod["main"].params) > 1
    bound = schedule.bind_params(mod)
    assert len(bound["main"].params) == 1
    assert "params" not in bound["main"].attrs


def test_executable_exports(tmp_path):
    rng = np.random.default_rng(2)
    model = _conv_model(rng)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    ex = schedule.build(from_onnx(model, shape_dict={"x": [1, 4, 6, 6]}), HOST, progress=False)
    path = tmp_path / "model.so"
    ex.export_library(str(path))
    loaded = tvm.runtime.load_module(str(path))
    out = _run(loaded, x)
    np.testing.assert_allclose(out, _ort(model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("text", ["localhost", "host:port:key", "host:70000:key", "host:9190:"])
def test_malformed_rpc_address(text):
    with pytest.raises(UsageError) as err:
        schedule.parse_rpc(text)
    assert "HOST:PORT:KEY" in str(err.value) or "port" in str(err.value)
    assert "\n" not in str(err.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracker_is_one_line_usage_error():
    port = _free_port()  # nothing listens there once the socket is closed
    rng = np.random.default_rng(3)
    mod = from_onnx(_conv_model(rng), shape_dict={"x": [1, 4, 6, 6]})
    with pytest.raises(UsageError) as err:
        schedule.build(mod, HOST, tune_trials=4, rpc=f"127.0.0.1:{port}:board", progress=False)
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "unreachable" in msg
    assert "\n" not in msg


def test_negative_trials_refused():
    rng = np.random.default_rng(4)
    mod = from_onnx(_conv_model(rng), shape_dict={"x": [1, 4, 6, 6]})
    with pytest.raises(UsageError):
        schedule.build(mod, HOST, tune_trials=-1, progress=False)


def _tunable_conv(seed: int) -> tuple[onnx.ModelProto, np.ndarray]:
    """A conv model and an input for the tuning tests; skips where MetaSchedule cannot run."""
    problem = schedule.metaschedule_problem()
    if problem is not None:
        pytest.skip(problem)
    rng = np.random.default_rng(seed)
    return _conv_model(rng), rng.standard_normal((1, 4, 6, 6)).astype(np.float32)


@pytest.mark.parametrize(
    "costs, trials",
    [([1.0, 1.0, 1.0], 12), ([100.0, 1.0, 1.0, 1.0], 40), ([5.0, 3.0, 1.0], 2), ([1e9, 1.0], 1000), ([2.0], 7)],
)
def test_trial_budget_is_split_by_cost(costs, trials):
    split = schedule.allot_trials(costs, trials)
    assert sum(split) == trials
    if trials >= len(costs):
        assert min(split) >= 1  # every kernel measured at least once
    else:
        assert split == [1 if c >= sorted(costs)[-trials] else 0 for c in costs]
    by_cost = sorted(range(len(costs)), key=lambda i: costs[i])
    assert [split[i] for i in by_cost] == sorted(split)  # more work, at least as many trials


@pytest.mark.slow
def test_tuning_fills_database_and_second_build_tunes_nothing(tmp_path, capsys):
    model, x = _tunable_conv(5)
    db = tmp_path / "db"
    ex = schedule.build(from_onnx(model, shape_dict={"x": [1, 4, 6, 6]}), HOST, tune_trials=8, tune_db=db)
    first = capsys.readouterr().err
    assert "tuning" in first and "trials" in first
    records = (db / "database_tuning_record.json").read_text().splitlines()
    # A failed build or run is recorded too, at 1e10 s: at least one candidate must have really run.
    run_secs = [float(s) for line in records for s in (json.loads(line)[1][1] or [])]
    assert run_secs and min(run_secs) < 1.0, run_secs
    ref = _ort(model, x)
    np.testing.assert_allclose(_run(ex, x), ref, rtol=1e-4, atol=1e-5)

    ex2 = schedule.build(from_onnx(model, shape_dict={"x": [1, 4, 6, 6]}), HOST, tune_trials=8, tune_db=db)
    second = capsys.readouterr().err
    assert "already in the tuning database" in second
    assert (db / "database_tuning_record.json").read_text().splitlines() == records
    np.testing.assert_allclose(_run(ex2, x), _run(ex, x), rtol=0, atol=0)


@pytest.mark.slow  # the MetaSchedule self-check runs a child process
def test_database_hits_skip_tuning(tmp_path, capsys, monkeypatch):
    """Kernels with a record are not tuned again: the build reads the database only."""
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    model, x = _tunable_conv(6)
    target = schedule._normalized_target(HOST)
    kernels = schedule.lower_to_kernels(schedule.bind_params(from_onnx(model, {"x": [1, 4, 6, 6]})), target)
    tasks = ms.relax_integration.extract_tasks(kernels, target)
    assert tasks
    db = ms.database.JSONDatabase(work_dir=str(tmp_path))
    for task in tasks:  # an identity schedule measured at 1 ms stands in for a tuned one
        workload = db.commit_workload(task.dispatched[0])
        trace = Schedule(task.dispatched[0]).trace
        db.commit_tuning_record(ms.database.TuningRecord(trace, workload, [1e-3], target))
    records = (tmp_path / "database_tuning_record.json").read_text().splitlines()
    assert len(records) == len(tasks)

    def no_tuning():
        raise AssertionError("tuning started although every kernel is in the database")

    monkeypatch.setattr(schedule, "_require_metaschedule", no_tuning)
    ex = schedule.build(from_onnx(model, {"x": [1, 4, 6, 6]}), HOST, tune_trials=8, tune_db=tmp_path)
    assert f"all {len(tasks)} kernels already in the tuning database" in capsys.readouterr().err
    assert (tmp_path / "database_tuning_record.json").read_text().splitlines() == records
    np.testing.assert_allclose(_run(ex, x), _ort(model, x), rtol=1e-4, atol=1e-5)


def test_unusable_metaschedule_refuses_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(schedule, "metaschedule_problem", lambda: "tuning needs the psutil package")
    rng = np.random.default_rng(7)
    mod = from_onnx(_conv_model(rng), shape_dict={"x": [1, 4, 6, 6]})
    with pytest.raises(UsageError, match="cannot tune: tuning needs the psutil package"):
        schedule.build(mod, HOST, tune_trials=4, tune_db=tmp_path / "db", progress=False)
