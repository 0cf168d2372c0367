"""Template search: measure the template schedules' knobs, not a schedule space.

MetaSchedule searches a space of schedules per kernel and needs hundreds of
measurements each.  The templates of this library already have a good
default; the search only tries their knobs (register tile, loop order,
parallel or not) for the kernels that take most of the model's time, tens of
configurations each, and keeps a configuration only when it measured faster
and computed the same numbers as the default.

Kernels are searched most expensive first (estimated FLOPs times calls),
each within its share of the time budget, by coordinate descent: one knob
at a time over its values with the others at the best found so far, twice
over.  Each winner is written to ``graphopt-templates.json`` in the tuning
database folder as soon as its kernel is done, keyed by the target and the
kernel's structure, so Ctrl-C keeps what was measured and the next build of
this or another model applies it without measuring again.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx

from graphopt.backends.tvm.cpu.templates import Config, TemplateRule, default_config, kernel_key
from graphopt.console import StatusReport
from graphopt.errors import UsageError, first_line
from graphopt.files import write_text_atomic

DB_FILE = "graphopt-templates.json"
_FORMAT = 1
# A configuration replaces the best one only when it is this much faster:
# measurements on a shared machine are noisy by a few percent.
_MIN_GAIN = 0.03
# Seconds one configuration's timing aims at (repeats x calls).
_TIMING_S = 0.04
_REPEATS = 5
_WARMUP_S = 0.01
# Passes of coordinate descent over the knobs.
_PASSES = 2


def template_rules(choices: dict[str, Config] | None = None) -> list[TemplateRule]:
    """The template rules, in the order the default schedule tries them."""
    from graphopt.backends.tvm.cpu.conv2d import BlockedConv2D
    from graphopt.backends.tvm.cpu.matmul import Matmul

    return [BlockedConv2D(choices), Matmul(choices)]


def target_key(target: tvm.target.Target) -> str:
    """What a measured winner depends on: the CPU, its features, the cores."""
    attrs = target.attrs
    parts = [target.kind.name, str(attrs.get("mtriple", "")), str(attrs.get("mcpu", "")),
             ",".join(sorted(str(a) for a in attrs.get("mattr", []) or [])), f"cores={attrs.get('num-cores', 1)}"]
    return ";".join(parts)


# ---------------------------------------------------------------- database


class TemplateDatabase:
    """Measured winners per target and kernel; in memory, or a JSON file in a
    tuning database folder, rewritten atomically after every kernel."""

    def __init__(self, path: Path | None = None, records: dict[str, dict[str, dict]] | None = None) -> None:
        self.path = path
        self.records = records or {}

    @classmethod
    def open(cls, folder: str | os.PathLike | None) -> "TemplateDatabase":
        if folder is None:
            return cls()
        path = Path(folder) / DB_FILE
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("targets"), dict):
                raise ValueError(f"not a format-{_FORMAT} template database")
        except (OSError, ValueError) as exc:
            raise UsageError(f"tune database {path}: {first_line(exc)}") from None
        return cls(path, data["targets"])

    def choices(self, target: tvm.target.Target) -> dict[str, Config]:
        return {key: rec["config"] for key, rec in self.records.get(target_key(target), {}).items()}

    def get(self, target: tvm.target.Target, key: str) -> dict | None:
        return self.records.get(target_key(target), {}).get(key)

    def put(self, target: tvm.target.Target, key: str, record: dict) -> None:
        self.records.setdefault(target_key(target), {})[key] = record
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": _FORMAT, "targets": self.records}, indent=1, sort_keys=True)
        write_text_atomic(self.path, text)


# ---------------------------------------------------------------- kernels


@dataclass
class Kernel:
    name: str
    func: tirx.PrimFunc
    rule: TemplateRule
    knobs: dict[str, list]
    calls: int
    flops: float
    key: str = field(default="")

    @property
    def cost(self) -> float:
        return self.flops * self.calls


def tunable_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> list[Kernel]:
    """The module's unscheduled kernels a template rule schedules with more
    than one configuration, one per distinct kernel, most expensive first."""
    calls = _call_counts(mod)
    found: dict[str, Kernel] = {}
    rules = template_rules()
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or (func.attrs and func.attrs.get("tirx.is_scheduled", False)):
            continue
        for rule in rules:
            try:
                knobs = rule.knobs(func, target)
            except Exception:  # the rule cannot read this kernel
                knobs = None
            if knobs is None:
                continue
            if math.prod(len(v) for v in knobs.values()) > 1:
                key = kernel_key(func)
                if key in found:
                    found[key].calls += calls.get(gv.name_hint, 1)
                else:
                    found[key] = Kernel(gv.name_hint, func, rule, knobs, calls.get(gv.name_hint, 1),
                                        _flops(func), key)
            break
    return sorted(found.values(), key=lambda k: -k.cost)


def _call_counts(mod: tvm.IRModule) -> dict[str, int]:
    counts: dict[str, int] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir":
            name = expr.args[0].name_hint
            counts[name] = counts.get(name, 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return counts


def _flops(func: tirx.PrimFunc) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return max(float(estimate_tir_flops(tvm.IRModule({"main": func}))), 1.0)
    except Exception:  # kernels the estimator does not understand
        return 1.0


# ---------------------------------------------------------------- measuring


class LocalDevice:
    """Builds and times kernels in this process, on this machine's CPU."""

    def __init__(self) -> None:
        from graphopt.backends.tvm import _size_thread_pool

        _size_thread_pool()  # the pool the artifact's runner will use
        self.dev = tvm.cpu(0)

    def load(self, lib: Any) -> Any:
        return lib.jit()

    def close(self) -> None:
        pass


