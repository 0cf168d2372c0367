"""The ``graphopt`` command.

Exit codes: 0 success, 1 internal error, 2 usage or bad option, 3 unreadable or
invalid model, 4 a pass or a verification failed, 130 interrupted.  Expected
errors print one line ``graphopt: error: ...``; ``--debug`` adds the traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from graphopt.errors import ExitCode, GraphoptError, UsageError
from graphopt.cli_args import (add_metric_argument, check_output_path, load_npz, parse_input_shapes,
                               register_metrics)
from graphopt.files import write_json_atomic


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from graphopt import __version__

    parser = _Parser(prog="graphopt", description="Optimize and compile ONNX models.")
    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    opt = sub.add_parser("opt", help="run a pass pipeline over a model")
    opt.add_argument("input", help="input .onnx model (never modified)")
    opt.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    opt.add_argument("-p", "--pipeline", help="textual pipeline, e.g. 'fold-constants,cse' (default: simplify)")
    opt.add_argument("--config", help="TOML file with [[pipeline]] steps and [run] options")
    opt.add_argument("--report", help="write a JSON report of the run to this file")
    opt.add_argument("--time-passes", action="store_true", default=None, help="print time per pass")
    opt.add_argument("--verify-each", action="store_true", default=None,
                     help="after each pass: onnx checker, shape inference, onnxruntime comparison")
    opt.add_argument("--tolerance", type=float, help="relative error allowed by --verify-each (default: per pass)")
    opt.add_argument("--inputs", help=".npz of inputs for --verify-each (default: seeded random)")
    opt.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                     help="pin the shape of a dynamic input (repeatable)")
    opt.add_argument("--seed", type=int, help="seed for random inputs and randomized passes (default 0)")
    opt.add_argument("--print-ir-after", action="append", metavar="PASS|all", help="print the IR after a pass")
    opt.add_argument("--dump-dir", help="save the model after each pass into this folder")
    opt.add_argument("--external-data", action="store_true", default=None,
                     help="write weights to OUTPUT.data (automatic over 2 GB)")
    opt.add_argument("--write-shapes", action="store_true", default=None,
                     help="write every inferred intermediate shape as value_info (default: only those the input had)")
    opt.add_argument("--calib", metavar="PATH",
                     help="calibration data for passes that need it: a .npz, a folder of .npy/.npz or images, "
                          "or random:N")
    opt.add_argument("--calib-preprocess", metavar="SPEC",
                     help="how images become inputs: a preset (imagenet, raw) and/or key=value items, e.g. "
                          "'resize=224x224,fit=crop,scale=255,mean=0.485;0.456;0.406,std=0.229;0.224;0.225,"
                          "layout=NCHW,channels=RGB'")
    opt.add_argument("--calib-samples", type=int, metavar="N", help="use at most the first N calibration samples")
    opt.add_argument("--fidelity", metavar="SPEC",
                     help="fidelity budget for the quantization passes, e.g. 'cosine>=0.99', 'top1>=0.98', "
                          "'max-abs<=0.05' (comma-joined: all must hold): the most sensitive nodes stay in float "
                          "until it holds on held-out --calib samples")
    add_metric_argument(opt)
    from graphopt import cache, logging_flags

    logging_flags.add_arguments(opt)  # -q/--quiet, --json
    cache.add_arguments(opt)  # --cache-dir, --no-cache

    sub.add_parser("passes", help="list registered passes, their options and named pipelines").add_argument(
        "--json", action="store_true", help="machine-readable output"
    )

    insp = sub.add_parser("inspect", help="inputs, outputs, ops, parameters and MACs of a model")
    insp.add_argument("model")
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    insp.add_argument("--per-node", action="store_true", help="list MACs per node")
    insp.add_argument("--groups", action="store_true",
                      help="list the channel groups that prune-channels sees (root, members, size, why left alone)")
    insp.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                      help="pin the shape of a dynamic input for MACs (repeatable)")
    from graphopt import cli_backend

    cli_backend.add_parsers(sub)  # compile, run
    from graphopt import cli_compress

    cli_compress.add_parsers(sub)  # compress, report
    return parser


# ----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("missing command (one of: opt, passes, inspect, compile, run, compress, report); see 'graphopt --help'")
        return int(_COMMANDS[args.command](args) or 0)
    except GraphoptError as exc:
        from graphopt.logging_flags import report_unhandled

        report_unhandled(argv, exc)  # --json of a command line that did not parse
        _fail(str(exc), debug)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; no output written", debug)
        return int(ExitCode.INTERRUPTED)
    except MemoryError:
        _fail("out of memory", debug)
        return int(ExitCode.INTERNAL)
    except BrokenPipeError:
        return int(ExitCode.OK)
    except Exception as exc:  # a bug: still one line unless --debug
        _fail(f"internal error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
              " (rerun with --debug for a traceback)", debug)
        return int(ExitCode.INTERNAL)


def _fail(message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"graphopt: error: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------
from graphopt.logging_flags import json_summary  # noqa: E402


@json_summary
def cmd_opt(args: argparse.Namespace) -> int:
    from graphopt import instruments as inst
    from graphopt.api import DEFAULT_PIPELINE
    from graphopt.context import PassContext
    from graphopt.summary import summarize
    from graphopt.ir import load, save
    from graphopt.manager import PassManager
    from graphopt.pipeline import load_config, parse

    # Everything that can be checked without the model is checked first.
    register_metrics(args)
    config = load_config(args.config) if args.config else None
    run_opts: dict[str, Any] = dict(config.run) if config else {}
    for key in ("time_passes", "verify_each", "seed", "tolerance", "dump_dir", "print_ir_after", "report",
                "external_data", "write_shapes"):
        value = getattr(args, key)
        if value is not None:
            run_opts[key.replace("_", "-")] = value
    if args.pipeline is not None and config and config.pipeline:
        raise UsageError("give the pipeline with -p or in --config, not both")
    # An explicit but empty -p is an error ("pipeline is empty"), not the default.
    pipeline = (
        parse(args.pipeline) if args.pipeline is not None else (config.pipeline if config and config.pipeline else None)
    )
    if pipeline is None:
        pipeline = parse(DEFAULT_PIPELINE)
    output = Path(args.output)
    check_output_path(output, "-o")
    if run_opts.get("report"):
        check_output_path(Path(run_opts["report"]), "--report")
    tolerance = run_opts.get("tolerance")
    if tolerance is not None and not tolerance >= 0:
        raise UsageError(f"--tolerance must be >= 0, got {tolerance}")
    input_shapes = parse_input_shapes(args.input_shape)
    calib = _calib_options(args, run_opts)
    _fidelity_option(args, run_opts, pipeline, calib)
    inputs = load_npz(args.inputs, "--inputs") if args.inputs else None
    from graphopt.cache import CommandCache
    from graphopt.logging_flags import run_log

    log = run_log(args)
    log.output = str(output)
    if getattr(args, "json", False) and run_opts.get("print-ir-after"):
        raise UsageError("--json and --print-ir-after both write to stdout; give one")
    cached = CommandCache.for_opt(args, pipeline, run_opts, calib, input_shapes)
    log.cache = cached.status
    if cached.restore(output, run_opts.get("report"), log):
        log.size = {"before": _file_bytes(Path(args.input)), "after": _file_bytes(output)}
        if not args.quiet:
            print(f"graphopt: wrote {output} ({log.nodes['before']} -> {log.nodes['after']} nodes, "
                  f"{_size(log.size['before'])} -> {_size(log.size['after'])}, "
                  f"{log.timings['restore']:.2f}s)", file=sys.stderr)
        return 0

    ctx = PassContext(
        seed=run_opts.get("seed", 0),
        inputs=inputs,
        input_shapes=input_shapes,
        tolerance=tolerance,
        quiet=args.quiet,
        options=run_opts,
    )
    instruments = []
    if run_opts.get("verify-each"):
        instruments.append(inst.VerifyEach(inputs, tolerance))
    if run_opts.get("print-ir-after"):
        instruments.append(inst.PrintIRAfter(run_opts["print-ir-after"]))
    if run_opts.get("dump-dir"):
        instruments.append(inst.DumpDir(run_opts["dump-dir"]))
    if run_opts.get("time-passes"):
        instruments.append(inst.TimePasses())
    progress = inst.Progress() if sys.stderr.isatty() and not args.quiet else None
    if progress:
        instruments.append(progress)

    start = time.perf_counter()
    model = load(args.input)
    _check_against_model(model, output, input_shapes, inputs)
    if calib is not None:  # validated against the model's inputs before any pass runs
        from graphopt.calibration import open_reader

        ctx.calibration = open_reader(calib["spec"], model, input_shapes=input_shapes, preprocess=calib["preprocess"],
                                      max_samples=calib["samples"], seed=ctx.seed, quiet=args.quiet, log=ctx.log)
    if run_opts.get("verify-each") and inputs is None:
        _check_random_input_sizes(model, input_shapes)
    report_path = run_opts.get("report")
    before = summarize(model, input_shapes) if report_path else None
    try:
        result = PassManager(pipeline, instruments).run(model, ctx)
    finally:
        if progress:
            progress.close()
    try:
        save(model, output, external_data=run_opts.get("external-data"), protect=[args.input],
             write_shapes=bool(run_opts.get("write-shapes")))
    except OSError as exc:  # permission denied, disk full, ...: save leaves no partial file
        raise UsageError(f"-o {output}: cannot write ({exc.strerror or exc})") from None
    seconds = time.perf_counter() - start
    if report_path:
        after = summarize(model, input_shapes)
        report = {
            "graphopt": _version(),
            "input": str(args.input),
            "output": str(output),
            "pipeline": str(pipeline),
            "seconds": round(seconds, 6),
            "cache": cached.status,
            "changed": result.changed,
            "passes": [r.as_dict() for r in result.records],
            "notes": model.info.load_notes + result.unchanged,
            "model": {"before": _model_totals(before, args.input), "after": _model_totals(after, output)},
        }
        try:
            write_json_atomic(Path(report_path), report)
        except OSError as exc:
            raise UsageError(f"--report {report_path}: cannot write ({exc.strerror or exc})") from None
    log.timing("run", seconds)
    log.size = {"before": _file_bytes(Path(args.input)), "after": _file_bytes(output)}
    if result.records:
        log.nodes = {"before": result.records[0].before.nodes, "after": result.records[-1].after.nodes}
    cached.store(output, report if report_path else None, {"nodes": log.nodes})
    if not args.quiet:
        for line in model.info.load_notes + result.unchanged:
            print(f"graphopt: note: {line}", file=sys.stderr)
        if result.records:
            before, after = result.records[0].before, result.records[-1].after
            change = (f"{before.nodes} -> {after.nodes} nodes, "
                      f"{_size(_file_bytes(Path(args.input)))} -> {_size(_file_bytes(output))}")
        else:
            change = "no passes"
        print(f"graphopt: wrote {output} ({change}, {seconds:.2f}s)", file=sys.stderr)
    return 0


def _model_totals(summary: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    return {
        "file_bytes": _file_bytes(Path(path)),
        "nodes": summary["nodes"],
        "params": summary["params"],
        "param_bytes": summary["param_bytes"],
        "macs": summary["macs"],
    }


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _file_bytes(path: Path) -> int:
    size = path.stat().st_size if path.exists() else 0
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


def cmd_passes(args: argparse.Namespace) -> int:
    from graphopt import registry

    passes = registry.passes()
    pipelines = registry.pipelines()
    if args.json:
        out = {
            "passes": {
                name: {
                    "summary": cls.summary(),
                    "module": cls.__module__,
                    "options": {
                        s.name: {"type": s.type_name, "default": s.default, "doc": s.doc}
                        for s in cls.option_specs().values()
                    },
                }
                for name, cls in passes.items()
            },
            "pipelines": {name: {"pipeline": text, "summary": doc} for name, (text, doc) in pipelines.items()},
        }
        print(json.dumps(out, indent=2, default=str))
        return 0
    width = max((len(n) for n in list(passes) + list(pipelines)), default=10) + 2
    print("Passes:")
    for name, cls in passes.items():
        print(f"  {name:<{width}}{cls.summary()}")
        for spec in cls.option_specs().values():
            default = spec.default if not isinstance(spec.default, bool) else str(spec.default).lower()
            print(f"  {'':<{width}}  {spec.name}={spec.type_name} (default {default}): {spec.doc}")
    print("\nNamed pipelines:")
    for name, (text, doc) in pipelines.items():
        print(f"  {name:<{width}}{doc}")
        print(f"  {'':<{width}}  = {text}")
    for err in registry.plugin_errors():
        print(f"graphopt: warning: {err}", file=sys.stderr)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from graphopt.summary import format_summary, summarize
    from graphopt.ir import load

    model = load(args.model)
    summary = summarize(model, parse_input_shapes(args.input_shape))
    groups = None
    if getattr(args, "groups", False):
        from graphopt.passes.pruning.groups import analyze, group_dict

        groups = analyze(model).groups()
        summary["channel_groups"] = [group_dict(g) for g in groups]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary, per_node=args.per_node))
        if groups is not None:
            from graphopt.passes.pruning.groups import format_groups

            print(format_groups(groups))
    return 0


_COMMANDS = {"opt": cmd_opt, "passes": cmd_passes, "inspect": cmd_inspect}
from graphopt.cli_backend import COMMANDS as _BACKEND_COMMANDS  # noqa: E402

_COMMANDS.update(_BACKEND_COMMANDS)
from graphopt.cli_compress import COMMANDS as _COMPRESS_COMMANDS  # noqa: E402

_COMMANDS.update(_COMPRESS_COMMANDS)


# ----------------------------------------------------------------------------------
# Helpers shared by commands
# ----------------------------------------------------------------------------------
def _check_against_model(
    model: Any, output: Path, input_shapes: dict[str, Any], inputs: dict[str, Any] | None
) -> None:
    """Checks that need the model: input names given on the command line exist, and
    the output does not land on one of the input's external-data files."""
    from graphopt.calibration import check_input_dims, check_input_names
    from graphopt.ir import refuse_overwriting_inputs

    check_input_names(model, "--input-shape", input_shapes)
    check_input_names(model, "--inputs", inputs or {})
    check_input_dims(model, input_shapes)
    try:
        refuse_overwriting_inputs(model, output, [])
    except UsageError as exc:
        raise UsageError(f"-o {exc}") from None


