"""Sensitivity-aware allocation of a pruning budget over channel groups.

Groups differ by far in how much pruning they tolerate: a uniform ratio
spends the same fraction on a group whose channels are redundant and on one
the output depends on.  Here each group is pruned *alone* at a few ratios,
with the recovery the pass applies (least-squares reconstruction or mean
folding), and the model's output error on the calibration samples is measured
(:func:`measure`).  :func:`allocate` then spends the channel budget where the
error per removed channel is least: each group's measured curve is made
monotone and convex (its lower hull), and segments are taken cheapest first
until the budget is met, the last one in part.  Errors of different groups are
assumed to add up, which holds for small errors and ranks the groups
correctly where it does not.

Deterministic: fixed group and ratio order, ties broken by group id.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from graphopt.activations import Activations
from graphopt.console import progress

Curve = list[tuple[int, float]]  # (channels removed, output error), starting at (0, 0)


def output_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """Mean squared relative error ``||got - want||^2 / ||want||^2`` over the
    outputs: squared, because independent perturbations add in energy."""
    errs = []
    for name, w in want.items():
        g = got.get(name)
        if g is None or g.shape != w.shape or not np.isfinite(g).all():
            return math.inf
        w64, g64 = w.astype(np.float64).ravel(), g.astype(np.float64).ravel()
        errs.append(float(np.sum(np.square(g64 - w64)) / max(float(np.sum(np.square(w64))), 1e-24)))
    return float(np.mean(errs)) if errs else 0.0


def compared_tensors(proto: onnx.ModelProto) -> list[str]:
    """The tensors a trial is scored on: each graph output, or the input of the
    Softmax/LogSoftmax that makes it (a saturated softmax hides how far its
    logits moved, and errors stop adding up)."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    out = []
    for o in proto.graph.output:
        node = producers.get(o.name)
        name = node.input[0] if node is not None and node.op_type in ("Softmax", "LogSoftmax") else o.name
        if name not in out:
            out.append(name)
    return out


class Reference:
    """The original model's :func:`compared_tensors` on ``max_samples``
    calibration samples after the first ``skip`` (the ones recovery fits on: an
    in-sample score flatters the groups whose refitted layers have the most
    weights), to score each trial model against.  ``held_out`` says whether
    there were samples after ``skip``; if not, the first ones are used.  A
    trial runs only what its edit changed (:class:`graphopt.activations.Activations`)."""

    def __init__(self, proto: onnx.ModelProto, calibration: Any, max_samples: int, source_dir=None,
                 skip: int = 0, metric: Any = None):
        samples = []
        head = []
        for i, sample in enumerate(calibration):
            if i < skip:
                if len(head) < max_samples:
                    head.append(dict(sample))
                continue
            if len(samples) >= max_samples:
                break
            samples.append(dict(sample))
        self.held_out = bool(samples)
        self.activations = Activations(proto, samples if samples else head, source_dir)
        self.samples = self.activations.samples
        # a task metric (graphopt.metrics.UserMetric) judges the graph outputs themselves
        self.metric = metric
        self.names = [o.name for o in proto.graph.output] if metric is not None else compared_tensors(proto)
        self.outputs = self.activations.values(self.names)

    def error(self, proto: onnx.ModelProto, source_dir=None) -> float:
        """The trial's error: the mean squared relative output error, or with a
        task metric ``1 - metric`` (its mean over the samples; a score such as
        F1 is 1 when nothing moved)."""
        got = self.activations.run(proto, self.names, source_dir)
        if self.metric is not None:
            # the metric gets arrays of its own: the reference values are shared, read-only
            scores = [self.metric.score(_copies(want), g, s) for g, want, s in zip(got, self.outputs, self.samples)]
            return max(0.0, 1.0 - float(np.mean(scores))) if scores else 0.0
        errs = [output_error(g, want) for g, want in zip(got, self.outputs)]
        return float(np.mean(errs)) if errs else 0.0


