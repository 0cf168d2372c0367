"""Backends that turn an optimized ONNX model into something that runs on a target.

``compile_model(model.onnx, out_dir, backend=..., target=...)`` writes an
artifact folder (the backend's files plus manifest.json); ``load_runner(path)``
runs an artifact of any installed backend, or a plain .onnx file with
onnxruntime.  A new backend subclasses :class:`Backend` and registers itself
with :func:`register_backend` or the ``graphopt.backends`` entry-point group.
"""
from __future__ import annotations

from graphopt.backends.artifact import compile_model, load_runner, read_artifact
from graphopt.backends.base import (
    Artifact,
    Backend,
    CompileError,
    CompileOptions,
    CompileResult,
    Runner,
    RunError,
    TensorSpec,
)
from graphopt.backends.registry import backends, get_backend, plugin_errors, register_backend

__all__ = [
    "Artifact", "Backend", "CompileError", "CompileOptions", "CompileResult", "Runner", "RunError", "TensorSpec",
    "backends", "compile_model", "get_backend", "load_runner", "plugin_errors", "read_artifact", "register_backend",
]