# --verify-each makes random inputs; beyond this many elements per input it
# would run out of memory (exit 1) instead of saying what to do.
MAX_RANDOM_INPUT_ELEMENTS = 2**30


def _check_random_input_sizes(model: Any, input_shapes: dict[str, list[int]]) -> None:
    import onnx_graphsurgeon as gs

    for t in model.graph.inputs:
        if not isinstance(t, gs.Variable) or t.shape is None:
            continue
        shape = input_shapes.get(t.name) or [d if isinstance(d, int) and d >= 0 else 1 for d in t.shape]
        n = 1
        for d in shape:
            n *= d
        if n > MAX_RANDOM_INPUT_ELEMENTS:
            raise UsageError(
                f"--verify-each: input '{t.name}' has shape {list(shape)} ({n} elements), too big for random "
                f"inputs; pin it with --input-shape {t.name}=... or give --inputs"
            )


def _calib_options(args: argparse.Namespace, run_opts: dict[str, Any]) -> dict[str, Any] | None:
    """--calib, --calib-preprocess, --calib-samples (or the same names under [run]),
    checked as far as they can be without the model."""
    from graphopt.calibration import check_spec

    spec = args.calib if args.calib is not None else run_opts.get("calib")
    preprocess = args.calib_preprocess if args.calib_preprocess is not None else run_opts.get("calib-preprocess")
    samples = args.calib_samples if args.calib_samples is not None else run_opts.get("calib-samples")
    if spec is None:
        if preprocess is not None or samples is not None:
            raise UsageError("--calib-preprocess and --calib-samples need --calib")
        return None
    check_spec(str(spec), preprocess, samples)
    return {"spec": str(spec), "preprocess": preprocess, "samples": samples}


def _fidelity_option(args: argparse.Namespace, run_opts: dict[str, Any], pipeline: Any,
                     calib: dict[str, Any] | None) -> None:
    """--fidelity (or ``fidelity`` under [run]): parsed now, needs --calib and a
    pass that takes a budget; passes read it from ``ctx.options["fidelity"]``."""
    from graphopt.fidelity import parse_fidelity

    spec = args.fidelity if args.fidelity is not None else run_opts.get("fidelity")
    if spec is None:
        return
    if not isinstance(spec, str):
        raise UsageError(f"--fidelity: expected a spec such as 'cosine>=0.99', got {spec!r}")
    parse_fidelity(spec, "--fidelity")
    if calib is None:
        raise UsageError(f"--fidelity '{spec}' needs --calib: the budget is checked on held-out calibration samples")
    if not any("fidelity" in p.option_specs() for p in pipeline.passes()):
        raise UsageError(f"--fidelity '{spec}': no pass in the pipeline takes a fidelity budget "
                         "(quantize-static, quantize-dynamic)")
    run_opts["fidelity"] = spec


def _version() -> str:
    from graphopt import __version__

    return __version__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
