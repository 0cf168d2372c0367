"""fold-constants on the onnx node conformance cases (see benchmarks/conformance.py).

The default run checks a fixed subset (every 20th case, by name); the full sweep
with the project's goals (100% correct, >= 98% of frozen cases fully folded)
runs with ``-m slow``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import conformance  # noqa: E402

METHODS = ["graphopt"]


def _sweep(every: int) -> dict:
    pipeline = conformance.resolve_pipeline(conformance.PIPELINE)
    cases = conformance.collect_cases(every=every)
    return conformance.sweep(cases, METHODS, pipeline)


def _check(summary: dict, min_folded_pct: float | None) -> None:
    for variant, v in summary["variants"].items():
        got = v["graphopt"]
        assert v["ref_ok"] > 0
        assert got["failing"] == {}, f"{variant}: incorrect after folding: {got['failing']}"
        if min_folded_pct is not None and variant == "frozen":
            assert got["folded_pct"] >= min_folded_pct, f"only {got['folded_pct']}% fully folded"


def test_conformance_subset_is_correct():
    summary = _sweep(every=20)
    _check(summary, min_folded_pct=None)
    assert summary["variants"]["frozen"]["graphopt"]["folded_pct"] >= 90


@pytest.mark.slow
def test_conformance_full_sweep_meets_goals():
    _check(_sweep(every=1), min_folded_pct=98.0)
