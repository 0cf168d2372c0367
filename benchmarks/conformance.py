"""Constant-folding conformance sweep over the onnx node test cases.

Every case of ``onnx.backend.test.case.node.collect_testcases()`` is run in two
variants:

* **frozen**: the test inputs become initializers (inputs that are not plain
  tensors stay graph inputs), so a perfect folder reduces the graph to
  initializers only;
* **inputs**: the model as it is, fed with the test inputs; folding may only
  touch Constant nodes and static shapes, and must keep every output.

For each variant, cases where onnxruntime runs the (frozen) original correctly
form the denominator.  graphopt's pipeline and, for comparison, onnx-graphsurgeon's
``fold_constants()`` + ``cleanup()`` are run on the same models, and the outputs
are compared with each case's rtol/atol.  A graph is *fully folded* when no
node is left.

    python benchmarks/conformance.py [--limit N] [--filter REGEX] [--json FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import onnx

PIPELINE = "simplify"
FALLBACK_PIPELINE = "fixpoint{max-iterations=8}(infer-shapes,fold-constants,eliminate-dead-code)"
VARIANTS = ("frozen", "inputs")
METHODS = ("graphopt", "gs")


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


def _is_tensor_input(vi: onnx.ValueInfoProto) -> bool:
    return vi.type.HasField("tensor_type")


def freeze(model: onnx.ModelProto, inputs: Sequence[Any]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Move the test inputs that are plain tensors into initializers; the rest stay
    graph inputs and are returned as feeds."""
    frozen = onnx.ModelProto()
    frozen.CopyFrom(model)
    g = frozen.graph
    keep, feeds = [], {}
    for vi, value in zip(list(g.input), inputs):
        if isinstance(value, np.ndarray) and _is_tensor_input(vi):
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
# Running and comparing
# ----------------------------------------------------------------------------------
def ort_run(proto: onnx.ModelProto, feeds: dict[str, Any]) -> list[Any]:
    from graphopt import runtime

    sess = runtime.session(proto)
    names = [o.name for o in sess.get_outputs()]
    feed = {i.name: feeds[i.name] for i in sess.get_inputs() if i.name in feeds}
    return sess.run(names, feed)


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


def optimize_graphopt(proto: onnx.ModelProto, pipeline: str) -> onnx.ModelProto:
    import graphopt
    from graphopt.context import PassContext
    from graphopt.ir import Model

    model = Model.from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    graphopt.optimize(model, pipeline, context=PassContext(quiet=True))
    return model.to_proto()


def optimize_gs(proto: onnx.ModelProto, pipeline: str) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.ModelProto.FromString(proto.SerializeToString()))
    graph.fold_constants().cleanup()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = proto.ir_version
    del out.opset_import[:]
    out.opset_import.extend(proto.opset_import)
    return out


OPTIMIZERS: dict[str, Callable[[onnx.ModelProto, str], onnx.ModelProto]] = {
    "graphopt": optimize_graphopt,
    "gs": optimize_gs,
}


# ----------------------------------------------------------------------------------
# Sweep
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    ref_ok: bool = False
    correct: dict[str, bool] = dataclasses.field(default_factory=dict)
    folded: dict[str, bool] = dataclasses.field(default_factory=dict)
    error: dict[str, str] = dataclasses.field(default_factory=dict)
    nodes_left: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def run_case(case: Any, methods: Sequence[str], pipeline: str) -> dict[str, Outcome]:
    """Both variants of one case; the reference run decides whether a variant counts."""
    inputs, expected = case.data_sets[0]
    rtol, atol = getattr(case, "rtol", 1e-3), getattr(case, "atol", 1e-7)
    results: dict[str, Outcome] = {}
    for variant in VARIANTS:
        if variant == "frozen":
            proto, feeds = freeze(case.model, inputs)
        else:
            proto, feeds = case.model, feeds_of(case.model, inputs)
        outcome = Outcome()
        try:
            outcome.ref_ok = all_match(ort_run(proto, feeds), expected, rtol, atol)
        except Exception as exc:
            outcome.error["ref"] = _line(exc)
        if outcome.ref_ok:
            for method in methods:
                _run_method(method, proto, feeds, case, variant, expected, rtol, atol, pipeline, outcome)
        results[variant] = outcome
    return results


