"""prune-channels: structured channel pruning with every coupled tensor updated.

The dependency analysis (:mod:`passes.pruning.groups`) finds the groups of
channel dimensions that must lose the same channels; this pass scores the
channels of each prunable group (:mod:`passes.pruning.importance`), keeps the
most important ones, removes the rest from every coupled tensor, and recovers
what it can without training (:mod:`passes.pruning.recovery`).  Groups the
analysis cannot prove safe are left whole and named in the notes.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx

from graphopt.context import PassContext
from graphopt.errors import UsageError
from graphopt.ir import Model
from graphopt.pass_base import Option, Pass, PassResult, Tolerance
from graphopt.registry import register_pass
from graphopt.rewrite import as_constant
from passes.pruning import recovery
from passes.pruning.groups import ChannelAnalysis, analyze, protect
from passes.pruning.importance import activation_importance, weight_importance

CRITERIA = ("l1", "l2", "bn-gamma", "activation")


def kept_count(size: int, remove: int, min_channels: int, round_to: int) -> int:
    """Channels a group keeps: ``size - remove``, at least ``min_channels`` (and
    1), rounded to a multiple of ``round_to`` (never above ``size``)."""
    keep = max(size - remove, min_channels, 1)
    if round_to > 1:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    return min(keep, size)


def select(scores: dict[int, np.ndarray], ratio: float, scope: str, min_channels: int,
           round_to: int) -> dict[int, np.ndarray]:
    """Kept channel indices per group: the highest scores survive."""
    keep_n: dict[int, int] = {}
    if scope == "layer":
        for g, s in scores.items():
            keep_n[g] = kept_count(len(s), int(math.floor(ratio * len(s) + 1e-9)), min_channels, round_to)
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
            keep_n[g] = kept_count(len(s), removed[g], min_channels, round_to)
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
    criterion = Option(str, "l1", "channel importance", choices=CRITERIA)
    scope = Option(str, "layer", "rank channels within each group or across groups (normalized)",
                   choices=("layer", "global"))
    min_channels = Option(int, 1, "no group keeps fewer channels", min=1)
    round_to = Option(int, 1, "kept channel counts are multiples of this", min=1)
    protect = Option(list, [], "node names or regexes whose groups stay whole")
    reconstruct = Option(bool, True, "least-squares refit of the next layers on calibration data (if given)")
    calib_samples = Option(int, 32, "calibration samples used for activations and reconstruction", min=1)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if self.criterion == "activation" and ctx.calibration is None:
            raise UsageError("prune-channels: criterion=activation needs calibration data (--calib)")
        analysis = analyze(model)
        if self.protect:
            protect(analysis, self.protect)
        groups = analysis.groups()
        prunable = [g.id for g in groups if g.prunable]
        notes = [f"group #{g.id} ({', '.join(g.roots[:3]) or 'no producer'}, {g.size} channels) left alone: "
                 f"{g.reasons[0]}" for g in groups if not g.prunable]
        stats: dict[str, Any] = {"groups": len(groups), "groups_prunable": len(prunable),
                                 "channels_before": sum(g.size for g in groups if g.prunable)}
        if not prunable or self.ratio == 0:
            stats.update(groups_pruned=0, channels_after=stats["channels_before"])
            return PassResult(False, stats, notes)
        if self.criterion == "activation":
            scores = activation_importance(analysis, prunable, ctx.calibration, self.calib_samples)
        else:
            scores = weight_importance(analysis, prunable, self.criterion)
        keep = select(scores, self.ratio, self.scope, self.min_channels, self.round_to)
        keep = {g: k for g, k in keep.items() if len(k) < analysis.spaces[g].size}
        if not keep:
            stats.update(groups_pruned=0, channels_after=stats["channels_before"])
            return PassResult(False, stats, notes)
        original = model.to_proto() if ctx.calibration is not None and self.reconstruct else None
        result = prune(model, analysis, keep, ctx, reconstruct=self.reconstruct, original=original,
                       max_samples=self.calib_samples)
        stats.update(result)
        stats["channels_after"] = stats["channels_before"] - sum(
            analysis.spaces[g].size - len(k) for g, k in keep.items())
        stats["per_group"] = {f"#{g} {'+'.join(analysis.spaces[g].roots[:2])}": [analysis.spaces[g].size, len(k)]
                              for g, k in keep.items()}
        notes += stats.pop("notes", [])
        return PassResult(True, stats, notes)


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
          *, reconstruct: bool = True, original: onnx.ModelProto | None = None, max_samples: int = 32) -> dict:
    """Remove channels (``keep``: group id -> kept indices) and recover: least
    squares with calibration data and ``reconstruct``; otherwise mean folding
    (calibration means, or exact constants without calibration) and BN
    re-estimation with calibration data.  Returns stats (with ``notes``)."""
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
    edited = analysis.apply(keep)
    stats["edits"] = edited
    if calibration is not None and reconstruct:
        nodes = [(n, None if kept_out is None else kept_out[0])
                 for n, _, _, _, kept_out, _ in plan if n.op in ("Conv", "Gemm", "MatMul")]
        done, notes = recovery.reconstruct(original, model, nodes, calibration, max_samples=max_samples,
                                           seed=getattr(ctx, "seed", 0))
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
    proto = recovery._proto_with_outputs(model, names)
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
    from passes.shapes import annotate_shapes

    annotate_shapes(model)
