"""Fidelity targets for lossy passes: ``--fidelity "cosine>=0.99"``.

A spec is one or more targets joined by commas, all of which must hold::

    cosine>=0.99            worst-case cosine similarity
    mean-cosine>=0.999      mean cosine similarity
    top1>=0.98              top-1 agreement along the last axis
    top5>=0.99              the reference's top-1 among the candidate's top 5
    max-abs<=0.05           largest absolute difference

Metrics compare a candidate model's outputs with the reference (float)
model's outputs over a set of samples.  Only floating-point outputs count
(integer and bool outputs, e.g. argmax indices, are skipped).

What "worst-case cosine" means, precisely: for every sample and every float
output, the output is cut into *rows* and the cosine similarity of each row
of the candidate with the same row of the reference is computed; ``cosine``
is the minimum over all rows of all outputs of all samples.  Rows are:

* rank 0 or 1 output: the whole tensor is one row;
* rank 2 ``[B, N]``: each of the B rows (one per batch item);
* rank 3 ``[B, S, H]``: each of the B*S rows along the last axis (one per
  token, for a transformer's hidden states);
* rank 4 and up ``[B, ...]``: each batch item, flattened (a feature map).

A row whose reference and candidate are both all zero has cosine 1; a row
where exactly one is all zero has cosine 0; a row with a NaN has cosine
-1 (worst possible).  ``mean-cosine`` is the mean over the same rows.

A name that is not a built-in is a user metric (:mod:`graphopt.metrics`:
``--metric NAME=module:function`` or the ``graphopt.metrics`` entry points),
the mean over the samples of ``function(reference, candidate, inputs)``,
higher is better (``name>=X``).

``top1`` is the fraction of positions (all leading indices of every float
output with a last axis of at least 2, over all samples) where the argmax
along the last axis agrees; ``max-abs`` is ``max |candidate - reference|``
over every element (inf when either side has a NaN where the other has not).
``top5`` counts the same positions as ``top1``, a position agreeing where the
reference's argmax is among the candidate's five largest (all of them when
the last axis is shorter).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from graphopt import metrics
from graphopt.errors import UsageError
from graphopt.metrics import UserMetric

# metric -> (direction it must be bounded from: ">" for higher is better, lowest, highest)
METRICS: dict[str, tuple[str, float, float]] = {
    "cosine": (">", -1.0, 1.0),
    "mean-cosine": (">", -1.0, 1.0),
    "top1": (">", 0.0, 1.0),
    "top5": (">", 0.0, 1.0),
    "max-abs": ("<", 0.0, math.inf),
}
_ALIASES = {"cos": "cosine", "cosine-min": "cosine", "min-cosine": "cosine", "top-1": "top1",
            "top1-agreement": "top1", "top-5": "top5", "max_abs": "max-abs", "maxabs": "max-abs",
            "mean_cosine": "mean-cosine"}
_TARGET = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_-]*)\s*(>=|<=|>|<)\s*([^\s]+)\s*$")
_EXAMPLE = 'e.g. "cosine>=0.99", "top1>=0.98", "top5>=0.99", "max-abs<=0.05", or several joined by commas'


@dataclasses.dataclass(frozen=True)
class Target:
    metric: str
    op: str  # >=, >, <=, <
    threshold: float

    def holds(self, value: float) -> bool:
        if value is None or math.isnan(value):
            return False
        return {">=": value >= self.threshold, ">": value > self.threshold,
                "<=": value <= self.threshold, "<": value < self.threshold}[self.op]

    def badness(self, value: float) -> float:
        """How far ``value`` is from ideal, relative to what the target allows:
        below 1 holds (for >= / <=), above 1 misses.  Used to rank nodes."""
        if value is None or math.isnan(value):
            return math.inf
        if self.metric not in METRICS:  # a user metric, higher is better: scores such as F1 reach 1
            ideal = 1.0 if self.threshold < 1.0 else self.threshold + max(abs(self.threshold), 1.0)
            return (ideal - value) / max(ideal - self.threshold, 1e-12)
        if METRICS[self.metric][0] == ">":
            ideal = METRICS[self.metric][2]
            return (ideal - value) / max(ideal - self.threshold, 1e-12)
        return value / max(self.threshold, 1e-12)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclasses.dataclass(frozen=True)
class FidelitySpec:
    targets: tuple[Target, ...]
    user: tuple[UserMetric, ...] = ()  # the user metrics the targets name

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.metric for t in self.targets))

    def holds(self, values: Mapping[str, float]) -> bool:
        return all(t.holds(values.get(t.metric, math.nan)) for t in self.targets)

    def badness(self, values: Mapping[str, float]) -> float:
        return max(t.badness(values.get(t.metric, math.nan)) for t in self.targets)

    def __str__(self) -> str:
        return ",".join(map(str, self.targets))


def parse_fidelity(text: str, where: str = "--fidelity") -> FidelitySpec:
    """Parse ``"cosine>=0.99,top1>=0.98"``; a mistake is a one-line
    :class:`UsageError` naming the spec."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{where}: empty fidelity spec; {_EXAMPLE}")
    targets: list[Target] = []
    user: list[UserMetric] = []
    for item in text.split(","):
        m = _TARGET.match(item)
        if not m:
            raise UsageError(f"{where} '{text}': cannot read '{item.strip()}'; {_EXAMPLE}")
        name, op, raw = m.group(1).lower(), m.group(2), m.group(3)
        name = _ALIASES.get(name, name)
        user_metric = None if name in METRICS else metrics.lookup(m.group(1))
        if name not in METRICS and user_metric is None:
            known = ", ".join([*METRICS, *metrics.registered()])
            raise UsageError(f"{where} '{text}': unknown metric '{m.group(1)}' (known: {known}; "
                             "add your own with --metric NAME=module:function)")
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise UsageError(f"{where} '{text}': '{raw}' is not a number")
        if user_metric is not None:
            if op[0] != ">":
                raise UsageError(f"{where} '{text}': metric '{user_metric.name}' is higher-is-better "
                                 f"({user_metric.name}>=X), not {user_metric.name}{op}X")
            if all(u.name != user_metric.name for u in user):
                user.append(user_metric)
            targets.append(Target(user_metric.name, op, value))
            continue
        direction, lo, hi = METRICS[name]
        if op[0] != direction:
            want = ">=" if direction == ">" else "<="
            raise UsageError(f"{where} '{text}': {name} is bounded from {'below' if direction == '>' else 'above'} "
                             f"({name}{want}X), not {name}{op}X")
        if not lo <= value <= hi:
            raise UsageError(f"{where} '{text}': {name} threshold must be in [{lo:g}, {hi:g}], got {raw}")
        targets.append(Target(name, op, value))
    return FidelitySpec(tuple(targets), tuple(user))