def _run_method(method, proto, feeds, case, variant, expected, rtol, atol, pipeline, outcome: Outcome) -> None:
    try:
        optimized = OPTIMIZERS[method](proto, pipeline)
    except Exception as exc:
        outcome.correct[method] = False
        outcome.folded[method] = False
        outcome.error[method] = f"optimize: {_line(exc)}"
        return
    outcome.nodes_left[method] = [n.op_type for n in optimized.graph.node]
    outcome.folded[method] = len(optimized.graph.node) == 0
    try:
        ok = all_match(ort_run(optimized, feeds), expected, rtol, atol)
        if ok and variant == "inputs" and len(case.data_sets) > 1:
            for more_inputs, more_expected in case.data_sets[1:]:
                ok &= all_match(ort_run(optimized, feeds_of(case.model, more_inputs)), more_expected, rtol, atol)
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


def resolve_pipeline(text: str) -> str:
    """The default pipeline, or a folding-only one while passes it names are missing."""
    import graphopt
    from graphopt.errors import UsageError

    try:
        graphopt.parse(text)
        return text
    except UsageError:
        if text != PIPELINE:
            raise
        return FALLBACK_PIPELINE


def sweep(cases: Sequence[Any], methods: Sequence[str], pipeline: str, progress: bool = False) -> dict[str, Any]:
    """Run every case; returns the summary and per-case details."""
    _quiet_libraries()
    per_case: dict[str, dict[str, Outcome]] = {}
    load_errors: list[str] = []
    start = time.perf_counter()
    for i, case in enumerate(cases):
        try:
            onnx.checker.check_model(case.model)
        except Exception:
            load_errors.append(case.name)
            continue
        per_case[case.name] = run_case(case, methods, pipeline)
        if progress and (i + 1) % 100 == 0:
            print(f"  {i + 1}/{len(cases)} cases, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    seconds = time.perf_counter() - start
    return summarize(per_case, methods, load_errors, seconds, pipeline, len(cases))


def summarize(per_case, methods, load_errors, seconds, pipeline, total) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "pipeline": pipeline,
        "total_cases": total,
        "skipped_unloadable": len(load_errors),
        "skipped_cases": load_errors,
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


def print_table(summary: dict[str, Any], methods: Sequence[str], show_folded: bool = False) -> None:
    print(f"pipeline: {summary['pipeline']}")
    print(f"cases: {summary['total_cases']} (skipped, cannot load: {summary['skipped_unloadable']}), "
          f"{summary['seconds']} s")
    header = f"{'variant':8} {'method':9} {'ORT ok':>7} {'correct':>8} {'%':>7} {'folded':>7} {'%':>7}"
    print(header)
    print("-" * len(header))
    for variant, v in summary["variants"].items():
        for method in methods:
            m = v[method]
            print(f"{variant:8} {method:9} {v['ref_ok']:7d} {m['correct']:8d} {m['correct_pct']:7.2f} "
                  f"{m['folded']:7d} {m['folded_pct']:7.2f}")
    for variant, v in summary["variants"].items():
        for method in methods:
            failing = v[method]["failing"]
            if failing:
                print(f"\n{variant}/{method}: {len(failing)} incorrect")
                for name, why in failing.items():
                    print(f"  {name}: {why}")
            if show_folded and variant == "frozen":
                nf = v[method]["not_folded"]
                print(f"\n{variant}/{method}: {len(nf)} not fully folded")
                for name, ops in nf.items():
                    print(f"  {name}: {','.join(ops)}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="run only the first N cases")
    ap.add_argument("--filter", default=None, help="only cases whose name matches this regex")
    ap.add_argument("--every", type=int, default=1, help="take one case in N")
    ap.add_argument("--pipeline", default=PIPELINE, help="graphopt pipeline (default: simplify)")
    ap.add_argument("--no-gs", action="store_true", help="skip the onnx-graphsurgeon comparison")
    ap.add_argument("--show-unfolded", action="store_true", help="list frozen cases not fully folded")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    methods = ["graphopt"] + ([] if args.no_gs else ["gs"])
    pipeline = resolve_pipeline(args.pipeline)
    cases = collect_cases(args.filter, args.limit, args.every)
    summary = sweep(cases, methods, pipeline, progress=True)
    print_table(summary, methods, show_folded=args.show_unfolded)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
