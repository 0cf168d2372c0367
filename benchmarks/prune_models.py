"""prune-channels on the benchmark models: what it removes, what it leaves alone
and why, and what that buys in MACs, parameters and onnxruntime latency.

Models: the nine light CNNs from onnx's backend test data with seeded random
weights (``quantize_vs_ort.randomize_light``: as shipped every weight is a
``ConstantOfShape`` fill, so every channel would score the same), and the
PP-OCRv4 det/rec and PP-OCR mobile cls models from the rapidocr-onnxruntime
wheel.  Every model first goes through ``fold-constants`` (the baseline is that
folded model), then ``prune-channels{RATIO}`` (default ``ratio=0.3``, l1, layer
scope, no calibration).

Per model: onnx.checker passes; onnxruntime runs the pruned model on the
original input shapes (PP-OCR: the pinned OCR sizes of ``models.py``) and the
output shapes are unchanged; MACs and parameters before/after
(``graphopt.summary``); latency ratio pruned / baseline, one onnxruntime thread,
the two models alternating in each round after a warm-up, medians; the
groups left alone, by reason.  Goal: MACs fall by >= 40% on the plain CNNs
(alexnet, vgg19, zfnet512, squeezenet, resnet50, inception_v1, inception_v2,
densenet121); the table names the groups left alone where they do not.

    python benchmarks/prune_models.py [--models a,b] [--pipeline "prune-channels{ratio=0.3}"] [--rounds 15]

``--ocr-accuracy``: PP-OCRv4 rec exact-match and character accuracy on
``ocr_eval``'s rendered lines at ratios 0.1-0.5, without data and with
least-squares reconstruction on calibration lines of another seed.

    python benchmarks/prune_models.py --ocr-accuracy [--ratios 0.1,0.3] [--criteria l1,activation]

``--allocate uniform,sensitivity`` adds rows with per-group ratios chosen from
each group's measured output error (``prune-channels{allocate=sensitivity}``;
with calibration data only); ``--recovery reconstruct`` skips the no-data rows;
``--ridge``, ``--refit``, ``--round-to``, ``--sensitivity-ratios`` and
``--sensitivity-samples`` pass through to the pass.
``--ocr-model det``: PP-OCRv4 det instead, box F1 on ``--eval-lines`` rendered
pages and box agreement with the unpruned model (reconstruction only).
``--latency-rounds N`` adds a latency column: every model of the run against
the baseline, one onnxruntime thread, interleaved.  ``--keep DIR`` keeps the
models; ``--time-kept DIR [--rounds N]`` times them again later, on a quiet
machine, without pruning again.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import statistics
import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models as bench_models  # noqa: E402

import graphopt  # noqa: E402
from graphopt import runtime  # noqa: E402
from graphopt.context import PassContext  # noqa: E402
from graphopt.ir import Model  # noqa: E402
from graphopt.summary import summarize  # noqa: E402

PLAIN_CNNS = ("bvlc_alexnet", "vgg19", "zfnet512", "squeezenet", "resnet50", "inception_v1", "inception_v2",
              "densenet121")
MACS_GOAL = 0.40


def baseline(name: str, path: Path) -> onnx.ModelProto:
    if name in bench_models.light_models():
        from quantize_vs_ort import randomize_light

        proto = randomize_light(path)
    else:
        proto = onnx.load(str(path))
    model = Model.from_proto(proto, source_dir=path.parent)
    graphopt.optimize(model, "fold-constants", context=PassContext(quiet=True))
    return model.to_proto()


def _reason_kind(reason: str) -> str:
    """A reason without node and tensor names, for counting."""
    return re.sub(r"'[^']*'", "X", reason)


def latency(protos: list, feeds: dict, rounds: int) -> list[float]:
    """Median seconds per model: one onnxruntime thread each, every model once per
    round in an order rotated each round, after a warm-up run of each."""
    sessions = [runtime.session(p, threads=1) for p in protos]
    for sess in sessions:
        runtime.run(sess, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for i in range(rounds):
        for k in range(len(sessions)):
            j = (i + k) % len(sessions)
            t = time.perf_counter()
            runtime.run(sessions[j], feeds)
            times[j].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def measure(name: str, path: Path, pipeline: str, rounds: int) -> dict:
    base = baseline(name, path)
    shapes = bench_models.input_shapes(name, path)
    model = Model.from_proto(onnx.ModelProto.FromString(base.SerializeToString()), source_dir=path.parent)
    t = time.perf_counter()
    result = graphopt.optimize(model, pipeline, context=PassContext(quiet=True, input_shapes=shapes))
    seconds = time.perf_counter() - t
    pruned = model.to_proto()
    onnx.checker.check_model(pruned)
    record = next(r for r in result.records if r.name == "prune-channels")
    s0 = summarize(Model.from_proto(base), shapes)
    s1 = summarize(Model.from_proto(pruned), shapes)
    feeds = bench_models.sample_inputs(name, path)
    want = runtime.run(runtime.session(base), feeds)
    got = runtime.run(runtime.session(pruned), feeds)
    same_shapes = all(got[k].shape == want[k].shape for k in want) and list(got) == list(want)
    cos = min(runtime.cosine_similarity(got[k], want[k]) for k in want)
    t0, t1 = latency([base, pruned], feeds, rounds)
    alone = collections.Counter(_reason_kind(n.split(" left alone: ", 1)[1]) for n in record.notes
                                if " left alone: " in n)
    stats = record.stats
    return {
        "model": name, "checker": True, "same_shapes": same_shapes,
        "groups": stats["groups"], "prunable": stats["groups_prunable"], "pruned": stats.get("groups_pruned", 0),
        "channels_before": stats["channels_before"], "channels_after": stats["channels_after"],
        "macs_before": s0["macs"], "macs_after": s1["macs"], "params_before": s0["params"],
        "params_after": s1["params"], "latency_ms": [t0 * 1e3, t1 * 1e3], "latency_ratio": t1 / t0,
        "cosine": cos, "seconds": seconds, "left_alone": dict(alone.most_common()),
    }


def _pct(before: int, after: int) -> str:
    return f"-{100 * (1 - after / before):.1f}%" if before else "n/a"


def print_table(rows: list[dict]) -> None:
    print("| model | groups (prunable / pruned) | channels | MACs | params | latency (ms) | ratio | output cos | ok |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['groups']} ({r['prunable']} / {r['pruned']}) | "
              f"{r['channels_before']} -> {r['channels_after']} | "
              f"{r['macs_before'] / 1e6:.0f}M -> {r['macs_after'] / 1e6:.0f}M ({_pct(r['macs_before'], r['macs_after'])}) | "
              f"{r['params_before'] / 1e6:.2f}M -> {r['params_after'] / 1e6:.2f}M "
              f"({_pct(r['params_before'], r['params_after'])}) | "
              f"{r['latency_ms'][0]:.1f} -> {r['latency_ms'][1]:.1f} | {r['latency_ratio']:.2f} | {r['cosine']:.3f} | "
              f"{'yes' if r['checker'] and r['same_shapes'] else 'NO'} |")
    print()
    print("Groups left alone, by reason (node names replaced by X):")
    print()
    for r in rows:
        if r["left_alone"]:
            text = "; ".join(f"{n}x {k}" for k, n in r["left_alone"].items())
            print(f"* {r['model']}: {text}")


def ocr_accuracy(ratios: list[float], n_eval: int, n_calib: int, criteria: list[str],
                 allocations: tuple[str, ...] = ("uniform",), recoveries: tuple[str, ...] = ("no data", "reconstruct"),
                 extra: str = "", keep: Path | None = None, rounds: int = 0) -> list[dict]:
    """PP-OCRv4 rec task metrics (``ocr_eval``: rendered lines of the evaluation
    seed) after ``prune-channels`` at each ratio, without data (l1, bias folding
    of constant channels only) and with ``n_calib`` calibration lines of another
    seed (least-squares reconstruction)."""
    import ocr_eval

    data = ocr_eval.make_rec_dataset(n_eval)
    with _ocr_workdir("rec", n_calib, keep) as (tmp, base, base_path, calib_path, shapes):
        ref = ocr_eval.evaluate_rec(base_path, data)
        rows = [{"ratio": 0.0, "variant": "original", "exact_match": ref["exact_match"],
                 "char_accuracy": ref["char_accuracy"], "macs": summarize(Model.from_proto(base), shapes)["macs"],
                 "path": str(base_path)}]
        runs = [(r, c, v, a) for r in ratios for c in criteria for v in recoveries for a in allocations
                if v == "reconstruct" or (c != "activation" and a == "uniform")]
        for ratio, criterion, variant, alloc in runs:
            options = f"ratio={ratio},criterion={criterion},calib-samples={n_calib},allocate={alloc}{extra}"
            model, stats, seconds, out = _prune(base, calib_path if variant == "reconstruct" else None, options,
                                                tmp / f"pruned_{ratio}_{criterion}_{variant[0]}_{alloc}.onnx")
            res = ocr_eval.evaluate_rec(out, data)
            rows.append({"ratio": ratio, "variant": variant, "criterion": criterion, "allocation": alloc,
                         "exact_match": res["exact_match"], "char_accuracy": res["char_accuracy"],
                         "channels": [stats["channels_before"], stats["channels_after"]],
                         "per_group": stats.get("allocation"), "macs": summarize(model, shapes)["macs"],
                         "seconds": seconds, "path": str(out)})
            print(f"  rec ratio {ratio} {criterion} {variant} {alloc}: {res['exact_match']:.3f} "
                  f"({seconds:.0f}s)", file=sys.stderr, flush=True)
        _add_latency(rows, "ppocr_rec", rounds)
    return rows


@contextlib.contextmanager
def _ocr_workdir(kind: str, n_calib: int, keep: Path | None):
    """The folded baseline of PP-OCRv4 ``kind`` saved in a work folder (``keep``,
    or a temporary one), with ``n_calib`` calibration samples of another seed."""
    import tempfile

    import ocr_eval

    name = f"ppocr_{kind}"
    with contextlib.ExitStack() as stack:
        if keep is None:
            keep = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"graphopt-prune-{kind}-")))
        keep.mkdir(parents=True, exist_ok=True)
        base = baseline(name, bench_models.ppocr_models()[name])
        base_path = keep / "base.onnx"
        onnx.save(base, base_path)
        calib_path = ocr_eval.save_calibration(kind, keep / "calib.npz", n=n_calib, model=base_path)
        yield keep, base, base_path, calib_path, bench_models.PINNED_SHAPES[name]


def _add_latency(rows: list[dict], name: str, rounds: int) -> None:
    """Each row's model timed against the baseline (row 0) in one interleaved run."""
    if rounds <= 0:
        return
    path = bench_models.ppocr_models()[name]
    secs = latency([onnx.load(r["path"]) for r in rows], bench_models.sample_inputs(name, path), rounds)
    for r, t in zip(rows, secs):
        r["latency_ms"] = t * 1e3
        r["latency_ratio"] = t / secs[0]


