"""graphopt's quantize-static against onnxruntime's quantize_static (QDQ).

Same fp32 model, same calibration samples (benchmarks/ocr_eval.calibration_inputs)
and the same calibrator (MinMax unless --method).  Reported per quantized
model: file size, onnxruntime CPU latency (runs interleaved across models,
median), cosine similarity and relative error of the raw output against fp32 on
held-out inputs, and the OCR task agreement with fp32 (rec: exact-match
agreement of decoded strings; det: box F1 taking fp32 boxes as truth).

    python benchmarks/quantize_vs_ort.py --model rec
    python benchmarks/quantize_vs_ort.py --model det --calib-n 16 --eval-n 8
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ocr_eval  # noqa: E402

HELD_OUT_SEED = 7


def _ort_quantize(src: Path, dst: Path, calib: dict[str, np.ndarray], *, per_channel: bool, act: str,
                  method: str) -> float:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = [{k: v[i:i + 1] for k, v in calib.items()} for i in range(len(next(iter(calib.values()))))]
            self.it = iter(self.items)

        def get_next(self):
            return next(self.it, None)

        def rewind(self):
            self.it = iter(self.items)

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    t0 = time.perf_counter()
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8 if act == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=methods[method])
    return time.perf_counter() - t0


def _preprocessed(src: Path, tmp: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = tmp / (src.stem + "_pre.onnx")
    if not dst.exists():
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        # onnxruntime writes per-channel DequantizeLinear (axis) even below opset 13,
        # which is an invalid model: upgrade first, as graphopt's pass does.
        import onnx

        onnx.save(onnx.version_converter.convert_version(onnx.load(dst), 13), dst)
    return dst


def _graphopt_quantize(src: Path, dst: Path, calib_path: Path, pipeline: str) -> float:
    from graphopt import cli

    t0 = time.perf_counter()
    rc = cli.main(["opt", str(src), "-o", str(dst), "-p", pipeline, "--calib", str(calib_path), "-q"])
    if rc != 0:
        raise SystemExit(f"graphopt failed with exit {rc}")
    return time.perf_counter() - t0


def _fidelity(sess_ref, sess, xs: np.ndarray) -> dict[str, float]:
    cos, rel = [], []
    name = sess_ref.get_inputs()[0].name
    for i in range(len(xs)):
        a = sess_ref.run(None, {name: xs[i:i + 1]})[0].astype(np.float64).ravel()
        b = sess.run(None, {name: xs[i:i + 1]})[0].astype(np.float64).ravel()
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
        rel.append(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-30)))
    return {"cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)), "rel_err_median": float(np.median(rel))}


def _latency(sessions: dict[str, object], x: np.ndarray, runs: int, warmup: int = 3) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        name = s.get_inputs()[0].name
        for _ in range(warmup):
            s.run(None, {name: x})
    for _ in range(runs):
        for k, s in sessions.items():  # interleaved, so drift hits every model alike
            name = s.get_inputs()[0].name
            t0 = time.perf_counter()
            s.run(None, {name: x})
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["rec", "det", "cls"], default="rec")
    ap.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax")
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--eval-n", type=int, default=16)
    ap.add_argument("--task-n", type=int, default=100, help="images for the task agreement (0: skip)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out-dir", help="keep the quantized models here")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    src = ocr_eval.original_model(args.model)
    calib = ocr_eval.calibration_inputs(args.model, args.calib_n)
    held = ocr_eval.calibration_inputs(args.model, args.eval_n, seed=HELD_OUT_SEED)["x"]
    tmp = Path(args.out_dir or tempfile.mkdtemp(prefix="qvo-"))
    tmp.mkdir(parents=True, exist_ok=True)
    calib_path = tmp / "calib.npz"
    np.savez(calib_path, **calib)

    models = {"fp32": src}
    build: dict[str, float] = {}
    variants = [
        ("graphopt", lambda d: _graphopt_quantize(src, d, calib_path, f"quantize-static{{method={args.method}}}")),
        ("graphopt+simplify", lambda d: _graphopt_quantize(
            src, d, calib_path, f"simplify,quantize-static{{method={args.method}}}")),
        ("ort_u8s8_perchannel", lambda d: _ort_quantize(src, d, calib, per_channel=True, act="uint8", method=args.method)),
        ("ort_default_s8s8", lambda d: _ort_quantize(src, d, calib, per_channel=False, act="int8", method=args.method)),
        # onnxruntime asks for its pre-processing (Constant nodes -> initializers,
        # shape inference, graph optimization), without which it cannot see the weights.
        ("ort_pre_u8s8_perchannel", lambda d: _ort_quantize(_preprocessed(src, tmp), d, calib, per_channel=True,
                                                            act="uint8", method=args.method)),
    ]
    for name, fn in variants:
        dst = tmp / f"{args.model}_{name}.onnx"
        build[name] = fn(dst)
        models[name] = dst

    sessions = {k: ocr_eval.open_session(p, args.threads) for k, p in models.items()}
    lat = _latency(sessions, held[:1], args.runs)
    results = {}
    for k, p in models.items():
        row = {"size_mb": p.stat().st_size / 2**20, "latency_ms": lat[k]}
        if k != "fp32":
            row.update(_fidelity(sessions["fp32"], sessions[k], held))
            row["build_s"] = build[k]
            if args.task_n:
                if args.model == "rec":
                    row.update(ocr_eval.compare_rec(sessions["fp32"], sessions[k], ocr_eval.make_rec_dataset(args.task_n)))
                elif args.model == "det":
                    row.update(ocr_eval.compare_det(sessions["fp32"], sessions[k], ocr_eval.make_det_dataset(args.task_n)))
                else:
                    row.update(ocr_eval.compare_cls(sessions["fp32"], sessions[k], ocr_eval.make_cls_dataset(args.task_n)))
        results[k] = {a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}
    print(f"model={args.model} method={args.method} calib={args.calib_n} eval={args.eval_n} runs={args.runs} "
          f"threads={args.threads or 'default'}")
    cols = sorted({c for r in results.values() for c in r})
    print("variant".ljust(22) + "".join(c[:14].rjust(15) for c in cols))
    for k, r in results.items():
        print(k.ljust(22) + "".join(str(r.get(c, "")).rjust(15) for c in cols))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
