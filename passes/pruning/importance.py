"""Channel importance for ``prune-channels``: weight norms, BN gammas, activations, refit error.

Each score is per channel of a group, summed over the group's members (every
producer of a residual group contributes its filters).  Scores are only
compared within a group (scope=layer) or after dividing by the group's mean
(scope=global), so their units do not matter.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from graphopt.errors import UsageError
from graphopt.rewrite import as_constant
from graphopt.passes.pruning.groups import ChannelAnalysis, Edit, Layout


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
    from graphopt.activations import collect

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


def _probe_design(node, value: np.ndarray, axis: int, rng: np.random.Generator):
    """The consumer's least-squares design matrix on one sample (rows x input
    columns, a column per input element and kernel tap) and its weight as
    (outputs x columns), or None where the consumer is not a plain linear map."""
    from graphopt.passes.pruning.recovery import MAX_ROWS, im2col

    w_const = as_constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if w_const is None:
        return None
    w = np.asarray(w_const.values, dtype=np.float64)
    if node.op == "Conv":
        if w.ndim != 4 or int(node.attrs.get("group", 1)) != 1 or value.ndim != 4:
            return None
        a, _ = im2col(value, node, w.shape[2:], rng=rng)
        return a, w.reshape(w.shape[0], -1), int(np.prod(w.shape[2:]))
    if node.op in ("Gemm", "MatMul") and w.ndim == 2:
        a = np.moveaxis(value, axis, -1).reshape(-1, value.shape[axis])
        if a.shape[0] > MAX_ROWS:
            a = a[np.sort(rng.choice(a.shape[0], MAX_ROWS, replace=False))]
        if node.op == "Gemm":
            if int(node.attrs.get("transA", 0)):
                return None
            wt = w if int(node.attrs.get("transB", 0)) else w.T
        else:
            wt = w.T
        return a, wt, 1
    return None


def reconstruction_importance(analysis: ChannelAnalysis, groups: list[int], calibration: Any,
                              max_samples: int = 32, lam: float = 1e-4) -> dict[int, np.ndarray]:
    """How much the next layers' least-squares refit error grows when a channel
    goes: greedy removal, cheapest first, with optimal-brain-surgeon updates
    (removing input block c with the rest refitted costs
    ``tr(W_c (Hinv_cc)^-1 W_c')``, H the consumer's input Gram matrix with a
    bias column); a channel's score is the cost at its removal, made monotone
    in removal order, so the last ones removed score highest.  Groups that no
    plain linear consumer reads (Conv with group 1, Gemm, MatMul with a
    constant weight) fall back to activation scores."""
    if calibration is None:
        raise UsageError("prune-channels: criterion=reconstruction needs calibration data (--calib)")
    from graphopt.activations import collect

    wanted = set(groups)
    probes = []  # (tensor name, layout, node)
    for tensor, layout, node in analysis.probes:
        if node.op not in ("Conv", "Gemm", "MatMul"):
            continue
        if any(analysis.find(s.space) in wanted for s in layout.segs):
            probes.append((tensor.name, layout, node))
    rng = np.random.default_rng(0)
    grams: dict[int, np.ndarray] = {}
    weights: dict[int, tuple[np.ndarray, int]] = {}
    names = sorted({p[0] for p in probes})
    for values in collect(analysis.model, names, calibration, max_samples):
        for i, (name, layout, node) in enumerate(probes):
            design = _probe_design(node, np.asarray(values[name], dtype=np.float64), layout.axis % values[name].ndim,
                                   rng)
            if design is None:
                continue
            a, wt, taps = design
            if a.shape[1] != wt.shape[1]:  # not the layout the weight reads: leave this consumer out
                continue
            a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
            grams[i] = grams.get(i, 0) + a.T @ a
            weights[i] = (wt, taps)
    scores: dict[int, np.ndarray] = {}
    fallback = [g for g in groups]
    for g in groups:
        states = []
        for i, (name, layout, node) in enumerate(probes):
            if i not in grams:
                continue
            wt, taps = weights[i]
            cols: dict[int, list[int]] = {}
            off = 0
            for s in layout.segs:
                if analysis.find(s.space) == g:
                    for c in range(s.lo, s.hi):
                        start = (off + (c - s.lo) * s.inner) * taps
                        cols.setdefault(c, []).extend(range(start, start + s.inner * taps))
                off += s.length
            if not cols:
                continue
            h = grams[i]
            d = h.shape[0] - 1
            scale = float(np.mean(np.diag(h)[:d])) if d else 1.0
            h = h + np.diag(np.r_[np.full(d, lam * max(scale, 1e-12)), 0.0])
            try:
                hinv = np.linalg.inv(h)
            except np.linalg.LinAlgError:
                continue
            w = np.concatenate([wt, np.zeros((wt.shape[0], 1))], axis=1)  # bias column: never removed
            states.append({"hinv": hinv, "w": w, "cols": cols, "alive": np.ones(h.shape[0], bool)})
        if not states:
            continue
        size = analysis.spaces[g].size
        left = set(range(size))
        order, costs = [], []
        single = all(len(v) == 1 for st in states for v in st["cols"].values())
        while len(left) > 1:
            best, best_cost = None, math.inf
            if single:  # one column per channel: every cost at once
                cand = np.array(sorted(left))
                total = np.zeros(len(cand))
                for st in states:
                    col = np.array([st["cols"][c][0] if c in st["cols"] else -1 for c in cand])
                    have = col >= 0
                    diag = st["hinv"][col[have], col[have]]
                    norms = np.square(st["w"][:, col[have]]).sum(axis=0)
                    total[have] += np.where(diag > 0, norms / np.maximum(diag, 1e-300), math.inf)
                j = int(np.argmin(total))
                best, best_cost = int(cand[j]), float(total[j])
            if not single:  # blocks of columns (kernel taps, flattened positions): batched solves
                cand = sorted(left)
                total = np.zeros(len(cand))
                for st in states:
                    have = [j for j, c in enumerate(cand) if c in st["cols"]]
                    widths = {len(st["cols"][cand[j]]) for j in have}
                    if not have:
                        continue
                    if len(widths) == 1:
                        idx = np.array([st["cols"][cand[j]] for j in have])  # [n, k]
                        blocks = st["hinv"][idx[:, :, None], idx[:, None, :]]  # [n, k, k]
                        wc = np.transpose(st["w"][:, idx], (1, 2, 0))  # [n, k, out]
                        try:
                            sol = np.linalg.solve(blocks, wc)
                            total[have] += np.einsum("nko,nko->n", wc, sol)
                        except np.linalg.LinAlgError:
                            total[have] = math.inf
                        continue
                    for j in have:
                        idx1 = st["cols"][cand[j]]
                        wc1 = st["w"][:, idx1]
                        try:
                            total[j] += float(np.trace(wc1 @ np.linalg.solve(st["hinv"][np.ix_(idx1, idx1)], wc1.T)))
                        except np.linalg.LinAlgError:
                            total[j] = math.inf
                j = int(np.argmin(total))
                if math.isfinite(total[j]):
                    best, best_cost = int(cand[j]), float(total[j])
            if best is None:
                break
            for st in states:
                idx = st["cols"].get(best)
                if not idx:
                    continue
                hinv, w = st["hinv"], st["w"]
                block_inv = np.linalg.inv(hinv[np.ix_(idx, idx)])
                w -= (w[:, idx] @ block_inv) @ hinv[idx, :]
                hinv -= hinv[:, idx] @ block_inv @ hinv[idx, :]
                w[:, idx] = 0.0
                hinv[idx, :] = 0.0
                hinv[:, idx] = 0.0
            left.discard(best)
            order.append(best)
            costs.append(best_cost)
        score = np.zeros(size)
        running = 0.0
        for rank, (c, cost) in enumerate(zip(order, costs)):
            running = max(running, cost)
            score[c] = running + 1e-12 * rank  # later removal, higher score
        for c in left:
            score[c] = (running + 1.0) * 2.0
        scores[g] = score
        fallback.remove(g)
    if fallback:
        scores.update(activation_importance(analysis, fallback, calibration, max_samples))
    return scores
