"""TVM backend against onnxruntime: outputs, compile time, untuned latency.

Each model is compiled with ``graphopt compile --backend tvm`` in its own
process (a crash in the compiler costs one row, not the run), loaded back with
``backends.load_runner``, and run on the same inputs as onnxruntime (the
``onnxruntime`` backend's runner on the original file).  Relative error is
``graphopt.runtime.relative_error``, worst output; the goal is <= 1e-4 in fp32.
Latency: the two runners interleaved (order rotated every round), warm-up
first, medians; the ratio is TVM / onnxruntime (below 1: TVM faster).

    python benchmarks/tvm_correctness.py [--models a,b] [--target x86_64] [--runs 20] [--json OUT]
                                         [--tvm-default-pipeline]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402

GOAL = 1e-4


def interleaved(runners: dict, feed: dict, runs: int, warmup: int) -> dict[str, float]:
    keys = list(runners)
    for _ in range(warmup):
        for k in keys:
            runners[k](feed)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(runs):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            runners[k](feed)
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


# ``--tvm-default-pipeline``: build with TVM's own default pipeline instead of
# graphopt.backends.tvm.schedule (the compile path without graphopt's schedules).
_DEFAULT_PIPELINE = ("import sys, graphopt.backends.tvm as b; b._schedule = lambda: None; "
                     "from graphopt.cli import main; sys.exit(main())")


def compile_one(name: str, path: Path, out: Path, target: str, timeout: float, default_pipeline: bool) -> dict:
    launcher = ["-c", _DEFAULT_PIPELINE] if default_pipeline else ["-m", "graphopt.cli"]
    cmd = [sys.executable, *launcher, "compile", str(path), "--backend", "tvm", "--target", target,
           "-o", str(out), "-q", *models.shape_flags(name, path)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"compile timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
        return {"error": f"exit {proc.returncode}: {lines[-1] if lines else ''}"[:300]}
    manifest = json.loads((out / "manifest.json").read_text())
    return {"compile_s": manifest["compile_seconds"], "process_s": round(wall, 2),
            "schedules": manifest.get("tuning", {}).get("schedules", "graphopt")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated names (default: the 9 light models and PP-OCR det/rec/cls)")
    ap.add_argument("--target", default="x86_64")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per compile")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--tvm-default-pipeline", action="store_true",
                    help="build with TVM's default pipeline, not graphopt.backends.tvm.schedule (untuned loop nests on CPU)")
    args = ap.parse_args()

    from graphopt.backends import load_runner
    from graphopt.runtime import relative_error

    rows = []
    with tempfile.TemporaryDirectory(prefix="tvm-bench-") as tmp:
        for name, path in models.select(args.models).items():
            out = Path(tmp) / name
            row = {"model": name, **compile_one(name, path, out, args.target, args.timeout,
                                                       args.tvm_default_pipeline)}
            if "error" not in row:
                feed = models.task_inputs(name, path)
                tvm_runner = load_runner(out)
                ort_runner = load_runner(path)
                got, want = tvm_runner(feed), ort_runner(feed)
                row["rel_err"] = max(relative_error(got[k], want[k]) for k in want)
                lat = interleaved({"tvm": tvm_runner, "ort": ort_runner}, feed, args.runs, args.warmup)
                row.update(tvm_ms=lat["tvm"], ort_ms=lat["ort"], ratio=lat["tvm"] / lat["ort"])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    print("| model | compile s | rel. error | <= 1e-4 | TVM ms | onnxruntime ms | latency TVM / ORT |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | - | - | no: {r['error']} | - | - | - |")
            continue
        ok = "yes" if r["rel_err"] <= GOAL else "no"
        print(f"| {r['model']} | {r['compile_s']:.1f} | {r['rel_err']:.1e} | {ok} | {r['tvm_ms']:.2f} | "
              f"{r['ort_ms']:.2f} | {r['ratio']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all("error" not in r and r["rel_err"] <= GOAL for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
