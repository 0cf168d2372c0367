"""``graphopt compress``: search compression pipelines under a fidelity target.

The search is plain and auditable: every candidate is a textual pipeline run
by the pass manager on the simplified model, so the winner can be rebuilt with
``graphopt opt --config``.  The calibration data is split once (seeded) into
calibration samples, which the passes see, and held-out samples, on which
every candidate's fidelity against the simplified float model is measured and
which no pass ever sees.  The objective (onnxruntime latency, interleaved with
the float model, or file size) only ranks candidates that meet the target.

Outcomes: ``compressed`` (a candidate met the target and beat the float model
on the objective), ``not-met`` (no candidate met the target) and
``no-gain`` (some met it but none beat the float model); in the last two the
simplified float model is written and ``met`` is false in the report.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from graphopt import registry
from graphopt.calibration import CalibrationData, open_reader
from graphopt.context import PassContext
from graphopt.errors import GraphoptError, UsageError, first_line
from graphopt.fidelity import FidelitySpec, compare_outputs, parse_fidelity
from graphopt.ir import Model, load, save
from graphopt.manager import Instrument, PassManager, PassRecord
from graphopt.pipeline import parse, to_toml

BASE_PIPELINE = "simplify"
OBJECTIVES = ("latency", "size")
DEFAULT_FIDELITY = "cosine>=0.99"
DEFAULT_HOLDOUT = 0.25
# Latencies within this fraction of the fastest count as equal (timing noise);
# ties go to the smaller file, then to the earlier candidate, so reruns agree.
LATENCY_TIE = 0.03
_now = time.perf_counter  # the budget's clock (tests replace it)
GPU_TARGET_WORDS = ("cuda", "gpu", "rocm", "metal", "vulkan", "opencl", "nvidia", "tensorrt")
# Passes after which channels and MACs no longer reflect the float structure.
NUMERIC_PASSES = frozenset({"quantize-static", "quantize-dynamic", "quantize-weights", "convert-fp16",
                            "share-weights", "sparsify", "binarize"})


@dataclasses.dataclass
class CompressOptions:
    fidelity: str = DEFAULT_FIDELITY
    objective: str = "latency"
    target: str | None = None
    budget_minutes: float | None = None
    seed: int = 0
    holdout: float = DEFAULT_HOLDOUT
    input_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    calib_preprocess: str | None = None
    calib_samples: int | None = None
    candidates: list[str] | None = None  # None: generated from the model and target
    threads: int = 1
    latency_rounds: int | None = None  # None: as many as fit in ~0.6 s per model, 7..40
    quiet: bool = False

    def check(self) -> FidelitySpec:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective '{self.objective}': expected one of {', '.join(OBJECTIVES)}")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise UsageError(f"--budget-minutes must be > 0, got {self.budget_minutes:g}")
        if not 0 < self.holdout < 1:
            raise UsageError(f"--holdout must be in (0, 1), got {self.holdout:g}")
        if self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        if self.latency_rounds is not None and self.latency_rounds < 1:
            raise UsageError(f"--latency-rounds must be at least 1, got {self.latency_rounds}")
        spec = parse_fidelity(self.fidelity, "--fidelity")
        for text in self.candidates or []:
            parse(text)  # a typo fails before any work
        return spec


@dataclasses.dataclass
class Candidate:
    index: int
    pipeline: str
    status: str = "pending"  # ok, failed, unchanged, skipped
    fidelity: dict[str, float] = dataclasses.field(default_factory=dict)
    met: bool = False
    latency_ms: float | None = None
    baseline_ms: float | None = None
    ratio: float | None = None
    size_bytes: int | None = None
    seconds: float = 0.0
    error: str | None = None
    notes: list[dict[str, str]] = dataclasses.field(default_factory=list)
    records: list[PassRecord] = dataclasses.field(default_factory=list, repr=False)
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict, repr=False)
    path: Path | None = dataclasses.field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pipeline": self.pipeline,
            "status": self.status,
            "met": self.met,
            "fidelity": {k: _round(v) for k, v in self.fidelity.items()},
            "latency_ms": _round(self.latency_ms),
            "baseline_ms": _round(self.baseline_ms),
            "latency_ratio": _round(self.ratio),
            "size_bytes": self.size_bytes,
            "seconds": _round(self.seconds),
            "error": self.error,
        }


@dataclasses.dataclass
class CompressResult:
    report: dict[str, Any]
    model: Model
    chosen: Candidate | None
    interrupted: bool = False


# ----------------------------------------------------------------------------------
# Candidates
# ----------------------------------------------------------------------------------
def _has_weighted(model: Model, ops: Sequence[str]) -> bool:
    import onnx_graphsurgeon as gs

    return any(n.op in ops and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant) for n in model.graph.nodes)


def default_candidates(model: Model, spec: FidelitySpec, objective: str, target: str | None,
                       note: Callable[[str], None] = lambda m: None) -> list[str]:
    """Pipelines worth trying for this model, cheapest ideas first; passes
    that are not registered are left out (with a note)."""
    known = registry.passes()
    fid = f'fidelity="{spec}"'
    convs = _has_weighted(model, ("Conv", "ConvTranspose"))
    matmuls = _has_weighted(model, ("MatMul", "Gemm"))
    out: list[str] = []

    def add(text: str) -> None:
        missing = [p for p in _pass_names(text) if p not in known]
        if missing:
            note(f"candidate '{text}' left out: pass '{missing[0]}' is not available")
        elif text not in out:
            out.append(text)

    # Cheap candidates first (a budget may stop the search early), then those
    # with a fidelity budget, whose sensitivity search costs one model run per probe.
    if matmuls and not convs:  # transformers, MLPs: weights dominate, dynamic int8 is the usual win
        add("quantize-dynamic")
        add("quantize-dynamic{per-channel=true}")
    add("quantize-static")
    add("quantize-static{method=percentile}")
    if matmuls and convs:
        add("quantize-dynamic")
    if objective == "size" or _gpu_target(target):
        add("convert-fp16")
    if objective == "size" and matmuls:
        add("quantize-weights{bits=8}")
    if matmuls and not convs:
        add(f"quantize-dynamic{{{fid}}}")
    add(f"quantize-static{{{fid}}}")
    add(f"quantize-static{{method=percentile,{fid}}}")
    if matmuls and convs:
        add(f"quantize-dynamic{{{fid}}}")
    if convs:
        for ratio in (0.1, 0.25):
            add(f"prune-channels{{ratio={ratio}}}")
        add(f"prune-channels{{ratio=0.1}},quantize-static{{{fid}}}")
    elif matmuls:
        add("prune-neurons{ratio=0.1}")
        add(f"prune-neurons{{ratio=0.1}},quantize-dynamic{{{fid}}}")
    return out


def _gpu_target(target: str | None) -> bool:
    return bool(target) and any(w in target.lower() for w in GPU_TARGET_WORDS)


def _pass_names(text: str) -> list[str]:
    """Top-level pass names of a pipeline text, without parsing options."""
    names, depth, cur = [], 0, ""
    for ch in text:
        if ch in "{([":
            depth += 1
        elif ch in "})]":
            depth -= 1
        elif ch == "," and depth == 0:
            names.append(cur)
            cur = ""
            continue
        if depth == 0 and ch not in "})]":
            cur += ch
    names.append(cur)
    return [n.strip() for n in names if n.strip()]


# ----------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------
def _session(path: Path, threads: int):
    from graphopt.runtime import session

    return session(path.read_bytes(), source_dir=path.parent, threads=threads)


def _outputs(sess, samples: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    from graphopt.runtime import run

    return [run(sess, s) for s in samples]


def measure_fidelity(sess, samples, references, user=()) -> dict[str, float]:
    """Every built-in metric and the ``user`` metrics of the candidate run by ``sess``."""
    return compare_outputs(_outputs(sess, samples), references, samples, user)


def measure_latency(base_sess, cand_sess, feed: Mapping[str, np.ndarray], rounds: int | None,
                    warmup: int = 2) -> tuple[float, float]:
    """Median milliseconds of (baseline, candidate), runs interleaved so that
    machine noise hits both alike; the order alternates every round."""
    from graphopt.runtime import run

    for _ in range(warmup):
        run(base_sess, feed)
        run(cand_sess, feed)
    if rounds is None:
        t = time.perf_counter()
        run(base_sess, feed)
        one = max(time.perf_counter() - t, 1e-5)
        rounds = int(min(max(0.6 / one, 7), 40))
    base, cand = [], []
    for i in range(rounds):
        pair = ((base_sess, base), (cand_sess, cand)) if i % 2 == 0 else ((cand_sess, cand), (base_sess, base))
        for sess, times in pair:
            t = time.perf_counter()
            run(sess, feed)
            times.append(time.perf_counter() - t)
    return statistics.median(base) * 1e3, statistics.median(cand) * 1e3


def file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# ----------------------------------------------------------------------------------
# Per-layer structure
# ----------------------------------------------------------------------------------
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def layer_table(model: Model, input_shapes: Mapping[str, list[int]] | None = None) -> dict[str, dict[str, Any]]:
    """Output channels and MACs of every weighted layer (Conv, Gemm, MatMul with
    a constant weight), by node name."""
    import onnx_graphsurgeon as gs

    from graphopt.summary import node_macs

    macs = {n["name"]: n["macs"] for n in node_macs(model, dict(input_shapes or {}))}
    out: dict[str, dict[str, Any]] = {}
    for node in model.graph.nodes:
        if node.op not in _WEIGHTED or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        shape = list(node.inputs[1].shape or [])
        if not shape:
            continue
        if node.op == "Conv":
            channels = shape[0]
        elif node.op == "ConvTranspose":
            channels = shape[1] * int(node.attrs.get("group", 1))
        elif node.op == "Gemm":
            channels = shape[0] if node.attrs.get("transB", 0) else shape[-1]
        else:
            channels = shape[-1]
        out[node.name] = {"op": node.op, "channels": int(channels), "macs": int(macs.get(node.name, 0))}
    return out


class _StructureSnapshot(Instrument):
    """Records the layer table just before the first numeric pass (quantization,
    fp16, ...) or at the end: the structure pruning left."""

    def __init__(self, input_shapes):
        self.input_shapes = input_shapes
        self.layers: dict[str, dict[str, Any]] | None = None

    def before_pass(self, p, model, ctx) -> None:
        if self.layers is None and p.name in NUMERIC_PASSES:
            self.layers = layer_table(model, self.input_shapes)

    def run_end(self, model, ctx, records) -> None:
        if self.layers is None:
            self.layers = layer_table(model, self.input_shapes)


# ----------------------------------------------------------------------------------
# Calibration split, written so `graphopt opt --config` sees the same samples
# ----------------------------------------------------------------------------------
def write_samples(data: CalibrationData, path: Path) -> Path:
    """Write samples as one .npz (leading axis = samples) when they share shapes,
    else as a folder of one .npz per sample; returns the path written."""
    samples = list(data)
    shapes = {name: {s[name].shape for s in samples} for name in data.input_names}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if all(len(v) == 1 for v in shapes.values()):
            target = path.with_suffix(".npz")
            np.savez(tmp / "data.npz", **{n: np.stack([s[n] for s in samples]) for n in data.input_names})
            _replace(tmp / "data.npz", target)
        else:
            target = path
            folder = tmp / "samples"
            folder.mkdir()
            width = max(len(str(len(samples))), 6)
            for i, s in enumerate(samples):
                np.savez(folder / f"{i:0{width}d}.npz", **s)
            _replace(folder, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(src: Path, dst: Path) -> None:
    import os

    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# ----------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------
def compress(
    model_path: str | Path,
    calib: str,
    options: CompressOptions,
    *,
    work_dir: Path,
    log: Callable[[str], None] | None = None,
    on_candidate: Callable[[Candidate, int], None] | None = None,
) -> CompressResult:
    """Run the search; candidate models are written under ``work_dir``.

    Ctrl-C during the search ends it: the result holds the best candidate so
    far and ``interrupted`` is set.  ``on_candidate(candidate, total)`` is
    called before (status ``pending``) and after each candidate.
    """
    spec = options.check()
    say = (lambda m: None) if options.quiet or log is None else log
    start = _now()
    deadline = None if options.budget_minutes is None else start + options.budget_minutes * 60

    original = load(model_path)
    from graphopt.summary import summarize

    before = summarize(original, options.input_shapes)
    base = original.copy()
    base_ctx = PassContext(seed=options.seed, input_shapes=options.input_shapes, quiet=True,
                           options={"seed": options.seed})
    base_records = PassManager(parse(BASE_PIPELINE)).run(base, base_ctx).records
    base_path = work_dir / "simplified.onnx"
    save(base, base_path)

    data = open_reader(calib, base, input_shapes=options.input_shapes, preprocess=options.calib_preprocess,
                       max_samples=options.calib_samples, seed=options.seed, quiet=True)
    if len(data) < 2:
        raise UsageError(f"--calib {calib}: {len(data)} sample; compress needs at least 2 (calibration + held-out)")
    calib_part, held = data.split(options.holdout, options.seed)
    held_samples = list(held)
    calib_file = write_samples(calib_part, work_dir / "calibration")
    # The passes read the written copy, exactly as a rebuild with --config will.
    pass_data = open_reader(str(calib_file), base, input_shapes=options.input_shapes, seed=options.seed, quiet=True)

    base_sess = _session(base_path, options.threads)
    references = _outputs(base_sess, held_samples)
    # what the float model itself measures (user metrics need not reach 1 on it)
    float_fidelity = compare_outputs(references, references, held_samples, spec.user)
    base_layers = layer_table(base, options.input_shapes)

    notes: list[str] = []
    texts = options.candidates if options.candidates is not None else default_candidates(
        base, spec, options.objective, options.target, notes.append)
    for n in notes:
        say(f"graphopt: {n}")
    candidates = [Candidate(i + 1, t) for i, t in enumerate(texts)]
    seen: dict[bytes, int] = {}
    interrupted = False
    stopped_by_budget = False
    baseline_times: list[float] = []
    try:
        for cand in candidates:
            if deadline is not None and _now() >= deadline:
                cand.status = "skipped"
                cand.error = "budget spent"
                stopped_by_budget = True
                continue
            if on_candidate:
                on_candidate(cand, len(candidates))
            _evaluate(cand, base, base_path, base_sess, pass_data, held_samples, references, spec, options,
                      work_dir, seen, baseline_times)
            if on_candidate:
                on_candidate(cand, len(candidates))
    except KeyboardInterrupt:
        interrupted = True
        for cand in candidates:
            if cand.status == "pending":
                cand.status = "skipped"
                cand.error = "interrupted"

    chosen, outcome = choose(candidates, options.objective, base_path)
    model = load(chosen.path) if chosen else base
    report = _report(model_path, calib, options, spec, data, calib_part, held, float_fidelity, before, base,
                     base_path, base_records,
                     base_layers, candidates, chosen, outcome, notes, baseline_times, interrupted, stopped_by_budget,
                     _now() - start)
    report["calibration_file"] = str(calib_file)
    return CompressResult(report, model, chosen, interrupted)


def _evaluate(cand: Candidate, base: Model, base_path: Path, base_sess, pass_data: CalibrationData,
              held_samples, references, spec: FidelitySpec, options: CompressOptions, work_dir: Path,
              seen: dict[bytes, int], baseline_times: list[float]) -> None:
    t0 = time.perf_counter()
    try:
        model = base.copy()
        ctx = PassContext(seed=options.seed, calibration=pass_data, input_shapes=options.input_shapes, quiet=True,
                          options={"seed": options.seed, "calib": str(pass_data.source)})
        snapshot = _StructureSnapshot(options.input_shapes)
        result = PassManager(parse(cand.pipeline), [snapshot]).run(model, ctx)
        cand.records = result.records
        cand.layers = snapshot.layers or {}
        cand.notes = [{"pass": r.name, "note": n} for r in result.records for n in r.notes]
        if not result.changed:
            cand.status = "unchanged"
            cand.error = "the pipeline left the model as it was"
            return
        path = work_dir / f"candidate-{cand.index:02d}.onnx"
        save(model, path)
        digest = path.read_bytes()
        if digest in seen:
            cand.status = "unchanged"
            cand.error = f"same model as candidate {seen[digest]}"
            return
        seen[digest] = cand.index
        cand.path = path
        cand.size_bytes = file_bytes(path)
        sess = _session(path, options.threads)
        cand.fidelity = measure_fidelity(sess, held_samples, references, spec.user)
        cand.met = spec.holds(cand.fidelity)
        if options.objective == "latency" or cand.met:
            cand.baseline_ms, cand.latency_ms = measure_latency(base_sess, sess, held_samples[0],
                                                                options.latency_rounds)
            cand.ratio = cand.latency_ms / cand.baseline_ms
            baseline_times.append(cand.baseline_ms)
        cand.status = "ok"
    except GraphoptError as exc:
        cand.status = "failed"
        cand.error = first_line(exc)
    except (KeyboardInterrupt, MemoryError):
        cand.status = "skipped"
        cand.error = "interrupted"
        raise
    except Exception as exc:  # onnxruntime refusing a candidate is a failed candidate, not a failed search
        cand.status = "failed"
        cand.error = f"{type(exc).__name__}: {first_line(exc, default='')}"
    finally:
        cand.seconds = time.perf_counter() - t0


def choose(candidates: Sequence[Candidate], objective: str, base_path: Path) -> tuple[Candidate | None, str]:
    """The best candidate meeting the target on the objective, if it beats the
    float model; ties (latency within LATENCY_TIE) go to the smaller file."""
    met = [c for c in candidates if c.status == "ok" and c.met]
    if not met:
        return None, "not-met"
    if objective == "size":
        base_size = file_bytes(base_path)
        better = [c for c in met if c.size_bytes is not None and c.size_bytes < base_size]
        if not better:
            return None, "no-gain"
        return min(better, key=lambda c: (c.size_bytes, c.index)), "compressed"
    better = [c for c in met if c.ratio is not None and c.ratio < 1 - LATENCY_TIE]
    if not better:
        return None, "no-gain"
    fastest = min(c.ratio for c in better)
    tied = [c for c in better if c.ratio <= fastest * (1 + LATENCY_TIE)]
    return min(tied, key=lambda c: (c.size_bytes or 0, c.index)), "compressed"


# ----------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------
def chosen_pipeline(chosen: Candidate | None) -> str:
    return BASE_PIPELINE if chosen is None else f"{BASE_PIPELINE},{chosen.pipeline}"


def config_toml(pipeline: str, seed: int, calib_file: str | None, metrics: Sequence[str] = ()) -> str:
    """A config for ``graphopt opt --config`` that rebuilds the chosen model
    (with the ``--metric`` flags its fidelity budgets name)."""
    flags = "".join(f" --metric {m}" for m in metrics)
    lines = [f"# Rebuild: graphopt opt MODEL -o OUT --config THIS_FILE{flags}", "", "[run]", f"seed = {seed}"]
    if calib_file is not None:
        lines.append(f'calib = "{_toml_escape(calib_file)}"')
    return "\n".join(lines) + "\n\n" + to_toml(parse(pipeline))


def _toml_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def untouched_nodes(records: Sequence[PassRecord]) -> list[dict[str, str]]:
    """What the passes of the chosen pipeline left alone and why: nodes kept in
    float by a fidelity budget, and every note the passes wrote."""
    out: list[dict[str, str]] = []
    for r in records:
        fid = r.stats.get("fidelity") if isinstance(r.stats, dict) else None
        if isinstance(fid, dict):
            for item in fid.get("kept_float") or []:
                name, op = (item.get("node"), item.get("op")) if isinstance(item, dict) else (item, None)
                alone = (item.get("error") or {}).get("cosine") if isinstance(item, dict) else None
                out.append({"pass": r.name, "node": str(name) + (f" ({op})" if op else ""),
                            "reason": f"kept in float to meet the fidelity target {fid.get('target', '')}"
                                      + (f" (quantized alone: cosine {alone:g})" if alone is not None else "")})
        for key, value in sorted((r.stats or {}).items()):
            if key.startswith("skipped_") and value:
                out.append({"pass": r.name, "node": f"{value} x {key[len('skipped_'):]}",
                            "reason": "op type not quantized by this pass"})
        for n in r.notes:
            out.append({"pass": r.name, "node": "", "reason": n})
    return out


def sensitivity(records: Sequence[PassRecord]) -> list[dict[str, Any]]:
    """The quantization passes' per-node sensitivity ranking, if they made one."""
    out = []
    for r in records:
        fid = r.stats.get("fidelity") if isinstance(r.stats, dict) else None
        ranking = fid.get("ranking") if isinstance(fid, dict) else None
        if not isinstance(ranking, dict):
            continue
        kept = {k.get("node") if isinstance(k, dict) else k for k in fid.get("kept_float") or []}
        for item in ranking.get("top", []):
            out.append({"pass": r.name, "node": item.get("node"), "op": item.get("op"),
                        "score": item.get("score"), "error": item.get("error"),
                        "kept_float": item.get("node") in kept})
    return out


