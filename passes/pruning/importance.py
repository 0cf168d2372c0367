"""Channel importance for ``prune-channels``: weight norms, BN gammas, activations.

Each score is per channel of a group, summed over the group's members (every
producer of a residual group contributes its filters).  Scores are only
compared within a group (scope=layer) or after dividing by the group's mean
(scope=global), so their units do not matter.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from graphopt.errors import UsageError
from graphopt.rewrite import as_constant
from passes.pruning.groups import ChannelAnalysis, Edit, Layout


def _accumulate(analysis: ChannelAnalysis, scores: dict[int, np.ndarray], per_element: np.ndarray,
                segs, hit: set[int] | None = None) -> None:
    off = 0
    for s in segs:
        g = analysis.find(s.space)
        if g in scores:
            block = per_element[off:off + s.length].reshape(s.hi - s.lo, s.inner).sum(axis=1)
            scores[g][s.lo:s.hi] += block
            if hit is not None:
                hit.add(g)
        off += s.length


def _weight_scores(analysis: ChannelAnalysis, edits: list[Edit], groups: list[int], power: int,
                   hit: set[int] | None = None) -> dict[int, np.ndarray]:
    scores = {g: np.zeros(analysis.spaces[g].size) for g in groups}
    for e in edits:
        const = as_constant(e.node.inputs[e.index], analysis._overridable)
        if const is None:
            continue
        values = np.asarray(const.values)
        moved = np.moveaxis(values, e.axis, 0).reshape(values.shape[e.axis], -1)
        per = np.abs(moved).sum(axis=1, dtype=np.float64) if power == 1 else \
            np.square(moved, dtype=np.float64).sum(axis=1)
        _accumulate(analysis, scores, per, e.segs, hit)
    if power == 2:
        scores = {g: np.sqrt(v) for g, v in scores.items()}
    return scores


def weight_importance(analysis: ChannelAnalysis, groups: list[int], criterion: str) -> dict[int, np.ndarray]:
    """l1 / l2 norms of each channel's filters (root producers and depthwise
    filters); bn-gamma: |gamma| of the group's BatchNormalizations, falling
    back to l1 for a group without one."""
    if criterion in ("l1", "l2"):
        return _weight_scores(analysis, analysis.sources, groups, 1 if criterion == "l1" else 2)
    hit: set[int] = set()
    scores = _weight_scores(analysis, analysis.bn_scales, groups, 1, hit)
    missing = [g for g in groups if g not in hit]
    if missing:
        scores.update(_weight_scores(analysis, analysis.sources, missing, 1))
    return scores


def activation_importance(analysis: ChannelAnalysis, groups: list[int], calibration: Any,
                          max_samples: int = 64) -> dict[int, np.ndarray]:
    """Mean |activation| per channel where the group's channels are read by a
    Conv/Gemm/MatMul (i.e. after the group's activation), over calibration data."""
    if calibration is None:
        raise UsageError("prune-channels: criterion=activation needs calibration data (--calib)")
    from passes.pruning.recovery import collect

    probes: dict[str, Layout] = {}
    for tensor, layout, _ in analysis.probes:
        if any(analysis.find(s.space) in groups for s in layout.segs):
            probes.setdefault(tensor.name, layout)
    scores = {g: np.zeros(analysis.spaces[g].size) for g in groups}
    if not probes:
        return scores
    sums: dict[str, np.ndarray] = {}
    for outputs in collect(analysis.model, list(probes), calibration, max_samples):
        for name, value in outputs.items():
            layout = probes[name]
            axes = tuple(i for i in range(value.ndim) if i != layout.axis)
            mean = np.abs(value.astype(np.float64)).mean(axis=axes)
            sums[name] = sums.get(name, 0) + mean
    for name, per in sums.items():
        _accumulate(analysis, scores, np.asarray(per), probes[name].segs)
    return scores
