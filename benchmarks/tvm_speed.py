"""Latency of TVM artifacts (default schedules, tuned) against onnxruntime on the host CPU.

    python benchmarks/tvm_speed.py [--models squeezenet,resnet50,ppocr_det,ppocr_rec,ppocr_cls]
                                   [--tune-minutes 0] [--trials 0] [--db tvm-tune-db] [--repeat 30]
                                   [--threads 2] [--int8 [--quantize OPTIONS]] [--target x86_64]

Measured as users run it: each model is compiled with
``graphopt compile MODEL --target x86_64 -o DIR`` in a subprocess (its wall
time is the compile time), the artifact folder is loaded as ``graphopt run``
loads it (``graphopt.backends.artifact.load_runner``), and onnxruntime runs the same
file with all graph optimizations and spinning off.  With ``--tune-minutes
M`` a second artifact is built after a template search of M minutes per
model (``graphopt compile --tune-minutes M``), with ``--trials N`` after N
MetaSchedule trials (both: both), its winners kept in ``--db`` (reused
between runs: delete the folder to measure a search from scratch).  The runners are timed interleaved, one call each per round
after a warm-up, and the medians are reported with their ratio to
onnxruntime; the geometric mean of the ratios closes the table.  With
``--int8`` each model is first quantized as a user does it (``graphopt opt
-p simplify,quantize-static --calib random:16``) and both runtimes run that
QDQ file; fidelity is each one's worst-output cosine to onnxruntime's fp32
outputs, side by side, and the fp32 model's TVM artifact for the same target
is timed in the same rounds (last column: int8 / fp32).  ``--quantize``
passes options to quantize-static (``reduce-range=true``: 7-bit weights);
``--target`` compiles for another x86-64 target this CPU can run (a TVM
target JSON, e.g. ``{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu":
"haswell"}`` for AVX2's int8 path), onnxruntime still using all of this
CPU's features.  onnxruntime's pool does not spin
(``allow_spinning=0``); TVM's runs with the runner's default (workers spin
about a millisecond after a kernel, then sleep), and every call is followed
by an untimed busy wait of ``PAUSE_S`` so that a pool still spinning after its
own run does not steal a core from the other runtime's next one.  Light
models get randomized weights (their constant fills would make every output
equal), so the outputs are compared for real.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import models  # noqa: E402

DEFAULT_MODELS = "squeezenet,resnet50,ppocr_det,ppocr_rec,ppocr_cls"
# Untimed wait after every timed call: longer than any pool's spinning.
PAUSE_S = 0.002


def ort_runner(path: Path, feed: dict[str, np.ndarray], threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, feed)


def compile_artifact(path: Path, name: str, out: Path, extra: list[str], target: str = "x86_64") -> float:
    """``graphopt compile`` as a user runs it; returns its wall time."""
    cmd = [sys.executable, "-m", "graphopt.cli", "compile", str(path), "--target", target, "-o", str(out), "-q",
           *models.shape_flags(name, path), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: graphopt compile failed: {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def artifact_runner(folder: Path, feed: dict[str, np.ndarray]):
    from graphopt.backends.artifact import load_runner

    runner = load_runner(folder)
    arrays = runner.check_feeds(feed)
    return lambda: list(runner.run_checked(arrays).values())


def pause(seconds: float) -> None:
    """Wait busily: a sleeping main thread lets the core clock down and the
    next runner start cold, which a deployed model called back to back does
    not see."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def median_ms(runners: dict, repeat: int) -> dict[str, float]:
    for fn in runners.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeat):
        for key, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
            pause(PAUSE_S)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def model_file(name: str, path: Path, work: Path) -> Path:
    """The model to time: light models with seeded random weights written out."""
    if name in models.OCR_KINDS:
        return path
    import onnx

    from light_weights import randomize_light

    out = work / f"{name}.onnx"
    onnx.save(randomize_light(path), str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--trials", type=int, default=0, help="MetaSchedule trials per model (0: default schedules only)")
    ap.add_argument("--tune-minutes", type=float, default=0.0,
                    help="template search minutes per model for the tuned artifact (0: none)")
    ap.add_argument("--db", default="tvm-tune-db", help="JSON tuning database folder, reused between runs")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads (TVM uses the physical cores)")
    ap.add_argument("--int8", action="store_true", help="time the quantize-static QDQ model in both runtimes")
    ap.add_argument("--quantize", default="", help="quantize-static options with --int8, e.g. reduce-range=true")
    ap.add_argument("--target", default="x86_64", help="graphopt compile --target (a preset or TVM target JSON)")
    args = ap.parse_args()

    print(f"threads: onnxruntime {args.threads}, TVM {os.cpu_count()} logical cores (num-cores = physical)")
    fidelity = "cosine to fp32: ORT / TVM" if args.int8 else "max rel diff"
    print(f"target: {args.target}")
    fp32_column = " TVM fp32 ms (int8 / fp32) |" if args.int8 else ""
    print(f"| model | onnxruntime ms | TVM default ms (x ORT) | TVM tuned ms (x ORT) | {fidelity} | compile s |"
          + fp32_column)
    print("|---|---|---|---|---|---|" + ("---|" if args.int8 else ""))
    ratios: list[float] = []
    tuned_ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="graphopt-tvm-speed-") as tmp:
        work = Path(tmp)
        for name, path in models.select(args.models).items():
            path = model_file(name, path, work)
            feed = models.sample_inputs(name, path)
            fp32 = None
            runners = {}
            if args.int8:
                fp32 = [np.asarray(v) for v in ort_runner(path, feed, args.threads)()]
                compile_artifact(path, name, work / f"{name}.fp32", [], args.target)
                runners["fp32"] = artifact_runner(work / f"{name}.fp32", feed)
                path = models.quantize_static(path, name, work / f"{name}.qdq.onnx", args.quantize)
            compile_s = [compile_artifact(path, name, work / f"{name}.default", [], args.target)]
            runners = {"ort": ort_runner(path, feed, args.threads),
                       "default": artifact_runner(work / f"{name}.default", feed), **runners}
            if args.trials > 0 or args.tune_minutes > 0:
                tuning = ["--tune-trials", str(args.trials), "--tune-minutes", str(args.tune_minutes)]
                compile_s.append(compile_artifact(path, name, work / f"{name}.tuned", [*tuning, "--tune-db", args.db],
                                                  args.target))
                runners["tuned"] = artifact_runner(work / f"{name}.tuned", feed)
            ref = [np.asarray(v) for v in runners["ort"]()]
            diff = 0.0
            for key, fn in runners.items():
                if key not in ("ort", "fp32"):
                    for got, want in zip(fn(), ref):
                        scale = float(np.max(np.abs(want))) or 1.0
                        diff = max(diff, float(np.max(np.abs(np.asarray(got) - want))) / scale)
            agreement = f"{diff:.1e}" if fp32 is None else \
                f"{models.worst_cosine(ref, fp32):.5f} / {models.worst_cosine(runners['default'](), fp32):.5f}"
            ms = median_ms(runners, args.repeat)
            ratios.append(ms["default"] / ms["ort"])
            if "tuned" in ms:
                tuned_ratios.append(ms["tuned"] / ms["ort"])
            cells = [f"{ms['ort']:.2f}", f"{ms['default']:.2f} ({ms['default'] / ms['ort']:.2f}x)"]
            cells.append(f"{ms['tuned']:.2f} ({ms['tuned'] / ms['ort']:.2f}x)" if "tuned" in ms else "-")
            if "fp32" in ms:
                cells_end = f" {ms['fp32']:.2f} ({ms['default'] / ms['fp32']:.2f}x) |"
            else:
                cells_end = ""
            print(f"| {name} | {' | '.join(cells)} | {agreement} | {' / '.join(f'{s:.0f}' for s in compile_s)} |"
                  + cells_end, flush=True)
    if ratios:
        geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        print(f"\ngeomean TVM default / onnxruntime: {geomean:.2f}x; worst {max(ratios):.2f}x")
    if tuned_ratios:
        geomean = math.exp(sum(math.log(r) for r in tuned_ratios) / len(tuned_ratios))
        print(f"geomean TVM tuned / onnxruntime: {geomean:.2f}x; worst {max(tuned_ratios):.2f}x")


if __name__ == "__main__":
    main()