class RemoteDevice:
    """Times kernels on a board behind an RPC tracker (the board links them)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.dev = session.cpu(0)
        self._dir = tempfile.TemporaryDirectory(prefix="graphopt-search-")
        self._n = 0

    @classmethod
    def through_tracker(cls, rpc_config: Any) -> "RemoteDevice":
        tracker = tvm.rpc.connect_tracker(rpc_config.tracker_host, rpc_config.tracker_port)
        return cls(tracker.request(rpc_config.tracker_key, session_timeout=0))

    def load(self, lib: Any) -> Any:
        from tvm.support.tar import tar

        self._n += 1
        path = Path(self._dir.name) / f"kernel{self._n}.{tar.output_format}"
        lib.export_library(str(path), fcompile=tar)
        self.session.upload(str(path))
        return self.session.load_module(path.name)

    def close(self) -> None:
        self._dir.cleanup()


def _arguments(func: tirx.PrimFunc, seed: int) -> list[np.ndarray]:
    """Random inputs for every buffer of ``func`` (outputs are overwritten)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for param in func.params:
        shape = [int(d) for d in param.shape]
        dtype = str(param.dtype)
        if dtype.startswith(("float", "bfloat")):
            arrays.append(rng.uniform(-1, 1, shape).astype(dtype))
        elif dtype == "bool":
            arrays.append(rng.integers(0, 2, shape).astype(bool))
        else:  # small integers: valid as quantized values and as indices
            arrays.append(rng.integers(0, 4, shape).astype(dtype))
    return arrays


@dataclass
class Measured:
    secs: float
    outputs: list[np.ndarray]


def measure(device: Any, sch_func: tirx.PrimFunc, target: tvm.target.Target, inputs: list[np.ndarray]) -> Measured:
    """Build one scheduled kernel and time it: calls per repeat sized so a
    repeat takes a few milliseconds, the median of the repeats."""
    lib = tvm.compile(tvm.IRModule({"main": sch_func.with_attr("global_symbol", "main")}), target=target)
    module = device.load(lib)
    args = [tvm.runtime.tensor(a, device.dev) for a in inputs]
    module["main"](*args)  # the outputs to compare
    outputs = [a.numpy() for a in args]
    # Warm up (caches, the workspace pool, the clock) for a few calls and at
    # least _WARMUP_S: a kernel's first calls ran up to 1.7x slower.
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < _WARMUP_S:
        module["main"](*args)
        calls += 1
    once = max((time.perf_counter() - start) / calls, 1e-7)
    number = max(1, int(_TIMING_S / _REPEATS / once))
    timer = module.time_evaluator("main", device.dev, number=number, repeat=_REPEATS)
    return Measured(float(np.median(timer(*args).results)), outputs)


