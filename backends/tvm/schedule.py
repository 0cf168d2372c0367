"""Schedules for the TVM backend: a default for every kernel, MetaSchedule tuning on demand.

Relax lowers each fused group of ONNX nodes to a TIR kernel.  Left unscheduled, a
CPU kernel is a plain single-threaded loop nest (tens of times slower than
onnxruntime) and a GPU kernel does not compile at all, so ``build`` always
schedules every kernel:

* kernels found in the tuning database get their tuned schedule;
* on GPU targets the rest get DLight's default GPU rules;
* on CPU targets the rest get graphopt's schedule library
  (:mod:`graphopt.backends.tvm.cpu`: convolutions in channel-blocked layouts with
  register tiles, injective and pooling kernels fused, parallel and
  vectorized) and DLight's GEMV rule; the wheel has no BLAS or DNNL to
  dispatch to, so these schedules are what makes an untuned build fast.

Tuning (``tune_trials > 0``) measures candidates locally or on boards behind an
RPC tracker and appends every measurement to a JSON database as it goes, so an
interrupted run keeps what it measured and a later build, of this model or of
another one sharing kernels, reuses it instead of tuning again.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import tvm
from tvm import relax
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from graphopt.console import StatusReport
from graphopt.errors import UsageError

# Seed of the tuning search, so that two tuning runs of one model agree.
DEFAULT_SEED = 0
# Largest batch of candidates measured in one tuning round.
_MAX_TRIALS_PER_ITER = 64
# Builds a tuning worker process serves before it is replaced.
_BUILDS_PER_WORKER = 200
# Seconds to wait for the RPC tracker to answer.
_RPC_TIMEOUT_S = 10
# Seconds the MetaSchedule self-check may take before tuning is refused.
_PROBE_TIMEOUT_S = 300  # creating the first tuning context takes about a minute on 2 busy cores


def build(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    *,
    tune_trials: int = 0,
    tune_minutes: float = 0.0,
    tune_db: str | os.PathLike | None = None,
    rpc: str | None = None,
    progress: bool = True,
) -> "relax.VMExecutable":
    """Compile a Relax module (as imported from ONNX, static shapes) for ``target``.

    ``tune_trials`` is the measurement budget of the whole module; 0 tunes nothing
    (but a ``tune_db`` from earlier runs is still applied).  ``tune_minutes``
    is the time the template search (:mod:`graphopt.backends.tvm.cpu.search`, CPU
    targets) may spend measuring the templates' knobs.  ``tune_db`` is a
    folder holding the JSON databases of both (created on demand).  ``rpc`` is
    ``HOST:PORT:KEY`` of an RPC tracker whose boards measure the candidates.
    """
    if tune_trials < 0:
        raise UsageError(f"tune trials must be >= 0, got {tune_trials}")
    if not tune_minutes >= 0:
        raise UsageError(f"tune minutes must be >= 0, got {tune_minutes}")
    target = _normalized_target(target)
    rpc_config = parse_rpc(rpc) if rpc else None
    if rpc_config is not None:
        check_tracker(rpc_config)
    _LAST_SUMMARY.clear()
    mod = bind_params(mod)
    mod = lower_to_kernels(mod, target)
    templates = None
    if target.kind.name == "llvm" or tune_minutes > 0:
        from graphopt.backends.tvm.cpu import search

        templates = search.TemplateDatabase.open(tune_db)
        if tune_minutes > 0:
            _LAST_SUMMARY["template_search"] = search.search(mod, target, tune_minutes, templates,
                                                             rpc_config=rpc_config, progress=progress)

    with _database(tune_db, tune_trials) as database:
        if tune_trials > 0:
            tune(mod, target, database, tune_trials, rpc_config=rpc_config, progress=progress)
        if database is not None:
            with target, database:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        mod = default_schedule(mod, target, templates.choices(target) if templates else None)
        return tvm.compile(mod, target, relax_pipeline=_finish_pipeline(target))


_LAST_SUMMARY: dict = {}


def last_summary() -> dict:
    """What the last :func:`build` searched, for the artifact's manifest."""
    return dict(_LAST_SUMMARY)


# ---------------------------------------------------------------- module preparation


def _normalized_target(target: tvm.target.Target | str | dict) -> tvm.target.Target:
    """The target with ``num-cores`` set on CPU: MetaSchedule's parallel rules need it."""
    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)
    if target.kind.name == "llvm" and int(target.attrs.get("num-cores", 0) or 0) <= 0:
        config = dict(target.export())
        config["num-cores"] = _physical_cores()
        target = tvm.target.Target(config)
    return target


