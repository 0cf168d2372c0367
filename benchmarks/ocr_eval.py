"""Task metrics for the PP-OCR det/rec/cls models on rendered text.

Compression (quantization, pruning) is judged by what the model still reads,
not only by tensor error, so this scores a model (onnxruntime CPU) on seeded
synthetic inputs with known ground truth.  The tasks themselves (rendering,
RapidOCR 1.4.4's pre/post-processing, datasets, metrics; see that module's
docstring) are in tests/ocr_tasks.py, shared with the tests; this module runs
the models and is the command line.  The other benchmarks use it as
``ocr_eval.calibration_inputs``, ``ocr_eval.make_rec_dataset`` and so on.

    python benchmarks/ocr_eval.py --model rec [--onnx PATH] [--n 200]
    python benchmarks/ocr_eval.py --model det --onnx q.onnx --reference fp32.onnx
    python benchmarks/ocr_eval.py --model rec --calib OUT.npz --n 64
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # the OCR tasks, shared with the tests

from ocr_tasks import (  # noqa: E402,F401  (re-exported: the other benchmarks' API)
    CALIB_SEED, DET_SIDE, EVAL_SEED, FontsNotFound, agreement, calibration_inputs, charset_from_dict,
    cls_preprocess, ctc_greedy_decode, db_boxes, det_agreement, det_metrics, det_preprocess, find_fonts,
    make_cls_dataset, make_det_dataset, make_rec_dataset, rec_agreement, rec_metrics, rec_preprocess,
)

ModelLike = Union[str, os.PathLike, Any]  # a model path, or an onnxruntime.InferenceSession


# ----------------------------------------------------------------------------
# Running models
# ----------------------------------------------------------------------------


def open_session(model: ModelLike, threads: int = 0):
    """An onnxruntime CPU session for a path (or the session itself, passed through)."""
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def _run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _benchmark_models() -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import models  # benchmarks/models.py: fetches the rapidocr wheel once into its cache

    return models.ppocr_models()


def original_model(kind: str) -> Path:
    """Path of the fp32 ``det``/``rec``/``cls`` model from the rapidocr wheel."""
    return _benchmark_models()[f"ppocr_{kind}"]


def rec_charset(sess) -> list[str]:
    """CTC classes for a rec session: its ``character`` metadata, or the fp32
    original's when a rewrite dropped the metadata."""
    meta = sess.get_modelmeta().custom_metadata_map
    if "character" not in meta:
        meta = open_session(original_model("rec")).get_modelmeta().custom_metadata_map
    return charset_from_dict(meta["character"].splitlines())


def predict_rec(model: ModelLike, images: Iterable[np.ndarray], width: int | None = None) -> list[str]:
    """Recognised text per line image, one line per run (see rec_preprocess for
    ``width``).  Edge spaces are dropped: the model reads the crop margin as a
    space now and then, and ground truth has none there."""
    sess = open_session(model)
    charset = rec_charset(sess)
    return [ctc_greedy_decode(_run(sess, rec_preprocess(img, width))[0], charset).strip() for img in images]


def predict_cls(model: ModelLike, images: Iterable[np.ndarray]) -> list[int]:
    """Orientation class per line image (0: upright, 1: 180 degrees)."""
    sess = open_session(model)
    return [int(_run(sess, cls_preprocess(img))[0].argmax()) for img in images]


def predict_det(model: ModelLike, images: Iterable[np.ndarray], side: int = DET_SIDE, norm: str = "half") -> list[np.ndarray]:
    """(k, 4) boxes per page, in page pixels."""
    sess = open_session(model)
    return [db_boxes(_run(sess, det_preprocess(img, side, norm))[0, 0], img.shape[:2]) for img in images]


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def evaluate_rec(model: ModelLike, dataset: Sequence[tuple[np.ndarray, str]], width: int | None = None) -> dict:
    """Exact match and character accuracy of a rec model on (image, text) pairs."""
    charset = set(rec_charset(open_session(model)))
    missing = sorted({c for _, t in dataset for c in t} - charset)
    if missing:
        raise ValueError(f"ground truth uses characters outside the model's dictionary: {missing}")
    preds, secs = _timed(lambda: predict_rec(model, [img for img, _ in dataset], width))
    res: dict = rec_metrics(preds, [t for _, t in dataset])  # type: ignore[arg-type]
    res.update(n=len(dataset), seconds=secs, predictions=preds)
    return res


def compare_rec(model_a: ModelLike, model_b: ModelLike, dataset: Sequence[tuple[np.ndarray, str]]) -> dict:
    """rec_agreement of two models on a dataset's images."""
    images = [img for img, _ in dataset]
    return {**rec_agreement(predict_rec(model_a, images), predict_rec(model_b, images)), "n": len(dataset)}


def evaluate_cls(model: ModelLike, dataset: Sequence[tuple[np.ndarray, int]]) -> dict:
    """Accuracy of a cls model against the known orientation."""
    preds, secs = _timed(lambda: predict_cls(model, [img for img, _ in dataset]))
    return {"accuracy": agreement(preds, [lab for _, lab in dataset]), "n": len(dataset), "seconds": secs, "predictions": preds}  # type: ignore[arg-type]


