"""graphopt: an ahead-of-time optimizer and compiler for ONNX models."""
from __future__ import annotations

__version__ = "0.1.0"

from graphopt.api import inspect, load, optimize, optimize_file, parse, save  # noqa: E402
from graphopt.context import PassContext  # noqa: E402
from graphopt.errors import ExitCode, GraphoptError, ModelError, PassError, UsageError  # noqa: E402
from graphopt.ir import Model  # noqa: E402
from graphopt.manager import Instrument, PassManager  # noqa: E402
from graphopt.pass_base import Option, Pass, PassResult, Tolerance  # noqa: E402
from graphopt.registry import register_pass, register_pipeline  # noqa: E402

__all__ = [
    "__version__", "load", "save", "optimize", "optimize_file", "inspect", "parse",
    "Model", "PassContext", "PassManager", "Instrument", "Pass", "PassResult", "Option", "Tolerance",
    "register_pass", "register_pipeline", "ExitCode", "GraphoptError", "ModelError", "PassError", "UsageError",
]
