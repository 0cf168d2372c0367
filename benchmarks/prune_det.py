"""Data-driven channel pruning of PP-OCRv4 det as a user runs it.

    python benchmarks/prune_det.py                      # prune-channels{ratio=0.3} --calib (32 pages)
    python benchmarks/prune_det.py --options "ratio=0.3,budget=channels"

Steps, each through the ``graphopt`` CLI on written files: calibration pages
of one seed saved as .npz (``ocr_eval``), ``graphopt opt det -p
"simplify,prune-channels{...}" --calib calib.npz`` (its wall time is the
pruning time), the same pipeline without pruning as the fp32 baseline, then
box F1 on rendered pages of another seed (against their line boxes, and
agreement with the baseline's boxes) and onnxruntime latency of both files:
fresh sessions, ``--threads`` intra-op threads, no spinning, interleaved
rounds after a warm-up, medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import models as bench_models  # noqa: E402
import ocr_eval  # noqa: E402
from ocr_tasks import det_agreement, make_det_dataset  # noqa: E402

SHAPE = "x=1x3x640x640"


def graphopt_opt(src: Path, out: Path, pipeline: str, *extra: str) -> float:
    """Run ``graphopt opt`` as a user does; its wall seconds."""
    cmd = [sys.executable, "-m", "graphopt.cli", "opt", str(src), "-o", str(out), "-q", "-p", pipeline,
           "--input-shape", SHAPE, *extra]
    env = dict(os.environ, GRAPHOPT_NO_CACHE="1")
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t


def latency(paths: list[Path], feeds: dict, rounds: int, threads: int) -> list[float]:
    import onnxruntime as ort

    sessions = []
    for p in paths:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions.append(ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]))
    for s in sessions:
        s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for i in range(rounds):
        for k in range(len(sessions)):
            j = (i + k) % len(sessions)
            t = time.perf_counter()
            sessions[j].run(None, feeds)
            times[j].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def macs(path: Path) -> int:
    from graphopt.ir import load
    from graphopt.summary import summarize

    return int(summarize(load(path), {"x": [1, 3, 640, 640]})["macs"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--options", default="ratio=0.3", help="prune-channels options")
    ap.add_argument("--calib-pages", type=int, default=32)
    ap.add_argument("--eval-pages", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="keep the files in this folder")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    det = bench_models.ppocr_models()["ppocr_det"]
    work = args.keep or Path(tempfile.mkdtemp(prefix="graphopt-prune-det-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = ocr_eval.save_calibration("det", work / "calib.npz", n=args.calib_pages, model=det)
    base, pruned = work / "base.onnx", work / "pruned.onnx"
    graphopt_opt(det, base, "simplify")
    seconds = graphopt_opt(det, pruned, f"simplify,prune-channels{{{args.options}}}", "--calib", str(calib))
    print(f"pruning: {seconds:.1f} s", file=sys.stderr, flush=True)

    pages = make_det_dataset(args.eval_pages)
    ref, got = ocr_eval.evaluate_det(base, pages), ocr_eval.evaluate_det(pruned, pages)
    agree = det_agreement(ocr_eval.predict_det(base, [p for p, _ in pages]),
                          ocr_eval.predict_det(pruned, [p for p, _ in pages]))
    feeds = {"x": np.load(calib)["x"][:1]}
    ms = [t * 1e3 for t in latency([base, pruned], feeds, args.rounds, args.threads)]
    row = {"options": args.options, "prune_seconds": round(seconds, 1),
           "macs": [macs(base), macs(pruned)],
           "f1": [ref["f1"], got["f1"]], "agreement_f1": agree["agreement_f1"],
           "latency_ms": [round(m, 2) for m in ms], "latency_ratio": round(ms[1] / ms[0], 3),
           "threads": args.threads, "rounds": args.rounds}
    print(json.dumps(row, indent=1))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