def _copies(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in values.items()}


def measure(trial: Callable[[int, int], float], removals: dict[int, list[int]],
            quiet: bool = True) -> dict[int, Curve]:
    """Output error of each group pruned alone: ``trial(group, channels removed)``
    for each count in ``removals[group]``; a trial that fails counts as an
    infinite error (the group is then spent last)."""
    jobs = [(g, r) for g in sorted(removals) for r in removals[g]]
    curves: dict[int, Curve] = {g: [(0, 0.0)] for g in sorted(removals)}
    for g, r in progress(jobs, total=len(jobs), description="pruning sensitivity", quiet=quiet):
        curves[g].append((r, trial(g, r)))
    return curves


def _hull(curve: Curve) -> Curve:
    """Lower convex hull of a monotone version of ``curve`` (error never falls
    as more channels go), from (0, 0), up to its first failed trial."""
    pts: Curve = []
    best = 0.0
    for n, e in sorted(curve):
        if math.isinf(e) or math.isnan(e):
            break
        best = max(best, e)
        if pts and pts[-1][0] == n:
            pts[-1] = (n, best)
        else:
            pts.append((n, best))
    hull: Curve = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # the middle point goes when it is on or above the chord from hull[-2] to p
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(curves: dict[int, Curve], budget: int) -> tuple[dict[int, int], float]:
    """Channels to remove per group so the total is ``budget`` (or all that
    the curves reach) at the least predicted error; returns (removed per group,
    predicted error)."""
    segments = []
    for g in sorted(curves):
        hull = _hull(curves[g])
        for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
            segments.append(((y2 - y1) / (x2 - x1), g, x1, x2, y1, y2))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    removed = {g: 0 for g in curves}
    error = 0.0
    left = budget
    for slope, g, x1, x2, y1, y2 in segments:
        if left <= 0:
            break
        if removed[g] != x1:  # an earlier segment of this group was cut short
            continue
        take = min(x2 - x1, left)
        removed[g] += take
        error += slope * take
        left -= take
    return removed, error


def allocate_by_cost(curves: dict[int, Curve], costs: dict[int, dict[int, int]],
                     budget: int) -> tuple[dict[int, int], float, int]:
    """:func:`allocate` with the budget in another unit than channels: each
    trial's ``costs[group][channels removed]`` (e.g. MACs saved), so groups
    are ranked by error per unit saved.  Returns (channels removed per group,
    predicted error, units removed).  A group's segment that the budget takes
    in part is taken whole: every count removed is one a trial measured (and
    one that rounding to vector lanes allows), and the budget is met or
    passed, never missed by a rounding."""
    points: dict[int, list[tuple[int, int]]] = {}  # (cost, channels), increasing in both
    by_cost: dict[int, Curve] = {}
    for g in sorted(curves):
        pts, curve, last = [(0, 0)], [(0, 0.0)], 0
        for n, e in sorted(curves[g]):
            if n == 0:
                continue
            c = max(int(costs.get(g, {}).get(n, 0)), last + 1)  # a failed trial has no cost: keep order
            pts.append((c, n))
            curve.append((c, e))
            last = c
        points[g], by_cost[g] = pts, curve
    spent, error = allocate(by_cost, budget)
    removed, reached = {}, 0
    for g, c in spent.items():
        cost, n = next(((c2, n2) for c2, n2 in points[g] if c2 >= c), points[g][-1])
        removed[g] = n if c > 0 else 0
        reached += cost if c > 0 else 0
    return removed, error, reached


def removal_grid(size: int, ratios: Sequence[float], floor: int) -> list[int]:
    """Distinct channel counts to try removing from a group of ``size``
    (never below ``floor`` kept)."""
    out = []
    for r in ratios:
        n = min(int(math.floor(r * size + 1e-9)), size - floor)
        if n > 0 and n not in out:
            out.append(n)
    return sorted(out)