def _physical_cores() -> int:
    from graphopt.backends.tvm.targets import usable_cores

    return usable_cores()


def bind_params(mod: tvm.IRModule) -> tvm.IRModule:
    """Bind weights kept as a function's ``params`` attribute (``from_onnx(...,
    keep_params_in_input=True)``) so they fold into constants.  A module whose
    weights were already detached keeps them as inputs, to be passed at run time."""
    out = mod
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function) or func.attrs is None or "params" not in func.attrs:
            continue
        values = list(func.attrs["params"])
        num_input = int(func.attrs["num_input"]) if "num_input" in func.attrs else len(func.params) - len(values)
        weights = list(func.params)[num_input:]
        if len(weights) != len(values):
            raise UsageError(
                f"function {gv.name_hint}: {len(values)} bound weights for {len(weights)} weight inputs"
            )
        stripped = func.without_attr("params")
        out = tvm.IRModule({**{g: f for g, f in out.functions_items()}, gv: stripped})
        out = relax.transform.BindParams(gv.name_hint, dict(zip(weights, values)))(out)
    return out


def lower_to_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Relax ops to fused TIR kernels: the form MetaSchedule extracts tasks from.
    On CPUs, convolutions are first planned into channel-blocked layouts and
    legalized to graphopt's blocked compute (graphopt.backends.tvm.cpu)."""
    cpu = target.kind.name == "llvm"
    if cpu:
        from graphopt.backends.tvm.cpu import conv2d, deconv, layout, matmul, vector_lanes

        with target, tvm.transform.PassContext(opt_level=3):
            mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                            relax.transform.CanonicalizeBindings(),
                                            relax.transform.FoldConstant()])(mod)
        from graphopt.backends.tvm.cpu.target import int8_dot, vector_registers

        lanes = vector_lanes(target)
        planned = layout.plan(deconv.rewrite(mod), lanes, int8_dot=int8_dot(target),
                              registers=vector_registers(target))
        mod = matmul.plan_matmuls(planned, lanes)
    legalize = {"relax.nn.conv2d": conv2d.legalize_conv2d} if cpu else None
    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        *_library_dispatch(target),
        relax.transform.LegalizeOps(customize_legalize_map=legalize),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(mod)


def _library_dispatch(target: tvm.target.Target) -> list:
    try:
        return list(relax.pipeline.library_dispatch_passes(target))
    except (ValueError, AttributeError):
        return []


def _finish_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """What ``tvm.compile`` still runs once every kernel is scheduled."""
    try:
        passes = list(relax.pipeline.dataflow_lower_passes(target)) + list(relax.pipeline.finalize_passes(target))
    except (ValueError, AttributeError):
        passes = [
            relax.transform.RewriteDataflowReshape(),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            relax.transform.StaticPlanBlockMemory(),
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
        ]
    return tvm.transform.Sequential(passes)


# ---------------------------------------------------------------- default schedules


def is_gpu(target: tvm.target.Target) -> bool:
    return relax.pipeline.BackendDispatcher.is_gpu_target(target)


def default_schedule(mod: tvm.IRModule, target: tvm.target.Target, choices: dict | None = None) -> tvm.IRModule:
    """Schedule the kernels the database did not: DLight's GPU rules (a GPU kernel
    without a schedule does not compile), graphopt's CPU library on ``llvm``,
    its templates configured by ``choices`` (kernel key -> the template
    search's winner) where they have one."""
    if is_gpu(target):
        from tvm.s_tir import dlight as dl

        with target:
            return dl.ApplyDefaultSchedule(
                dl.gpu.Matmul(),
                dl.gpu.GEMV(),
                dl.gpu.Reduction(),
                dl.gpu.GeneralReduction(),
                dl.gpu.Fallback(),
            )(mod)
    if target.kind.name != "llvm":
        return mod
    from tvm.s_tir import dlight as dl

    from graphopt.backends.tvm.cpu import generic
    from graphopt.backends.tvm.cpu.search import template_rules

    conv, mm = template_rules(choices)
    with target:
        return dl.ApplyDefaultSchedule(
            conv,
            dl.cpu.GEMV(),
            mm,
            # Not dl.cpu.Reduction: it makes a 1000-class softmax 1000x slower
            # (2.3 ms against 2.5 us unscheduled on a 2-core x86).
            generic.SpatialReduction(),
            generic.RowReduction(),
            generic.Injective(),
        )(mod)


