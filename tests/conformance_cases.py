"""The onnx node conformance cases, run through ``graphopt opt`` as a user runs it.

Every case of ``onnx.backend.test.case.node.collect_testcases()`` is run in two
variants:

* **frozen**: the test inputs become initializers (inputs that are not plain
  tensors stay graph inputs), so a perfect folder reduces the graph to
  initializers only;
* **inputs**: the model as it is, fed with the test inputs; folding may only
  touch Constant nodes and static shapes, and must keep every output.

Each variant is written to a file; the optimizer (``graphopt opt IN -o OUT``
through the CLI's own entry point, or another tool) writes its output file,
and a fresh onnxruntime session on each file gives the numbers.  Cases where
onnxruntime runs the (frozen) original correctly form the denominator.  A
graph is *fully folded* when no node is left.  Shared by tests/test_conformance.py
and benchmarks/conformance.py.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

PIPELINE = "simplify"
VARIANTS = ("frozen", "inputs")

# An optimizer reads the model at its first path and writes its second;
# it raises on failure.
Optimizer = Callable[[Path, Path, str], None]


# ----------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------
def collect_cases(pattern: str | None = None, limit: int | None = None, every: int = 1) -> list[Any]:
    """Node test cases with data, sorted by name; ``every`` picks one case in N."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [c for c in collect_testcases() if c.model is not None and c.data_sets]
    cases.sort(key=lambda c: c.name)
    if pattern:
        rx = re.compile(pattern)
        cases = [c for c in cases if rx.search(c.name)]
    cases = cases[::every]
    return cases[:limit] if limit else cases


