"""Sensitivity analysis and a fidelity budget for the quantization passes.

``quantize-static{fidelity="cosine>=0.99"}`` / ``quantize-dynamic{...}`` (or
``graphopt opt --fidelity SPEC``) quantize as usual but keep the most
sensitive nodes in float until the spec (:mod:`graphopt.fidelity`) holds on
calibration samples held out from everything else (``CalibrationData.split``).

1. **Ranking** (:func:`rank_nodes`) on the calibration part of the samples:
   each candidate node is quantized *alone* (everything else float) and the
   model's outputs are compared with the float model's; the score is how far
   the spec is from holding (:meth:`FidelitySpec.badness`).  With more
   candidates than ``max_probes``, consecutive nodes (graph order) are
   probed in ``max_probes`` groups and share their group's score, so the
   number of probes stays bounded.
2. **Budget** (:func:`fit_to_budget`) on the held-out part: with the ranking
   ``r``, candidate ``k`` keeps ``r[:k]`` in float and quantizes the rest.
   ``k = 0`` is tried first; otherwise the smallest passing ``k`` is found by
   bisection over ``[0, n]`` (``1 + ceil(log2 n)`` evaluations), so no more
   nodes stay in float than the ranking says are needed.  ``k = n`` (nothing
   quantized, the float model) always passes and is never run; when
   ``k = n - 1`` fails the pass says so and quantizes nothing.

How a candidate is run is the pass's business (:class:`Candidates`):
:class:`RebuildCandidates` builds and loads one model per candidate (any
pass); ``quantize-dynamic`` uses a *switched* model, built and loaded once,
in which every node computes both its float and quantized result and a
scalar input per node picks one, so a probe is a run, not a model build.

Everything is deterministic (seeded split, fixed order, ties broken by graph
order); Ctrl-C stops between runs and leaves the model as it was, since
candidates are copies.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from graphopt import runtime
from graphopt.console import progress
from graphopt.errors import UsageError
from graphopt.fidelity import FidelityReport, FidelitySpec, compare_outputs, parse_fidelity
from graphopt.pass_base import Option

Feeds = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------
# Options shared by the quantization passes
# ----------------------------------------------------------------------------------
def fidelity_spec(p: Any, ctx: Any) -> FidelitySpec | None:
    """The spec a pass works to: its own ``fidelity`` option when given (an
    empty string turns a run-wide one off), else ``ctx.options["fidelity"]``
    (``graphopt opt --fidelity``)."""
    text = p.fidelity if p.is_set("fidelity") else (ctx.options or {}).get("fidelity", "")
    if not text:
        return None
    where = f"pass '{p.name}': option 'fidelity'" if p.is_set("fidelity") else "--fidelity"
    spec = parse_fidelity(text, where)
    if getattr(ctx, "calibration", None) is None:
        raise UsageError(f"{where} needs calibration data to measure on: pass --calib PATH")
    return spec


class FidelityBudgetOptions:
    """The fidelity-budget options of a quantization pass; mix in before Pass.

    A bad spec fails when the pipeline is parsed, before any work."""

    fidelity = Option(str, "", 'fidelity budget, e.g. "cosine>=0.99" (see graphopt.fidelity): the most sensitive '
                      "nodes stay in float until it holds on held-out calibration samples, which calibration "
                      "then does not see; empty: none (graphopt opt --fidelity sets it for every quantization pass)")
    fidelity_holdout = Option(float, 0.5, "fraction of calibration samples held out to check the fidelity budget",
                              min=0.01, max=0.99)
    fidelity_samples = Option(int, 16, "calibration samples (not held out) used to rank nodes by sensitivity",
                              min=1)
    fidelity_probes = Option(int, 48, "at most this many sensitivity probes (beyond: neighbouring nodes are "
                             "probed in groups)", min=1)

    def __init__(self, **options):
        super().__init__(**options)
        if self.fidelity:
            parse_fidelity(self.fidelity, f"pass '{self.name}': option 'fidelity'")



def split_samples(data: Any, holdout: float, seed: int, max_rank_samples: int) -> tuple[list, list, Any]:
    """``(ranking samples, held-out samples, calibration part)`` of ``data``."""
    if len(data) < 2:
        raise UsageError(f"fidelity budget: calibration data {data.source} has {len(data)} sample; "
                         "need at least 2 (some are held out to check the target)")
    calib, held = data.split(holdout, seed)
    rank = calib.take(max_rank_samples) if max_rank_samples and max_rank_samples < len(calib) else calib
    return list(rank), list(held), calib


# ----------------------------------------------------------------------------------
# Running candidates
# ----------------------------------------------------------------------------------
def run_all(sess: Any, samples: Sequence[Feeds], outputs: Sequence[str] | None = None,
            extra: Feeds | None = None) -> list[Outputs]:
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    result = []
    for s in samples:
        feed = {k: v for k, v in s.items() if k in inputs}
        if extra:
            feed.update(extra)
        result.append(dict(zip(names, sess.run(names, feed))))
    return result


class Candidates:
    """Runs the model with a set of candidate nodes kept in float."""

    sessions = 0
    output_names: list[str] = []

    def outputs(self, keep: frozenset[str], samples: Sequence[Feeds]) -> list[Outputs]:
        raise NotImplementedError


class RebuildCandidates(Candidates):
    """One model per candidate: ``build(keep)`` returns the quantized model
    with ``keep`` in float (a copy; the pass's model is not touched)."""

    def __init__(self, build: Callable[[frozenset[str]], onnx.ModelProto], output_names: Sequence[str],
                 source_dir: Path | None = None):
        self.build = build
        self.output_names = list(output_names)
        self.source_dir = source_dir
        self._last: tuple[frozenset[str], Any] | None = None

    def outputs(self, keep: frozenset[str], samples: Sequence[Feeds]) -> list[Outputs]:
        if self._last is None or self._last[0] != keep:
            self._last = None
            sess = runtime.session(self.build(keep), source_dir=self.source_dir)
            self.sessions += 1
            self._last = (keep, sess)
        return run_all(self._last[1], samples, self.output_names)


class SwitchedCandidates(Candidates):
    """One model for every candidate: node ``name`` computes
    ``float + s * (quantized - float)`` with ``s`` the scalar input
    ``switches[name]`` (1 quantized, 0 float)."""

    def __init__(self, proto: onnx.ModelProto, switches: Mapping[str, str], output_names: Sequence[str],
                 source_dir: Path | None = None):
        self.switches = dict(switches)
        self.output_names = list(output_names)
        self.sess = runtime.session(proto, source_dir=source_dir)
        self.sessions = 1

    def outputs(self, keep: frozenset[str], samples: Sequence[Feeds]) -> list[Outputs]:
        extra = {inp: np.array(0.0 if name in keep else 1.0, np.float32) for name, inp in self.switches.items()}
        return run_all(self.sess, samples, self.output_names, extra)


def metric_values(outputs: Sequence[Outputs], references: Sequence[Outputs], spec: FidelitySpec | None = None,
                  samples: Sequence[Feeds] | None = None) -> dict[str, float]:
    """Every built-in metric, and ``spec``'s user metrics (which see ``samples``)."""
    return compare_outputs(outputs, references, samples, spec.user if spec is not None else ())


def measure(candidates: Candidates, keep: frozenset[str], samples: Sequence[Feeds],
            references: Sequence[Outputs], spec: FidelitySpec | None = None) -> dict[str, float]:
    return metric_values(candidates.outputs(keep, samples), references, spec, samples)


@dataclasses.dataclass
class BudgetData:
    """The samples a fidelity search works on and the float model's outputs
    on them: ``rank`` (ranking, from the calibration part), ``held`` (held
    out: only checked against), ``calib`` (the calibration part, for
    statistics), and the reference outputs of each."""

    rank: list[Feeds]
    held: list[Feeds]
    calib: Any
    names: list[str]
    rank_refs: list[Outputs]
    held_refs: list[Outputs]

    @classmethod
    def prepare(cls, model: Any, ctx: Any, p: Any) -> "BudgetData":
        """Split ``ctx.calibration`` with pass ``p``'s budget options and run
        the model (float, as it is now) on both parts."""
        rank, held, calib = split_samples(ctx.calibration, p.fidelity_holdout, ctx.seed, p.fidelity_samples)
        names, (rank_refs, held_refs) = reference_outputs(model.to_proto(), model.source_dir, rank, held)
        return cls(rank, held, calib, names, rank_refs, held_refs)


# ----------------------------------------------------------------------------------
# Ranking and the budget
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class NodeSensitivity:
    """A candidate node, the output error its quantization alone causes
    (``values``, on the ranking samples) and that error's ``score``
    (:meth:`FidelitySpec.badness`: above 1, the node alone breaks the spec).
    ``group`` > 1: measured together with that many neighbours."""

    name: str
    op: str
    score: float
    values: dict[str, float]
    group: int = 1

    def as_dict(self, metrics: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.name, "op": self.op,
                               "error": {m: number(self.values[m]) for m in metrics if m in self.values},
                               "score": number(self.score)}
        if self.group > 1:
            out["measured_with"] = self.group
        return out


def rank_nodes(nodes: Sequence[tuple[str, str]], candidates: Candidates, samples: Sequence[Feeds],
               references: Sequence[Outputs], spec: FidelitySpec, *, max_probes: int = 96,
               quiet: bool = False) -> list[NodeSensitivity]:
    """``nodes`` (name, op) in graph order, most sensitive first."""
    names = [n for n, _ in nodes]
    everything = frozenset(names)
    count = max(1, min(len(nodes), max_probes))
    bounds = np.linspace(0, len(nodes), count + 1).round().astype(int)
    groups = [list(range(bounds[i], bounds[i + 1])) for i in range(count) if bounds[i + 1] > bounds[i]]
    ranked: list[tuple[float, int, NodeSensitivity]] = []
    for group in progress(groups, description="fidelity: ranking nodes", quiet=quiet):
        alone = frozenset(names[i] for i in group)
        values = measure(candidates, everything - alone, samples, references, spec)
        score = spec.badness(values)
        for i in group:
            ranked.append((score, i, NodeSensitivity(names[i], nodes[i][1], score, values, len(group))))
    ranked.sort(key=lambda t: (-_sortable(t[0]), t[1]))
    return [r for _, _, r in ranked]


@dataclasses.dataclass
class BudgetResult:
    kept: list[NodeSensitivity]          # kept in float, most sensitive first
    report: FidelityReport               # held-out fidelity of the chosen model
    all_quantized: FidelityReport        # held-out fidelity with every candidate quantized
    feasible: bool                       # False: not even one node could be quantized
    evaluations: int


def fit_to_budget(ranked: Sequence[NodeSensitivity], candidates: Candidates, samples: Sequence[Feeds],
                  references: Sequence[Outputs], spec: FidelitySpec, *, quiet: bool = False) -> BudgetResult:
    """Smallest ``k`` such that keeping ``ranked[:k]`` in float meets ``spec``
    on ``samples`` (held out), by bisection; see the module doc."""
    n = len(ranked)
    reports: dict[int, FidelityReport] = {}

    def evaluate(k: int) -> FidelityReport:
        keep = frozenset(r.name for r in ranked[:k])
        reports[k] = FidelityReport.of(spec, measure(candidates, keep, samples, references, spec), len(samples))
        return reports[k]

    steps = 1 + max(0, math.ceil(math.log2(n))) if n > 1 else 1
    lo, hi = 0, n  # invariant: k=lo fails (once evaluated), k=hi passes
    for step in progress(range(steps), description="fidelity: fitting the budget", quiet=quiet):
        if step == 0:
            if evaluate(0).met:
                hi = 0
                break
            continue
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        if evaluate(mid).met:
            hi = mid
        else:
            lo = mid
    while hi - lo > 1:  # only if the step count was too small (it is not): finish without a bar
        mid = (lo + hi) // 2
        if evaluate(mid).met:
            hi = mid
        else:
            lo = mid
    feasible = hi < n
    # infeasible: everything stays float, the reference itself
    report = reports[hi] if feasible else FidelityReport.of(
        spec, metric_values(references, references, spec, samples), len(samples))
    return BudgetResult(list(ranked[:hi]), report, reports[0], feasible, len(reports))


def _sortable(x: float) -> float:
    return 1e300 if math.isnan(x) or x == math.inf else x


def number(v: float) -> float | str:
    """A metric value for a JSON report: 6 significant digits, non-finite as text."""
    if not math.isfinite(v):
        return str(v)
    return float(f"{v:.6g}")


# ----------------------------------------------------------------------------------
# The whole search, for a pass
# ----------------------------------------------------------------------------------
def measure_model(spec: FidelitySpec, proto: onnx.ModelProto, source_dir: Path | None,
            samples: Sequence[Feeds], refs: Sequence[Outputs]) -> FidelityReport:
    """``spec``'s metrics of a model against the float model's outputs ``refs``."""
    sess = runtime.session(proto, source_dir=source_dir)
    names = list(refs[0]) if refs else None
    values = metric_values(run_all(sess, samples, names), refs, spec, samples)
    return FidelityReport.of(spec, values, len(samples))


@dataclasses.dataclass
class SearchOutcome:
    keep: frozenset[str]
    stats: dict[str, Any]
    note: str
    spec: FidelitySpec | None = None
    held_samples: Sequence[Feeds] = ()
    held_refs: Sequence[Outputs] = ()

    def verify(self, proto: onnx.ModelProto, source_dir: Path | None = None) -> FidelityReport | None:
        """Measure the model the pass actually wrote on the held-out samples
        and record it as the final fidelity (``heldout``) in the stats."""
        if self.spec is None or not self.held_samples:
            return None
        report = measure_model(self.spec, proto, source_dir, self.held_samples, self.held_refs)
        metrics = [m for m in self.stats.get("heldout", {}) if m != "samples"] or list(report.values)
        self.stats["heldout"] = {"samples": report.samples, **{m: number(report.values[m]) for m in metrics}}
        self.stats["met"] = report.met
        if not report.met:
            self.note += (f"; the written model measures {report.line(list(self.spec.metrics))} on the held-out "
                          f"samples and misses the target")
        return report


    def conclude(self, model, quantized: bool, stats: dict, notes: list[str], ctx, pass_name: str) -> None:
        """Measure what the pass wrote (when it quantized anything), put the
        fidelity block into the pass's stats and say the outcome."""
        if quantized:
            self.verify(model.to_proto(), model.source_dir)
        stats["fidelity"] = self.stats
        notes.append(self.note)
        ctx.info(f"graphopt: {pass_name}: {self.note}")


def search(spec: FidelitySpec, nodes: Sequence[tuple[str, str]], candidates: Candidates,
           rank_samples: Sequence[Feeds], rank_refs: Sequence[Outputs],
           held_samples: Sequence[Feeds], held_refs: Sequence[Outputs], *,
           max_probes: int, quiet: bool, method: str) -> SearchOutcome:
    """Rank ``nodes`` and fit the budget; returns what to keep in float, the
    ``fidelity`` block of the pass's stats and a one-line note."""
    metrics = list(spec.metrics)
    for m in ("cosine", "top1", "max-abs"):
        if m not in metrics:
            metrics.append(m)
    if not nodes:
        return SearchOutcome(frozenset(), {"target": str(spec), "candidates": 0}, "fidelity: nothing to quantize")
    ranked = rank_nodes(nodes, candidates, rank_samples, rank_refs, spec, max_probes=max_probes, quiet=quiet)
    budget = fit_to_budget(ranked, candidates, held_samples, held_refs, spec, quiet=quiet)
    stats: dict[str, Any] = {
        "target": str(spec),
        "met": budget.report.met,
        "feasible": budget.feasible,
        "candidates": len(nodes),
        "kept_float": [r.as_dict(metrics) for r in budget.kept],
        "quantized": len(nodes) - len(budget.kept) if budget.feasible else 0,
        "heldout": {"samples": len(held_samples), **{m: number(budget.report.values[m]) for m in metrics}},
        "all_quantized_heldout": {m: number(budget.all_quantized.values[m]) for m in metrics},
        "ranking": {"method": method, "samples": len(rank_samples),
                    "probes": min(len(nodes), max(1, max_probes)),
                    "grouped": any(r.group > 1 for r in ranked),
                    "top": [r.as_dict(metrics) for r in ranked[:10]]},
        "evaluations": budget.evaluations,
        "sessions": candidates.sessions,
    }
    shown = ", ".join(f"{m} {number(budget.report.values[m])}" for m in spec.metrics)
    if not budget.feasible:
        worst = ranked[-1] if ranked else None
        note = (f"fidelity {spec} cannot be met on {len(held_samples)} held-out sample(s) even with only the "
                f"least sensitive node{'' if worst is None else ' (' + worst.name + ')'} quantized; nothing "
                f"quantized (the model stays float)")
        return SearchOutcome(frozenset(n for n, _ in nodes), stats, note)
    outcome = SearchOutcome(frozenset(r.name for r in budget.kept), stats, "", spec, held_samples, held_refs)
    if budget.kept:
        names = ", ".join(f"{r.name} ({_score_text(r, spec)})" for r in budget.kept[:8])
        more = f" and {len(budget.kept) - 8} more" if len(budget.kept) > 8 else ""
        note = (f"fidelity {spec}: kept {len(budget.kept)} of {len(nodes)} node(s) in float: {names}{more}; "
                f"held-out ({len(held_samples)} sample(s)): {shown}")
    else:
        note = f"fidelity {spec}: met with every node quantized; held-out ({len(held_samples)} sample(s)): {shown}"
    outcome.note = note
    return outcome


def _score_text(r: NodeSensitivity, spec: FidelitySpec) -> str:
    return ", ".join(f"{m} {number(r.values[m])} alone" for m in spec.metrics)


def reference_outputs(proto: onnx.ModelProto, source_dir: Path | None,
                      *sample_sets: Sequence[Feeds]) -> tuple[list[str], list[list[Outputs]]]:
    """The float model's outputs on each sample set (one session)."""
    sess = runtime.session(proto, source_dir=source_dir)
    names = [o.name for o in sess.get_outputs()]
    return names, [run_all(sess, s, names) for s in sample_sets]


__all__ = ["BudgetData", "BudgetResult", "Candidates", "NodeSensitivity", "RebuildCandidates", "SearchOutcome",
           "SwitchedCandidates", "fidelity_spec", "fit_to_budget", "measure", "rank_nodes", "reference_outputs",
           "metric_values", "number", "search", "split_samples"]
