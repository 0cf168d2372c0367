"""int8 TVM kernels from QDQ models against fp32 TVM, in one run.

Per model:

* fp32: ``graphopt opt M -p simplify`` (light models: seeded random weights,
  ``quantize_vs_ort.randomize_light``), imported with the Relax ONNX frontend;
* int8: the same model through ``-p quantize-static --calib random:16`` (QDQ,
  per-channel int8 weights, uint8 activations), imported, then
  ``graphopt.backends.tvm.int8.lower_qdq``;
* both built the same way for the host llvm target
  (``graphopt.backends.tvm.targets.host_llvm``: the host CPU name and features):
  ``graphopt.backends.tvm.schedule.build`` (default drawn schedules, no tuning unless
  ``--tune-trials``) when a probe build in a child process succeeds, else
  plain ``tvm.compile`` (unscheduled kernels; ``--build`` forces either).

Correctness: the int8 module against onnxruntime running the same QDQ model,
on seeded N(0, 1) inputs, twice: with graph optimizations off (DQ -> float op
-> Q: the QDQ reference semantics) and with its defaults (its own int8
kernels).  When an output comes from a DequantizeLinear the difference is in
quantization steps of that output (max, and the fraction of elements off by
one or more); else as relative error.  One-step differences per layer (float
accumulation and rounding ties) compound over a deep network, so the cosine
to the fp32 model is given for TVM int8 and for onnxruntime's QDQ run side by
side.

Latency: fp32 and int8 alternate within each round (order rotating), a
warm-up first, medians over rounds; the goal is int8 <= 0.6x fp32.

    python benchmarks/tvm_int8.py [--models resnet50,ppocr_rec] [--rounds 15] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import models as bench_models  # noqa: E402

GOAL = 0.6


def _graphopt(src: Path, dst: Path, pipeline: str, extra: list[str]) -> None:
    subprocess.run([sys.executable, "-c", "import sys; from graphopt.cli import main; sys.exit(main())", "opt", str(src), "-o", str(dst), "-p", pipeline, "-q",
                    "--seed", "0", *extra], check=True)


def prepare(name: str, path: Path, tmp: Path) -> tuple[Path, Path]:
    """(fp32 model, QDQ model) for ``name``."""
    src = path
    if name in bench_models.light_models():
        from quantize_vs_ort import randomize_light

        src = tmp / f"{name}_random.onnx"
        onnx.save(randomize_light(path), str(src))
    flags = bench_models.shape_flags(name, path)
    fp32, qdq = tmp / f"{name}_fp32.onnx", tmp / f"{name}_qdq.onnx"
    _graphopt(src, fp32, "simplify", flags)
    _graphopt(fp32, qdq, "quantize-static", flags + ["--calib", "random:16"])
    return fp32, qdq


def import_relax(path: Path, shapes: dict[str, list[int]]):
    from tvm.relax.frontend.onnx import from_onnx

    return from_onnx(onnx.load(str(path)), shape_dict=shapes)


_PROBE = """
import tvm
from tvm import relax
from graphopt.backends.tvm import schedule
from graphopt.backends.tvm.targets import host_llvm
bb = relax.BlockBuilder()
x = relax.Var("x", relax.TensorType((4, 4), "float32"))
with bb.function("main", [x]):
    with bb.dataflow():
        y = bb.emit_output(relax.op.matmul(x, x))
    bb.emit_func_output(y)
