"""A BERT-shaped encoder built with onnx.helper, and dynamic int8 quantization on it.

The model (``build_encoder``) is embeddings-free: its input is the hidden
states ``x[batch, seq, hidden]`` a BERT embedding layer would produce.  It has
an input LayerNormalization (the embedding LayerNorm), then ``layers``
post-LN encoder blocks as BERT has them:

    q, k, v = x Wq + bq, x Wk + bk, x Wv + bv        (MatMul + Add)
    heads   = Softmax(q k^T / sqrt(d)) v             (Reshape/Transpose, MatMul, Softmax)
    x       = LayerNorm(x + heads Wo + bo)
    x       = LayerNorm(x + GELU(x W1 + b1) W2 + b2)  (GELU in its Erf form)

Weights are seeded N(0, 1/sqrt(fan_in)).  Real transformers have a few hidden
channels whose activations are 10-50x larger than the rest ("outlier
features"); they come from LayerNorm gammas with a few large entries, and that
is how they are reproduced here: every LayerNorm gets ``outliers`` channels
(the same channels in every layer, as in real models) with gamma 8 to 20.  With
per-tensor activation quantization those channels set the scale, the other
channels are left with a few int8 steps, and onnxruntime's ``quantize_dynamic``
drifts noticeably; without outliers (``--outliers 0``) it is near lossless.

Compared, in one run: fp32, onnxruntime ``quantize_dynamic`` (QInt8 weights,
defaults; and per-channel), graphopt ``-p quantize-dynamic`` (default; and
per-channel), and graphopt with ``--fidelity "cosine>=0.99"`` where the CLI
has that option.  Reported: file size, onnxruntime CPU latency (fixed
threads, all variants interleaved after a warm-up, medians) as a ratio to fp32
and to onnxruntime's variant, and fidelity on held-out inputs: the worst
per-token cosine similarity to fp32 over all tokens of all evaluation samples,
the mean per-token cosine, and the relative error max|q - f| / max|f|.
Every output is also checked with onnx.checker, run in onnxruntime, and
graphopt's output is built twice and compared byte for byte.

    python benchmarks/bert_encoder.py [--hidden 768 --layers 4 --heads 12 --seq 128]
                                      [--quick] [--json OUT] [--out-dir DIR]

Goals (exit 1 if missed, naming which): graphopt's worst-case token cosine >=
onnxruntime's (same granularity), graphopt's latency <= onnxruntime's (5%
allowed for timer noise on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_vs_ort import session  # noqa: E402  (one way to open a timed session)

LATENCY_SLACK = 1.05
OPSET = 17


# ----------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------
def build_encoder(hidden: int = 768, layers: int = 4, heads: int = 12, ffn: int | None = None, seq: int | None = 128,
                  outliers: int = 4, seed: int = 0) -> onnx.ModelProto:
    """The encoder as an onnx model (opset 17).  ``seq=None`` leaves the sequence dim symbolic."""
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    ffn = ffn or 4 * hidden
    dh = hidden // heads
    rng = np.random.default_rng(seed)
    outlier_ch = rng.choice(hidden, size=outliers, replace=False) if outliers else np.zeros(0, int)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(x: str, k: int, n: int, prefix: str) -> str:
        w = const(f"{prefix}.weight", (rng.standard_normal((k, n)) / math.sqrt(k)).astype(np.float32))
        b = const(f"{prefix}.bias", (rng.standard_normal(n) * 0.02).astype(np.float32))
        return node("Add", [node("MatMul", [x, w], f"{prefix}/MatMul"), b], f"{prefix}/Add")

    def layernorm(x: str, prefix: str) -> str:
        gamma = rng.uniform(0.8, 1.2, hidden).astype(np.float32)
        gamma[outlier_ch] = rng.uniform(8.0, 20.0, len(outlier_ch)) * rng.choice([-1.0, 1.0], len(outlier_ch))
        beta = (rng.standard_normal(hidden) * 0.05).astype(np.float32)
        beta[outlier_ch] += rng.uniform(-2.0, 2.0, len(outlier_ch)).astype(np.float32)
        return node("LayerNormalization", [x, const(f"{prefix}.gamma", gamma), const(f"{prefix}.beta", beta)],
                    f"{prefix}/LayerNorm", axis=-1, epsilon=1e-12)

    heads_shape = const("shape.heads", np.array([0, -1, heads, dh], np.int64))
    merged_shape = const("shape.merged", np.array([0, -1, hidden], np.int64))
    scale = const("attn.scale", np.array(1.0 / math.sqrt(dh), np.float32))
    sqrt2 = const("gelu.sqrt2", np.array(math.sqrt(2.0), np.float32))
    one = const("gelu.one", np.array(1.0, np.float32))
    half = const("gelu.half", np.array(0.5, np.float32))

    x = layernorm("x", "embeddings")
    for i in range(layers):
        p = f"layer{i}"
        q = node("Transpose", [node("Reshape", [linear(x, hidden, hidden, f"{p}.q"), heads_shape], f"{p}.q/Reshape")],
                 f"{p}.q/Transpose", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [linear(x, hidden, hidden, f"{p}.k"), heads_shape], f"{p}.k/Reshape")],
                 f"{p}.k/Transpose", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [linear(x, hidden, hidden, f"{p}.v"), heads_shape], f"{p}.v/Reshape")],
                 f"{p}.v/Transpose", perm=[0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [q, k], f"{p}.attn/QK"), scale], f"{p}.attn/Scale")
        probs = node("Softmax", [scores], f"{p}.attn/Softmax", axis=-1)
        ctx = node("MatMul", [probs, v], f"{p}.attn/PV")
        ctx = node("Reshape", [node("Transpose", [ctx], f"{p}.attn/Transpose", perm=[0, 2, 1, 3]), merged_shape],
                   f"{p}.attn/Reshape")
        x = layernorm(node("Add", [x, linear(ctx, hidden, hidden, f"{p}.attn.out")], f"{p}.attn/Residual"),
                      f"{p}.attn")
        h = linear(x, hidden, ffn, f"{p}.ffn.in")
        erf = node("Erf", [node("Div", [h, sqrt2], f"{p}.gelu/Div")], f"{p}.gelu/Erf")
        g = node("Mul", [node("Mul", [h, node("Add", [erf, one], f"{p}.gelu/Add")], f"{p}.gelu/Mul"), half],
                 f"{p}.gelu/Half")
        x = layernorm(node("Add", [x, linear(g, ffn, hidden, f"{p}.ffn.out")], f"{p}.ffn/Residual"), f"{p}.ffn")
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    seq_dim = seq if seq else "seq"
    graph = helper.make_graph(
        nodes, f"bert_encoder_h{hidden}_l{layers}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq_dim, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq_dim, hidden])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="graphopt-bench")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def encoder_inputs(n: int, seq: int, hidden: int, seed: int) -> np.ndarray:
    """(n, 1, seq, hidden) hidden states like a BERT embedding sum: per-token N(0, 1)
    plus a shared per-position component."""
    rng = np.random.default_rng(seed)
    pos = rng.standard_normal((seq, hidden)).astype(np.float32) * 0.5
    return np.stack([(rng.standard_normal((1, seq, hidden)) + pos).astype(np.float32) for _ in range(n)])


# ----------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------
def _graphopt(src: Path, dst: Path, args: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "opt", str(src), "-o", str(dst), "-q", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"graphopt {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return time.perf_counter() - t0


def _ort_dynamic(src: Path, dst: Path, per_channel: bool) -> float:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    return time.perf_counter() - t0


def graphopt_has_option(flag: str) -> bool:
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "opt", "--help"], capture_output=True, text=True)
    return flag in proc.stdout


def interleaved_latency(sessions: dict, feed_of, runs: int, warmup: int) -> dict[str, float]:
    """Median ms per variant; each round runs every variant once, the order rotating
    from round to round so no variant always follows the same one."""
    keys = list(sessions)
    for _ in range(warmup):
        for k in keys:
            sessions[k].run(None, feed_of(sessions[k]))
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(runs):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            feed = feed_of(sessions[k])
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def token_fidelity(ref: list[np.ndarray], out: list[np.ndarray]) -> dict[str, float]:
    cos_all, rel = [], []
    for a, b in zip(ref, out):
        a = a.reshape(-1, a.shape[-1]).astype(np.float64)
        b = b.reshape(-1, b.shape[-1]).astype(np.float64)
        cos_all.append((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30))
        rel.append(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-30)))
    cos = np.concatenate(cos_all)
    return {"token_cos_min": float(cos.min()), "token_cos_mean": float(cos.mean()),
            "token_cos_p01": float(np.quantile(cos, 0.01)), "rel_err_max": float(max(rel))}


def op_histogram(path: Path) -> dict[str, int]:
    m = onnx.load(str(path), load_external_data=False)
    out: dict[str, int] = {}
    for n in m.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--outliers", type=int, default=4, help="outlier channels per LayerNorm (0: none)")
    ap.add_argument("--seed", type=int, default=0, help="weight seed")
    ap.add_argument("--calib-n", type=int, default=16, help="calibration samples for --fidelity (seed 1)")
    ap.add_argument("--eval-n", type=int, default=16, help="held-out evaluation samples (seed 2)")
    ap.add_argument("--runs", type=int, default=40, help="timed rounds (each runs every variant once)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fidelity", default="cosine>=0.99", help="budget for graphopt's --fidelity, if it has one")
    ap.add_argument("--quick", action="store_true", help="fewer samples and rounds")
    ap.add_argument("--out-dir", help="keep the models here (default: a temporary folder)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.eval_n, args.calib_n, args.runs = 6, 8, 15

    tmp = Path(args.out_dir or tempfile.mkdtemp(prefix="bert-q-"))
    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / "encoder_fp32.onnx"
    onnx.save(build_encoder(args.hidden, args.layers, args.heads, seq=args.seq, outliers=args.outliers,
                            seed=args.seed), str(src))
    calib = encoder_inputs(args.calib_n, args.seq, args.hidden, seed=1)
    held = encoder_inputs(args.eval_n, args.seq, args.hidden, seed=2)
    calib_path = tmp / "calib.npz"
    np.savez(calib_path, x=calib)

    variants: dict[str, tuple[str, object]] = {
        "ort_dynamic": ("ort", lambda d: _ort_dynamic(src, d, per_channel=False)),
        "ort_dynamic_perchannel": ("ort", lambda d: _ort_dynamic(src, d, per_channel=True)),
        "graphopt_dynamic": ("graphopt", ["-p", "quantize-dynamic"]),
        "graphopt_dynamic_perchannel": ("graphopt", ["-p", "quantize-dynamic{per-channel=true}"]),
    }
    has_fidelity = graphopt_has_option("--fidelity")
    if has_fidelity:
        variants["graphopt_dynamic_fidelity"] = (
            "graphopt", ["-p", "quantize-dynamic", "--calib", str(calib_path), "--fidelity", args.fidelity])
    # Which ORT variant each graphopt variant is judged against (same weight granularity).
    counterpart = {"graphopt_dynamic": "ort_dynamic", "graphopt_dynamic_perchannel": "ort_dynamic_perchannel",
                   "graphopt_dynamic_fidelity": "ort_dynamic"}

    paths = {"fp32": src}
    info: dict[str, dict] = {"fp32": {}}
    problems: list[str] = []
    for name, (tool, how) in variants.items():
        dst = tmp / f"encoder_{name}.onnx"
        row: dict = {}
        try:
            if tool == "ort":
                row["build_s"] = how(dst)  # type: ignore[operator]
            else:
                row["build_s"] = _graphopt(src, dst, how)  # type: ignore[arg-type]
                again = tmp / f"encoder_{name}.again.onnx"
                _graphopt(src, again, how)  # type: ignore[arg-type]
                row["deterministic"] = dst.read_bytes() == again.read_bytes()
                again.unlink()
                if not row["deterministic"]:
                    problems.append(f"{name}: two runs of graphopt gave different files")
            onnx.checker.check_model(str(dst))
            row["checker"] = True
        except Exception as exc:  # report and go on with the other variants
            problems.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
            row["error"] = str(exc)[:300]
            info[name] = row
            continue
        paths[name] = dst
        info[name] = row

    sessions = {k: session(p, args.threads) for k, p in paths.items()}
    outputs = {k: [s.run(None, {"x": held[i]})[0] for i in range(len(held))] for k, s in sessions.items()}
    lat = interleaved_latency(sessions, lambda s: {"x": held[0]}, args.runs, args.warmup)

    results: dict[str, dict] = {}
    for k, p in paths.items():
        row = {"size_mb": p.stat().st_size / 2**20, "latency_ms": lat[k]}
        row.update(info.get(k, {}))
        if k != "fp32":
            row["size_ratio"] = row["size_mb"] / (src.stat().st_size / 2**20)
            row["latency_vs_fp32"] = lat[k] / lat["fp32"]
            row.update(token_fidelity(outputs["fp32"], outputs[k]))
            ops = op_histogram(p)
            row["quant_nodes"] = {o: c for o, c in ops.items()
                                  if o in ("DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear",
                                           "MatMulIntegerToFloat", "QuantizeLinear", "DequantizeLinear")}
            row["float_matmuls"] = ops.get("MatMul", 0)
        results[k] = row
    for k, ref in counterpart.items():
        if k in results and ref in results:
            results[k]["latency_vs_ort"] = results[k]["latency_ms"] / results[ref]["latency_ms"]
            results[k]["vs"] = ref
            if results[k]["token_cos_min"] < results[ref]["token_cos_min"]:
                problems.append(f"fidelity: {k} worst token cosine {results[k]['token_cos_min']:.4f} < "
                                f"{ref} {results[ref]['token_cos_min']:.4f}")
            if results[k]["latency_vs_ort"] > LATENCY_SLACK:
                problems.append(f"latency: {k} {results[k]['latency_ms']:.1f} ms is "
                                f"{results[k]['latency_vs_ort']:.2f}x {ref}")

    import onnxruntime

    print(f"BERT-shaped encoder: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, seq {args.seq}, "
          f"{args.outliers} outlier channels; onnxruntime {onnxruntime.__version__}, {args.threads} threads, "
          f"{args.runs} interleaved rounds after {args.warmup} warm-up; eval {args.eval_n} x {args.seq} tokens"
          f"{'' if has_fidelity else '; graphopt has no --fidelity option yet'}")
    print("| variant | size MB | size ratio | ms | vs fp32 | vs ORT | worst token cos | p1 token cos | mean token cos | rel.err | checker | deterministic |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, r in results.items():
        def f(key, fmt):
            return format(r[key], fmt) if key in r else "-"
        print(f"| {k} | {f('size_mb', '.2f')} | {f('size_ratio', '.3f')} | {f('latency_ms', '.1f')} | "
              f"{f('latency_vs_fp32', '.2f')} | {f('latency_vs_ort', '.2f')} | {f('token_cos_min', '.4f')} | "
              f"{f('token_cos_p01', '.4f')} | {f('token_cos_mean', '.5f')} | {f('rel_err_max', '.3f')} | "
              f"{'ok' if r.get('checker') else '-'} | {r.get('deterministic', '-')} |")
    for k, r in results.items():
        if "error" in r:
            print(f"{k}: ERROR {r['error']}")
    print("Goals: " + ("met" if not problems else "MISSED:\n  " + "\n  ".join(problems)))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "has_fidelity_option": has_fidelity,
                                               "results": results, "problems": problems}, indent=2, default=str))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
