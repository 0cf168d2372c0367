"""prune-channels: structured channel pruning with every coupled tensor updated.

The dependency analysis (:mod:`graphopt.passes.pruning.groups`) finds the groups of
channel dimensions that must lose the same channels; this pass scores the
channels of each prunable group (:mod:`graphopt.passes.pruning.importance`), keeps the
most important ones, removes the rest from every coupled tensor, and recovers
what it can without training (:mod:`graphopt.passes.pruning.recovery`).  Groups the
analysis cannot prove safe are left whole and named in the notes.  With
``allocate=sensitivity`` the fraction removed per group comes from each
group's measured output error (:mod:`graphopt.passes.pruning.allocation`) instead of
one ratio for all.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import numpy as np
import onnx

from graphopt.activations import Activations, with_outputs
from graphopt.context import PassContext
from graphopt.errors import UsageError
from graphopt.ir import Model
from graphopt.pass_base import Option, Pass, PassResult, Tolerance
from graphopt.registry import register_pass
from graphopt.rewrite import as_constant
from graphopt.passes.folding import materialize, topological_order
from graphopt.passes.pruning import allocation, recovery
from graphopt.passes.pruning.groups import ChannelAnalysis, analyze, protect
from graphopt.passes.pruning.importance import activation_importance, reconstruction_importance, weight_importance

CRITERIA = ("l1", "l2", "bn-gamma", "activation", "reconstruction")


def kept_count(size: int, remove: int, min_channels: int, round_to: int, up: bool = False) -> int:
    """Channels a group keeps: ``size - remove``, at least ``min_channels`` (and
    1), rounded to a multiple of ``round_to`` (the nearest, or with ``up`` the
    next, so that no group loses more than asked; never above ``size``)."""
    keep = max(size - remove, min_channels, 1)
    if round_to > 1:
        steps = math.ceil(keep / round_to) if up else int(round(keep / round_to))
        keep = max(round_to, steps * round_to)
    return min(keep, size)


# round-to=0: kept counts become multiples of the target's fp32 vector lanes
# (PassContext.vector_lanes), rounded up; this many where no target is named:
# whole AVX2 and NEON registers, half an AVX-512 one.
DEFAULT_LANES = 8


@dataclasses.dataclass(frozen=True)
class Settings:
    """The options as this run applies them: ``auto`` resolved by whether
    calibration data is given, round-to by the target."""

    criterion: str
    allocate: str
    round_to: int
    round_up: bool

    def kept(self, size: int, remove: int, min_channels: int) -> int:
        return kept_count(size, remove, min_channels, self.round_to, self.round_up)


def select(scores: dict[int, np.ndarray], ratio: float, scope: str, min_channels: int,
           round_to: int, up: bool = False) -> dict[int, np.ndarray]:
    """Kept channel indices per group: the highest scores survive."""
    keep_n: dict[int, int] = {}
    if scope == "layer":
        for g, s in scores.items():
            keep_n[g] = kept_count(len(s), int(math.floor(ratio * len(s) + 1e-9)), min_channels, round_to, up)
    else:
        # Global: one ranking of all prunable channels on scores divided by their group's mean.
        entries = []
        for g, s in scores.items():
            mean = float(np.mean(s)) if len(s) else 0.0
            norm = s / mean if mean > 0 else np.zeros_like(s)
            entries += [(float(v), g, i) for i, v in enumerate(norm)]
        entries.sort()
        total = sum(len(s) for s in scores.values())
        budget = int(math.floor(ratio * total + 1e-9))
        removed = {g: 0 for g in scores}
        floor = {g: max(min_channels, 1) for g in scores}
        for _, g, _ in entries:
            if budget <= 0:
                break
            if len(scores[g]) - removed[g] > floor[g]:
                removed[g] += 1
                budget -= 1
        for g, s in scores.items():
            keep_n[g] = kept_count(len(s), removed[g], min_channels, round_to, up)
    out = {}
    for g, s in scores.items():
        order = np.argsort(-s, kind="stable")
        out[g] = np.sort(order[: keep_n[g]])
    return out


@register_pass("prune-channels")
class PruneChannels(Pass):
    """Remove the least important channels of every prunable channel group (lossy)."""

    tolerance = Tolerance(relative=None, cosine=0.5, lossy=True)

    ratio = Option(float, 0.3, "fraction of channels removed (per group, or of all channels for scope=global)",
                   min=0.0, max=0.95)
    criterion = Option(str, "auto", "channel importance; auto: reconstruction with calibration data, else l1",
                       choices=("auto",) + CRITERIA)
    scope = Option(str, "layer", "rank channels within each group or across groups (normalized)",
                   choices=("layer", "global"))
    min_channels = Option(int, 1, "no group keeps fewer channels", min=1)
    round_to = Option(int, 0, "kept channel counts are multiples of this (rounded to the nearest); 0: of the "
                      f"target's fp32 vector lanes ({DEFAULT_LANES} where none is named), rounded up", min=0)
    protect = Option(list, [], "node names or regexes whose groups stay whole")
    reconstruct = Option(bool, True, "least-squares refit of the next layers on calibration data (if given)")
    calib_samples = Option(int, 32, "calibration samples used for activations and reconstruction", min=1)
    refit = Option(str, "consumers", "reconstruction: refit the layers that lost input channels (consumers) or "
                   "also every later Conv/Gemm/MatMul whose input changed (downstream)",
                   choices=("consumers", "downstream"))
    fit_rows = Option(int, recovery.MAX_ROWS, "reconstruction: most rows (sampled positions) of each "
                      "least-squares fit", min=16)
    ridge = Option(float, 1e-4, "reconstruction: ridge strength, relative to the mean input energy", min=0.0)
    allocate = Option(str, "auto", "per-group ratios: uniform (ratio and scope) or sensitivity (measured on "
                      "calibration data: insensitive groups lose more, see budget); auto: sensitivity with "
                      "calibration data, else uniform", choices=("auto", "uniform", "sensitivity"))
    budget = Option(str, "macs", "allocate=sensitivity: ratio is the fraction of the model's MACs removed (macs: "
                    "groups are ranked by output error per MAC) or of its prunable channels (channels)",
                    choices=("macs", "channels"))
    sensitivity_ratios = Option(list, [], "allocate=sensitivity: ratios each group is measured at, pruned alone "
                                "(';'-separated; the largest caps a group); empty: ratio/2, ratio, 3*ratio/2")
    sensitivity_metric = Option(str, "", "allocate=sensitivity: a task metric (--metric NAME or a graphopt.metrics "
                                "entry point) trials are scored on, as 1 - metric; empty: relative output error")
    sensitivity_samples = Option(int, 16, "allocate=sensitivity: calibration samples each trial is recovered on, "
                                 "and as many following ones it is scored on", min=1)

    def settings(self, ctx: PassContext) -> Settings:
        """The options this run applies (``auto`` and ``round-to=0`` resolved)."""
        data = ctx.calibration is not None
        criterion = self.criterion if self.criterion != "auto" else ("reconstruction" if data else "l1")
        allocate = self.allocate if self.allocate != "auto" else ("sensitivity" if data else "uniform")
        if self.round_to:
            return Settings(criterion, allocate, self.round_to, False)
        return Settings(criterion, allocate, getattr(ctx, "vector_lanes", None) or DEFAULT_LANES, True)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if self.criterion in ("activation", "reconstruction") and ctx.calibration is None:
            raise UsageError(f"prune-channels: criterion={self.criterion} needs calibration data (--calib)")
        if self.allocate == "sensitivity" and ctx.calibration is None:
            raise UsageError("prune-channels: allocate=sensitivity needs calibration data (--calib)")
        settings = self.settings(ctx)
        if self.sensitivity_metric and settings.allocate != "sensitivity":
            raise UsageError("prune-channels: option 'sensitivity-metric' needs allocate=sensitivity "
                             "(the default with --calib)")
        if settings.allocate == "sensitivity":
            self._task_metric()  # an unknown name fails before any work
        grid = self._grid()
        notes = _materialize_weights(model)
        analysis = analyze(model)
        if self.protect:
            protect(analysis, self.protect)
        groups = analysis.groups()
        prunable = [g.id for g in groups if g.prunable]
        notes += [f"group #{g.id} ({', '.join(g.roots[:3]) or 'no producer'}, {g.size} channels) left alone: "
                  f"{g.reasons[0]}" for g in groups if not g.prunable]
        stats: dict[str, Any] = {"groups": len(groups), "groups_prunable": len(prunable),
                                 "channels_before": sum(g.size for g in groups if g.prunable)}
        if self.ratio == 0:
            stats.update(groups_pruned=0, channels_after=stats["channels_before"])
            return PassResult(False, stats, notes, reason="ratio=0 removes nothing")
        if not prunable:
            stats.update(groups_pruned=0, channels_after=stats["channels_before"])
            return PassResult(False, stats, notes, reason=_why_nothing_prunable(model, groups))
        stats["settings"] = dataclasses.asdict(settings)
        if settings.criterion == "activation":
            scores = activation_importance(analysis, prunable, ctx.calibration, self.calib_samples)
        elif settings.criterion == "reconstruction":
            scores = reconstruction_importance(analysis, prunable, ctx.calibration, self.calib_samples, self.ridge)
        else:
            scores = weight_importance(analysis, prunable, settings.criterion)
        if settings.allocate == "sensitivity":
            keep = self._allocate(model, analysis, scores, ctx, grid, settings, stats, notes)
        else:
            keep = select(scores, self.ratio, self.scope, self.min_channels, settings.round_to, settings.round_up)
        keep = {g: k for g, k in keep.items() if len(k) < analysis.spaces[g].size}
        if not keep:
            stats.update(groups_pruned=0, channels_after=stats["channels_before"])
            return PassResult(False, stats, notes, reason=(
                f"every one of the {len(prunable)} prunable groups keeps all its channels at ratio={self.ratio} "
                f"(min-channels={self.min_channels}, round-to={settings.round_to})"))
        original = model.to_proto() if ctx.calibration is not None and self.reconstruct else None
        before = model.to_proto() if ctx.calibration is None else None
        result = prune(model, analysis, keep, ctx, reconstruct=self.reconstruct, original=original,
                       max_samples=self.calib_samples, lam=self.ridge, downstream=self.refit == "downstream",
                       max_rows=self.fit_rows)
        stats.update(result)
        stats["channels_after"] = stats["channels_before"] - sum(
            analysis.spaces[g].size - len(k) for g, k in keep.items())
        stats["per_group"] = {f"#{g} {'+'.join(analysis.spaces[g].roots[:2])}": [analysis.spaces[g].size, len(k)]
                              for g, k in keep.items()}
        notes += stats.pop("notes", [])
        if before is not None:
            self._warn_without_data(before, model, ctx, stats)
        return PassResult(True, stats, notes)

    def _warn_without_data(self, before: onnx.ModelProto, model: Model, ctx: PassContext, stats: dict) -> None:
        """Pruned without calibration data: nothing recovered what was removed,
        so say how far the outputs moved, measured on seeded random inputs."""
        from graphopt import runtime
        from graphopt.fidelity import compare_outputs

        try:
            ref_sess = runtime.session(before, source_dir=model.source_dir)
            new_sess = runtime.session(model.to_proto(), source_dir=model.source_dir)
            feeds = [runtime.random_inputs(ref_sess, seed=ctx.seed + i, shapes=ctx.input_shapes) for i in range(4)]
            cosine = compare_outputs([runtime.run(new_sess, f) for f in feeds],
                                     [runtime.run(ref_sess, f) for f in feeds])["cosine"]
        except Exception:  # a model onnxruntime cannot run on random inputs: no figure, still the warning
            cosine = None
        figure = f" (worst output cosine {cosine:.4f} on 4 random inputs)" if cosine is not None else ""
        if cosine is not None:
            stats["random_input_cosine"] = round(cosine, 6)
        if not ctx.quiet:
            print(f"graphopt: warning: prune-channels without --calib: the outputs move{figure}; give --calib "
                  "to rank channels on data and recover what they carried", file=sys.stderr)

    def _grid(self) -> list[float]:
        if not self.sensitivity_ratios:
            return sorted({min(round(f * self.ratio, 6), 0.95) for f in (0.5, 1.0, 1.5)} - {0.0})
        try:
            grid = sorted({float(r) for r in self.sensitivity_ratios})
        except ValueError:
            raise UsageError(f"prune-channels: option 'sensitivity-ratios': not a list of numbers: "
                             f"{';'.join(self.sensitivity_ratios)!r}") from None
        if not grid or not all(0 < r < 1 for r in grid):
            raise UsageError("prune-channels: option 'sensitivity-ratios': each ratio must lie in (0, 1)")
        return grid

    def _task_metric(self):
        """The ``sensitivity-metric`` to score trials on, or None."""
        if not self.sensitivity_metric:
            return None
        from graphopt import metrics

        metric = metrics.lookup(self.sensitivity_metric)
        if metric is None:
            known = ", ".join(metrics.registered()) or "none registered"
            raise UsageError(f"prune-channels: option 'sensitivity-metric': unknown metric "
                             f"'{self.sensitivity_metric}' (task metrics: {known}; add one with --metric NAME=module:function)")
        return metric

    def _allocate(self, model: Model, analysis: ChannelAnalysis, scores: dict[int, np.ndarray],
                  ctx: PassContext, grid: list[float], settings: Settings, stats: dict,
                  notes: list[str]) -> dict[int, np.ndarray]:
        """Kept channels per group from measured sensitivities: each group pruned
        alone at each ratio of ``grid`` (with this pass's recovery), then the
        budget spent where the output error per channel is least."""
        proto = model.to_proto()
        source_dir = model.source_dir
        sizes = {g: analysis.spaces[g].size for g in scores}
        roots = {g: list(analysis.spaces[g].roots) for g in scores}
        order = {g: np.argsort(-s, kind="stable") for g, s in scores.items()}
        floor = max(self.min_channels, 1)
        removals = {}
        for g, size in sizes.items():
            counts = {size - settings.kept(size, n, self.min_channels)
                      for n in allocation.removal_grid(size, grid, floor)}
            removals[g] = sorted(n for n in counts if n > 0)
        samples = self.sensitivity_samples
        reference = allocation.Reference(proto, ctx.calibration, samples, source_dir, skip=samples,
                                         metric=self._task_metric())
        if not reference.held_out:
            notes.append(f"allocate=sensitivity: no calibration samples beyond the {samples} that trials are "
                         "recovered on; trials were scored on those same samples")
        failed: list[str] = []
        # The original's activations on the samples trials are recovered on, shared by every trial.
        fit = Activations(proto, (s for _, s in zip(range(samples), ctx.calibration)), source_dir) \
            if self.reconstruct else None
        by_macs = self.budget == "macs"
        base_macs = _total_macs(model, ctx) if by_macs else 0
        saved: dict[int, dict[int, int]] = {g: {} for g in sizes}  # MACs a trial removed

        def trial(g: int, n: int) -> float:
            m = Model.from_proto(onnx.ModelProto.FromString(proto.SerializeToString()), source_dir=source_dir)
            a = analyze(m)
            if a.find(g) != g or a.spaces[g].size != sizes[g] or list(a.spaces[g].roots) != roots[g]:
                failed.append(f"#{g}")
                return math.inf
            keep = {g: np.sort(order[g][: sizes[g] - n])}
            try:
                prune(m, a, keep, ctx, reconstruct=self.reconstruct, original=proto if self.reconstruct else None,
                      max_samples=samples, lam=self.ridge, downstream=self.refit == "downstream",
                      max_rows=self.fit_rows, activations=fit)
                if by_macs:
                    saved[g][n] = base_macs - _total_macs(m, ctx)
                return reference.error(m.to_proto(), source_dir)
            except Exception as exc:  # a trial model onnxruntime rejects: not pruned that far
                failed.append(f"#{g} ({type(exc).__name__})")
                return math.inf

        curves = allocation.measure(trial, removals, quiet=getattr(ctx, "quiet", True))
        if by_macs:
            budget = int(math.ceil(self.ratio * base_macs - 1e-9))
            removed, predicted, reached = allocation.allocate_by_cost(curves, saved, budget)
            unit = "MACs"
        else:
            budget = int(math.ceil(self.ratio * sum(sizes.values()) - 1e-9))  # at least ratio of the channels
            removed, predicted = allocation.allocate(curves, budget)
            reached, unit = sum(removed.values()), "channels"
        if reached < budget:
            notes.append(f"allocate=sensitivity: the measured ratios reach {reached} of the {budget} {unit} "
                         f"asked for (largest ratio {grid[-1]:g} per group)")
        if failed:
            notes.append(f"allocate=sensitivity: trials failed for groups {', '.join(sorted(set(failed)))}; "
                         "each is pruned at most up to its last ratio that worked")
        keep = {g: np.sort(order[g][: settings.kept(sizes[g], removed[g], self.min_channels)])
                for g in scores}
        stats["allocation"] = {f"#{g} {'+'.join(roots[g][:2])}": round(1 - len(keep[g]) / sizes[g], 3)
                               for g in sorted(sizes)}
        stats["sensitivity"] = {f"#{g}": [[n, round(e, 6)] for n, e in curves[g]] for g in sorted(curves)}
        stats["predicted_error"] = round(predicted, 6)
        return keep


def _total_macs(model: Model, ctx: PassContext) -> int:
    from graphopt.summary import node_macs

    return sum(n["macs"] for n in node_macs(model, getattr(ctx, "input_shapes", None)))


def _consumer_plan(analysis: ChannelAnalysis, keep: dict[int, np.ndarray]):
    """Consumers that lose input channels: (node, layout, kept input elements,
    removed input elements, kept output indices and axis or None, weight before)."""
    out_index = {}
    for e in analysis.sources:
        if e.role == "out-weight":
            out_index[id(e.node)] = e
    plan = []
    for node, layout in analysis.consumers:
        kept = analysis.indices(layout.segs, keep)
        if len(kept) == layout.length:
            continue
        removed = np.setdiff1d(np.arange(layout.length), kept)
        src = out_index.get(id(node))
        kept_out = None if src is None else (analysis.indices(src.segs, keep), src.axis)
        const = as_constant(node.inputs[1], analysis._overridable)
        weight = None if const is None else np.asarray(const.values)
        plan.append((node, layout, kept, removed, kept_out, weight))
    return plan


def prune(model: Model, analysis: ChannelAnalysis, keep: dict[int, np.ndarray], ctx: PassContext | None = None,
          *, reconstruct: bool = True, original: onnx.ModelProto | None = None, max_samples: int = 32,
          lam: float = 1e-4, downstream: bool = False, max_rows: int = recovery.MAX_ROWS,
          activations: Activations | None = None) -> dict:
    """Remove channels (``keep``: group id -> kept indices) and recover: least
    squares with calibration data and ``reconstruct`` (with ``downstream``, also
    every later layer whose input the pruning changed); otherwise mean folding
    (calibration means, or exact constants without calibration) and BN
    re-estimation with calibration data.  ``activations``: the original on
    the first ``max_samples`` calibration samples, for callers that prune
    many variants of one model.  Returns stats (with ``notes``)."""
    calibration = getattr(ctx, "calibration", None) if ctx is not None else None
    plan = _consumer_plan(analysis, keep)
    stats: dict[str, Any] = {"groups_pruned": len(keep), "notes": []}
    means: dict[str, np.ndarray] = {}
    constant: dict[str, np.ndarray] = {}
    if plan and not (calibration is not None and reconstruct):
        names = sorted({n.inputs[0].name for n, *_ in plan})
        if calibration is not None:
            means = _channel_means(analysis.model, names, plan, calibration, max_samples)
        else:
            constant = _bias_only_values(analysis, keep, names, plan, ctx)
    later = _downstream_layers(analysis, keep, plan) if calibration is not None and reconstruct and downstream \
        else []
    edited = analysis.apply(keep)
    stats["edits"] = edited
    if calibration is not None and reconstruct:
        nodes = [(n, None if kept_out is None else kept_out[0])
                 for n, _, _, _, kept_out, _ in plan if n.op in ("Conv", "Gemm", "MatMul")]
        if later:
            order = {id(n): i for i, n in enumerate(topological_order(model.graph))}
            nodes = sorted(nodes + later, key=lambda item: order.get(id(item[0]), len(order)))
        done, notes = recovery.reconstruct(original, model, nodes, calibration, lam=lam, max_samples=max_samples,
                                           seed=getattr(ctx, "seed", 0), max_rows=max_rows,
                                           activations=activations)
        stats["reconstructed"] = done
        stats["notes"] += notes
    else:
        taken = set(model.graph.tensors().keys())
        folded = 0
        for node, layout, kept, removed, kept_out, weight in plan:
            name = node.inputs[0].name
            if weight is None:
                continue
            if name in means:
                values, idx = means[name][removed], removed
            elif name in constant:
                mask = ~np.isnan(constant[name][removed])
                if not mask.any():
                    continue
                values, idx = constant[name][removed][mask], removed[mask]
            else:
                continue
            w = weight
            if kept_out is not None:
                w = np.take(w, kept_out[0], axis=kept_out[1])
            if np.any(values != 0):
                folded += recovery.fold_removed(model, node, idx, values.astype(np.float64), w, taken)
        stats["bias_folded"] = folded
        if calibration is not None:
            bns = _changed_bns(analysis, plan)
            stats["bn_reestimated"] = recovery.recalibrate_bn(model, bns, calibration, max_samples)
    _refresh_shapes(model)
    return stats


def _downstream_layers(analysis: ChannelAnalysis, keep: dict[int, np.ndarray], plan) -> list:
    """Conv (group 1) / Gemm / MatMul layers with a constant weight that read,
    directly or not, a tensor the pruning changes but lose no input channel
    themselves: (node, kept output indices or None), before ``apply``."""
    touched = [n for n, *_ in plan]
    out_index = {}
    for e in analysis.sources:
        kept = analysis.indices(e.segs, keep)
        if len(kept) < sum(s.length for s in e.segs):
            touched.append(e.node)
        if e.role == "out-weight":
            out_index[id(e.node)] = (kept, len(kept) < sum(s.length for s in e.segs))
    in_plan = {id(n) for n, *_ in plan}
    seen: set[int] = set()
    stack = [t for n in touched for t in n.outputs]
    found = []
    while stack:
        t = stack.pop()
        for user in t.outputs:
            if id(user) in seen:
                continue
            seen.add(id(user))
            stack.extend(user.outputs)
            if id(user) in in_plan or user.op not in ("Conv", "Gemm", "MatMul") or len(user.inputs) < 2:
                continue
            if as_constant(user.inputs[1], analysis._overridable) is None:
                continue
            if user.op == "Conv" and int(user.attrs.get("group", 1)) != 1:
                continue
            kept, sliced = out_index.get(id(user), (None, False))
            found.append((user, kept if sliced else None))
    return found


def _bias_only_values(analysis: ChannelAnalysis, keep: dict[int, np.ndarray], names, plan, ctx):
    """What each removed channel would be with its filters at zero: its bias
    (BN shift, activation of it), a constant that the next layer's bias can
    absorb.  Exact for a channel whose filters are zero; for a channel with
    small filters, it keeps the offset that weight norms do not see."""
    saved = []
    for e in analysis.sources:
        full = sum(s.length for s in e.segs)
        kept = analysis.indices(e.segs, keep)
        if len(kept) == full:
            continue
        const = as_constant(e.node.inputs[e.index], analysis._overridable)
        values = np.array(const.values)
        index = [slice(None)] * values.ndim
        index[e.axis] = np.setdiff1d(np.arange(full), kept)
        saved.append((const, const.values))
        values[tuple(index)] = 0
        const.values = values
    try:
        return _constant_channels(analysis.model, names, plan, ctx)
    finally:
        for const, values in reversed(saved):
            const.values = values


def _channel_means(model: Model, names, plan, calibration, max_samples) -> dict[str, np.ndarray]:
    layouts = {n.inputs[0].name: layout for n, layout, *_ in plan}
    sums: dict[str, np.ndarray] = {}
    count = 0
    for values in recovery.collect(model, names, calibration, max_samples):
        count += 1
        for name, v in values.items():
            axes = tuple(i for i in range(v.ndim) if i != layouts[name].axis)
            sums[name] = sums.get(name, 0) + v.astype(np.float64).mean(axis=axes)
    return {n: s / max(count, 1) for n, s in sums.items()}


def _constant_channels(model: Model, names, plan, ctx) -> dict[str, np.ndarray]:
    """Per input element of each consumer: its value where it is the same at every
    position for two different random inputs, else NaN."""
    from graphopt import runtime

    layouts = {n.inputs[0].name: layout for n, layout, *_ in plan}
    proto = with_outputs(model, names)
    try:
        sess = runtime.session(proto, source_dir=model.source_dir, optimize=False)
        shapes = dict(getattr(ctx, "input_shapes", None) or {})
        runs = [runtime.run(sess, runtime.random_inputs(sess, seed=s, shapes=shapes)) for s in (11, 12)]
    except Exception:
        return {}
    out = {}
    for name in names:
        axis = layouts[name].axis
        a, b = (np.moveaxis(r[name], axis, 0).reshape(r[name].shape[axis], -1) for r in runs)
        lo = np.minimum(a.min(axis=1), b.min(axis=1))
        hi = np.maximum(a.max(axis=1), b.max(axis=1))
        out[name] = np.where(lo == hi, lo, np.nan).astype(np.float64)
    return out


# Parameters prune-channels edits: a weight an exporter computes (light models
# make theirs with ConstantOfShape) must become an initializer first.
_WEIGHT_OPERANDS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
    "BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2),
}


def _materialize_weights(model: Model) -> list[str]:
    """Evaluate computed weights so the analysis sees their values; one note."""
    computed = [
        node.inputs[i]
        for node in model.graph.nodes
        for i in _WEIGHT_OPERANDS.get(node.op, ())
        if i < len(node.inputs) and node.inputs[i].name and node.inputs[i].inputs
        and as_constant(node.inputs[i], model.info.initializer_inputs) is None
    ]
    if not computed:
        return []
    ops = sorted({t.inputs[0].op for t in computed})
    done = materialize(model, computed)
    if not done:
        return [f"{len(computed)} weights are computed ({', '.join(ops)}) and could not be evaluated: "
                "their layers are not pruned"]
    return [f"evaluated {len(done)} weights computed by {', '.join(ops)} into initializers, so their "
            "channels can be removed"]


def _why_nothing_prunable(model: Model, groups: list) -> str:
    """One line: what the analysis saw and why none of it can be pruned."""
    layers = sum(1 for n in model.graph.nodes if n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"))
    if not groups:
        return (f"no channel group found: none of the {layers} Conv/Gemm/MatMul layers has a constant weight "
                "whose output channels could be removed")
    reasons: dict[str, int] = {}
    for g in groups:
        reasons[g.reasons[0]] = reasons.get(g.reasons[0], 0) + 1
    top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
    return (f"none of the {len(groups)} channel groups is prunable ("
            + "; ".join(f"{n} {'group' if n == 1 else 'groups'}: {why}" for why, n in top) + ")")


def _changed_bns(analysis: ChannelAnalysis, plan) -> list:
    """BatchNormalizations right after a consumer whose input lost channels."""
    out = []
    for node, *_ in plan:
        for user in node.outputs[0].outputs if node.outputs else []:
            if user.op == "BatchNormalization" and len(user.inputs) >= 5:
                out.append(user)
    return out


def _refresh_shapes(model: Model) -> None:
    """Intermediate shapes are stale after pruning: drop them and infer again."""
    import onnx_graphsurgeon as gs

    keep = {id(t) for t in list(model.graph.inputs) + list(model.graph.outputs)}
    for t in model.graph.tensors().values():
        if isinstance(t, gs.Variable) and id(t) not in keep:
            t.shape = None
    model.analyses.pop("shapes", None)
    from graphopt.passes.shapes import annotate_shapes

    annotate_shapes(model)