schedule.build(bb.get(), tvm.target.Target(host_llvm()), progress=False)
"""


def build_path() -> str:
    """``schedule`` when graphopt.backends.tvm.schedule.build works here (probed in a
    child process: a crash there must not end the benchmark), else ``compile``
    (plain ``tvm.compile``: unscheduled kernels)."""
    try:
        from graphopt.backends.tvm import schedule  # noqa: F401
    except ImportError:
        return "compile"
    probe = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, timeout=600)
    return "schedule" if probe.returncode == 0 else "compile"


def build(mod, target, tune_trials: int, path: str):
    import tvm

    if path == "schedule":
        from graphopt.backends.tvm import schedule

        return schedule.build(mod, target, tune_trials=tune_trials, progress=False)
    return tvm.compile(mod, target)


def output_scales(path: Path) -> dict[str, float]:
    """Scale of each graph output that a per-tensor DequantizeLinear produces."""
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = {}
    outputs = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in outputs and node.input[1] in inits:
            s = inits[node.input[1]]
            if s.size == 1:
                out[node.output[0]] = float(s.reshape(-1)[0])
    return out


def _session(path: Path, optimized: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimized:  # DQ -> float op -> Q as written: the QDQ reference semantics
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def compare(fp32: Path, qdq: Path, got: list[np.ndarray], feed: dict[str, np.ndarray]) -> dict:
    """Per output: steps against onnxruntime's QDQ reference (optimizations off)
    and against its own int8 kernels (default optimizations: QLinearConv etc.),
    and the cosine to the fp32 model of TVM int8 and of onnxruntime's QDQ run."""
    ref_sess = _session(qdq, optimized=False)
    ref = ref_sess.run(None, feed)
    ort_int8 = _session(qdq, optimized=True).run(None, feed)
    float_out = _session(fp32, optimized=True).run(None, feed)
    scales = output_scales(qdq)
    res = {}
    for i, meta in enumerate(ref_sess.get_outputs()):
        g = got[i].astype(np.float64)
        entry: dict = {"elements": int(g.size),
                       "cos_to_fp32": {"tvm_int8": round(_cos(g, float_out[i]), 6),
                                       "ort_qdq": round(_cos(ref[i], float_out[i]), 6)}}
        for label, want in (("vs_ort_reference", ref[i]), ("vs_ort_int8_kernels", ort_int8[i])):
            diff = np.abs(g - want.astype(np.float64))
            if meta.name in scales:
                steps = diff / scales[meta.name]
                entry[label] = {"max_steps": round(float(steps.max()), 3),
                                "frac_differing": round(float((steps > 0.5).mean()), 5)}
            else:
                entry[label] = {"relative_error": float(diff.max() / max(np.abs(want).max(), 1e-30))}
        res[meta.name] = entry
    return res


def _time(vm, args, runs: int) -> float:
    t0 = time.perf_counter()
    for _ in range(runs):
        vm["main"](*args)
    return (time.perf_counter() - t0) / runs * 1000.0


def run_model(name: str, path: Path, args, tmp: Path) -> dict:
    import tvm
    from tvm import relax

    from graphopt.backends.tvm.int8 import lower_qdq
    from graphopt.backends.tvm.targets import host_llvm

    target = tvm.target.Target(host_llvm())
    fp32, qdq = prepare(name, path, tmp)
    shapes = bench_models.input_shapes(name, path)
    feed = bench_models.sample_inputs(name, path, seed=0)
    t0 = time.perf_counter()
    mod_f = import_relax(fp32, shapes)
    mod_q, stats = lower_qdq(import_relax(qdq, shapes))
    t1 = time.perf_counter()
    ex_f = build(mod_f, target, args.tune_trials, args.build)
    t2 = time.perf_counter()
    ex_q = build(mod_q, target, args.tune_trials, args.build)
    t3 = time.perf_counter()
    dev = tvm.cpu()
    vms = {"fp32": relax.VirtualMachine(ex_f, dev), "int8": relax.VirtualMachine(ex_q, dev)}
    tv_args = [tvm.runtime.tensor(feed[k]) for k in shapes]
    out = vms["int8"]["main"](*tv_args)
    outs = [o.numpy() for o in out] if isinstance(out, (list, tuple)) or hasattr(out, "__len__") and \
        not hasattr(out, "numpy") else [out.numpy()]
    fidelity = compare(fp32, qdq, outs, feed)
    for vm in vms.values():  # warm-up
        _time(vm, tv_args, 1)
    samples: dict[str, list[float]] = {k: [] for k in vms}
    order = list(vms)
    for r in range(args.rounds):
        for k in order[r % 2:] + order[:r % 2]:
            samples[k].append(_time(vms[k], tv_args, args.runs))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "model": name,
        "target": str(target.export().get("mcpu", "")),
        "build": {"schedule": "graphopt.backends.tvm.schedule.build", "compile": "tvm.compile (unscheduled kernels)"}[args.build],
        "lower_qdq": stats,
        "fidelity_vs_onnxruntime": fidelity,
        "build_s": {"fp32": round(t2 - t1, 1), "int8": round(t3 - t2, 1), "import": round(t1 - t0, 1)},
        "latency_ms": {k: round(v, 2) for k, v in med.items()},
        "ratio_int8_fp32": round(med["int8"] / med["fp32"], 3),
        "goal_met": med["int8"] / med["fp32"] <= GOAL,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet50")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=1, help="calls per timing sample")
    ap.add_argument("--tune-trials", type=int, default=0)
    ap.add_argument("--build", choices=("auto", "schedule", "compile"), default="auto",
                    help="auto: schedule.build when it works here, else tvm.compile")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.build == "auto":
        args.build = build_path()
        print(f"build path: {args.build}", file=sys.stderr, flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in bench_models.select(args.models).items():
            res = run_model(name, path, args, Path(tmp))
            results.append(res)
            print(json.dumps(res, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["goal_met"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
