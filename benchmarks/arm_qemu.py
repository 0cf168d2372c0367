"""aarch64 TVM artifacts run under qemu-user, checked against onnxruntime.

Each model is compiled on this (x86-64) machine with ``graphopt compile
--target aarch64`` (TVM, linked by aarch64-linux-gnu-gcc, else zig cc), then run
by the aarch64 TVM runtime in an arm64 Debian userland under ``qemu-aarch64``
(tests/aarch64_guest.py: the userland, its set-up, running artifacts in it;
shared with the tests).  The outputs come back as a .npz and are compared
with onnxruntime on the host on the same inputs (``graphopt.runtime.
relative_error``, worst output; goal <= 1e-4 in fp32).

Light models get seeded random weights first (their shipped weights are
ConstantOfShape fills: ``light_weights.randomize_light``); PP-OCR models
run at their pinned shapes on rendered text.  The qemu time is the median of
``--runs`` emulated runs after one warm-up: a check that the run finishes, not
a speed figure for any Arm CPU.

``--int8`` quantizes each model first as a user does (``graphopt opt -p
simplify,quantize-static --calib random:16``) and compiles the QDQ model for
``--target`` (default ``aarch64-dotprod``, so the int8 convolutions run on
``sdot``; the JSON of an i8mm CPU gets ``usdot``).  Integer kernels round
where onnxruntime's QDQ reference does, so the check is agreement with it
(cosine >= 0.999, worst output) and fidelity to the fp32 model next to
onnxruntime's own.

    python benchmarks/arm_qemu.py [--models squeezenet,resnet50,ppocr_cls,ppocr_rec] [--runs 2]
                                  [--int8] [--target PRESET|JSON] [--setup-only] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # the guest harness, shared with the tests

import models  # noqa: E402
from aarch64_guest import (  # noqa: E402
    GuestRPCServer, SetupError, compile_aarch64, ensure_root, ensure_tools, run_artifact, run_artifact_rpc,
)

GOAL = 1e-4
INT8_GOAL = 0.999  # cosine to onnxruntime on the same QDQ model
DOTPROD = "aarch64-dotprod"
DEFAULT_MODELS = "squeezenet,resnet50,ppocr_cls,ppocr_rec"


def prepare(name: str, path: Path, tmp: Path) -> Path:
    """The model file to compile: light models with seeded random weights, others as shipped."""
    if name in models.light_models():
        import onnx
        from light_weights import randomize_light

        dst = tmp / f"{name}_random.onnx"
        onnx.save(randomize_light(path), str(dst))
        return dst
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated names (default {DEFAULT_MODELS})")
    ap.add_argument("--runs", type=int, default=2, help="emulated runs after one warm-up (median reported)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per compile and per guest run")
    ap.add_argument("--via", choices=["script", "rpc"], default="script",
                    help="script: a Python script in the guest loads the library; rpc: a TVM RPC server in the "
                         "guest, driven from this host with tvm.rpc (upload, load_module, relax VM)")
    ap.add_argument("--int8", action="store_true", help="quantize-static each model and check the QDQ artifact")
    ap.add_argument("--target", help=f"aarch64 target: a preset or TVM target JSON (default: aarch64; "
                                     f"with --int8 {DOTPROD})")
    ap.add_argument("--setup-only", action="store_true", help="set up qemu and the arm64 root, then stop")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    if platform.machine() not in ("x86_64", "AMD64"):
        print(f"note: host is {platform.machine()}; the aarch64 artifacts are still run under qemu", file=sys.stderr)
    try:
        qemu = ensure_tools()
        root = ensure_root(qemu)
    except SetupError as exc:
        print(f"arm_qemu: cannot run aarch64 artifacts here: {exc}", file=sys.stderr)
        return 2
    qemu_version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    print(f"qemu: {qemu} ({qemu_version}); arm64 root: {root}", file=sys.stderr, flush=True)
    if args.setup_only:
        return 0

    from graphopt.runtime import relative_error

    server = None
    if args.via == "rpc":
        try:
            server = GuestRPCServer(qemu, root)
        except RuntimeError as exc:
            print(f"arm_qemu: {exc}", file=sys.stderr)
            return 2
        print(f"TVM RPC server under qemu on 127.0.0.1:{server.port}", file=sys.stderr, flush=True)
    target = args.target or (DOTPROD if args.int8 else "aarch64")
    rows = []
    with tempfile.TemporaryDirectory(prefix="arm-qemu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for name, src in models.select(args.models).items():
            row: dict = {"model": name}
            path = prepare(name, src, tmp)
            feed = models.task_inputs(name, src)
            fp32 = None
            if args.int8:
                fp32 = models.run_onnxruntime(path, feed)
                path = models.quantize_static(path, name, tmp / f"{name}.qdq.onnx")
            out = tmp / f"{name}_aarch64"
            row.update(compile_aarch64(path, out, models.shape_flags(name, src), args.timeout, target))
            if "error" not in row:
                want_list = models.run_onnxruntime(path, feed)
                manifest = json.loads((out / "manifest.json").read_text())
                want = dict(zip([o["name"] for o in manifest["outputs"]], want_list))
                try:
                    if server is not None:
                        got, report = run_artifact_rpc(server, out, feed, args.runs, args.timeout)
                    else:
                        got, report = run_artifact(qemu, root, out, feed, args.runs, args.timeout)
                except Exception as exc:  # one failed model is a row, not the end of the run
                    row["error"] = str(exc)[:300]
                else:
                    row["rel_err"] = max(relative_error(got[k], want[k]) for k in want)
                    if fp32 is not None:
                        row["cosine_ort"] = models.worst_cosine([got[k] for k in want], list(want.values()))
                        row["fp32_cosine"] = [models.worst_cosine(list(want.values()), fp32),
                                              models.worst_cosine([got[k] for k in want], fp32)]
                        row["int8"] = manifest.get("int8", {}).get("rewritten")
                    row["qemu_s"] = statistics.median(report["seconds"]) if report["seconds"] else None
                    row["guest"] = {k: report[k] for k in ("machine", "tvm", "runtime_only")}
                    row["via"] = args.via
                    row["library_bytes"] = (out / manifest["files"]["library"]).stat().st_size
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if server is not None:
        server.close()

    if args.int8:
        return _int8_table(rows, target, args.json)
    print("| model | compile s (host) | guest | rel. error vs onnxruntime | <= 1e-4 | qemu run s (emulated) |")
    print("| --- | ---: | --- | ---: | --- | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | - | - | - | no: {r['error']} | - |")
            continue
        ok = "yes" if r["rel_err"] <= GOAL else "no"
        print(f"| {r['model']} | {r['compile_s']:.1f} | {r['guest']['machine']}, TVM {r['guest']['tvm']} | "
              f"{r['rel_err']:.1e} | {ok} | {r['qemu_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all("error" not in r and r["rel_err"] <= GOAL for r in rows) else 1


def _int8_table(rows: list[dict], target: str, json_out: str | None) -> int:
    print(f"target: {target}")
    print("| model | compile s (host) | integer kernels | cosine to onnxruntime (same QDQ) | >= 0.999 "
          "| cosine to fp32: ORT / TVM aarch64 | qemu run s (emulated) |")
    print("| --- | ---: | --- | ---: | --- | --- | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | - | - | - | no: {r['error']} | - | - |")
            continue
        ok = "yes" if r["cosine_ort"] >= INT8_GOAL else "no"
        ort, tvm_ = r["fp32_cosine"]
        print(f"| {r['model']} | {r['compile_s']:.1f} | {r['int8']} | {r['cosine_ort']:.6f} | {ok} | "
              f"{ort:.5f} / {tvm_:.5f} | {r['qemu_s']:.2f} |")
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all("error" not in r and r["cosine_ort"] >= INT8_GOAL for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
