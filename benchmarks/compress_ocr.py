"""``graphopt compress --fidelity ...`` against onnxruntime's quantizers on
PP-OCRv4 rec and det, in one run.

Per model:

* ``graphopt_compress``: ``graphopt compress M -o OUT --calib C.npz --fidelity SPEC
  --budget-minutes B`` (its own candidates; it holds out 25% of C for fidelity);
* ``ort_static``: onnxruntime's ``quant_pre_process`` + ``quantize_static`` (QDQ,
  per-channel int8 weights, uint8 activations, MinMax) on all of C;
* ``ort_dynamic``: ``quantize_dynamic`` with its defaults (reference).

C: ``ocr_eval.calibration_inputs(kind, n, seed=CALIB_SEED)`` (rendered lines or
pages).  Nothing below sees C: OCR task metrics (exact match / character
accuracy, detection F1) on ``ocr_eval``'s evaluation set against ground truth
and agreement with fp32, raw-output cosine on rendered inputs from seed 7.
Latency: onnxruntime CPU, fixed threads, fp32 and every variant in each round
with the order rotating, warm-up first, medians (``quantize_vs_ort``).

    python benchmarks/compress_ocr.py [--models ppocr_rec,ppocr_det] [--quick] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models as bench_models  # noqa: E402
import ocr_eval  # noqa: E402
import quantize_vs_ort as qvo  # noqa: E402

KINDS = {"ppocr_rec": "rec", "ppocr_det": "det"}
# rec: softmax over the charset per time step, so top-1 agreement per step is the
# natural target; det: a probability map, where only a cosine means something.
FIDELITY = {"rec": "top1>=0.99", "det": "cosine>=0.99"}
METRICS = {"rec": ["exact_match", "char_accuracy", "agreement", "char_agreement", "cos_mean"],
           "det": ["det_f1", "det_mean_iou", "agreement_f1", "agreement_mean_iou", "cos_mean"]}


def compress(src: Path, dst: Path, calib: Path, spec: str, budget: float, threads: int, report: Path,
             metrics: list[str] = ()) -> dict:
    cmd = [sys.executable, "-m", "graphopt.cli", "compress", str(src), "-o", str(dst), "--calib", str(calib),
           "--fidelity", spec, "--budget-minutes", str(budget), "--threads", str(threads), "--report", str(report)]
    for m in metrics:
        cmd += ["--metric", m]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"graphopt compress exit {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    print(proc.stderr.strip(), flush=True)
    rep = json.loads((report / "report.json").read_text())
    return {"build_s": seconds, "chosen": rep["chosen"]["pipeline"], "met": rep["met"],
            "candidates": [(c["pipeline"], c["status"], c["met"], c.get("latency_ratio")) for c in rep["candidates"]]}


def run_model(name: str, src: Path, args, tmp: Path) -> dict:
    kind = KINDS[name]
    mdir = tmp / name
    mdir.mkdir(parents=True, exist_ok=True)
    in_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    n_cal = args.det_calib_n if kind == "det" else args.calib_n
    calib = ocr_eval.calibration_inputs(kind, n_cal, seed=ocr_eval.CALIB_SEED, input_name=in_name)
    calib_path = mdir / "calib.npz"
    np.savez(calib_path, **calib)
    held = ocr_eval.calibration_inputs(kind, args.raw_n, seed=qvo.HELD_OUT_SEED, input_name=in_name)[in_name]
    data = (ocr_eval.make_rec_dataset if kind == "rec" else ocr_eval.make_det_dataset)(
        args.rec_n if kind == "rec" else args.det_n, ocr_eval.EVAL_SEED)
    spec = args.fidelity or FIDELITY[kind]

    paths, rows = {"fp32": src}, {"fp32": {}}
    builders = {
        "graphopt_compress": lambda d: compress(src, d, calib_path, spec, args.budget_minutes, args.threads,
                                                mdir / "report", args.metric),
        "ort_static": lambda d: {"build_s": qvo.ort_static(src, d, calib, "minmax", mdir)},
        "ort_dynamic": lambda d: {"build_s": qvo.ort_dynamic(qvo._preprocessed(src, mdir), d, None)},
    }
    for v, build in builders.items():
        dst = mdir / f"{v}.onnx"
        try:
            rows[v] = build(dst)
            onnx.checker.check_model(str(dst))
        except Exception as exc:  # report it, measure the rest
            rows[v] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            continue
        paths[v] = dst
    sessions = {v: qvo.session(p, args.threads) for v, p in paths.items()}
    runs = args.det_runs if kind == "det" else args.runs
    lat = qvo.interleaved_latency(sessions, {in_name: held[:1]}, runs, args.warmup)
    ref_preds = None
    for v in paths:
        row = rows[v]
        row["size_mb"] = bench_models.file_bytes(paths[v]) / 2**20
        row["latency_ms"] = lat[v]
        if v != "fp32":
            row["latency_vs_fp32"] = lat[v] / lat["fp32"]
            row.update(qvo.raw_fidelity(sessions["fp32"], sessions[v], held, in_name))
        metrics, preds = qvo.task_metrics(kind, sessions[v], data, ref_preds)
        if v == "fp32":
            ref_preds = preds
        row.update(metrics)
    return {"kind": kind, "fidelity": spec, "calib_samples": n_cal, "eval_samples": len(data), "runs": runs,
            "variants": rows}


def fmt_table(name: str, res: dict) -> list[str]:
    cols = METRICS[res["kind"]]
    lines = [f"{name} (fidelity {res['fidelity']}; calib {res['calib_samples']}, eval {res['eval_samples']}, "
             f"{res['runs']} rounds)",
             "| variant | MB | ms | vs fp32 | " + " | ".join(cols) + " |", "|---" * (4 + len(cols)) + "|"]
    for v, r in res["variants"].items():
        if "error" in r:
            lines.append(f"| {v} | ERROR: {r['error'][:160]} |")
            continue

        def f(key, spec=".4f"):
            return format(r[key], spec) if isinstance(r.get(key), (int, float)) else "-"

        lines.append(f"| {v} | {f('size_mb', '.2f')} | {f('latency_ms', '.1f')} | {f('latency_vs_fp32', '.2f')} | "
                     + " | ".join(f(c, ".5f" if c.startswith("cos") else ".4f") for c in cols) + " |")
    chosen = res["variants"].get("graphopt_compress", {}).get("chosen")
    if chosen:
        lines.append(f"\ngraphopt compress chose `{chosen}`")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="ppocr_rec,ppocr_det")
    ap.add_argument("--fidelity", help="one spec for every model (default: rec top1>=0.99, det cosine>=0.99)")
    ap.add_argument("--metric", action="append", default=[], metavar="NAME=FILE:FUNCTION",
                    help="a task metric for graphopt compress (e.g. box_f1=benchmarks/det_box_f1.py:box_f1)")
    ap.add_argument("--budget-minutes", type=float, default=10.0)
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--det-calib-n", type=int, default=16)
    ap.add_argument("--rec-n", type=int, default=200)
    ap.add_argument("--det-n", type=int, default=40)
    ap.add_argument("--raw-n", type=int, default=8)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--det-runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="fewer samples and rounds, 4-minute budgets")
    ap.add_argument("--out-dir", help="keep models and compress reports here")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib_n, args.det_calib_n, args.rec_n, args.det_n = 16, 8, 60, 12
        args.raw_n, args.runs, args.det_runs, args.budget_minutes = 4, 15, 8, 4.0
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    available = bench_models.ppocr_models()
    unknown = [n for n in names if n not in KINDS or n not in available]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    tmp = Path(args.out_dir or tempfile.mkdtemp(prefix="compress-ocr-"))
    tmp.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    print(f"onnxruntime {onnxruntime.__version__}, {args.threads} thread(s), budget {args.budget_minutes:g} min, "
          f"models in {tmp}", flush=True)
    results = {}
    for name in names:
        t0 = time.perf_counter()
        res = run_model(name, available[name], args, tmp)
        res["seconds"] = time.perf_counter() - t0
        results[name] = res
        print("\n".join(fmt_table(name, res)) + f"\n({res['seconds']:.0f} s)\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
