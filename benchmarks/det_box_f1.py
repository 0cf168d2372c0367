"""A task metric for PP-OCR det, as a user writes one for ``--metric``:
F1 of the candidate's text boxes against the reference model's boxes
(DB post-processing of each probability map, IoU >= 0.5).

    graphopt compress det.onnx -o det.small.onnx --calib pages.npz \\
        --metric box_f1=benchmarks/det_box_f1.py:box_f1 --fidelity "box_f1>=0.99"
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ocr_tasks import db_boxes, det_metrics  # noqa: E402


def _boxes(outputs: dict) -> np.ndarray:
    prob = np.asarray(next(iter(outputs.values())))
    prob = prob.reshape(prob.shape[-2:])
    return db_boxes(prob, prob.shape)


def box_f1(reference: dict, candidate: dict, inputs: dict) -> float:
    """1.0 when the candidate finds the same boxes as the reference."""
    return float(det_metrics([_boxes(candidate)], [_boxes(reference)])["f1"])