def freeze(model: onnx.ModelProto, inputs: Sequence[Any]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Move the test inputs that are plain tensors into initializers; the rest stay
    graph inputs and are returned as feeds.  The IR version is left as it was, so
    IR 3 cases get initializers that are not graph inputs, as onnxruntime allows."""
    frozen = onnx.ModelProto()
    frozen.CopyFrom(model)
    g = frozen.graph
    keep, feeds = [], {}
    for vi, value in zip(list(g.input), inputs):
        if isinstance(value, np.ndarray) and vi.type.HasField("tensor_type"):
            g.initializer.append(onnx.numpy_helper.from_array(value, vi.name))
        else:
            keep.append(vi)
            feeds[vi.name] = value
    keep.extend(list(g.input)[len(inputs):])
    del g.input[:]
    g.input.extend(keep)
    return frozen, feeds


def feeds_of(model: onnx.ModelProto, inputs: Sequence[Any]) -> dict[str, Any]:
    return {vi.name: value for vi, value in zip(model.graph.input, inputs)}


# ----------------------------------------------------------------------------------
# Optimizing and running files
# ----------------------------------------------------------------------------------
def graphopt_cli(src: Path, dst: Path, pipeline: str) -> None:
    """``graphopt opt SRC -o DST -p PIPELINE`` through the console script's entry point."""
    from graphopt.cli import main

    code = main(["opt", str(src), "-o", str(dst), "-p", pipeline, "-q", "--no-cache"])
    if code != 0:
        raise RuntimeError(f"graphopt opt exited {code}")


def ort_run_file(path: Path, feeds: dict[str, Any], optimize: bool = True) -> list[Any]:
    """Outputs of a fresh onnxruntime session on the written file."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return sess.run(names, {i.name: feeds[i.name] for i in sess.get_inputs() if i.name in feeds})


def outputs_match(got: Any, want: Any, rtol: float, atol: float) -> bool:
    """np.testing-style comparison of one output (tensors, sequences, optionals)."""
    if want is None or got is None:
        return want is None and got is None
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(
            outputs_match(g, w, rtol, atol) for g, w in zip(got, want)
        )
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(
            outputs_match(got[k], want[k], rtol, atol) for k in want
        )
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return False
    if want.dtype.kind in "OUS" or got.dtype.kind in "OUS":
        return bool(np.array_equal(got.astype(object), want.astype(object)))
    if got.dtype != want.dtype:
        return False
    try:
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    except AssertionError:
        return False
    return True


def all_match(got: Sequence[Any], want: Sequence[Any], rtol: float, atol: float) -> bool:
    return len(got) == len(want) and all(outputs_match(g, w, rtol, atol) for g, w in zip(got, want))


# ----------------------------------------------------------------------------------
# Sweep
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    ref_ok: bool = False
    correct: dict[str, bool] = dataclasses.field(default_factory=dict)
    folded: dict[str, bool] = dataclasses.field(default_factory=dict)
    error: dict[str, str] = dataclasses.field(default_factory=dict)
    nodes_left: dict[str, list[str]] = dataclasses.field(default_factory=list)


def run_case(case: Any, optimizers: dict[str, Optimizer], pipeline: str, work: Path) -> dict[str, Outcome]:
    """Both variants of one case; the reference run decides whether a variant counts."""
    inputs, expected = case.data_sets[0]
    rtol, atol = getattr(case, "rtol", 1e-3), getattr(case, "atol", 1e-7)
    results: dict[str, Outcome] = {}
    for variant in VARIANTS:
        if variant == "frozen":
            proto, feeds = freeze(case.model, inputs)
        else:
            proto, feeds = case.model, feeds_of(case.model, inputs)
        src = work / f"{variant}.onnx"
        onnx.save(proto, str(src))
        outcome = Outcome(nodes_left={})
        outcome.ref_ok = _reference_ok(src, feeds, expected, rtol, atol, outcome)
        if outcome.ref_ok:
            for method, optimize in optimizers.items():
                dst = work / f"{variant}.{method}.onnx"
                _run_method(method, optimize, src, dst, feeds, case, variant, expected, rtol, atol, pipeline, outcome)
        results[variant] = outcome
    return results


def _reference_ok(src: Path, feeds, expected, rtol: float, atol: float, outcome: Outcome) -> bool:
    """onnxruntime runs the original correctly, with its graph optimizations or,
    where they break a valid model (the frozen expanded AffineGrid: its own
    folding hands Range a shape-[1] limit), without.  Outputs of the optimizer
    are always run with them on, as users run them."""
    for optimize in (True, False):
        try:
            return all_match(ort_run_file(src, feeds, optimize), expected, rtol, atol)
        except Exception as exc:
            outcome.error["ref"] = _line(exc)
    return False


def _run_method(method, optimize, src, dst, feeds, case, variant, expected, rtol, atol, pipeline,
                outcome: Outcome) -> None:
    try:
        optimize(src, dst, pipeline)
        written = onnx.load(str(dst))
    except Exception as exc:
        outcome.correct[method] = False
        outcome.folded[method] = False
        outcome.error[method] = f"optimize: {_line(exc)}"
        return
    outcome.nodes_left[method] = [n.op_type for n in written.graph.node]
    outcome.folded[method] = len(written.graph.node) == 0
    try:
        ok = all_match(ort_run_file(dst, feeds), expected, rtol, atol)
        if ok and variant == "inputs" and len(case.data_sets) > 1:
            for more_inputs, more_expected in case.data_sets[1:]:
                ok &= all_match(ort_run_file(dst, feeds_of(case.model, more_inputs)), more_expected, rtol, atol)
        outcome.correct[method] = ok
        if not ok:
            outcome.error[method] = "wrong outputs"
    except Exception as exc:
        outcome.correct[method] = False
        outcome.error[method] = f"run: {_line(exc)}"


def _line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text[:200]


def sweep(cases: Sequence[Any], optimizers: dict[str, Optimizer], pipeline: str = PIPELINE,
          progress: bool = False) -> dict[str, Any]:
    """Run every case; returns the summary and per-case details."""
    _quiet_libraries()
    per_case: dict[str, dict[str, Outcome]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graphopt-conformance-") as tmp:
        for i, case in enumerate(cases):
            work = Path(tmp) / case.name
            work.mkdir()
            per_case[case.name] = run_case(case, optimizers, pipeline, work)
            if progress and (i + 1) % 100 == 0:
                print(f"  {i + 1}/{len(cases)} cases, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return summarize(per_case, list(optimizers), time.perf_counter() - start, pipeline, len(cases))


def summarize(per_case, methods, seconds, pipeline, total) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "pipeline": pipeline,
        "total_cases": total,
        "seconds": round(seconds, 1),
        "variants": {},
    }
    for variant in VARIANTS:
        ref = [name for name, r in per_case.items() if r[variant].ref_ok]
        v: dict[str, Any] = {"ref_ok": len(ref)}
        for method in methods:
            correct = [n for n in ref if per_case[n][variant].correct.get(method)]
            folded = [n for n in ref if per_case[n][variant].folded.get(method)]
            v[method] = {
                "correct": len(correct),
                "correct_pct": _pct(len(correct), len(ref)),
                "folded": len(folded),
                "folded_pct": _pct(len(folded), len(ref)),
                "fully_folded_and_correct": len(set(correct) & set(folded)),
                "failing": {n: per_case[n][variant].error.get(method, "") for n in ref if n not in correct},
                "not_folded": {
                    n: per_case[n][variant].nodes_left.get(method, []) for n in ref if n not in folded
                },
            }
        summary["variants"][variant] = v
    return summary


def _pct(n: int, d: int) -> float:
    return round(100.0 * n / d, 2) if d else 0.0


def _quiet_libraries() -> None:
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.CRITICAL
    warnings.simplefilter("ignore")