def compare_cls(model_a: ModelLike, model_b: ModelLike, dataset: Sequence[tuple[np.ndarray, int]]) -> dict:
    """Fraction of lines on which two cls models pick the same orientation."""
    images = [img for img, _ in dataset]
    return {"agreement": agreement(predict_cls(model_a, images), predict_cls(model_b, images)), "n": len(dataset)}


def evaluate_det(model: ModelLike, dataset: Sequence[tuple[np.ndarray, np.ndarray]], side: int = DET_SIDE, norm: str = "half") -> dict:
    """Precision/recall/F1 of a det model's boxes against the rendered line boxes."""
    preds, secs = _timed(lambda: predict_det(model, [img for img, _ in dataset], side, norm))
    res: dict = det_metrics(preds, [b for _, b in dataset])  # type: ignore[arg-type]
    res.update(n=len(dataset), seconds=secs, predictions=preds)
    return res


def compare_det(model_a: ModelLike, model_b: ModelLike, dataset: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict:
    """det_agreement of two models on a dataset's pages."""
    images = [img for img, _ in dataset]
    return {**det_agreement(predict_det(model_a, images), predict_det(model_b, images)), "n": len(dataset)}


# ----------------------------------------------------------------------------
# Calibration data
# ----------------------------------------------------------------------------


def save_calibration(kind: str, path: str | os.PathLike, n: int = 32, seed: int = CALIB_SEED, model: ModelLike | None = None) -> Path:
    """Write calibration_inputs to ``path`` (.npz), keyed by the model's input name."""
    name = open_session(model).get_inputs()[0].name if model is not None else "x"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **calibration_inputs(kind, n, seed, name))
    return path


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def _summary(res: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items() if k != "predictions"}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["rec", "det", "cls"], required=True)
    ap.add_argument("--onnx", help="model to score (default: the fp32 original from the rapidocr wheel)")
    ap.add_argument("--reference", help="also report agreement with this model (default with --onnx: the fp32 original)")
    ap.add_argument("--n", type=int, help="samples (default: 200 rec/cls, 50 det pages)")
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--det-side", type=int, default=DET_SIDE, help="det short side (RapidOCR: 736)")
    ap.add_argument("--det-norm", choices=["half", "imagenet"], default="half")
    ap.add_argument("--calib", metavar="NPZ", help="write N calibration samples (seed --calib-seed) here instead")
    ap.add_argument("--calib-seed", type=int, default=CALIB_SEED)
    ap.add_argument("--json", metavar="OUT", help="also write the metrics as JSON")
    ap.add_argument("--show-errors", type=int, default=0, metavar="K", help="print up to K rec misreads")
    args = ap.parse_args(argv)

    try:
        fonts = find_fonts()
    except FontsNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for given in (args.onnx, args.reference):
        if given and not Path(given).is_file():
            print(f"error: no model file {given}", file=sys.stderr)
            return 2
    kind = args.model
    n = args.n or (50 if kind == "det" else 200)
    model = args.onnx or original_model(kind)

    if args.calib:
        path = save_calibration(kind, args.calib, n, args.calib_seed, model)
        with np.load(path) as z:
            print(f"wrote {path}: " + ", ".join(f"{k} {z[k].shape}" for k in z.files))
        return 0

    t0 = time.perf_counter()
    if kind == "rec":
        data = make_rec_dataset(n, args.seed, fonts)
    elif kind == "cls":
        data = make_cls_dataset(n, args.seed, fonts)
    else:
        data = make_det_dataset(n, args.seed, fonts)
    t_data = time.perf_counter() - t0

    if kind == "rec":
        res = evaluate_rec(model, data)
    elif kind == "cls":
        res = evaluate_cls(model, data)
    else:
        res = evaluate_det(model, data, args.det_side, args.det_norm)
    reference = args.reference or (original_model(kind) if args.onnx else None)
    if reference is not None:  # agreement with the reference, reusing this model's predictions
        if kind == "rec":
            res.update(rec_agreement(predict_rec(reference, [img for img, _ in data]), res["predictions"]))
        elif kind == "cls":
            res["agreement"] = agreement(predict_cls(reference, [img for img, _ in data]), res["predictions"])
        else:
            ref_boxes = predict_det(reference, [img for img, _ in data], args.det_side, args.det_norm)
            res.update(det_agreement(ref_boxes, res["predictions"]))
    out = {"model": str(model), "kind": kind, "seed": args.seed, "fonts": [f.name for f in fonts],
           "render_seconds": round(t_data, 3), **_summary(res), "total_seconds": round(time.perf_counter() - t0, 3)}
    print(json.dumps(out, indent=2))
    if kind == "rec" and args.show_errors:
        for (img, truth), pred in zip(data, res["predictions"]):
            if pred != truth and args.show_errors > 0:
                args.show_errors -= 1
                print(f"  {truth!r:32} -> {pred!r}  (width {img.shape[1]})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
