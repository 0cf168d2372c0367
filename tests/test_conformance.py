"""simplify on the onnx node conformance cases, through ``graphopt opt`` and
written files (see tests/conformance_cases.py).

The default run checks a fixed subset (every 20th case, by name) and the cases
that once produced files onnxruntime refused; the full sweep with the project's
goals (100% correct, >= 98% of frozen cases fully folded) runs with ``-m slow``.
"""
from __future__ import annotations

import pytest

import conformance_cases as cc

OPTIMIZERS = {"graphopt": cc.graphopt_cli}


def _check(summary: dict, min_folded_pct: float | None) -> None:
    for variant, v in summary["variants"].items():
        got = v["graphopt"]
        assert v["ref_ok"] > 0
        assert got["failing"] == {}, f"{variant}: incorrect after folding: {got['failing']}"
        if min_folded_pct is not None and variant == "frozen":
            assert got["folded_pct"] >= min_folded_pct, f"only {got['folded_pct']}% fully folded"


def test_conformance_subset_is_correct():
    summary = cc.sweep(cc.collect_cases(every=20), OPTIMIZERS)
    _check(summary, min_folded_pct=None)
    assert summary["variants"]["frozen"]["graphopt"]["folded_pct"] >= 90


# Frozen, these once gave files onnxruntime refused (AffineGrid: a shape-[1]
# Range limit; a dead If branch that no longer type-checked) or were refused
# on load (IR 3 with initializers that are not graph inputs).
REGRESSIONS = ["test_affine_grid_2d_expanded", "test_affine_grid_3d_align_corners_expanded",
               "test_and_bcast3v1d", "test_xor4d", "test_scan_sum"]


@pytest.mark.parametrize("name", REGRESSIONS)
def test_case_that_once_failed_on_the_cli_path(name):
    summary = cc.sweep(cc.collect_cases(f"^{name}$"), OPTIMIZERS)
    frozen = summary["variants"]["frozen"]
    assert frozen["ref_ok"] == 1
    assert frozen["graphopt"]["failing"] == {}
    if name != "test_scan_sum":  # Scan is kept (its body reads no constant it could fold away)
        assert frozen["graphopt"]["folded"] == 1, frozen["graphopt"]["not_folded"]
    _check(summary, None)


@pytest.mark.slow
def test_conformance_full_sweep_meets_goals():
    _check(cc.sweep(cc.collect_cases(), OPTIMIZERS), min_folded_pct=98.0)
