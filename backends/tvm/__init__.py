"""The ``tvm`` backend: ONNX -> Relax -> a shared library for a CPU or GPU.

The artifact holds ``model.so`` (exported with ``export_library``; the weights
are constants inside it) and the manifest.  Building goes through
``graphopt.backends.tvm.schedule.build`` (default schedules, optional MetaSchedule
tuning).  TVM is imported only when a model is compiled or loaded.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.backends.base import (Artifact, Backend, CompileError, CompileOptions, CompileResult, Runner, RunError,
                           TensorSpec, input_specs)
from graphopt.backends.registry import register_backend
from graphopt.backends.tvm import targets as _targets
from graphopt.errors import UsageError, first_line

LIBRARY = "model.so"


@register_backend("tvm")
class TVMBackend(Backend):
    """Apache TVM (Relax): a compiled shared library per target."""

    def targets(self) -> dict[str, str]:
        return _targets.describe()

    def resolve_target(self, target: str) -> dict[str, Any]:
        return {"name": target if target in _targets.PRESETS else "json", **_targets.resolve(target).as_dict()}

    def check_options(self, options: CompileOptions) -> None:
        if options.tune_trials < 0:
            raise UsageError(f"--tune-trials must be >= 0, got {options.tune_trials}")
        if not options.tune_minutes >= 0:
            raise UsageError(f"--tune-minutes must be >= 0, got {options.tune_minutes:g}")
        if options.rpc and not (options.tune_trials or options.tune_minutes):
            raise UsageError("--rpc measures tuning candidates on a remote device; it needs --tune-trials N "
                             "or --tune-minutes M")
        if (options.tune_trials or options.tune_minutes or options.tune_db) and _schedule() is None:
            raise UsageError("--tune-trials/--tune-minutes/--tune-db: tuning needs backends/tvm/schedule.py, "
                             "which this install lacks")

    def versions(self) -> dict[str, str]:
        import tvm

        return {"tvm": str(tvm.__version__)}

    def compile(self, model: Any, target: str, options: CompileOptions, folder: Path) -> CompileResult:
        import tvm

        from graphopt.backends.tvm import frontend

        spec = _targets.resolve(target)
        inputs = input_specs(model, options.input_shapes, static=True)
        t0 = time.perf_counter()
        proto = frontend.prepare(model, inputs)
        mod = frontend.import_onnx(proto, inputs)
        outputs = frontend.output_specs(mod, [o.name for o in proto.graph.output])
        mod, int8 = _integer_kernels(mod, spec)
        t1 = time.perf_counter()
        executable, tuning = build(mod, tvm.target.Target(spec.tvm), options)
        t2 = time.perf_counter()
        fcompile = spec.linker.fcompile() if spec.linker else None  # None: TVM's host compiler
        try:
            executable.export_library(str(folder / LIBRARY), fcompile=fcompile)
        except Exception as exc:
            raise CompileError(f"linking {LIBRARY} failed ({spec.cc or 'host compiler'}): "
                               f"{frontend._message(exc)}") from None
        seconds = {"prepare_and_import": round(t1 - t0, 3), "build": round(t2 - t1, 3),
                   "export": round(time.perf_counter() - t2, 3)}
        return CompileResult(inputs=inputs, outputs=outputs, files={"library": LIBRARY}, target={},
                             extra={"weights": f"constants inside {LIBRARY}", "tuning": tuning, "seconds": seconds,
                                    **({"int8": int8} if int8 else {}),
                                    "prepared": "input shapes pinned, then simplify (exact passes)"})

    def load(self, artifact: Artifact) -> Runner:
        target = artifact.manifest.get("target", {})
        arch = target.get("arch")
        if arch and arch != _targets.host_arch():
            raise UsageError(f"{artifact.path}: compiled for {arch} (target '{target.get('name')}'); "
                             f"this machine is {_targets.host_arch()}: copy the folder to the device and run it there")
        return TVMRunner(artifact.file("library"), str(target.get("device", "cpu")), artifact.inputs, artifact.outputs)


def _integer_kernels(mod: Any, spec: _targets.TargetSpec) -> tuple[Any, dict[str, Any] | None]:
    """A QDQ model's quantized convolutions and matmuls as integer kernels on
    CPU targets (``graphopt.backends.tvm.int8``): float compute between dequantize and
    quantize would be slower than the fp32 model.  Other models unchanged."""
    from tvm import relax

    if spec.tvm.get("kind") != "llvm":
        return mod, None
    found = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, lambda e: found.append(
                isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.dequantize"))
    if not any(found):
        return mod, None
    from graphopt.backends.tvm import int8
    from graphopt.backends.tvm.schedule import bind_params

    return int8.lower_qdq(bind_params(mod))


def _schedule():
    """graphopt.backends.tvm.schedule, or None while that module does not exist."""
    try:
        from graphopt.backends.tvm import schedule
    except ModuleNotFoundError as exc:
        if exc.name == "graphopt.backends.tvm.schedule":
            return None
        raise
    return schedule


def build(mod: Any, target: Any, options: CompileOptions) -> tuple[Any, dict[str, Any]]:
    """The relax Executable for ``mod``, and a tuning summary for the manifest."""
    schedule = _schedule()
    try:
        if schedule is not None:
            result = schedule.build(mod, target, tune_trials=options.tune_trials, tune_minutes=options.tune_minutes,
                                    tune_db=options.tune_db, rpc=options.rpc, progress=options.progress)
            summary = getattr(schedule, "last_summary", None)
            summary = dict(summary()) if callable(summary) else {}
            return result, {"trials": options.tune_trials, "minutes": options.tune_minutes,
                            "database": str(options.tune_db or "") or None, "rpc": options.rpc, "schedules": "graphopt.backends.tvm.schedule", **summary}
        # Fallback while backends/tvm/schedule.py is missing: TVM's default
        # pipeline for the target (legalize; DLight schedules for GPUs), untuned.
        import tvm

        return tvm.compile(mod, target), {"trials": 0, "database": None, "rpc": None, "schedules": "tvm default"}
    except (UsageError, CompileError):
        raise
    except Exception as exc:
        from graphopt.backends.tvm.frontend import _message

        raise CompileError(f"TVM build for {target.kind.name} failed: {_message(exc)}") from None


# sched_yield() calls an idle TVM worker makes before it sleeps (TVM's
# default is 300000, a third of a second of spinning after every run).
# About a millisecond: the workers stay awake across the gaps between one
# run's kernels (waking a sleeping worker cost ~35 us per parallel kernel
# on a 2-core VM: SqueezeNet ran 1.4x slower with 0) and sleep soon after
# the run, leaving the cores to the rest of the process.
RUNNER_SPIN_COUNT = 1000


def _size_thread_pool() -> None:
    """One TVM worker per usable physical core, unless ``TVM_NUM_THREADS``
    says otherwise: TVM's default is half the logical CPUs on x86 (it assumes
    two threads per core); workers spin briefly (``RUNNER_SPIN_COUNT``)
    unless ``TVM_THREAD_POOL_SPIN_COUNT`` says otherwise.  The pool reads
    both when it starts, at the first parallel kernel."""
    os.environ.setdefault("TVM_NUM_THREADS", str(_targets.usable_cores()))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(RUNNER_SPIN_COUNT))


class TVMRunner(Runner):
    """A Relax VM over the exported library."""

    def __init__(self, library: Path, device: str, inputs: list[TensorSpec], outputs: list[TensorSpec]):
        super().__init__(inputs, outputs)
        import tvm
        from tvm import relax

        try:
            self.device = tvm.device(device, 0)
            present = self.device.exist
        except Exception:
            present = False
        if not present:
            raise UsageError(f"{library.parent}: compiled for a {device} device, and this machine has none")
        if device == "cpu":
            _size_thread_pool()
        try:
            lib = tvm.runtime.load_module(str(library))
            self.vm = relax.VirtualMachine(lib, self.device)
        except Exception as exc:
            from graphopt.errors import ModelError

            raise ModelError(f"{library}: TVM cannot load the library ({first_line(exc)})") from None
        self._main = self.vm["main"]

    def _run(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        try:
            args = [tvm.runtime.tensor(a, self.device) for a in arrays]
            result = self._main(*args)
            values = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
            return {spec.name: v.numpy() for spec, v in zip(self.outputs, values)}
        except Exception as exc:
            from graphopt.backends.tvm.frontend import _message

            raise RunError(f"TVM run failed: {_message(exc)}") from None