def same_numbers(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    for x, y in zip(a, b):
        if x.dtype.kind == "f":
            scale = float(np.max(np.abs(y))) if y.size else 0.0
            if not np.allclose(x, y, rtol=1e-4, atol=1e-5 * max(scale, 1.0)):
                return False
        elif not np.array_equal(x, y):
            return False
    return True


# ---------------------------------------------------------------- the search


@dataclass
class KernelResult:
    config: Config
    secs: float
    default_secs: float
    measured: int
    failed: int
    complete: bool

    def record(self, kernel: Kernel) -> dict:
        return {"name": kernel.name, "rule": type(kernel.rule).__name__, "config": self.config,
                "secs": self.secs, "default_secs": self.default_secs, "measured": self.measured,
                "failed": self.failed, "complete": self.complete}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a kernel's search, carrying what it measured so far."""

    def __init__(self, result: "KernelResult") -> None:
        super().__init__()
        self.result = result


def search_kernel(kernel: Kernel, target: tvm.target.Target, device: Any, deadline: float) -> KernelResult | None:
    """Coordinate descent over ``kernel``'s knobs from the default, until
    every knob was tried twice over or ``deadline`` (time.monotonic()) passed.
    None when the default itself could not be built or run."""
    inputs = _arguments(kernel.func, seed=0)
    default = default_config(kernel.knobs)

    def run(config: Config) -> Measured | None:
        sch = kernel.rule.schedule(kernel.func, target, config)
        return None if sch is None else measure(device, sch.mod["main"], target, inputs)

    reference = run(default)
    if reference is None:
        return None
    best, best_secs = dict(default), reference.secs
    seen = {json.dumps(default, sort_keys=True)}
    measured, failed, complete = 1, 0, True
    for _ in range(_PASSES):
        improved = False
        for knob, values in kernel.knobs.items():
            for value in values:
                config = {**best, knob: value}
                tag = json.dumps(config, sort_keys=True)
                if tag in seen:
                    continue
                if time.monotonic() > deadline:
                    return KernelResult(best, best_secs, reference.secs, measured, failed, False)
                seen.add(tag)
                try:
                    result = run(config)
                except KeyboardInterrupt:
                    raise Interrupted(KernelResult(best, best_secs, reference.secs, measured, failed, False)) from None
                except Exception:  # a primitive refused this configuration, or it failed to build
                    result = None
                measured += 1
                if result is None or not same_numbers(result.outputs, reference.outputs):
                    failed += 1
                    continue
                if result.secs < best_secs * (1 - _MIN_GAIN):
                    best, best_secs, improved = config, result.secs, True
        if not improved:
            break
    return KernelResult(best, best_secs, reference.secs, measured, failed, complete)


def runs_here(target: tvm.target.Target) -> str | None:
    """Why kernels for ``target`` cannot be timed on this machine, or None."""
    from graphopt.backends.tvm.cpu.target import cpu_features
    from graphopt.backends.tvm.targets import host_arch, normalize_arch

    triple = str(target.attrs.get("mtriple", ""))
    if triple and normalize_arch(triple.split("-")[0]) != host_arch():
        return f"the target is for {triple.split('-')[0]}, this machine is {host_arch()}"
    host = cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())}))
    missing = sorted(f for f in cpu_features(target) - host if f.startswith(("avx", "sse", "fma", "neon", "sve")))
    if missing:
        return f"this CPU lacks {', '.join(missing[:3])} the target uses"
    return None


