"""Dynamic int8 quantization of a recurrent model: graphopt against onnxruntime.

The model (``lstm_tagger``, built with onnx.helper, seeded weights): a token
embedding (Gather), two stacked bidirectional LSTM layers and a per-step
classifier (MatMul + Add + Softmax), the shape of a sequence tagger or a
speech/OCR decoder.  Variants, all from the same fp32 file:

* ``ort_dynamic``: onnxruntime ``quantize_dynamic`` with its defaults (QInt8;
  LSTM becomes DynamicQuantizeLSTM, MatMul DynamicQuantizeMatMul);
* ``graphopt_dynamic``: ``graphopt opt -p quantize-dynamic``;
* ``graphopt_budget``: the same with ``--calib DATA --fidelity "cosine>=0.99"``;
* ``graphopt_compress``: ``graphopt compress --calib DATA --fidelity "cosine>=0.99"``.

Fidelity: cosine of each held-out sequence's output (the per-step class
probabilities) to fp32's, worst case and mean, and per-step top-1 agreement.
Latency: onnxruntime CPU, fixed threads, every variant once per round with the
order rotating, warm-up first, medians; ratios to fp32 and to ``ort_dynamic``.

    python benchmarks/recurrent_quant.py [--seq 64] [--hidden 256] [--runs 40] [--json OUT]

Goal (exit 1 if missed): the variants that get the calibration data
(``graphopt_budget``, ``graphopt_compress``) at least as faithful as
``ort_dynamic`` (mean cosine and top-1 agreement) and every graphopt variant
within 5% of its latency.  ``graphopt_dynamic`` has no data and the same
recipe as ``ort_dynamic`` (its LSTMs are bit-identical; embedding tables get a
scale per column instead of one), so its fidelity is reported, not judged.
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
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bert_encoder import interleaved_latency, op_histogram  # noqa: E402
from quantize_vs_ort import session  # noqa: E402

LATENCY_SLACK = 1.05


def lstm_tagger(vocab: int = 4000, emb: int = 128, hidden: int = 256, classes: int = 64, seed: int = 0
                ) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {"table": (0.5 * rng.standard_normal((vocab, emb))).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed")]  # [seq, batch, emb]
    x, width = "e", emb
    for layer in range(2):
        p = f"l{layer}_"
        scale = 1.0 / np.sqrt(hidden)
        inits[p + "W"] = (scale * rng.standard_normal((2, 4 * hidden, width))).astype(np.float32)
        inits[p + "R"] = (scale * rng.standard_normal((2, 4 * hidden, hidden))).astype(np.float32)
        inits[p + "B"] = (0.1 * rng.standard_normal((2, 8 * hidden))).astype(np.float32)
        nodes += [
            helper.make_node("LSTM", [x, p + "W", p + "R", p + "B"], [p + "y"], name=p + "lstm",
                             hidden_size=hidden, direction="bidirectional"),
            # [seq, 2, batch, hidden] -> [seq, batch, 2, hidden] -> [seq, batch, 2*hidden]
            helper.make_node("Transpose", [p + "y"], [p + "t"], name=p + "transpose", perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [p + "t", "merge"], [p + "out"], name=p + "merge"),
        ]
        x, width = p + "out", 2 * hidden
    inits["merge"] = np.array([0, 0, -1], np.int64)
    # logits with a spread of a few units, so the class probabilities are peaked as a trained tagger's are
    inits["Wc"] = ((10.0 / np.sqrt(width)) * rng.standard_normal((width, classes))).astype(np.float32)
    inits["bc"] = (0.1 * rng.standard_normal(classes)).astype(np.float32)
    nodes += [helper.make_node("MatMul", [x, "Wc"], ["logits0"], name="classifier"),
              helper.make_node("Add", ["logits0", "bc"], ["logits"], name="classifier_bias"),
              helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "lstm_tagger", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["seq", 1])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["seq", 1, classes])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def sequences(n: int, seq: int, vocab: int, seed: int) -> np.ndarray:
    """Token ids with a Zipf-like frequency, as text has."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab + 1)
    p = 1.0 / ranks
    return rng.choice(vocab, size=(n, seq, 1), p=p / p.sum()).astype(np.int64)


