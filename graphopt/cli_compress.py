"""``graphopt compress`` and ``graphopt report``: the command-line side of
:mod:`graphopt.compress` and :mod:`graphopt.report_html`.

Exit codes follow :mod:`graphopt.cli`; a search in which no candidate met the
target still exits 0 (the float model is written, the report says
``"met": false`` and stderr says so); Ctrl-C during the search writes the best
result so far and exits 130.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from graphopt.errors import ExitCode, PassError, UsageError
from graphopt.files import copy_atomic, write_json_atomic, write_text_atomic
from graphopt.logging_flags import json_summary, run_log


def add_parsers(sub: Any) -> None:
    from graphopt import logging_flags
    from graphopt.cli_args import add_metric_argument

    p = sub.add_parser("compress", help="search compression pipelines that meet a fidelity target")
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    p.add_argument("--calib", required=True, metavar="DATA",
                   help="samples (a .npz, a folder of .npy/.npz or images, or random:N); a seeded share is held "
                        "out to measure fidelity and never used for calibration")
    p.add_argument("--calib-preprocess", metavar="SPEC", help="how images become inputs (as for graphopt opt)")
    p.add_argument("--calib-samples", type=int, metavar="N", help="use at most the first N samples")
    p.add_argument("--fidelity", default="cosine>=0.99", metavar="SPEC",
                   help="target on the held-out samples, e.g. 'cosine>=0.99', 'top1>=0.99' (default cosine>=0.99)")
    add_metric_argument(p)
    p.add_argument("--objective", default="latency", choices=["latency", "size"],
                   help="what the chosen candidate minimizes (default latency, onnxruntime CPU)")
    p.add_argument("--target", help="compile the result for this target through a backend (e.g. x86_64, "
                                    "aarch64, cuda); GPU targets also try convert-fp16")
    p.add_argument("--backend", default="tvm", help="backend for --target (default tvm)")
    p.add_argument("--compile-out", metavar="DIR", help="artifact folder for --target (default OUTPUT minus .onnx "
                                                        "plus .artifact)")
    p.add_argument("--budget-minutes", type=float, metavar="M", help="start no new candidate after M minutes")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, calibration and passes (default 0)")
    p.add_argument("--holdout", type=float, default=0.25, metavar="F",
                   help="fraction of the samples held out for fidelity (default 0.25)")
    p.add_argument("--candidate", action="append", metavar="PIPELINE",
                   help="try this pipeline instead of the generated list (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for latency (default 1)")
    p.add_argument("--latency-rounds", type=int, metavar="N", help="timed runs per model (default: adaptive)")
    p.add_argument("--report", metavar="DIR", help="write report.json, report.html and compress.toml here")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                   help="pin the shape of a dynamic input (repeatable)")
    logging_flags.add_arguments(p)

    r = sub.add_parser("report", help="render a saved compress report.json as a self-contained HTML page")
    r.add_argument("report_json", metavar="RUN.json")
    r.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for report.html")


@json_summary
def cmd_compress(args: argparse.Namespace) -> int:
    from graphopt.cli_args import check_output_path, parse_input_shapes, register_metrics
    from graphopt.compress import CompressOptions, compress
    from graphopt.calibration import check_spec

    register_metrics(args)
    output = Path(args.output)
    check_output_path(output, "-o")
    if Path(args.model).resolve() == output.resolve():
        raise UsageError(f"-o {output}: same file as the input model")
    if not Path(args.model).is_file():
        raise UsageError(f"{args.model}: no such model file")
    report_dir = Path(args.report) if args.report else None
    if report_dir is not None:
        if report_dir.exists() and not report_dir.is_dir():
            raise UsageError(f"--report {report_dir}: not a folder")
        if not report_dir.exists() and not (report_dir.parent if str(report_dir.parent) else Path(".")).is_dir():
            raise UsageError(f"--report {report_dir}: parent folder '{report_dir.parent}' does not exist")
    check_spec(args.calib, args.calib_preprocess, args.calib_samples)
    options = CompressOptions(
        fidelity=args.fidelity, objective=args.objective, target=args.target, budget_minutes=args.budget_minutes,
        seed=args.seed, holdout=args.holdout, input_shapes=parse_input_shapes(args.input_shape),
        calib_preprocess=args.calib_preprocess, calib_samples=args.calib_samples, candidates=args.candidate,
        threads=args.threads, latency_rounds=args.latency_rounds, quiet=args.quiet,
    )
    options.check()
    if args.target:
        _check_backend(args.backend, args.target)

    display = _Display(quiet=args.quiet)
    with tempfile.TemporaryDirectory(prefix="graphopt-compress-", dir=output.parent) as tmp:
        try:
            result = compress(args.model, args.calib, options, work_dir=Path(tmp), log=display.line,
                              on_candidate=display.candidate)
        finally:
            display.close()
        report = result.report
        src = Path(tmp) / "simplified.onnx" if result.chosen is None else result.chosen.path
        if src.with_name(src.name + ".data").exists():  # external weights: save names its own .data file
            from graphopt.ir import load, save

            save(load(src), output, external_data=True, protect=[args.model])
        else:
            _copy_atomic(src, output)
        report["output"] = str(output)
        calib_file = Path(report.pop("calibration_file"))
        if report_dir is not None:
            report_dir.mkdir(exist_ok=True)
            kept = report_dir / calib_file.name
            if calib_file.is_dir():
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(calib_file, kept)
            else:
                _copy_atomic(calib_file, kept)
            _finish_report(report, report_dir, kept, args, options)
    if args.target and not result.interrupted:
        report["compile"] = _compile(output, args, options, display)
        failure = report["compile"].pop("exception", None)
        if report_dir is not None:
            _write_reports(report, report_dir)
        if failure is not None:
            raise failure
    log = run_log(args)
    log.output = str(output)
    log.size = {"before": report["model"]["before"]["file_bytes"], "after": report["model"]["after"]["file_bytes"]}
    log.nodes = {"before": report["model"]["before"]["nodes"], "after": report["model"]["after"]["nodes"]}
    log.timing("search", report["budget"]["seconds_spent"])
    _summary(report, output, report_dir, args.quiet)
    return int(ExitCode.INTERRUPTED) if result.interrupted else 0


def _finish_report(report: dict[str, Any], report_dir: Path, calib_file: Path, args, options) -> None:
    from graphopt.compress import config_toml

    pipeline = report["chosen"]["pipeline"]
    toml_text = config_toml(pipeline, options.seed, str(calib_file.resolve()), getattr(args, "metric", None) or ())
    toml_path = report_dir / "compress.toml"
    write_text_atomic(toml_path, toml_text)
    shapes = "".join(f" --input-shape {k}={'x'.join(map(str, v))}" for k, v in options.input_shapes.items())
    report["chosen"].update({
        "toml": toml_text,
        "config_file": str(toml_path),
        "calibration_file": str(calib_file),
        "rebuild": f"graphopt opt {args.model} -o {args.output} --config {toml_path}{shapes}",
    })
    _write_reports(report, report_dir)


def _write_reports(report: dict[str, Any], report_dir: Path) -> None:
    from graphopt.report_html import render

    write_json_atomic(report_dir / "report.json", report)
    write_text_atomic(report_dir / "report.html", render(report))


def cmd_report(args: argparse.Namespace) -> int:
    from graphopt.report_html import render

    path = Path(args.report_json)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not a readable JSON report ({exc})") from None
    if not isinstance(report, dict) or "candidates" not in report or "model" not in report:
        raise UsageError(f"{path}: not a graphopt compress report (no 'candidates' or 'model')")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: not a folder")
    if not out.exists():
        if not (out.parent if str(out.parent) else Path(".")).is_dir():
            raise UsageError(f"-o {out}: parent folder '{out.parent}' does not exist")
        out.mkdir()
    write_text_atomic(out / "report.html", render(report))
    print(f"graphopt: wrote {out / 'report.html'}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------
def _check_backend(backend: str, target: str) -> None:
    try:
        from graphopt.backends import get_backend
    except ImportError:
        return  # said after the search, in the report
    get_backend(backend).resolve_target(target)


def _compile(output: Path, args, options, display: "_Display") -> dict[str, Any]:
    """``graphopt compile`` in a child process: a backend that crashes (a code
    generator's segfault) cannot take the search's results with it."""
    import subprocess

    try:
        from graphopt import backends  # noqa: F401
    except ImportError as exc:
        display.line(f"graphopt: --target {args.target}: no backend package ({exc}); compiled nothing")
        return {"backend": args.backend, "target": args.target, "ok": False, "error": f"no backend package: {exc}"}
    folder = Path(args.compile_out) if args.compile_out else output.with_name(
        (output.name[:-5] if output.name.endswith(".onnx") else output.name) + ".artifact")
    argv = [sys.executable, "-m", "graphopt.cli", "compile", str(output), "-o", str(folder), "--target", args.target,
            "--backend", args.backend, "-q"]
    for name, shape in options.input_shapes.items():
        argv += ["--input-shape", f"{name}={'x'.join(map(str, shape))}"]
    display.line(f"graphopt: compiling {output} for {args.target} with {args.backend}")
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("graphopt: error: ")]
        why = lines[-1][len("graphopt: error: "):] if lines else (
            f"the backend crashed (signal {-proc.returncode})" if proc.returncode < 0 else
            f"exit code {proc.returncode}")
        exc_type = UsageError if proc.returncode == int(ExitCode.USAGE) else PassError
        return {"backend": args.backend, "target": args.target, "ok": False, "error": why,
                "exception": exc_type(f"--target {args.target}: compiling {output} failed: {why}")}
    display.line(f"graphopt: compiled {output} for {args.target} with {args.backend}: {folder}")
    return {"backend": args.backend, "target": args.target, "ok": True, "artifact": str(folder)}


def _copy_atomic(src: Path, dst: Path) -> None:
    try:
        copy_atomic(src, dst)
    except OSError as exc:
        raise UsageError(f"{dst}: cannot write ({exc.strerror or exc})") from None


class _Display:
    """One line per candidate (which, fidelity, latency, size); a status spinner
    on a terminal while a candidate builds."""

    def __init__(self, quiet: bool):
        from graphopt.console import console

        self.quiet = quiet
        self.console = console()
        self.status = None

    def line(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def candidate(self, cand, total: int) -> None:
        if self.quiet:
            return
        if cand.status == "pending":
            if sys.stderr.isatty():
                self.close()
                self.status = self.console.status(f"graphopt: candidate {cand.index}/{total}: {cand.pipeline}")
                self.status.start()
            return
        self.close()
        self.line(f"graphopt: [{cand.index}/{total}] {cand.pipeline}: {_describe(cand)}")

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


def _describe(cand) -> str:
    if cand.status != "ok":
        return f"{cand.status} ({cand.error})"
    from graphopt.fidelity import METRICS

    shown = [k for k in cand.fidelity if k in ("cosine", "top1") or k not in METRICS]  # and user metrics
    fid = ", ".join(f"{k} {cand.fidelity[k]:.4g}" for k in shown)
    parts = [fid, "meets target" if cand.met else "misses target"]
    if cand.ratio is not None:
        parts.append(f"latency {cand.latency_ms:.3g} ms ({cand.ratio:.2f}x float)")
    parts.append(f"{cand.size_bytes / 1024:.1f} KB")
    return ", ".join(parts)


def _summary(report: dict[str, Any], output: Path, report_dir: Path | None, quiet: bool) -> None:
    if quiet and report["met"] and not report["interrupted"]:
        return  # -q still says when the target was missed or the search cut short
    before, after = report["model"]["before"], report["model"]["after"]
    lat = report["latency"]
    line = (f"graphopt: {report['message']}; wrote {output} ({before['file_bytes'] / 1024:.1f} KB -> "
            f"{after['file_bytes'] / 1024:.1f} KB")
    if lat.get("ratio") is not None and report["options"]["objective"] == "latency":
        line += f", latency {lat['ratio']:.2f}x"
    line += ")"
    if report_dir is not None:
        line += f"; report in {report_dir}"
    print(line, file=sys.stderr)


COMMANDS = {"compress": cmd_compress, "report": cmd_report}
