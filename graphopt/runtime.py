"""onnxruntime as graphopt's reference evaluator.

Used to fold constants, to verify passes numerically and to measure models.
Sessions are built from in-memory protos; external weights are found through
the model's source folder, so nothing is written next to the input.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from graphopt.errors import UsageError

_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def session(
    proto: onnx.ModelProto | bytes,
    *,
    source_dir: Path | None = None,
    optimize: bool = True,
    threads: int = 0,
    log_severity: int = 4,
):
    """An onnxruntime CPU session; its own log stays quiet (4 = fatal only)
    because graphopt reports failures itself, in one line."""
    import onnxruntime as ort

    if log_severity >= 4:
        ort.set_default_logger_severity(4)
    so = ort.SessionOptions()
    so.log_severity_level = log_severity
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if source_dir is not None:
        so.add_session_config_entry(_EXTERNAL_FOLDER_KEY, str(source_dir))
    data = proto if isinstance(proto, bytes) else proto.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def random_inputs(
    sess, *, seed: int = 0, shapes: Mapping[str, list[int]] | None = None
) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input of a session; symbolic dims become 1."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for inp in sess.get_inputs():
        shape = list((shapes or {}).get(inp.name) or [d if isinstance(d, int) and d >= 0 else 1 for d in inp.shape])
        dtype = _ORT_TO_NUMPY.get(inp.type)
        if dtype is None:
            raise UsageError(f"input '{inp.name}': cannot make random data of type {inp.type}; pass --inputs")
        if dtype == np.bool_:
            out[inp.name] = rng.random(shape) > 0.5
        elif np.issubdtype(dtype, np.integer):
            out[inp.name] = rng.integers(0, 4, size=shape).astype(dtype)
        else:
            out[inp.name] = rng.standard_normal(shape).astype(dtype)
    return out


def run(sess, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    feed = {i.name: inputs[i.name] for i in sess.get_inputs() if i.name in inputs}
    return dict(zip(names, sess.run(names, feed)))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max|actual - expected| / max|expected|`` (absolute when expected is all zero).

    NaN and inf must sit at the same places in both; elsewhere they count as equal.
    """
    a = np.asarray(actual)
    e = np.asarray(expected)
    if a.shape != e.shape:
        return float("inf")
    if a.dtype.kind in "biuO" or a.dtype.kind == "U" or e.dtype.kind in "OU":
        return 0.0 if np.array_equal(a, e) else float("inf")
    a = a.astype(np.float64)
    e = e.astype(np.float64)
    finite = np.isfinite(e)
    if not np.array_equal(np.isnan(a), np.isnan(e)) or not np.array_equal(a[~finite & ~np.isnan(e)], e[~finite & ~np.isnan(e)]):
        return float("inf")
    if not finite.any():
        return 0.0
    diff = np.abs(a[finite] - e[finite]).max(initial=0.0)
    scale = np.abs(e[finite]).max(initial=0.0)
    return float(diff / scale) if scale > 0 else float(diff)


def cosine_similarity(actual: np.ndarray, expected: np.ndarray) -> float:
    """Cosine of the two outputs flattened; 1.0 when both are all zero, and
    -inf on a shape mismatch or a NaN/inf that only one side has."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    e = np.asarray(expected, dtype=np.float64).ravel()
    if a.shape != e.shape or not np.array_equal(np.isfinite(a), np.isfinite(e)):
        return float("-inf")
    finite = np.isfinite(e)
    a, e = a[finite], e[finite]
    na, ne = np.linalg.norm(a), np.linalg.norm(e)
    if na == 0 and ne == 0:
        return 1.0
    if na == 0 or ne == 0:
        return 0.0
    return float(np.dot(a, e) / (na * ne))
