"""Wall time of the ``graphopt opt`` CLI against the ``onnxslim`` CLI.

Both run as fresh subprocesses (so import time counts, as it does for a user),
on the same models, interleaved: each repetition runs every model with both
tools, alternating which goes first, after one warm-up round that is not
timed.  The machine is shared and noisy, so the figures are medians and the
goal is a ratio graphopt/onnxslim <= 1.0 on every model.

    python benchmarks/speed_vs_onnxslim.py [--json OUT] [--reps 5] [--models a,b] [-p PIPELINE]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402

GOAL_RATIO = 1.0


def graphopt_cmd(src: Path, dst: Path, pipeline: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "graphopt.cli", "opt", str(src), "-o", str(dst), "-q"]
    return cmd + (["-p", pipeline] if pipeline else [])


def onnxslim_cmd(src: Path, dst: Path) -> list[str]:
    exe = shutil.which("onnxslim")
    return ([exe] if exe else [sys.executable, "-m", "onnxslim"]) + [str(src), str(dst)]


def timed(cmd: list[str]) -> float:
    """Seconds one command took; raises if it failed (a failed run is not a time)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise RuntimeError(f"{Path(cmd[0]).name} ... failed: {last}")
    return seconds


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write raw times and ratios as JSON here")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    ap.add_argument("--models", help="comma-separated subset of models")
    ap.add_argument("-p", "--pipeline", help="graphopt pipeline (default: graphopt's default, simplify)")
    args = ap.parse_args(argv)

    chosen = models.select(args.models)
    times: dict[str, dict[str, list[float]]] = {n: {"graphopt": [], "onnxslim": []} for n in chosen}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="graphopt-speed-") as tmp:
        work = Path(tmp)
        for rep in range(args.reps + 1):  # round 0 is the warm-up
            for i, (name, src) in enumerate(chosen.items()):
                if name in errors:
                    continue
                runs = {
                    "graphopt": graphopt_cmd(src, work / f"{name}.opt.onnx", args.pipeline),
                    "onnxslim": onnxslim_cmd(src, work / f"{name}.slim.onnx"),
                }
                order = ["graphopt", "onnxslim"] if (rep + i) % 2 == 0 else ["onnxslim", "graphopt"]
                try:
                    measured = {tool: timed(runs[tool]) for tool in order}
                except RuntimeError as exc:
                    errors[name] = str(exc)
                    continue
                if rep > 0:
                    for tool, seconds in measured.items():
                        times[name][tool].append(seconds)
            print(f"  round {rep}/{args.reps} done" + (" (warm-up)" if rep == 0 else ""), file=sys.stderr, flush=True)

    rows = []
    print(f"{'model':14s} {'graphopt s':>10s} {'onnxslim s':>10s} {'ratio':>7s}  goal<= {GOAL_RATIO}")
    for name in chosen:
        if name in errors:
            print(f"{name:14s} {'-':>10s} {'-':>10s} {'-':>7s}  FAIL {errors[name]}")
            rows.append({"model": name, "error": errors[name]})
            continue
        g = statistics.median(times[name]["graphopt"])
        s = statistics.median(times[name]["onnxslim"])
        ratio = g / s
        ok = ratio <= GOAL_RATIO
        print(f"{name:14s} {g:10.3f} {s:10.3f} {ratio:7.2f}  {'PASS' if ok else 'FAIL'}")
        rows.append({"model": name, "graphopt_median_s": g, "onnxslim_median_s": s, "ratio": ratio, "ok": ok,
                     "graphopt_s": times[name]["graphopt"], "onnxslim_s": times[name]["onnxslim"]})
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    gm = geomean(ratios)
    print(f"{'geomean':14s} {'':>10s} {'':>10s} {gm:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"reps": args.reps, "pipeline": args.pipeline or "default",
                                               "geomean_ratio": gm, "rows": rows}, indent=2) + "\n")
    return 0 if not errors and all(r["ok"] for r in rows if "ok" in r) else 1


if __name__ == "__main__":
    sys.exit(main())