_QUIET_LOGGER = logging.getLogger("graphopt.tvm.schedule")
_QUIET_LOGGER.setLevel(logging.ERROR)


# ---------------------------------------------------------------- database


@contextmanager
def _database(tune_db: str | os.PathLike | None, tune_trials: int) -> Iterator[ms.Database | None]:
    if tune_db is None:
        yield ms.database.MemoryDatabase() if tune_trials > 0 else None
        return
    folder = Path(tune_db)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"tune database {folder}: not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        db = ms.database.JSONDatabase(work_dir=str(folder), allow_missing=True)
    except Exception as exc:  # noqa: BLE001 - unreadable or corrupt JSON
        from graphopt.errors import first_line

        raise UsageError(f"tune database {folder}: {first_line(exc)}") from None
    yield db


def tuned(database: ms.Database, task_mod: tvm.IRModule, measured: list | None = None) -> bool:
    """Whether the database holds a measured record for this kernel.

    Not ``get_top_k``: it skips records whose trace is empty, and an empty trace
    is what tuning records when the unscheduled kernel measured best (reshapes,
    small elementwise kernels); such kernels would be tuned again on every build.
    ``measured`` is ``database.get_all_tuning_records()`` when the caller asks
    for many kernels."""
    if not database.has_workload(task_mod):
        return False
    workload = database.commit_workload(task_mod)  # the stored workload, not a new one
    records = database.get_all_tuning_records() if measured is None else measured
    return any(r.workload.same_as(workload) and r.run_secs for r in records)


# ---------------------------------------------------------------- RPC


def parse_rpc(text: str) -> ms.runner.RPCConfig:
    """``HOST:PORT:KEY`` into an RPC configuration (one-line UsageError otherwise)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        raise UsageError(f"rpc {text!r}: expected HOST:PORT:KEY")
    host, port, key = parts
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"rpc {text!r}: port {port!r} is not a number in 1..65535")
    return ms.runner.RPCConfig(
        tracker_host=host, tracker_port=int(port), tracker_key=key, session_timeout_sec=_RPC_TIMEOUT_S
    )


def check_tracker(config: ms.runner.RPCConfig) -> None:
    """Fail in one line, before any tuning, when the tracker or its boards are absent."""
    where = f"{config.tracker_host}:{config.tracker_port}"
    try:
        tracker = tvm.rpc.connect_tracker(config.tracker_host, config.tracker_port)
        summary = tracker.summary()
    except Exception as exc:  # noqa: BLE001 - refused, unresolvable host, timeout
        from graphopt.errors import first_line

        raise UsageError(f"rpc tracker {where} unreachable: {first_line(exc)}") from None
    keys = {str(item["key"]).split(":")[-1] for item in summary.get("server_info", [])}
    if config.tracker_key not in keys:
        found = ", ".join(sorted(keys)) or "none"
        raise UsageError(f"rpc tracker {where} has no board with key {config.tracker_key!r} (keys: {found})")


# ---------------------------------------------------------------- tuning


def tune(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    database: ms.Database,
    trials: int,
    *,
    rpc_config: ms.runner.RPCConfig | None = None,
    progress: bool = True,
) -> int:
    """Tune the kernels of ``mod`` the database does not have yet; return how many
    were tuned.

    Kernels are tuned one at a time, the most expensive first, each with its
    share of ``trials`` (by estimated FLOPs).  One at a time, because
    MetaSchedule's gradient scheduler builds every kernel's first batch before
    it measures or commits any, and measures one kernel while it compiles the
    next, which on a 2-core machine times the candidates against the compiler.  So every batch is
    committed as soon as it is measured and Ctrl-C loses nothing measured; the
    KeyboardInterrupt then propagates."""
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target) if not t.mod.attrs.get("tirx.is_scheduled", False)]
    measured = list(database.get_all_tuning_records())
    todo = [t for t in tasks if not tuned(database, t.dispatched[0], measured)]
    report = _Reporter(progress, len(tasks), len(tasks) - len(todo), trials)
    if not todo:
        report.line(f"all {len(tasks)} kernels already in the tuning database")
        return 0
    _require_metaschedule()
    costs = [_cost(t) for t in todo]
    order = sorted(range(len(todo)), key=lambda i: -costs[i])
    budget = allot_trials(costs, trials)
    plan = [(todo[i], budget[i]) for i in order if budget[i] > 0]
    learned = _has_xgboost()
    num_cores = _physical_cores()
    builder = PooledBuilder(max_workers=num_cores)
    if rpc_config is not None:
        runner = ms.runner.RPCRunner(rpc_config=rpc_config, max_workers=1)
    else:
        runner = ms.runner.LocalRunner()
    # One cost model for all kernels, so that what it learns carries over.
    cost_model = ms.CostModel.create("xgb", num_tuning_cores=num_cores) if learned else ms.CostModel.create("random")
    names = [t.task_name for t, _ in plan]
    report.start(names)
    scheduler_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    old_level = scheduler_logger.level
    scheduler_logger.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="graphopt-tune-") as workdir:
            for i, (task, n) in enumerate(plan):
                context = ms.TuneContext(
                    mod=task.dispatched[0],
                    target=task.target,
                    space_generator="post-order-apply",
                    search_strategy=_search_strategy(learned, min(_MAX_TRIALS_PER_ITER, n)),
                    task_name=task.task_name,
                    logger=_QUIET_LOGGER,
                    rand_state=DEFAULT_SEED + i,
                    num_threads=num_cores,
                ).clone()
                ms.tune.tune_tasks(
                    tasks=[context],
                    task_weights=[1.0],
                    work_dir=workdir,
                    max_trials_global=n,
                    max_trials_per_task=n,
                    num_trials_per_iter=min(_MAX_TRIALS_PER_ITER, n),
                    builder=builder,
                    runner=runner,
                    database=database,
                    cost_model=cost_model,
                    measure_callbacks=[
                        *ms.measure_callback.MeasureCallback.create("default"),
                        _ProgressCallback(report, [task.task_name]),
                    ],
                    task_scheduler="round-robin",
                )
    finally:
        scheduler_logger.setLevel(old_level)
        builder.shutdown()
        report.stop()
    return len(plan)


def _cost(task: ms.ExtractedTask) -> float:
    """Estimated FLOPs of one kernel times the number of times the model calls it."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        flops = float(estimate_tir_flops(task.dispatched[0]))
    except Exception:  # noqa: BLE001 - kernels the estimator does not understand
        flops = 0.0
    return max(flops, 1.0) * float(task.weight)


