"""The ``onnxruntime`` backend: the ONNX model plus the session settings to
run it with.  It is the reference other backends are compared with, and what
``graphopt run`` uses for a plain .onnx file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from graphopt.backends.base import (Artifact, Backend, CompileError, CompileOptions, CompileResult, Runner, RunError,
                           TensorSpec, input_specs)
from graphopt.backends.registry import register_backend
from graphopt.errors import UsageError, first_line

# Target preset -> execution providers, most preferred first.
PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
_DESCRIPTIONS = {
    "cpu": "onnxruntime's CPU execution provider",
    "cuda": "onnxruntime's CUDA execution provider, CPU for the nodes it lacks",
}
# Session settings written to the manifest; load() applies them.
DEFAULT_SESSION = {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": 0}

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(uint16)": "uint16",
    "tensor(int32)": "int32", "tensor(uint32)": "uint32", "tensor(int64)": "int64", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


@register_backend("onnxruntime")
class OnnxRuntimeBackend(Backend):
    """The ONNX model run by onnxruntime (the reference)."""

    def targets(self) -> dict[str, str]:
        return dict(_DESCRIPTIONS)

    def resolve_target(self, target: str) -> dict[str, Any]:
        info = super().resolve_target(target)
        return {**info, "providers": list(PROVIDERS[target])}

    def versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "onnx": onnx.__version__}

    def compile(self, model: Any, target: str, options: CompileOptions, folder: Path) -> CompileResult:
        from graphopt.ir import save

        path = folder / "model.onnx"
        save(model, path, protect=[model.source_path] if model.source_path else [])
        session = dict(DEFAULT_SESSION, providers=list(PROVIDERS[target]))
        try:  # the model must load; checked on the CPU, which every build has
            sess = _session(path, dict(session, providers=["CPUExecutionProvider"]))
        except Exception as exc:
            raise CompileError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
        inputs = input_specs(model, options.input_shapes, static=False)
        return CompileResult(inputs=inputs, outputs=_specs(sess.get_outputs()), files={"model": path.name},
                             target={}, extra={"session": session})

    def load(self, artifact: Artifact) -> Runner:
        settings = dict(DEFAULT_SESSION, **artifact.manifest.get("session", {}))
        sess = _session(artifact.file("model"), settings)
        return OrtRunner(sess, artifact.inputs, artifact.outputs)


class OrtRunner(Runner):
    def __init__(self, sess, inputs: list[TensorSpec], outputs: list[TensorSpec]):
        super().__init__(inputs, outputs)
        self.session = sess
        self._names = [o.name for o in sess.get_outputs()]

    def _run(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        feed = {spec.name: a for spec, a in zip(self.inputs, arrays)}
        try:
            return dict(zip(self._names, self.session.run(self._names, feed)))
        except Exception as exc:
            raise RunError(f"onnxruntime failed: {first_line(exc)}") from None


def model_runner(path: Path) -> OrtRunner:
    """A runner for an .onnx file as it is (validated like ``graphopt opt`` does)."""
    from graphopt.errors import ModelError
    from graphopt.ir import load_proto

    load_proto(path)
    try:
        sess = _session(path, dict(DEFAULT_SESSION, providers=PROVIDERS["cpu"]))
    except Exception as exc:
        raise ModelError(f"{path}: onnxruntime cannot load the model ({first_line(exc)})") from None
    return OrtRunner(sess, _specs(sess.get_inputs()), _specs(sess.get_outputs()))


def _specs(args) -> list[TensorSpec]:
    return [
        TensorSpec(a.name, None if a.shape is None else tuple(d if isinstance(d, int) else str(d) for d in a.shape),
                   _ORT_TYPES.get(a.type, a.type))
        for a in args
    ]


def _session(path: Path, settings: dict[str, Any]):
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    providers = list(settings.get("providers") or PROVIDERS["cpu"])
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise UsageError(f"onnxruntime here lacks {', '.join(missing)} "
                         f"(available: {', '.join(ort.get_available_providers())})")
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, str(settings["graph_optimization_level"]))
    if settings.get("intra_op_num_threads"):
        so.intra_op_num_threads = int(settings["intra_op_num_threads"])
    return ort.InferenceSession(str(path), so, providers=providers)