def search(mod: tvm.IRModule, target: tvm.target.Target, minutes: float, database: TemplateDatabase, *,
           rpc_config: Any = None, progress: bool = True, device: Any = None) -> dict[str, Any]:
    """Search the templates' knobs of ``mod``'s kernels for ``minutes``;
    winners go to ``database``.  Kernels are timed on ``device``, by default
    this machine or the board ``rpc_config`` names.  Returns a summary for
    the manifest."""
    if target.kind.name != "llvm":
        raise UsageError(f"--tune-minutes searches CPU templates; target '{target.kind.name}' "
                         "is tuned with --tune-trials")
    if rpc_config is None and device is None:
        problem = runs_here(target)
        if problem is not None:
            raise UsageError(f"--tune-minutes measures on this machine, and {problem}: add --rpc HOST:PORT:KEY")
    kernels = tunable_kernels(mod, target)
    todo = [k for k in kernels if not (database.get(target, k.key) or {}).get("complete")]
    report = _Report(progress, len(kernels), len(kernels) - len(todo), minutes)
    summary: dict[str, Any] = {"minutes": minutes, "kernels": len(kernels), "from_database": len(kernels) - len(todo),
                               "searched": 0, "measured": 0, "improved": 0, "estimated_gain_ms": 0.0}
    if not todo:
        report.line(f"all {len(kernels)} template kernels already in the tuning database")
        return summary
    if device is None:
        device = RemoteDevice.through_tracker(rpc_config) if rpc_config is not None else LocalDevice()
    end = time.monotonic() + 60.0 * minutes
    remaining_cost = sum(k.cost for k in todo)
    try:
        for i, kernel in enumerate(todo):
            now = time.monotonic()
            if now >= end:
                break
            share = (end - now) * kernel.cost / max(remaining_cost, 1.0)
            remaining_cost -= kernel.cost
            try:
                result = search_kernel(kernel, target, device, deadline=now + share)
            except Interrupted as stop:  # keep the kernel's best so far, then stop
                database.put(target, kernel.key, stop.result.record(kernel))
                raise KeyboardInterrupt from None
            summary["searched"] += 1
            if result is None:
                report.kernel(i, len(todo), kernel, None)
                continue
            database.put(target, kernel.key, result.record(kernel))
            summary["measured"] += result.measured
            if result.config != default_config(kernel.knobs):
                summary["improved"] += 1
                summary["estimated_gain_ms"] += (result.default_secs - result.secs) * 1e3 * kernel.calls
            report.kernel(i, len(todo), kernel, result)
    finally:
        device.close()
        report.stop()
    summary["estimated_gain_ms"] = round(summary["estimated_gain_ms"], 3)
    report.line(f"template search: {summary['searched']} kernels, {summary['measured']} configurations, "
                f"{summary['improved']} faster than the default (about {summary['estimated_gain_ms']:.2f} ms)")
    return summary


class _Report(StatusReport):
    """A bar over the kernels on a terminal; one line per kernel otherwise."""

    def __init__(self, enabled: bool, n_kernels: int, n_cached: int, minutes: float) -> None:
        super().__init__(enabled)
        self.line(f"template search over {n_kernels - n_cached} of {n_kernels} kernels "
                  f"({n_cached} from the database), {minutes:g} min")
        if n_kernels > n_cached:
            self.start_bar("searching", "kernels", n_kernels - n_cached, counted=False)

    def kernel(self, i: int, n: int, kernel: Kernel, result: KernelResult | None) -> None:
        if result is None:
            text = f"{kernel.name}: the default schedule did not build here; skipped"
        else:
            text = (f"{kernel.name}: {result.default_secs * 1e3:.3f} -> {result.secs * 1e3:.3f} ms "
                    f"({result.measured} configurations{'' if result.complete else ', time up'})")
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=text)
        else:
            self.line(f"[{i + 1}/{n}] {text}")