def allot_trials(costs: list[float], trials: int) -> list[int]:
    """Split a trial budget over kernels: a few each, the rest by cost share.

    Every kernel gets a floor (up to 4, less when the budget is small) so that
    cheap kernels are measured at least once; the rest follows the kernels'
    share of the FLOPs, because a kernel's tuned time is what the model gains
    and it grows with its work."""
    n = len(costs)
    if n == 0 or trials <= 0:
        return [0] * n
    floor = min(4, trials // n)
    if floor == 0:  # fewer trials than kernels: the most expensive get one each
        ranked = sorted(range(n), key=lambda i: -costs[i])[:trials]
        return [1 if i in ranked else 0 for i in range(n)]
    rest = trials - floor * n
    total = sum(costs)
    shares = [rest * c / total for c in costs]
    out = [floor + int(x) for x in shares]
    # Largest remainders take the trials that rounding down left over.
    for i in sorted(range(n), key=lambda i: -(shares[i] - int(shares[i])))[: trials - sum(out)]:
        out[i] += 1
    return out


@derived_object
class PooledBuilder(ms.builder.PyBuilder):
    """MetaSchedule's local builder with warm worker processes kept between batches.

    A worker's first build imports ``tvm.s_tir.tensor_intrin``, which takes
    about 30 s of CPU on this wheel: as long as the build time limit.  The stock
    ``LocalBuilder`` starts new workers for every batch, so on a busy machine
    every build timed out, its worker was killed and the next one started cold
    again; tuning recorded nothing but failures.  Here the import runs in each
    worker's initializer, outside the limit, and workers are reused, recycled
    every ``_BUILDS_PER_WORKER`` builds to bound what a long-lived one
    accumulates."""

    def __init__(self, max_workers: int, timeout_sec: float = 30.0) -> None:
        super().__init__()
        import importlib

        from tvm.support.popen_pool import PopenPoolExecutor

        self.timeout_sec = timeout_sec
        self.pool = PopenPoolExecutor(
            max_workers=max_workers,
            timeout=timeout_sec,
            initializer=functools.partial(importlib.import_module, "tvm.s_tir.tensor_intrin"),
            maximum_process_uses=_BUILDS_PER_WORKER,
        )

    def build(self, build_inputs: list) -> list:
        from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
        from tvm.support.popen_pool import StatusKind

        results = []
        jobs = [(None, None, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
        for outcome in self.pool.map_with_error_catching(lambda job: _worker_func(*job), jobs):
            if outcome.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(outcome.value, None))
            elif outcome.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(None, f"build timed out after {self.timeout_sec:.0f} s"))
            else:
                results.append(ms.builder.BuilderResult(None, f"build failed: {outcome.value}"))
        return results

    def shutdown(self) -> None:
        self.pool.shutdown()


_PROBE = (
    "import tvm; from tvm import te; from tvm.s_tir import meta_schedule as ms\n"
    "A = te.placeholder((8, 8)); B = te.compute((8, 8), lambda i, j: A[i, j] * 2)\n"
    "mod = tvm.IRModule({'main': te.create_prim_func([A, B])})\n"
    "tvm.ir.save_json(mod)\n"  # what the JSON database writes
    "ms.TuneContext(mod,"
    " target=tvm.target.Target({'kind': 'llvm', 'num-cores': 1}), space_generator='post-order-apply')\n"
)


@functools.lru_cache(maxsize=1)
def metaschedule_problem() -> str | None:
    """Why MetaSchedule cannot tune here, or None.  It needs psutil, and some
    builds of the wheel crash serializing a kernel to JSON (the database's
    format) or hang creating a tuning context, so both are tried once in a
    child process with a time limit instead of in this one."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        return "tuning needs the psutil package (pip install psutil)"
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], timeout=_PROBE_TIMEOUT_S, capture_output=True)
    except subprocess.TimeoutExpired:
        return f"MetaSchedule hangs creating a tuning context in this TVM build (> {_PROBE_TIMEOUT_S} s)"
    if done.returncode != 0:
        return (
            f"this TVM build crashes serializing a kernel or creating a tuning context (exit {done.returncode})"
        )
    return None


def _require_metaschedule() -> None:
    problem = metaschedule_problem()
    if problem is not None:
        raise UsageError(f"cannot tune: {problem}")


def _has_xgboost() -> bool:
    try:
        import xgboost  # noqa: F401  # pylint: disable=unused-import
    except ImportError:
        return False
    return True


def _search_strategy(learned: bool, per_iter: int) -> ms.SearchStrategy:
    """How candidates are drawn for one kernel.

    With XGBoost, the evolutionary search: the learned cost model ranks a
    population of mutated schedules and the best are measured.  Without it the
    cost model is random, so evolving a population only costs time; random
    samples of the design space are as good and cheaper.  The population is
    scaled to the trials each kernel gets in a round (MetaSchedule's default
    of 512 is sized for thousands of trials).
    """
    if not learned:
        return ms.search_strategy.ReplayTrace()
    return ms.search_strategy.EvolutionarySearch(
        population_size=max(64, min(512, 8 * per_iter)),
        init_min_unmeasured=max(16, min(50, 2 * per_iter)),
    )


class _Reporter(StatusReport):
    """A rich bar on a terminal; one status line per measured batch otherwise."""

    def __init__(self, enabled: bool, n_kernels: int, n_cached: int, trials: int) -> None:
        super().__init__(enabled)
        self.n_kernels = n_kernels
        self.n_cached = n_cached
        self.trials = trials
        self.done = 0
        self.best: dict[str, float] = {}
        self._t0 = time.monotonic()

    def start(self, names: list[str]) -> None:
        self.line(
            f"tuning {len(names)} of {self.n_kernels} kernels ({self.n_cached} from the database), "
            f"{self.trials} trials"
        )
        self.start_bar("tuning", names[0], self.trials)

    def measured(self, name: str, n: int, secs: list[float]) -> None:
        self.done += n
        if secs:
            self.best[name] = min(self.best.get(name, math.inf), min(secs))
        best = self.best.get(name)
        best_txt = f"best {best * 1e3:.3f} ms" if best is not None else "no valid candidate yet"
        if self._bar is not None:
            self._bar.update(self._task, completed=min(self.done, self.trials), description=f"{name} ({best_txt})")
        else:
            self.line(f"tuning {name}: {n} trials, {best_txt} [{self.done}/{self.trials}]")

    def stop(self) -> None:
        super().stop()
        if self.done:
            self.line(f"tuned {self.done} trials in {time.monotonic() - self._t0:.0f} s")


@derived_object
class _ProgressCallback(ms.measure_callback.PyMeasureCallback):
    def __init__(self, report: _Reporter, names: list[str]) -> None:
        super().__init__()
        self.report = report
        self.names = names

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        secs = []
        for result in runner_results:
            if result.error_msg is None and result.run_secs:
                secs.append(sum(float(s) for s in result.run_secs) / len(result.run_secs))
        self.report.measured(self.names[task_id], len(measure_candidates), secs)