def time_kept(folder: Path, name: str, rounds: int) -> None:
    """Time every model kept in ``folder`` (``--keep``) against its base.onnx."""
    rows = [{"path": str(folder / "base.onnx")}]
    rows += [{"path": str(p)} for p in sorted(folder.glob("pruned_*.onnx"))]
    _add_latency(rows, name, rounds)
    print("| model | onnxruntime ms (1 thread) | x baseline |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {Path(r['path']).stem} | {r['latency_ms']:.2f} | {r['latency_ratio']:.2f} |")


def _prune(base: onnx.ModelProto, calib_path: Path | None, options: str, out: Path):
    """``prune-channels{options}`` on a copy of ``base`` (with the calibration
    file when given), saved to ``out``: (model, pass stats, seconds, out)."""
    from graphopt.calibration import open_reader

    model = Model.from_proto(onnx.ModelProto.FromString(base.SerializeToString()))
    ctx = PassContext(quiet=True)
    if calib_path is not None:
        ctx.calibration = open_reader(str(calib_path), model, quiet=True)
    t = time.perf_counter()
    result = graphopt.optimize(model, f"prune-channels{{{options}}}", context=ctx)
    seconds = time.perf_counter() - t
    onnx.save(model.to_proto(), out)
    return model, result.records[-1].stats, seconds, out


