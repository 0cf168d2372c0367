"""Dynamic int8 quantization of a real pretrained sentence encoder under a fidelity budget.

The model is sentence-transformers' all-MiniLM-L6-v2 (``models.minilm_onnx``:
6 post-LN BERT layers, hidden 384, exported with torch; output the L2-normalised
mean-pooled sentence embedding).  Data: English sentences from
``models.sentences()``, tokenized and padded to 128 tokens; the first
``--calib`` sentences are the calibration set graphopt gets (``--calib`` npz),
the next ``--eval`` sentences, disjoint from them, are the evaluation set
nobody calibrates on.

Variants, all from the same fp32 file:

* ``ort_dynamic``: onnxruntime ``quantize_dynamic`` with its defaults (QInt8,
  per-tensor weights); ``ort_dynamic_pc``: the same with ``per_channel=True``;
* ``graphopt_dynamic``: ``graphopt opt -p quantize-dynamic`` (no data);
* ``graphopt_budget``: ``graphopt opt -p quantize-dynamic --calib DATA
  --fidelity "cosine>=0.99"``, the command a user runs.

Fidelity: the cosine similarity of each evaluation sentence's embedding to
fp32's; reported worst case (the minimum over all sentences), 1st percentile
and mean.  Latency: onnxruntime CPU, fixed threads, batch 1 x 128 tokens, every
variant once per round with the order rotating, warm-up first, medians; ratios
to fp32 and to ``ort_dynamic`` come from the same rounds.  Every output passes
onnx.checker and graphopt's budget variant is built twice and compared byte
for byte.

    python benchmarks/encoder_quant.py [--calib 64] [--eval 256] [--runs 40] [--threads 2] [--json OUT]

Goals (exit 1 if missed): graphopt_budget's worst-case cosine >= 0.99 and its
latency within 10% of ort_dynamic's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bert_encoder import _graphopt, _ort_dynamic, interleaved_latency, op_histogram  # noqa: E402
from models import minilm_onnx, sentences, tokenize  # noqa: E402
from quantize_vs_ort import session  # noqa: E402

SEQ = 128
TARGET = 0.99
LATENCY_SLACK = 1.10


def embeddings(sess, data: dict[str, np.ndarray], batch: int = 16) -> np.ndarray:
    n = len(data["input_ids"])
    return np.concatenate([sess.run(None, {k: v[i:i + batch] for k, v in data.items()})[0]
                           for i in range(0, n, batch)])


def cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1) + 1e-30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64, help="calibration sentences given to graphopt")
    ap.add_argument("--eval", type=int, default=256, help="held-out evaluation sentences")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fidelity", default=f"cosine>={TARGET}")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    src = minilm_onnx()
    text = sentences()
    calib = tokenize(text[:args.calib], SEQ)
    evals = tokenize(text[args.calib:args.calib + args.eval], SEQ)
    tmp = Path(tempfile.mkdtemp(prefix="graphopt-encoder-"))
    calib_path = tmp / "calib.npz"
    np.savez(calib_path, **calib)

    paths = {"fp32": src}
    build_s: dict[str, float] = {}
    recipes = {
        "ort_dynamic": lambda d: _ort_dynamic(src, d, per_channel=False),
        "ort_dynamic_pc": lambda d: _ort_dynamic(src, d, per_channel=True),
        "graphopt_dynamic": lambda d: _graphopt(src, d, ["-p", "quantize-dynamic"]),
        "graphopt_budget": lambda d: _graphopt(src, d, ["-p", "quantize-dynamic", "--calib", str(calib_path),
                                                        "--fidelity", args.fidelity,
                                                        "--report", str(tmp / "budget.json")]),
    }
    for name, make in recipes.items():
        paths[name] = tmp / f"{name}.onnx"
        build_s[name] = make(paths[name])
        onnx.checker.check_model(str(paths[name]))
        print(f"built {name} in {build_s[name]:.1f} s", file=sys.stderr)
    again = tmp / "graphopt_budget.again.onnx"
    _graphopt(src, again, ["-p", "quantize-dynamic", "--calib", str(calib_path), "--fidelity", args.fidelity])
    digest = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (paths["graphopt_budget"], again)}
    deterministic = len(set(digest.values())) == 1

    sessions = {name: session(p, args.threads) for name, p in paths.items()}
    ref = embeddings(sessions["fp32"], evals)
    one = {k: v[:1] for k, v in evals.items()}
    lat = interleaved_latency(sessions, lambda s: one, args.runs, args.warmup)
    report = json.loads((tmp / "budget.json").read_text())
    qstats = report["passes"][-1]["stats"]

    rows = {}
    for name, sess in sessions.items():
        cos = cosines(ref, embeddings(sess, evals))
        rows[name] = {
            "bytes": Path(paths[name]).stat().st_size,
            "ms": lat[name],
            "vs_fp32": lat[name] / lat["fp32"],
            "vs_ort": lat[name] / lat["ort_dynamic"],
            "worst": float(cos.min()), "p01": float(np.quantile(cos, 0.01)), "mean": float(cos.mean()),
            "ops": op_histogram(Path(paths[name])) if name != "fp32" else {},
        }
    size0 = rows["fp32"]["bytes"]
    print(f"\nall-MiniLM-L6-v2, {args.calib} calibration / {args.eval} evaluation sentences, batch 1 x {SEQ}, "
          f"{args.threads} threads, {args.runs} rounds")
    print("| variant | size ratio | latency vs fp32 | vs ort_dynamic | worst cosine | 1st pct | mean |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['bytes'] / size0:.3f} | {r['vs_fp32']:.2f} ({r['ms']:.1f} ms) | {r['vs_ort']:.2f} | "
              f"{r['worst']:.4f} | {r['p01']:.4f} | {r['mean']:.5f} |")
    fid = qstats.get("fidelity", {})
    print(f"\ngraphopt_budget: recipe {qstats.get('recipe', {}).get('chosen')}, kept in float "
          f"{[k['node'] for k in fid.get('kept_float', [])]}, held-out (graphopt's own split) "
          f"{fid.get('heldout')}, deterministic {deterministic}")
    b = rows["graphopt_budget"]
    misses = []
    if b["worst"] < TARGET:
        misses.append(f"worst-case cosine {b['worst']:.4f} < {TARGET}")
    if b["vs_ort"] > LATENCY_SLACK:
        misses.append(f"latency {b['vs_ort']:.2f}x ort_dynamic > {LATENCY_SLACK}")
    if not deterministic:
        misses.append("graphopt output not byte-identical across two builds")
    print("goals: " + ("met" if not misses else "MISSED: " + "; ".join(misses)))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "quantize_dynamic": qstats, "build_s": build_s,
                                         "deterministic": deterministic, "misses": misses,
                                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
