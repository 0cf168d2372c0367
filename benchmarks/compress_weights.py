"""Weight compression without retraining: size and fidelity of sparsify,
share-weights and binarize on a few CNNs and PP-OCRv4 rec, in one run.

Models: light CNNs from onnx's backend test data with seeded random weights
(``quantize_vs_ort.randomize_light``: the shipped weights are one constant
fill, which no weight compression can say anything about) and PP-OCRv4 rec
from the rapidocr-onnxruntime wheel (real weights).  Every model is first
run through ``simplify`` (BatchNorm folded into the convolutions, as it would
be deployed); that is the baseline every variant is compared with:

* ``sparsify{ratio=0.3}``, ``{ratio=0.5}``: unstructured magnitude pruning,
  the ratio in every layer; ``{ratio=0.5,scope=global}``: one threshold over
  all layers (magnitudes divided by each layer's RMS);
* ``sparsify{n=2,m=4}``: 2:4 along the input channels;
* ``share-weights{bits=4,granularity=tensor}``: k-means, one 16-entry codebook
  per tensor; ``{bits=4}`` / ``{bits=3}``: a codebook per output channel
  (the default); indices packed two per byte, decoded by Gather
  (``mode=gather``);
* ``binarize``: sign * per-channel mean |W|, first and last layers protected;
* ``prune-blocks{count=1}``, ``{count=2}``: the residual blocks whose removal
  moves the outputs least, ranked on 4 samples that evaluation does not use
  (CNNs: N(0, 1), seeds 100-103; rec: ``ocr_eval`` calibration lines, seed 1).

Figures: model file size and its gzip size (level 6) against the baseline's;
worst-case and mean row cosine (``graphopt.fidelity``) of the outputs to the
baseline's on sample inputs (CNNs: 4 seeded N(0, 1) inputs; rec: 4 rendered
text lines, seed 7, neither evaluation nor calibration data); for rec the OCR
task metrics (exact match, character accuracy) on ``ocr_eval``'s evaluation
lines.  Every compressed model passes onnx.checker and runs in onnxruntime.

    python benchmarks/compress_weights.py [--models resnet50,squeezenet,ppocr_rec] [--ocr-n 200] [--json OUT]
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models as bench_models  # noqa: E402
import ocr_eval  # noqa: E402
from quantize_vs_ort import randomize_light  # noqa: E402

import graphopt  # noqa: E402
from graphopt import runtime  # noqa: E402
from graphopt.context import PassContext  # noqa: E402
from graphopt.fidelity import compare_outputs  # noqa: E402
from graphopt.ir import Model  # noqa: E402

DEFAULT_MODELS = "resnet50,squeezenet,inception_v1,ppocr_rec"
VARIANTS = {
    "sparse 30%": "sparsify{ratio=0.3}",
    "sparse 50%": "sparsify{ratio=0.5}",
    "sparse 50% global": "sparsify{ratio=0.5,scope=global}",
    "sparse 2:4": "sparsify{n=2,m=4}",
    "shared 4-bit/tensor": "share-weights{bits=4,granularity=tensor}",
    "shared 4-bit/channel": "share-weights{bits=4}",
    "shared 3-bit/channel": "share-weights{bits=3}",
    "binary": "binarize",
    "blocks -1": "prune-blocks{count=1}",
    "blocks -2": "prune-blocks{count=2}",
}
RANK_SEED = 100  # prune-blocks ranks on samples from here, evaluation uses SAMPLE_SEED
SAMPLE_SEED = 7


def baseline(name: str, path: Path) -> tuple[onnx.ModelProto, dict]:
    proto = randomize_light(path) if name in bench_models.light_models() else onnx.load(str(path))
    shapes = bench_models.PINNED_SHAPES.get(name)
    model = Model.from_proto(proto)
    graphopt.optimize(model, "simplify", context=PassContext(input_shapes=shapes))
    return model.to_proto(), shapes or {}


def samples(name: str, path: Path, proto: onnx.ModelProto, n: int = 4, seed: int = SAMPLE_SEED
            ) -> list[dict[str, np.ndarray]]:
    if name == "ppocr_rec":
        rec_seed = ocr_eval.CALIB_SEED if seed == RANK_SEED else seed
        x = ocr_eval.calibration_inputs("rec", n, seed=rec_seed, input_name=proto.graph.input[0].name)
        key = next(iter(x))
        return [{key: x[key][i:i + 1]} for i in range(n)]
    return [bench_models.sample_inputs(name, path, seed=seed + i) for i in range(n)]


def measure(proto_path: Path, feeds, reference) -> dict:
    sess = runtime.session(onnx.load(str(proto_path)))
    outs = [runtime.run(sess, f) for f in feeds]
    values = compare_outputs(outs, reference) if reference is not None else {"cosine": 1.0, "mean-cosine": 1.0}
    data = proto_path.read_bytes()
    return {"bytes": len(data), "gzip": len(gzip.compress(data, 6)), "cosine": values["cosine"],
            "mean_cosine": values["mean-cosine"], "outputs": outs}


def run_model(name: str, path: Path, ocr_n: int, workdir: Path) -> list[dict]:
    base, shapes = baseline(name, path)
    feeds = samples(name, path, base)
    base_path = workdir / f"{name}.onnx"
    onnx.save(base, str(base_path))
    ref = measure(base_path, feeds, None)
    rows = [{"model": name, "variant": "baseline (simplify)", "pipeline": "simplify", **_public(ref), "seconds": 0.0}]
    rec_data = ocr_eval.make_rec_dataset(ocr_n) if name == "ppocr_rec" and ocr_n else None
    if rec_data:
        rows[0].update(_rec(base_path, rec_data))
    ranking = samples(name, path, base, seed=RANK_SEED)
    for label, pipe in VARIANTS.items():
        model = Model.from_proto(onnx.ModelProto.FromString(base.SerializeToString()))
        t0 = time.perf_counter()
        result = graphopt.optimize(model, pipe, context=PassContext(input_shapes=shapes, calibration=ranking))
        seconds = time.perf_counter() - t0
        out = workdir / f"{name}.{label.replace(' ', '_').replace('/', '_').replace(':', '')}.onnx"
        graphopt.save(model, out)
        onnx.checker.check_model(str(out))
        m = measure(out, feeds, ref["outputs"])
        stats = result.records[0].stats
        row = {"model": name, "variant": label, "pipeline": pipe, **_public(m), "seconds": round(seconds, 2),
               "changed": result.records[0].changed,
               "tensors": stats.get("tensors"), "sparsity": stats.get("sparsity"),
               "weight_error": stats.get("weight_error_mean"),
               "removed_blocks": [r["block"] for r in stats.get("removed", [])] or None,
               "removed_params": stats.get("removed_params")}
        if rec_data:
            row.update(_rec(out, rec_data))
        rows.append(row)
        print(_line(row, rows[0]), flush=True)
    return rows


def _rec(path: Path, data) -> dict:
    res = ocr_eval.evaluate_rec(str(path), data)
    return {"exact_match": round(res["exact_match"], 4), "char_accuracy": round(res["char_accuracy"], 4)}


def _public(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "outputs"}


def _line(row: dict, base: dict) -> str:
    text = (f"{row['model']:14s} {row['variant']:22s} {row['bytes'] / 1e6:8.2f} MB ({row['bytes'] / base['bytes']:5.3f})"
            f"  gzip {row['gzip'] / 1e6:7.2f} MB ({row['gzip'] / base['gzip']:5.3f})"
            f"  cos min {row['cosine']:.4f} mean {row['mean_cosine']:.4f}  {row['seconds']:.1f}s")
    if "exact_match" in row:
        text += f"  ocr exact {row['exact_match']:.3f} char {row['char_accuracy']:.3f}"
    return text


def markdown(rows: list[dict]) -> str:
    has_ocr = any("exact_match" in r for r in rows)
    head = "| model | variant | file MB | x base | gzip MB | x base | cosine (worst) | cosine (mean) |"
    sep = "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    if has_ocr:
        head += " OCR exact / char |"
        sep += " ---: |"
    lines = [head, sep]
    base = {}
    for r in rows:
        if r["variant"].startswith("baseline"):
            base = r
        variant = r["variant"] + ("" if r.get("changed", True) else " (nothing to do)")
        line = (f"| {r['model']} | {variant} | {r['bytes'] / 1e6:.2f} | {r['bytes'] / base['bytes']:.3f} | "
                f"{r['gzip'] / 1e6:.2f} | {r['gzip'] / base['gzip']:.3f} | {r['cosine']:.4f} | {r['mean_cosine']:.4f} |")
        if has_ocr:
            line += (f" {r['exact_match']:.3f} / {r['char_accuracy']:.3f} |" if "exact_match" in r else " |")
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS})")
    ap.add_argument("--ocr-n", type=int, default=200, help="rec evaluation lines (0: skip the OCR metric)")
    ap.add_argument("--json", help="write every row here")
    args = ap.parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in bench_models.select(args.models).items():
            rows += run_model(name, path, args.ocr_n, Path(tmp))
    print()
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