def det_accuracy(ratios: list[float], n_eval: int, n_calib: int, criteria: list[str],
                 allocations: tuple[str, ...] = ("uniform",), extra: str = "",
                 keep: Path | None = None, rounds: int = 0) -> list[dict]:
    """PP-OCRv4 det task metrics (``ocr_eval``: F1 of the boxes against the
    rendered pages' line boxes, and box agreement with the unpruned model)
    after ``prune-channels`` with reconstruction on ``n_calib`` calibration
    pages of another seed."""
    import ocr_eval

    data = ocr_eval.make_det_dataset(n_eval)
    with _ocr_workdir("det", n_calib, keep) as (tmp, base, base_path, calib_path, shapes):
        ref = ocr_eval.evaluate_det(base_path, data)
        rows = [{"ratio": 0.0, "variant": "original", "f1": ref["f1"], "agreement_f1": 1.0,
                 "macs": summarize(Model.from_proto(base), shapes)["macs"], "path": str(base_path)}]
        for ratio in ratios:
            for criterion in criteria:
                for alloc in allocations:
                    options = f"ratio={ratio},criterion={criterion},calib-samples={n_calib},allocate={alloc}{extra}"
                    model, stats, seconds, out = _prune(base, calib_path, options,
                                                        tmp / f"pruned_{ratio}_{criterion}_{alloc}.onnx")
                    res = ocr_eval.evaluate_det(out, data)
                    agree = ocr_eval.det_agreement(ref["predictions"], res["predictions"])
                    rows.append({"ratio": ratio, "variant": "reconstruct", "criterion": criterion, "allocation": alloc,
                                 "f1": res["f1"], "agreement_f1": agree["agreement_f1"],
                                 "channels": [stats["channels_before"], stats["channels_after"]],
                                 "per_group": stats.get("allocation"),
                                 "macs": summarize(model, shapes)["macs"], "seconds": seconds, "path": str(out)})
                    print(f"  det ratio {ratio} {criterion} {alloc}: F1 {res['f1']:.3f} ({seconds:.0f}s)",
                          file=sys.stderr, flush=True)
        _add_latency(rows, "ppocr_det", rounds)
    return rows


