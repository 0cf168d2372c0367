"""``graphopt compile`` and ``graphopt run``: compile a model into an artifact
folder for a target, and run an artifact (or a plain .onnx model)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from graphopt.errors import UsageError


def add_parsers(sub: Any) -> None:
    comp = sub.add_parser("compile", help="compile a model for a target into an artifact folder")
    comp.add_argument("model", help="input .onnx model")
    comp.add_argument("-t", "--target", required=True,
                      help="target preset (tvm: x86_64, aarch64, armv7, riscv64, cuda, vulkan, opencl; "
                           "onnxruntime: cpu, cuda) or a TVM target dict as JSON")
    comp.add_argument("-o", "--output", required=True, metavar="DIR", help="artifact folder (written atomically)")
    comp.add_argument("--backend", default="tvm", help="tvm (default), onnxruntime, or a plug-in backend")
    comp.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                      help="pin the shape of a dynamic input (repeatable)")
    comp.add_argument("--tune-trials", type=int, default=0, metavar="N",
                      help="MetaSchedule measurements for the whole model (default 0: default schedules)")
    comp.add_argument("--tune-minutes", type=float, default=0.0, metavar="M",
                      help="template search: measure the CPU schedule templates' knobs for up to M minutes "
                           "(default 0: each template's default)")
    comp.add_argument("--tune-db", metavar="DIR", help="tuning database folder, reused and extended across runs")
    comp.add_argument("--rpc", metavar="HOST:PORT:KEY", help="measure tuning candidates on boards of an RPC tracker")
    comp.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")

    run = sub.add_parser("run", help="run an artifact folder or an .onnx model (onnxruntime) on inputs")
    run.add_argument("model", metavar="ARTIFACT_OR_MODEL", help="artifact folder from 'graphopt compile', or .onnx")
    run.add_argument("--inputs", required=True, metavar="IN.npz", help="arrays named after the model's inputs")
    run.add_argument("--outputs", metavar="OUT.npz", help="write the outputs here (atomically)")
    run.add_argument("--repeat", type=int, default=0, metavar="N",
                     help="time N runs after a warm-up run and print the median")
    run.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors and timings")


def cmd_compile(args: argparse.Namespace) -> int:
    from graphopt.backends import CompileOptions, compile_model
    from graphopt.cli_args import parse_input_shapes

    if args.tune_db is not None:
        db = Path(args.tune_db)
        if db.exists() and not db.is_dir():
            raise UsageError(f"--tune-db {db}: not a folder")
        if not db.exists() and not (db.parent if str(db.parent) else Path(".")).is_dir():
            raise UsageError(f"--tune-db {db}: parent folder '{db.parent}' does not exist")
    if args.rpc is not None:
        parts = args.rpc.rsplit(":", 2)
        if len(parts) != 3 or not all(parts) or not parts[1].isdigit():
            raise UsageError(f"--rpc '{args.rpc}': expected HOST:PORT:KEY, e.g. 127.0.0.1:9190:rasp4")
    options = CompileOptions(
        input_shapes=parse_input_shapes(args.input_shape),
        tune_trials=args.tune_trials,
        tune_minutes=args.tune_minutes,
        tune_db=Path(args.tune_db) if args.tune_db else None,
        rpc=args.rpc,
        progress=not args.quiet,
    )
    start = time.perf_counter()
    out = compile_model(args.model, args.output, backend=args.backend, target=args.target, options=options)
    if not args.quiet:
        print(f"graphopt: wrote {out} ({args.backend}, target {args.target if not args.target.lstrip().startswith('{') else 'json'}, "
              f"{time.perf_counter() - start:.2f}s)", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from graphopt.backends import load_runner
    from graphopt.backends.artifact import time_runner
    from graphopt.cli_args import check_output_path, load_npz

    if args.repeat < 0:
        raise UsageError(f"--repeat must be >= 0, got {args.repeat}")
    if args.outputs:
        check_output_path(Path(args.outputs), "--outputs")
    inputs = load_npz(args.inputs, "--inputs")
    runner = load_runner(args.model)
    try:
        feeds = runner.check_feeds(inputs)
    except UsageError as exc:
        raise UsageError(f"--inputs {args.inputs}: {exc}") from None
    outputs = runner.run_checked(feeds)
    if args.outputs:
        write_npz_atomic(Path(args.outputs), outputs)
    if args.repeat:
        t = time_runner(lambda: runner.run_checked(feeds), args.repeat)
        print(f"median {t['median_ms']:.3f} ms over {t['runs']} runs (min {t['min_ms']:.3f}, max {t['max_ms']:.3f}; "
              "after 1 warm-up run)")
    if not args.quiet:
        shown = ", ".join(f"{k} {v.dtype} {'x'.join(map(str, v.shape)) or 'scalar'}" for k, v in outputs.items())
        where = f", wrote {args.outputs}" if args.outputs else ""
        print(f"graphopt: ran {args.model}: {shown}{where}", file=sys.stderr)
    return 0


def write_npz_atomic(path: Path, arrays: dict[str, Any]) -> None:
    import numpy as np

    from graphopt.files import atomic_files

    try:
        with atomic_files() as beside:
            with open(beside(path), "wb") as f:
                np.savez(f, **arrays)
    except OSError as exc:
        raise UsageError(f"--outputs {path}: cannot write ({exc.strerror or exc})") from None


COMMANDS = {"compile": cmd_compile, "run": cmd_run}
