"""graphopt's int8 quantization side by side with onnxruntime's, in one run.

Models: PP-OCRv4 det and rec and PP-OCR mobile v2.0 cls from the
rapidocr-onnxruntime wheel (real weights), and light CNNs from onnx's backend
test data with seeded random weights (``randomize_light``, from
tests/light_weights.py: the light models keep every weight as a
``ConstantOfShape`` fill, so quantizing them as shipped is degenerate).
Variants per model:

* ``graphopt_static``: ``graphopt opt M -p "simplify,quantize-static{method=M}" --calib C.npz``
* ``ort_static``: onnxruntime's recommended flow, ``quant_pre_process`` then
  ``quantize_static`` (QDQ, per-channel int8 symmetric weights, uint8
  activations: the same recipe as graphopt's defaults), same calibration samples
  and calibrator; the pre-processed model is upgraded to opset 13 because
  onnxruntime writes per-channel DequantizeLinear (``axis``) even below it.
* ``ort_dynamic``: ``quantize_dynamic`` with its defaults (QInt8 weights, every
  op it supports, Conv included): a reference, not judged.
* ``graphopt_dynamic`` / ``ort_dynamic_mm``: ``-p quantize-dynamic`` against
  ``quantize_dynamic(op_types_to_quantize=[MatMul, Gemm])`` (the same ops), on
  models that have a MatMul/Gemm with a constant weight.

Calibration: OCR ``ocr_eval.calibration_inputs(kind, n, seed=1)`` (rendered
lines/pages); CNNs seeded N(0, 1) images (seed 1).  Evaluation never sees those
samples: OCR task metrics on ``ocr_eval``'s evaluation set (seed 0) against
ground truth and against fp32, plus raw-output cosine on rendered inputs from
seed 7; CNNs on N(0, 1) inputs from seed 0: cosine of the logits to fp32 and
top-1 agreement.  Latency: onnxruntime CPU (default graph optimizations, fixed
threads), every variant of a model in each round with the order rotating, a
warm-up first, medians.  Every quantized model goes through onnx.checker and
runs in onnxruntime; graphopt's are built twice and compared byte for byte.

Goals (exit 1 naming what missed): on every model graphopt's static variant
has fidelity >= ort_static's (OCR: each task metric; CNN: mean cosine and
top-1 agreement; cosines within 1e-6 count as equal) and latency <=
ort_static's (x1.05 allowed for timer noise);
likewise graphopt_dynamic against ort_dynamic_mm.

    python benchmarks/quantize_vs_ort.py [--models ppocr_rec,resnet50] [--quick] [--json OUT]
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
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # helpers shared with the tests

import models as bench_models  # noqa: E402
import ocr_eval  # noqa: E402
from light_weights import randomize_light  # noqa: E402  (other benchmarks import it from here)

HELD_OUT_SEED = 7  # raw-output cosine on OCR inputs: neither calibration (1) nor evaluation (0)
LATENCY_SLACK = 1.05
COS_TOLERANCE = 1e-6  # cosines closer than this are float noise (task metrics are compared exactly)
OCR = {"ppocr_det": "det", "ppocr_rec": "rec", "ppocr_cls": "cls"}
DEFAULT_MODELS = ["ppocr_det", "ppocr_rec", "ppocr_cls", "resnet50", "squeezenet", "shufflenet", "inception_v1"]


# ----------------------------------------------------------------------------------
# Quantizers
# ----------------------------------------------------------------------------------
class _Reader:
    def __init__(self, calib: dict[str, np.ndarray]):
        n = len(next(iter(calib.values())))
        self.items = [{k: v[i:i + 1] for k, v in calib.items()} for i in range(n)]
        self.it = iter(self.items)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.items)


def _preprocessed(src: Path, tmp: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = tmp / (src.stem + "_pre.onnx")
    if not dst.exists():
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        m = onnx.load(str(dst))
        if next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) < 13:
            onnx.save(onnx.version_converter.convert_version(m, 13), str(dst))
    return dst


def ort_static(src: Path, dst: Path, calib: dict[str, np.ndarray], method: str, tmp: Path) -> float:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(_Reader, CalibrationDataReader):
        pass

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    t0 = time.perf_counter()
    quantize_static(str(_preprocessed(src, tmp)), str(dst), Reader(calib), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=methods[method])
    return time.perf_counter() - t0


def ort_dynamic(src: Path, dst: Path, ops: list[str] | None) -> float:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=ops)
    return time.perf_counter() - t0


def graphopt(src: Path, dst: Path, pipeline: str, calib_path: Path | None) -> tuple[float, bool]:
    """Build twice; (seconds of the first build, whether the two files are identical)."""
    cmd = [sys.executable, "-m", "graphopt.cli", "opt", str(src), "-p", pipeline, "-q"]
    if calib_path is not None:
        cmd += ["--calib", str(calib_path)]
    secs = 0.0
    for i, out in enumerate((dst, dst.with_suffix(".again.onnx"))):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd + ["-o", str(out)], capture_output=True, text=True)
        if i == 0:
            secs = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"graphopt -p {pipeline} exit {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    again = dst.with_suffix(".again.onnx")
    same = dst.read_bytes() == again.read_bytes()
    again.unlink()
    return secs, same


def has_const_matmul(path: Path) -> bool:
    m = onnx.load(str(path))
    inits = {t.name for t in m.graph.initializer}
    return any(n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits for n in m.graph.node)


# ----------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------
def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Interleaved timing keeps several sessions alive; by default each one's
    # worker threads spin after a run and steal the cores from the next
    # session's run, so whichever variant follows a big model looks slow.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def interleaved_latency(sessions: dict, feed: dict, runs: int, warmup: int) -> dict[str, float]:
    keys = list(sessions)
    for _ in range(warmup):
        for k in keys:
            sessions[k].run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(runs):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotate the order every round
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def grouped_latency(sessions: dict, feed: dict, runs: int, warmup: int) -> tuple[dict, dict]:
    """Latency per variant, each judged pair (graphopt, onnxruntime) interleaved
    with fp32 in its own loop, and each reference variant likewise: a slow
    reference (ConvInteger at 25 ms) in the same loop disturbs millisecond models
    next to it.  Returns (median ms per variant, the fp32 median of its loop)."""
    groups = [[g, o] for g, o in PAIRS.items() if g in sessions and o in sessions]
    grouped = {v for grp in groups for v in grp}
    groups += [[v] for v in sessions if v != "fp32" and v not in grouped]
    lat: dict[str, float] = {}
    base: dict[str, float] = {}
    for grp in groups:
        got = interleaved_latency({v: sessions[v] for v in ["fp32", *grp]}, feed, runs, warmup)
        lat.setdefault("fp32", got["fp32"])
        for v in grp:
            lat[v], base[v] = got[v], got["fp32"]
    if "fp32" not in lat:
        lat["fp32"] = interleaved_latency({"fp32": sessions["fp32"]}, feed, runs, warmup)["fp32"]
    return lat, base


def raw_fidelity(ref, sess, xs: np.ndarray, name: str) -> dict[str, float]:
    cos, rel, top1 = [], [], []
    for i in range(len(xs)):
        a = ref.run(None, {name: xs[i:i + 1]})[0].astype(np.float64)
        b = sess.run(None, {name: xs[i:i + 1]})[0].astype(np.float64)
        cos.append(float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
        rel.append(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-30)))
        top1.append(bool(a.reshape(len(a), -1).argmax(1)[0] == b.reshape(len(b), -1).argmax(1)[0]))
    return {"cos_mean": float(np.mean(cos)), "cos_min": float(np.min(cos)), "rel_err_median": float(np.median(rel)),
            "top1_agreement": float(np.mean(top1))}


def task_metrics(kind: str, sess, data, ref_preds) -> tuple[dict, object]:
    if kind == "rec":
        r = ocr_eval.evaluate_rec(sess, data)
        out = {"exact_match": r["exact_match"], "char_accuracy": r["char_accuracy"]}
        if ref_preds is not None:
            out.update(ocr_eval.rec_agreement(ref_preds, r["predictions"]))
    elif kind == "det":
        r = ocr_eval.evaluate_det(sess, data)
        out = {"det_f1": r["f1"], "det_mean_iou": r["mean_iou"]}
        if ref_preds is not None:
            a = ocr_eval.det_agreement(ref_preds, r["predictions"])
            out.update(agreement_f1=a["agreement_f1"], agreement_mean_iou=a["agreement_mean_iou"])
    else:
        r = ocr_eval.evaluate_cls(sess, data)
        out = {"cls_accuracy": r["accuracy"]}
        if ref_preds is not None:
            out["agreement"] = ocr_eval.agreement(ref_preds, r["predictions"])
    return out, r["predictions"]


# What "fidelity at least onnxruntime's" compares, per kind.
JUDGED = {"rec": ["exact_match", "char_accuracy", "agreement", "char_agreement"],
          "det": ["det_f1", "agreement_f1"], "cls": ["cls_accuracy", "agreement"],
          "cnn": ["cos_mean", "top1_agreement"]}
PAIRS = {"graphopt_static": "ort_static", "graphopt_dynamic": "ort_dynamic_mm"}


def run_model(name: str, src_path: Path, args, tmp: Path) -> dict:
    kind = OCR.get(name, "cnn")
    mdir = tmp / name
    mdir.mkdir(parents=True, exist_ok=True)
    if kind == "cnn":
        src = mdir / f"{name}_random_fp32.onnx"
        onnx.save(randomize_light(src_path, seed=0), str(src))
    else:
        src = src_path
    sproto = onnx.load(str(src), load_external_data=False)
    in_name = next(vi.name for vi in sproto.graph.input if vi.name not in {t.name for t in sproto.graph.initializer})
    t0 = time.perf_counter()
    if kind == "cnn":
        shape = bench_models.input_shapes(name, src)[in_name]
        calib = {in_name: np.random.default_rng(1).standard_normal([args.calib_n, *shape[1:]]).astype(np.float32)}
        held = np.random.default_rng(0).standard_normal([args.cnn_eval_n, *shape[1:]]).astype(np.float32)
        data = None
    else:
        n_cal = args.det_calib_n if kind == "det" else args.calib_n
        calib = ocr_eval.calibration_inputs(kind, n_cal, seed=ocr_eval.CALIB_SEED, input_name=in_name)
        held = ocr_eval.calibration_inputs(kind, args.raw_n, seed=HELD_OUT_SEED, input_name=in_name)[in_name]
        n_task = {"rec": args.rec_n, "det": args.det_n, "cls": args.cls_n}[kind]
        data = {"rec": ocr_eval.make_rec_dataset, "det": ocr_eval.make_det_dataset,
                "cls": ocr_eval.make_cls_dataset}[kind](n_task, ocr_eval.EVAL_SEED)
    render_s = time.perf_counter() - t0
    calib_path = mdir / "calib.npz"
    np.savez(calib_path, **calib)

    builders = {
        "graphopt_static": lambda d: graphopt(src, d, f"simplify,quantize-static{{method={args.method}}}", calib_path),
        "ort_static": lambda d: (ort_static(src, d, calib, args.method, mdir), None),
        "ort_dynamic": lambda d: (ort_dynamic(_preprocessed(src, mdir), d, None), None),
    }
    if has_const_matmul(src) or has_const_matmul(_preprocessed(src, mdir)):
        builders["graphopt_dynamic"] = lambda d: graphopt(src, d, "simplify,quantize-dynamic", None)
        builders["ort_dynamic_mm"] = lambda d: (ort_dynamic(_preprocessed(src, mdir), d, ["MatMul", "Gemm"]), None)

    paths, rows, problems = {"fp32": src}, {"fp32": {}}, []
    for v, build in builders.items():
        dst = mdir / f"{v}.onnx"
        row: dict = {}
        try:
            row["build_s"], det_ok = build(dst)
            if det_ok is not None:
                row["deterministic"] = det_ok
                if not det_ok:
                    problems.append(f"{name}/{v}: two graphopt runs gave different files")
            onnx.checker.check_model(str(dst))
            row["checker"] = True
            session(dst, args.threads).run(None, {in_name: held[:1]})
        except Exception as exc:  # report, measure the rest
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            if v.startswith("graphopt") or v in PAIRS.values():  # reference variants don't count
                problems.append(f"{name}/{v}: {row['error']}")
            rows[v] = row
            continue
        paths[v], rows[v] = dst, row

    sessions = {v: session(p, args.threads) for v, p in paths.items()}
    runs = args.det_runs if kind == "det" else args.runs
    lat, base = grouped_latency(sessions, {in_name: held[:1]}, runs, args.warmup)
    ref_preds = None
    for v in paths:
        row = rows[v]
        row["size_mb"] = bench_models.file_bytes(paths[v]) / 2**20
        row["latency_ms"] = lat[v]
        if v != "fp32":
            row["size_ratio"] = row["size_mb"] / rows["fp32"]["size_mb"]
            row["latency_vs_fp32"] = lat[v] / base[v]
            row.update(raw_fidelity(sessions["fp32"], sessions[v], held, in_name))
        if data is not None:
            metrics, preds = task_metrics(kind, sessions[v], data, ref_preds)
            if v == "fp32":
                ref_preds = preds
            row.update(metrics)
    for g, o in PAIRS.items():
        if g in paths and o in paths:
            rows[g]["latency_vs_ort"] = lat[g] / lat[o]
            rows[g]["vs"] = o
            if rows[g]["latency_vs_ort"] > LATENCY_SLACK:
                problems.append(f"{name}: latency {g} {lat[g]:.1f} ms = {rows[g]['latency_vs_ort']:.2f}x {o} {lat[o]:.1f} ms")
            for m in JUDGED[kind]:
                tol = COS_TOLERANCE if m.startswith("cos") else 0.0
                if m in rows[g] and m in rows[o] and rows[g][m] < rows[o][m] - tol:
                    problems.append(f"{name}: fidelity {g} {m} {rows[g][m]:.4f} < {o} {rows[o][m]:.4f}")
    return {"kind": kind, "render_s": render_s, "calib_samples": len(next(iter(calib.values()))),
            "eval_samples": len(data) if data is not None else len(held), "runs": runs,
            "variants": rows, "problems": problems}


def fmt_table(name: str, res: dict) -> list[str]:
    kind = res["kind"]
    metric_cols = {"rec": ["exact_match", "char_accuracy", "agreement", "char_agreement", "cos_mean"],
                   "det": ["det_f1", "det_mean_iou", "agreement_f1", "agreement_mean_iou", "cos_mean"],
                   "cls": ["cls_accuracy", "agreement", "cos_mean"],
                   "cnn": ["cos_mean", "cos_min", "top1_agreement"]}[kind]
    lines = [f"{name} ({kind}; calib {res['calib_samples']}, eval {res['eval_samples']}, {res['runs']} rounds)",
             "| variant | MB | size ratio | ms | vs fp32 | vs ORT | " + " | ".join(metric_cols) + " | checker | determ. |",
             "|---|" * 1 + "---|" * (7 + len(metric_cols))]
    for v, r in res["variants"].items():
        def f(key, spec=".3f"):
            return format(r[key], spec) if isinstance(r.get(key), (int, float)) else "-"
        if "error" in r:
            lines.append(f"| {v} | ERROR: {r['error'][:120]} |")
            continue
        lines.append(f"| {v} | {f('size_mb', '.2f')} | {f('size_ratio')} | {f('latency_ms', '.1f')} | "
                     f"{f('latency_vs_fp32', '.2f')} | {f('latency_vs_ort', '.2f')} | "
                     + " | ".join(f(c, ".5f" if c.startswith("cos") else ".4f") for c in metric_cols)
                     + f" | {'ok' if r.get('checker') else '-'} | {r.get('deterministic', '-')} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help=f"comma-separated (default {','.join(DEFAULT_MODELS)}; any light model works)")
    ap.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax")
    ap.add_argument("--calib-n", type=int, default=32, help="calibration samples (rec/cls lines, CNN images)")
    ap.add_argument("--det-calib-n", type=int, default=16, help="calibration pages for det")
    ap.add_argument("--rec-n", type=int, default=200)
    ap.add_argument("--det-n", type=int, default=50)
    ap.add_argument("--cls-n", type=int, default=200)
    ap.add_argument("--cnn-eval-n", type=int, default=32)
    ap.add_argument("--raw-n", type=int, default=8, help="OCR inputs for the raw-output cosine (seed 7)")
    ap.add_argument("--runs", type=int, default=40, help="latency rounds (each runs every variant once)")
    ap.add_argument("--det-runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer samples and rounds")
    ap.add_argument("--out-dir", help="keep the models here")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib_n, args.det_calib_n, args.rec_n, args.det_n, args.cls_n = 16, 6, 60, 12, 60
        args.cnn_eval_n, args.raw_n, args.runs, args.det_runs = 12, 4, 15, 8

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    available = {**bench_models.light_models(), **bench_models.ppocr_models()}
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(available)}")
    tmp = Path(args.out_dir or tempfile.mkdtemp(prefix="qvo-"))
    tmp.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    print(f"onnxruntime {onnxruntime.__version__}, {args.threads} threads, method {args.method}, "
          f"warm-up {args.warmup}, models in {tmp}")
    results, problems = {}, []
    for name in names:
        t0 = time.perf_counter()
        res = run_model(name, available[name], args, tmp)
        res["seconds"] = time.perf_counter() - t0
        results[name] = res
        problems += res["problems"]
        print("\n".join(fmt_table(name, res)) + f"\n({res['seconds']:.0f} s)\n", flush=True)
    print("Goals: " + ("met" if not problems else "MISSED:\n  " + "\n  ".join(problems)))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "results": results, "problems": problems},
                                              indent=2, default=str))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