def graphopt(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", *cmd, "-q"], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"graphopt {' '.join(cmd)}: {proc.stderr.strip()[-800:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-minutes", type=float, default=3.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="graphopt-rnn-"))
    src = tmp / "fp32.onnx"
    onnx.save(lstm_tagger(hidden=args.hidden), str(src))
    calib = tmp / "calib.npz"
    np.savez(calib, ids=sequences(args.calib, args.seq, 4000, seed=1))
    evals = sequences(args.eval, args.seq, 4000, seed=2)

    from onnxruntime.quantization import QuantType, quantize_dynamic

    paths = {"fp32": src}
    paths["ort_dynamic"] = tmp / "ort_dynamic.onnx"
    quantize_dynamic(str(src), str(paths["ort_dynamic"]), weight_type=QuantType.QInt8)
    budget = ["--calib", str(calib), "--fidelity", "cosine>=0.99"]
    builds = {
        "graphopt_dynamic": ["opt", str(src), "-p", "quantize-dynamic"],
        "graphopt_budget": ["opt", str(src), "-p", "quantize-dynamic", *budget],
        "graphopt_compress": ["compress", str(src), *budget, "--budget-minutes", str(args.budget_minutes),
                              "--threads", str(args.threads), "--report", str(tmp / "compress")],
    }
    for name, cmd in builds.items():
        paths[name] = tmp / f"{name}.onnx"
        graphopt([*cmd, "-o", str(paths[name])])
    for p in paths.values():
        onnx.checker.check_model(str(p))

    sessions = {k: session(p, args.threads) for k, p in paths.items()}
    outs = {k: np.stack([s.run(None, {"ids": evals[i]})[0] for i in range(len(evals))]) for k, s in sessions.items()}
    feed = {"ids": evals[0]}
    lat = interleaved_latency(sessions, lambda s: feed, args.runs, args.warmup)
    ref = outs["fp32"].reshape(len(evals), -1).astype(np.float64)
    rows = {}
    for k in paths:
        o = outs[k].reshape(len(evals), -1).astype(np.float64)
        cos = (ref * o).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(o, axis=1))
        top1 = float((outs[k].argmax(-1) == outs["fp32"].argmax(-1)).mean())
        rows[k] = {"bytes": paths[k].stat().st_size, "ms": lat[k], "vs_fp32": lat[k] / lat["fp32"],
                   "vs_ort": lat[k] / lat["ort_dynamic"], "worst": float(cos.min()), "mean": float(cos.mean()),
                   "top1": top1, "ops": op_histogram(paths[k])}
    print(f"\nlstm_tagger (2 bidirectional LSTM layers, hidden {args.hidden}), sequence {args.seq}, "
          f"{args.eval} held-out sequences, {args.threads} threads, {args.runs} rounds")
    print("| variant | size ratio | latency vs fp32 | vs ort_dynamic | worst cosine | mean cosine | top-1 agreement |")
    print("|---|---|---|---|---|---|---|")
    size0 = rows["fp32"]["bytes"]
    for k, r in rows.items():
        print(f"| {k} | {r['bytes'] / size0:.3f} | {r['vs_fp32']:.2f} ({r['ms']:.2f} ms) | {r['vs_ort']:.2f} | "
              f"{r['worst']:.5f} | {r['mean']:.5f} | {r['top1']:.4f} |")
    chosen = json.loads((tmp / "compress" / "report.json").read_text())["chosen"]["pipeline"]
    print(f"\ngraphopt compress chose: {chosen}")
    misses = []
    for k in ("graphopt_dynamic", "graphopt_budget", "graphopt_compress"):
        r, o = rows[k], rows["ort_dynamic"]
        if k != "graphopt_dynamic" and (r["mean"] < o["mean"] - 1e-6 or r["top1"] < o["top1"]):
            misses.append(f"{k} fidelity below ort_dynamic's")
        if r["vs_ort"] > LATENCY_SLACK:
            misses.append(f"{k} latency {r['vs_ort']:.2f}x ort_dynamic")
    print("goals: " + ("met" if not misses else "MISSED: " + "; ".join(misses)))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "compress": chosen, "misses": misses,
                                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
