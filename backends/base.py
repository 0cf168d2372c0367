"""What a backend is: a compiler from an ONNX model to an artifact folder, and a
loader that turns the folder back into something that runs.

A backend implements four things (see :class:`Backend`): the named target
presets it knows, how a target name is checked (before any work, so a typo is a
one-line usage error), ``compile`` that writes its files into a fresh folder,
and ``load`` that returns a :class:`Runner`.  Everything shared by all
backends (the atomic artifact folder, manifest.json, input checks, timing)
lives in :mod:`graphopt.backends.artifact`, so a new backend stays small.
"""
from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from graphopt.errors import PassError, UsageError

# Dims are ints, or strings for symbolic dims a backend accepts as given.
Shape = tuple[int | str, ...]


class CompileError(PassError):
    """A backend could not compile the model (unsupported op, code generator
    failure); exit code 4 like a failed pass."""


class RunError(PassError):
    """A compiled artifact failed while running."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, shape and numpy dtype name of a model input or output."""

    name: str
    shape: Shape | None
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorSpec":
        shape = data.get("shape")
        return cls(str(data["name"]), None if shape is None else tuple(shape), str(data["dtype"]))

    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) and d >= 0 for d in self.shape)


@dataclasses.dataclass
class CompileOptions:
    """Options of ``graphopt compile``; a backend reads those it supports and
    refuses the others in :meth:`Backend.check_options`."""

    input_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    tune_trials: int = 0
    tune_minutes: float = 0.0  # template search budget (tvm CPU targets)
    tune_db: Path | None = None
    rpc: str | None = None  # "HOST:PORT:KEY" of an RPC tracker
    progress: bool = True
    log: Any = None  # callable(str) for progress lines, or None


@dataclasses.dataclass
class CompileResult:
    """What ``Backend.compile`` reports; it becomes part of manifest.json.

    ``files`` maps a role ("library", "model", ...) to a file name inside the
    artifact folder; ``target`` is the resolved target (JSON-able); ``extra``
    holds backend-specific manifest fields (session settings, tuning summary).
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: dict[str, str]
    target: dict[str, Any]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A compiled artifact folder and its parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    def file(self, role: str) -> Path:
        from graphopt.errors import ModelError

        name = self.manifest.get("files", {}).get(role)
        path = self.path / str(name) if name else None
        if path is None or not path.is_file() or path.resolve().parent != self.path.resolve():
            raise ModelError(f"{self.path}: the artifact's {role} file ({name}) is missing")
        return path

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_dict(d) for d in self.manifest.get("inputs", [])]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_dict(d) for d in self.manifest.get("outputs", [])]


class Runner(abc.ABC):
    """Runs a loaded artifact: a dict of numpy inputs in, a dict of numpy
    outputs out (in the model's output order).  :meth:`run` checks the inputs
    against the specs, so a subclass only implements :meth:`_run`."""

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]):
        self.inputs = list(inputs)
        self.outputs = list(outputs)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(self.check_feeds(feeds))

    __call__ = run

    def run_checked(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Run on inputs already returned by :meth:`check_feeds` (timing loops)."""
        return self._run(arrays)

    @abc.abstractmethod
    def _run(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Run on the inputs given in the order of ``self.inputs``."""

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The inputs in order, each checked for name, dtype and static dims;
        a mismatch is a one-line UsageError naming the input."""
        names = [s.name for s in self.inputs]
        unknown = [k for k in feeds if k not in names]
        if unknown:
            raise UsageError(f"'{unknown[0]}' is not an input of the model (inputs: {', '.join(names) or 'none'})")
        arrays = []
        for spec in self.inputs:
            if spec.name not in feeds:
                raise UsageError(f"input '{spec.name}' is missing (inputs: {', '.join(names)})")
            value = np.asarray(feeds[spec.name])
            if value.dtype != np.dtype(spec.dtype):
                raise UsageError(f"input '{spec.name}' has dtype {value.dtype}, the model expects {spec.dtype}")
            if spec.shape is not None and (
                value.ndim != len(spec.shape)
                or any(isinstance(d, int) and d >= 0 and d != v for d, v in zip(spec.shape, value.shape))
            ):
                want = "x".join(str(d) for d in spec.shape) or "a scalar"
                got = "x".join(str(d) for d in value.shape) or "a scalar"
                raise UsageError(f"input '{spec.name}' has shape {got}, the model expects {want}")
            arrays.append(np.ascontiguousarray(value))
        return arrays


class Backend(abc.ABC):
    """A compiler for one family of targets.

    Subclass it, set ``name`` (or register it with
    ``@graphopt.backends.register_backend("name")``), and implement ``targets``,
    ``compile`` and ``load``.  ``resolve_target`` must raise UsageError for a
    target the backend does not know, without importing anything heavy.
    """

    name: ClassVar[str] = ""

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @abc.abstractmethod
    def targets(self) -> dict[str, str]:
        """Named target presets and a one-line description of each."""

    def resolve_target(self, target: str) -> dict[str, Any]:
        """The target as a JSON-able dict; UsageError when unknown."""
        presets = self.targets()
        if target not in presets:
            raise UsageError(
                f"--target '{target}': unknown target for backend '{self.name}' (known: {', '.join(presets)})"
            )
        return {"name": target}

    def check_options(self, options: CompileOptions) -> None:
        """Refuse options this backend does not support (UsageError)."""
        if options.tune_trials or options.tune_minutes or options.tune_db or options.rpc:
            raise UsageError(f"--tune-trials, --tune-minutes, --tune-db and --rpc are not supported by backend "
                             f"'{self.name}'")

    def versions(self) -> dict[str, str]:
        """Versions of the libraries the artifact depends on (for the manifest)."""
        return {}

    @abc.abstractmethod
    def compile(self, model: Any, target: str, options: CompileOptions, folder: Path) -> CompileResult:
        """Compile ``model`` (a :class:`graphopt.ir.Model`) for ``target`` and
        write the files into ``folder`` (empty, created by the caller, renamed
        into place once the manifest is written)."""

    @abc.abstractmethod
    def load(self, artifact: Artifact) -> Runner:
        """A runner for an artifact this backend compiled."""


def input_specs(model: Any, input_shapes: Mapping[str, list[int]], *, static: bool) -> list[TensorSpec]:
    """Specs of the graph inputs with pinned dims applied; with ``static``, a
    dim still unknown is a UsageError that says which --input-shape to give."""
    specs = []
    for t in model.graph.inputs:
        dtype = dtype_name(t.dtype)
        shape = input_shapes.get(t.name)
        if shape is None and t.shape is not None:
            shape = [d if isinstance(d, int) and d >= 0 else str(d) for d in t.shape]
        spec = TensorSpec(t.name, None if shape is None else tuple(shape), dtype)
        if static and not spec.is_static():
            shown = "x".join("?" if not isinstance(d, int) else str(d) for d in spec.shape or ()) or "unknown rank"
            raise UsageError(f"input '{t.name}' has a dynamic shape ({shown}); pin it with "
                             f"--input-shape {t.name}=DxDx...")
        specs.append(spec)
    return specs


def dtype_name(dtype: Any) -> str:
    """numpy name of a gs/onnx element type ("float32"), else its text."""
    if isinstance(dtype, int):
        import onnx

        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype)).name
        except Exception:
            return str(onnx.TensorProto.DataType.Name(dtype)).lower()
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)