# ----------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------
def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim <= 1:
        return x.reshape(1, -1)
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x.reshape(-1, x.shape[-1])
    return x.reshape(x.shape[0], -1)


def row_cosines(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity per row (see the module doc for what a row is)."""
    a, b = _rows(candidate), _rows(reference)
    if a.shape != b.shape:
        return np.full(max(len(b), 1), -1.0)
    if a.shape[1] == 0:
        return np.ones(len(a))
    bad = ~(np.isfinite(a).all(1) & np.isfinite(b).all(1))
    a = np.where(np.isfinite(a), a, 0.0)
    b = np.where(np.isfinite(b), b, 0.0)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (a * b).sum(1) / (na * nb)
    cos = np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, cos))
    cos = np.clip(cos, -1.0, 1.0)
    return np.where(bad, -1.0, cos)


@dataclasses.dataclass
class _Acc:
    min_cos: float = math.inf
    sum_cos: float = 0.0
    rows: int = 0
    top1_agree: int = 0
    top5_agree: int = 0
    top1_total: int = 0
    max_abs: float = 0.0


class MetricAccumulator:
    """Accumulates every built-in metric, and the ``user`` metrics, over
    (candidate, reference) output pairs; user metrics also see the sample's
    ``inputs``."""

    def __init__(self, user: Iterable[UserMetric] = ()) -> None:
        self.acc = _Acc()
        self.samples = 0
        self.user = tuple(user)
        self.user_sums = {m.name: 0.0 for m in self.user}

    def add(self, candidate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
            inputs: Mapping[str, np.ndarray] | None = None) -> None:
        acc = self.acc
        self.samples += 1
        for metric in self.user:
            self.user_sums[metric.name] += metric.score(reference, candidate, inputs or {})
        for name, ref in reference.items():
            ref = np.asarray(ref)
            if ref.dtype.kind not in "fc":
                continue
            cand = np.asarray(candidate.get(name)) if name in candidate else None
            if cand is None or cand.shape != ref.shape:
                acc.min_cos = -1.0
                acc.max_abs = math.inf
                acc.rows += 1
                acc.sum_cos -= 1.0
                continue
            cos = row_cosines(cand, ref)
            if cos.size:
                acc.min_cos = min(acc.min_cos, float(cos.min()))
                acc.sum_cos += float(cos.sum())
                acc.rows += int(cos.size)
            c64, r64 = cand.astype(np.float64), ref.astype(np.float64)
            if ref.size:
                nan_mismatch = not np.array_equal(np.isnan(c64), np.isnan(r64))
                with np.errstate(invalid="ignore"):
                    diff = np.abs(c64 - r64)
                diff = np.where(np.isnan(r64) & np.isnan(c64), 0.0, diff)
                m = math.inf if nan_mismatch else float(np.nan_to_num(diff, nan=math.inf).max())
                acc.max_abs = max(acc.max_abs, m)
            if ref.ndim >= 1 and ref.shape[-1] >= 2:
                flat_c = c64.reshape(-1, ref.shape[-1])
                flat_r = r64.reshape(-1, ref.shape[-1])
                best = np.argmax(flat_r, -1)
                acc.top1_agree += int((np.argmax(flat_c, -1) == best).sum())
                k = min(5, ref.shape[-1])
                top = np.argpartition(-flat_c, k - 1, axis=-1)[:, :k]
                acc.top5_agree += int((top == best[:, None]).any(axis=1).sum())
                acc.top1_total += int(flat_r.shape[0])

    def values(self) -> dict[str, float]:
        acc = self.acc
        return {
            "cosine": 1.0 if acc.rows == 0 else acc.min_cos,
            "mean-cosine": 1.0 if acc.rows == 0 else acc.sum_cos / acc.rows,
            "top1": 1.0 if acc.top1_total == 0 else acc.top1_agree / acc.top1_total,
            "top5": 1.0 if acc.top1_total == 0 else acc.top5_agree / acc.top1_total,
            "max-abs": acc.max_abs,
            **{name: (total / self.samples if self.samples else math.nan) for name, total in self.user_sums.items()},
        }


def compare_outputs(candidates: Iterable[Mapping[str, np.ndarray]],
                    references: Iterable[Mapping[str, np.ndarray]],
                    inputs: Iterable[Mapping[str, np.ndarray]] | None = None,
                    user: Iterable[UserMetric] = ()) -> dict[str, float]:
    """Every metric over paired per-sample outputs (dicts output name -> array);
    the ``user`` metrics with each sample's ``inputs``."""
    acc = MetricAccumulator(user)
    feeds = iter(inputs) if inputs is not None else None
    for cand, ref in zip(candidates, references):
        acc.add(cand, ref, next(feeds, None) if feeds is not None else None)
    return acc.values()


@dataclasses.dataclass
class FidelityReport:
    """Metric values of one candidate on a set of samples and whether ``spec`` holds."""

    spec: str
    values: dict[str, float]
    met: bool
    samples: int

    @classmethod
    def of(cls, spec: FidelitySpec, values: Mapping[str, float], samples: int) -> "FidelityReport":
        return cls(str(spec), dict(values), spec.holds(values), samples)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.spec, "met": self.met, "samples": self.samples,
                **{k: _round(v) for k, v in self.values.items()}}

    def line(self, metrics: Sequence[str] | None = None) -> str:
        names = metrics or list(self.values)
        return ", ".join(f"{m} {_fmt(self.values[m])}" for m in names if m in self.values)


def _round(v: float) -> float | str:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return float(f"{v:.6g}")


def _fmt(v: float) -> str:
    return f"{v:.6g}" if math.isfinite(v) else str(v)


__all__ = ["FidelityReport", "FidelitySpec", "METRICS", "MetricAccumulator", "Target", "compare_outputs",
           "parse_fidelity", "row_cosines"]
