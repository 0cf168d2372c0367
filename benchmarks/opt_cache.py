"""Wall time of ``graphopt opt`` on a cache miss (cold) against a cache hit.

Each run is a fresh subprocess, as a build system starts it, so interpreter
start-up and imports count.  Per repetition and model: a cold run into an
empty cache folder, then a cached run of the same command into a cache that
already holds the entry, alternating which goes first; one warm-up round is
not timed.  Also checks that the cached output is byte-identical to the cold
one.  Reported: medians and the ratio cached/cold of the wall time, of the child's
CPU time (less sensitive to a loaded machine), and of the time inside the
command (the ``--json`` total: without interpreter start-up and imports).

    python benchmarks/opt_cache.py [--reps 5] [--models tiny_resnet,resnet50,ppocr_det] [-p PIPELINE] [--calib SPEC]
                                   [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def model_paths(names: list[str]) -> dict[str, Path]:
    """tiny_resnet (examples/) and the models of benchmarks/models.py by name."""
    others = [n for n in names if n != "tiny_resnet"]
    known = models.select(",".join(others)) if others else {}
    return {n: ROOT / "examples" / "tiny_resnet.onnx" if n == "tiny_resnet" else known[n] for n in names}


def timed(cmd: list[str]) -> tuple[tuple[float, float], dict]:
    """((wall seconds, CPU seconds of the child), its --json summary)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    return (seconds, cpu), json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models", default="tiny_resnet,resnet50")
    ap.add_argument("-p", "--pipeline", help="pipeline (default: graphopt's default, simplify)")
    ap.add_argument("--calib", help="--calib for the pipeline, e.g. random:8")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for name, path in model_paths(args.models.split(",")).items():
            warm = tmp / f"{name}-warm-cache"

            def cmd(cache: Path, out: Path) -> list[str]:
                return [sys.executable, "-m", "graphopt.cli", "opt", str(path), "-o", str(out), "-q", "--json",
                        "--cache-dir", str(cache), *models.shape_flags(name, path),
                        *(["-p", args.pipeline] if args.pipeline else []),
                        *(["--calib", args.calib] if args.calib else [])]

            timed(cmd(warm, tmp / "warm.onnx"))  # warm-up; fills the cache the cached runs read
            cold_t, hit_t, inner = [], [], {"cold": [], "hit": []}
            for rep in range(args.reps):
                cold_cache = tmp / f"cold-{name}-{rep}"
                steps = [("cold", cold_cache, tmp / "cold.onnx"), ("hit", warm, tmp / "hit.onnx")]
                for kind, cache, out in steps if rep % 2 == 0 else steps[::-1]:
                    seconds, log = timed(cmd(cache, out))
                    if kind == "hit" and log["cache"] == "miss":
                        # graphopt's source changed since the warm-up (a shared checkout being
                        # edited): that run refilled the cache; time the hit again.
                        seconds, log = timed(cmd(cache, out))
                    assert log["cache"] == ("miss" if kind == "cold" else "hit"), log
                    (cold_t if kind == "cold" else hit_t).append(seconds)
                    inner[kind].append(log["timings"]["total"])
                shutil.rmtree(cold_cache)
                assert (tmp / "cold.onnx").read_bytes() == (tmp / "hit.onnx").read_bytes()
            med = {k: statistics.median(v) for k, v in (
                ("cold_wall", [w for w, _ in cold_t]), ("hit_wall", [w for w, _ in hit_t]),
                ("cold_cpu", [c for _, c in cold_t]), ("hit_cpu", [c for _, c in hit_t]),
                ("cold_in", inner["cold"]), ("hit_in", inner["hit"]))}
            out_mb = log["size"]["after"] / 2**20
            results[name] = {"input_bytes": path.stat().st_size, "output_bytes": log["size"]["after"],
                             **{k: round(v, 3) for k, v in med.items()},
                             "ratio_wall": round(med["hit_wall"] / med["cold_wall"], 3),
                             "ratio_cpu": round(med["hit_cpu"] / med["cold_cpu"], 3),
                             "ratio_in_process": round(med["hit_in"] / med["cold_in"], 3), "reps": args.reps}
            print(f"{name:<12} out {out_mb:6.1f} MB | wall cold {med['cold_wall']:5.2f} s cached {med['hit_wall']:5.2f} s"
                  f" ({med['hit_wall'] / med['cold_wall']:.2f}) | CPU cold {med['cold_cpu']:5.2f} s cached "
                  f"{med['hit_cpu']:5.2f} s ({med['hit_cpu'] / med['cold_cpu']:.2f}) | in-process cold "
                  f"{med['cold_in']:5.2f} s cached {med['hit_in']:5.2f} s ({med['hit_in'] / med['cold_in']:.2f})",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