def _row_head(r: dict, macs0: float, recovery: bool = False) -> str:
    """ratio | allocation | criterion [| recovery] | channels removed | MACs"""
    ch = "-"
    if "channels" in r:
        before, after = r["channels"]
        ch = f"{before - after} / {before} ({(before - after) / before:.3f})"
    cells = [f"{r['ratio']:g}", r.get("allocation", "-"), r.get("criterion", "-")]
    if recovery:
        cells.append(r["variant"])
    cells += [ch, f"{r['macs'] / 1e6:.0f}M ({_pct(macs0, r['macs'])})"]
    return "| " + " | ".join(cells)


def _latency_cell(r: dict) -> str:
    return f"{r['latency_ratio']:.2f}x ({r['latency_ms']:.1f} ms)" if "latency_ratio" in r else "-"


def print_det(rows: list[dict]) -> None:
    print("| ratio | allocation | criterion | channels removed (of prunable) | MACs | latency | F1 "
          "| box agreement F1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"{_row_head(r, rows[0]['macs'])} | {_latency_cell(r)} | {r['f1']:.3f} | {r['agreement_f1']:.3f} |")


def print_ocr(rows: list[dict]) -> None:
    print("| ratio | allocation | criterion | recovery | channels removed (of prunable) | MACs | latency "
          "| exact match | char accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"{_row_head(r, rows[0]['macs'], recovery=True)} | {_latency_cell(r)} | {r['exact_match']:.3f} "
              f"| {r['char_accuracy']:.4f} |")
    for r in rows:
        if r.get("per_group"):
            text = ", ".join(f"{k.split()[0]} {v:g}" for k, v in r["per_group"].items())
            print(f"\nratio {r['ratio']:g}, {r['criterion']}, sensitivity: per-group ratios {text}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated subset of models")
    ap.add_argument("--pipeline", default="prune-channels{ratio=0.3}")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--ocr-accuracy", action="store_true",
                    help="instead: PP-OCRv4 rec task metrics at several ratios, with and without reconstruction")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--criteria", default="l1")
    ap.add_argument("--eval-lines", type=int, default=200)
    ap.add_argument("--calib-lines", type=int, default=64)
    ap.add_argument("--allocate", default="uniform", help="--ocr-accuracy: uniform,sensitivity (comma-separated)")
    ap.add_argument("--recovery", default="no data,reconstruct",
                    help="--ocr-accuracy: 'no data', 'reconstruct' or both (comma-separated)")
    ap.add_argument("--ridge", type=float, help="--ocr-accuracy: the pass's ridge option")
    ap.add_argument("--refit", choices=("consumers", "downstream"), help="--ocr-accuracy: the pass's refit option")
    ap.add_argument("--sensitivity-ratios", help="--ocr-accuracy: the pass's sensitivity-ratios, e.g. 0.25;0.5")
    ap.add_argument("--round-to", type=int, help="--ocr-accuracy: the pass's round-to (16 keeps onnxruntime's "
                    "blocked AVX-512 convolutions)")
    ap.add_argument("--sensitivity-samples", type=int, help="--ocr-accuracy: the pass's sensitivity-samples")
    ap.add_argument("--ocr-model", choices=("rec", "det"), default="rec",
                    help="--ocr-accuracy: det reports box F1 and agreement on --eval-lines pages instead")
    ap.add_argument("--keep", type=Path, help="--ocr-accuracy: keep the baseline and pruned models in this folder")
    ap.add_argument("--latency-rounds", type=int, default=0,
                    help="--ocr-accuracy: time every model against the baseline, interleaved, this many rounds")
    ap.add_argument("--time-kept", type=Path, metavar="DIR",
                    help="only time the models a --keep run left in DIR against its base.onnx (--rounds rounds)")
    args = ap.parse_args(argv)
    if args.time_kept:
        time_kept(args.time_kept, f"ppocr_{args.ocr_model}", args.rounds)
        return 0
    if args.ocr_accuracy:
        passthrough = {"ridge": args.ridge, "refit": args.refit, "round-to": args.round_to,
                       "sensitivity-samples": args.sensitivity_samples}
        extra = "".join(f",{k}={v}" for k, v in passthrough.items() if v is not None)
        if args.sensitivity_ratios:
            extra += f',sensitivity-ratios="{args.sensitivity_ratios}"'
        ratios = [float(r) for r in args.ratios.split(",")]
        if args.ocr_model == "det":
            rows = det_accuracy(ratios, args.eval_lines, args.calib_lines, args.criteria.split(","),
                                tuple(args.allocate.split(",")), extra, args.keep, args.latency_rounds)
            print_det(rows)
        else:
            rows = ocr_accuracy(ratios, args.eval_lines, args.calib_lines, args.criteria.split(","),
                                tuple(args.allocate.split(",")), tuple(v.strip() for v in args.recovery.split(",")),
                                extra, args.keep, args.latency_rounds)
            print_ocr(rows)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    rows = []
    for name, path in bench_models.select(args.models).items():
        rows.append(measure(name, path, args.pipeline, args.rounds))
        print(f"  {name}: done ({rows[-1]['seconds']:.1f}s)", file=sys.stderr, flush=True)
    print_table(rows)
    missed = [r["model"] for r in rows if r["model"] in PLAIN_CNNS
              and 1 - r["macs_after"] / max(r["macs_before"], 1) < MACS_GOAL]
    broken = [r["model"] for r in rows if not (r["checker"] and r["same_shapes"])]
    print(f"\nMACs -{MACS_GOAL:.0%} goal missed on: {', '.join(missed) or 'none'}; broken: {', '.join(broken) or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
