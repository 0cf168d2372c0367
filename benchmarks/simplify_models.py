"""Does ``graphopt opt`` (default pipeline) keep every test model's outputs, and
how much does it shrink them compared with onnxslim?

For each model: run the graphopt CLI and the onnxslim CLI, run original and
both results in onnxruntime on the same inputs (a rendered text page or line
for the PP-OCR models, seeded random data for the others; the "random" column
repeats the PP-OCR check on random data), and tabulate nodes, file
size and relative error.  The reference is onnxruntime with its graph
optimizations off; the "ort-opt" column is the error of onnxruntime's own
optimizations on the original model (a float32 noise floor for rewrites such
as Conv+BatchNorm fusion).  The goal is graphopt's relative error <= 1e-4 on all
models (onnxslim's figures are for comparison only), and an output file at
most 1% (plus 4 KB of annotations) larger than its input ("ratio" is output
bytes / input bytes).

    python benchmarks/simplify_models.py [--json OUT] [--models a,b] [-p PIPELINE]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402
from graphopt.runtime import relative_error  # noqa: E402

TOLERANCE = 1e-4
SIZE_SLACK = (1.01, 4096)  # output bytes <= 1.01 * input bytes + 4 KB


@dataclass
class Row:
    model: str
    nodes_before: int
    nodes_after: int | None
    nodes_onnxslim: int | None
    bytes_before: int
    bytes_after: int | None
    bytes_onnxslim: int | None
    rel_error: float | None
    rel_error_random: float | None
    rel_error_onnxslim: float | None
    ort_floor: float | None
    ok: bool
    error: str = ""


def run_graphopt(src: Path, dst: Path, pipeline: str | None) -> str:
    """Run the CLI; returns '' or the error line it printed."""
    cmd = [sys.executable, "-m", "graphopt.cli", "opt", str(src), "-o", str(dst), "-q", "--no-cache"]
    if pipeline:
        cmd += ["-p", pipeline]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]


def run_onnxslim(src: Path, dst: Path) -> str:
    exe = shutil.which("onnxslim")
    cmd = [exe] if exe else [sys.executable, "-m", "onnxslim"]
    proc = subprocess.run(cmd + [str(src), str(dst)], capture_output=True, text=True)
    return "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]


def max_error(outputs: list, reference: list) -> float:
    if len(outputs) != len(reference):
        return float("inf")
    return max((relative_error(a, b) for a, b in zip(outputs, reference)), default=0.0)


def measure(name: str, src: Path, work: Path, pipeline: str | None) -> Row:
    inputs = models.task_inputs(name, src)
    reference = models.run_onnxruntime(src, inputs)
    row = Row(name, models.node_count(src), None, None, models.file_bytes(src), None, None, None, None, None, None,
              False)
    # The error onnxruntime's own optimizations (its Conv+BN fusion, etc.) make on
    # the original: a floor for what any graph rewrite can reach in float32.
    row.ort_floor = max_error(models.run_onnxruntime(src, inputs, optimize=True), reference)

    slim = work / f"{name}.slim.onnx"
    if not run_onnxslim(src, slim):
        row.nodes_onnxslim = models.node_count(slim)
        row.bytes_onnxslim = models.file_bytes(slim)
        row.rel_error_onnxslim = max_error(models.run_onnxruntime(slim, inputs), reference)

    out = work / f"{name}.opt.onnx"
    err = run_graphopt(src, out, pipeline)
    if err:
        row.error = err
        return row
    row.nodes_after = models.node_count(out)
    row.bytes_after = models.file_bytes(out)
    try:
        row.rel_error = max_error(models.run_onnxruntime(out, inputs), reference)
    except Exception as exc:  # onnxruntime rejected graphopt's output
        row.error = f"onnxruntime: {str(exc).strip().splitlines()[0]}"
        return row
    if name in models.OCR_KINDS:  # also on random data, for comparison
        noise = models.sample_inputs(name, src)
        row.rel_error_random = max_error(models.run_onnxruntime(out, noise), models.run_onnxruntime(src, noise))
    row.ok = row.rel_error <= TOLERANCE and size_ok(row.bytes_before, row.bytes_after)
    if not size_ok(row.bytes_before, row.bytes_after):
        row.error = f"output {row.bytes_after / row.bytes_before:.3f}x the input's size"
    return row


def size_ok(before: int, after: int) -> bool:
    factor, slack = SIZE_SLACK
    return after <= factor * before + slack


def _ratio(r: Row) -> str:
    return "-" if r.bytes_after is None else f"{r.bytes_after / r.bytes_before:.3f}"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _err(e: float | None) -> str:
    return "-" if e is None else f"{e:.1e}"


def print_table(rows: list[Row]) -> None:
    head = ("model", "nodes", "graphopt", "onnxslim", "size", "graphopt", "ratio", "onnxslim", "rel.err", "random",
            "slim err", "ort-opt", "ok")
    print(f"{head[0]:14s} {head[1]:>6s} {head[2]:>9s} {head[3]:>9s} {head[4]:>9s} {head[5]:>9s} {head[6]:>6s} "
          f"{head[7]:>9s} {head[8]:>8s} {head[9]:>8s} {head[10]:>8s} {head[11]:>8s}  {head[12]}")
    for r in rows:
        print(f"{r.model:14s} {r.nodes_before:6d} {r.nodes_after if r.nodes_after is not None else '-':>9} "
              f"{r.nodes_onnxslim if r.nodes_onnxslim is not None else '-':>9} {_size(r.bytes_before):>9s} "
              f"{_size(r.bytes_after):>9s} {_ratio(r):>6s} {_size(r.bytes_onnxslim):>9s} {_err(r.rel_error):>8s} "
              f"{_err(r.rel_error_random):>8s} {_err(r.rel_error_onnxslim):>8s} {_err(r.ort_floor):>8s}  "
              f"{'PASS' if r.ok else 'FAIL'} {r.error}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--models", help="comma-separated subset of models")
    ap.add_argument("-p", "--pipeline", help="graphopt pipeline (default: graphopt's default, simplify)")
    args = ap.parse_args(argv)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="graphopt-simplify-") as tmp:
        for name, path in models.select(args.models).items():
            rows.append(measure(name, path, Path(tmp), args.pipeline))
            print(f"  {name}: done", file=sys.stderr, flush=True)
    print_table(rows)
    failed = [r.model for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} models within relative error {TOLERANCE:g} and the size bound"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"tolerance": TOLERANCE, "pipeline": args.pipeline or "default",
                                               "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
