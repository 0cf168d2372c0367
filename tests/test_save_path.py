"""Saving models whose weights live in external files: the bugs the large-model
memory benchmark (benchmarks/large_model_memory.py) turned up."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import ir


def external_mlp(folder: Path) -> Path:
    """x @ w + b with w and b in an external file."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32) * 0 + 0.5, "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "in.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="in.data", size_threshold=0)
    return path


def outputs(path: Path) -> np.ndarray:
    import onnxruntime as ort

    x = np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_weight_read_by_a_pass_saves_inline_and_external(tmp_path):
    # A pass that reads a lazily loaded weight leaves gs's data_location=EXTERNAL
    # on it; the saved tensor must be a valid inline one, not "external, no location".
    src = external_mlp(tmp_path)
    want = outputs(src)
    for external in (False, True):
        model = graphopt.load(src)
        for c in model.constants():
            np.asarray(c.values)  # loads every weight into memory
        out = tmp_path / f"out_{external}.onnx"
        graphopt.save(model, out, external_data=external)
        proto = onnx.load(str(out), load_external_data=False)
        for t in proto.graph.initializer:
            locs = [e.value for e in t.external_data if e.key == "location"]
            big = t.name == "w"  # b (256 bytes) is under the 1 KB threshold: always inline
            assert (t.data_location == TensorProto.EXTERNAL) == (external and big)
            assert locs == ([out.name + ".data"] if external and big else [])
        np.testing.assert_array_equal(outputs(out), want)


def test_external_copy_without_copy_file_range(tmp_path, monkeypatch):
    src = external_mlp(tmp_path)
    want = outputs(src)

    def unsupported(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported, raising=False)
    out = tmp_path / "out.onnx"
    graphopt.save(graphopt.load(src), out, external_data=True)
    np.testing.assert_array_equal(outputs(out), want)


def test_write_all_loops_over_short_writes():
    class Short:
        def __init__(self):
            self.data = bytearray()

        def write(self, view):
            chunk = bytes(view[:3])
            self.data += chunk
            return len(chunk)

    out = Short()
    ir._write_all(out, b"0123456789")
    assert bytes(out.data) == b"0123456789"


def test_saved_files_get_umask_permissions(tmp_path):
    src = external_mlp(tmp_path)
    old = os.umask(0o022)
    try:
        out = tmp_path / "out.onnx"
        graphopt.save(graphopt.load(src), out, external_data=True)
    finally:
        os.umask(old)
    for f in (out, tmp_path / "out.onnx.data"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644