def _totals(summary: Mapping[str, Any], size: int | None) -> dict[str, Any]:
    return {"file_bytes": size, "nodes": summary["nodes"], "params": summary["params"],
            "param_bytes": summary["param_bytes"], "macs": summary["macs"],
            "symbolic_dims_as_1": summary.get("symbolic_dims_as_1", [])}


def _report(model_path, calib, options, spec, data, calib_part, held, float_fidelity, before, base, base_path,
            base_records,
            base_layers, candidates, chosen, outcome, notes, baseline_times, interrupted, stopped_by_budget,
            seconds) -> dict[str, Any]:
    from graphopt import __version__
    from graphopt.summary import summarize

    final_model = load(chosen.path) if chosen else base
    after = summarize(final_model, options.input_shapes)
    simplified = summarize(base, options.input_shapes)
    after_layers = chosen.layers if chosen else base_layers
    layers = []
    for name, info in base_layers.items():
        now = after_layers.get(name)
        layers.append({"name": name, "op": info["op"],
                       "channels_before": info["channels"], "channels_after": now["channels"] if now else 0,
                       "macs_before": info["macs"], "macs_after": now["macs"] if now else 0})
    pipeline = chosen_pipeline(chosen)
    messages = {
        "compressed": f"chose '{chosen.pipeline}'" if chosen else "",
        "not-met": f"no candidate met {spec} on the held-out samples; wrote the simplified float model",
        "no-gain": f"candidates met {spec} but none improved {options.objective}; wrote the simplified float model",
    }
    base_ms = statistics.median(baseline_times) if baseline_times else None
    return {
        "graphopt": __version__,
        "input": str(model_path),
        "options": {
            "fidelity": str(spec), "objective": options.objective, "target": options.target,
            "budget_minutes": options.budget_minutes, "seed": options.seed, "holdout": options.holdout,
            "threads": options.threads, "input_shapes": options.input_shapes,
        },
        "data": {"source": str(calib), "samples": len(data), "calibration": len(calib_part),
                 "heldout": len(held), "heldout_indices": held.indices},
        "outcome": outcome,
        "met": outcome == "compressed",
        "message": messages[outcome] + (" (interrupted: best so far)" if interrupted else ""),
        "interrupted": interrupted,
        "budget": {"minutes": options.budget_minutes, "seconds_spent": round(seconds, 3),
                   "stopped_early": stopped_by_budget},
        "chosen": {
            "candidate": chosen.pipeline if chosen else None,
            "pipeline": pipeline,
            "toml": None,  # filled in by the writer, which knows where the calibration file lands
        },
        "model": {"before": _totals(before, file_bytes(Path(model_path))),
                  "simplified": _totals(simplified, file_bytes(base_path)),
                  "after": _totals(after, chosen.size_bytes if chosen else file_bytes(base_path))},
        "latency": {"threads": options.threads, "baseline_ms": _round(base_ms),
                    "after_ms": _round(chosen.latency_ms if chosen else base_ms),
                    "ratio": _round(chosen.ratio if chosen else 1.0),
                    "measured_on": "onnxruntime CPUExecutionProvider, interleaved with the float model, medians"
                                   + ("; the target is a GPU, for which CPU latency is only a proxy"
                                      if _gpu_target(options.target) else "")},
        "fidelity": {"target": str(spec), "samples": len(held),
                     **{k: _round(v) for k, v in (chosen.fidelity if chosen else float_fidelity).items()}},
        "candidates": [c.as_dict() for c in candidates],
        "candidate_notes": notes,
        "untouched": untouched_nodes(chosen.records if chosen else []),
        **_sensitivity_block(chosen, candidates),
        "layers": layers,
        "simplify": {"passes": len(base_records), "changed": any(r.changed for r in base_records)},
    }


def _sensitivity_block(chosen: Candidate | None, candidates: Sequence[Candidate]) -> dict[str, Any]:
    """The chosen candidate's node ranking; when it made none (no fidelity
    budget in it), the first candidate's that did, named as such."""
    for c in ([chosen] if chosen else []) + [c for c in candidates if c is not chosen]:
        ranking = sensitivity(c.records)
        if ranking:
            return {"sensitivity": ranking, "sensitivity_from": c.pipeline}
    return {"sensitivity": [], "sensitivity_from": None}


def _round(v: float | None) -> float | str | None:
    if v is None:
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return float(f"{v:.6g}")


__all__ = ["CompressOptions", "CompressResult", "Candidate", "compress", "default_candidates", "choose",
           "config_toml", "layer_table", "measure_latency", "measure_fidelity", "write_samples"]
