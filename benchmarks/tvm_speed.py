"""Latency of TVM builds (untuned, tuned) against onnxruntime on the host CPU.

    python benchmarks/tvm_speed.py [--models resnet50,ppocr_rec,squeezenet]
                                   [--trials 0] [--db tvm-tune-db] [--repeat 30]

For each model: one onnxruntime session (all graph optimizations), the untuned
TVM build, and, with ``--trials N``, a build tuned with N MetaSchedule trials
into the JSON database ``--db`` (reused between runs, so a second run tunes
nothing).  The runners are timed interleaved, one call each per round after a
warm-up, and the medians are reported with their ratio to onnxruntime.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import models  # noqa: E402


def host_target(cores: int | None = None):
    """The host CPU as a TVM 0.27 target dict (``-mcpu=native`` is refused)."""
    import tvm
    from tvm.target import codegen

    from backends.tvm.schedule import _physical_cores

    return tvm.target.Target(
        {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": cores or _physical_cores()}
    )


def ort_runner(path: Path, feed: dict[str, np.ndarray]):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, feed)


def tvm_runner(name: str, path: Path, feed: dict[str, np.ndarray], target, **build_kw):
    import tvm
    from tvm import relax

    from backends.base import TensorSpec
    from backends.tvm.frontend import import_onnx, prepare
    from backends.tvm.schedule import build
    from graphopt.ir import load

    # The frontend needs shape computations folded: pin the inputs and simplify
    # (exact passes), as the TVM backend does.
    specs = [TensorSpec(k, tuple(v.shape), str(v.dtype)) for k, v in feed.items()]
    proto = prepare(load(path), specs)
    mod = import_onnx(proto, specs)
    t0 = time.perf_counter()
    ex = build(mod, target, **build_kw)
    build_s = time.perf_counter() - t0
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(feed[i.name]) for i in proto.graph.input if i.name in feed]
    return (lambda: vm["main"](*args)), build_s, vm, args


def first_output(result) -> np.ndarray:
    if isinstance(result, list):
        return np.asarray(result[0])
    if hasattr(result, "numpy"):
        return result.numpy()
    return first_output(result[0])


def median_ms(runners: dict, repeat: int) -> dict[str, float]:
    for fn in runners.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeat):
        for key, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,ppocr_rec,squeezenet")
    ap.add_argument("--trials", type=int, default=0, help="MetaSchedule trials per model (0: untuned only)")
    ap.add_argument("--db", default="tvm-tune-db", help="JSON tuning database folder, reused between runs")
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()

    target = host_target()
    print(f"target: {target}")
    print("| model | onnxruntime ms | TVM untuned ms (x ORT) | TVM tuned ms (x ORT) | max abs diff | build s |")
    print("|---|---|---|---|---|---|")
    for name, path in models.select(args.models).items():
        feed = models.sample_inputs(name, path)
        runners = {"ort": ort_runner(path, feed)}
        untuned, build_s, *_ = tvm_runner(name, path, feed, target, progress=False)
        runners["untuned"] = untuned
        builds = [f"{build_s:.0f}"]
        if args.trials > 0:
            tuned, tune_s, *_ = tvm_runner(name, path, feed, target, tune_trials=args.trials, tune_db=args.db)
            runners["tuned"] = tuned
            builds.append(f"{tune_s:.0f}")
        ref = first_output(runners["ort"]())
        diff = max(float(np.max(np.abs(first_output(fn()) - ref))) for k, fn in runners.items() if k != "ort")
        ms = median_ms(runners, args.repeat)
        cells = [f"{ms['ort']:.2f}", f"{ms['untuned']:.2f} ({ms['untuned'] / ms['ort']:.1f}x)"]
        cells.append(f"{ms['tuned']:.2f} ({ms['tuned'] / ms['ort']:.2f}x)" if "tuned" in ms else "-")
        print(f"| {name} | {' | '.join(cells)} | {diff:.2e} | {' / '.join(builds)} |", flush=True)


if __name__ == "__main__":
    main()
