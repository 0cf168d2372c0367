"""Peak memory of ``graphopt opt`` on a model whose weights exceed 2 GB.

graphopt promises that external weights stay on disk: loading binds them
lazily and saving streams them into the new data file.  This benchmark holds
it to that: it generates a ~2.2 GB MLP (MatMul+Add, Gemm and MatMul layers,
float32, external data) without ever holding more than one layer in memory,
runs the CLI on it as a subprocess, and reports the child's peak RSS as a
fraction of the weight bytes.  Goal: < 0.5.

It then checks the output: it loads without its data, every external tensor
points inside an existing data file with the right length, and (unless
``--no-ort``) onnxruntime gives the same outputs for original and output.

    python benchmarks/large_model_memory.py [--json OUT] [--layers 33] [--hidden 4096]
        [-p PIPELINE] [--per-pass] [--keep] [--no-ort]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

GOAL_RATIO = 0.5
TOLERANCE = 1e-4
SIMPLIFY_PASSES = ["infer-shapes", "fold-constants", "eliminate-identity", "fuse-batchnorm", "fuse-gemm", "cse",
                   "eliminate-dead-code"]


# ----------------------------------------------------------------------------------
# Generating the model
# ----------------------------------------------------------------------------------
class ExternalWriter:
    """Appends tensors to one external-data file and returns TensorProtos that
    reference them, so weights go straight from numpy to disk, one at a time."""

    def __init__(self, folder: Path, location: str):
        self.location = location
        self.file = open(folder / location, "wb")
        self.bytes = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        pad = (-self.file.tell()) % 64
        self.file.write(b"\0" * pad)
        offset = self.file.tell()
        data = np.ascontiguousarray(array).tobytes()
        self.file.write(data)
        self.bytes += len(data)
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(len(data)))):
            t.external_data.add(key=key, value=value)
        return t

    def close(self) -> None:
        self.file.close()


def generate(folder: Path, layers: int, hidden: int, seed: int = 0) -> tuple[Path, int]:
    """Write ``big.onnx`` + ``big.onnx.data``; returns the path and the weight bytes.

    Layer ``i`` cycles through three shapes graphopt's passes care about:
    MatMul+Add (fuse-gemm can make it a Gemm), Gemm with transB, and a MatMul
    followed by an Identity (eliminate-identity).  Each ends in a Relu; He-scaled
    weights keep activations O(1) through the chain.  A small constant
    subgraph (Concat of two Constants) feeds the final Reshape, for folding.
    """
    rng = np.random.default_rng(seed)
    path = folder / "big.onnx"
    writer = ExternalWriter(folder, "big.onnx.data")
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    scale = np.float32(np.sqrt(2.0 / hidden))
    h = "x"
    try:
        for i in range(layers):
            w = rng.standard_normal((hidden, hidden), dtype=np.float32)
            w *= scale
            b = (rng.standard_normal(hidden, dtype=np.float32) * np.float32(0.01))
            inits += [writer.add(f"w{i}", w), writer.add(f"b{i}", b)]
            del w
            kind = i % 3
            if kind == 0:
                nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"]),
                          helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"pre{i}"])]
            elif kind == 1:
                nodes.append(helper.make_node("Gemm", [h, f"w{i}", f"b{i}"], [f"pre{i}"], transB=1))
            else:
                nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"]),
                          helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"]),
                          helper.make_node("Identity", [f"add{i}"], [f"pre{i}"])]
            nodes.append(helper.make_node("Relu", [f"pre{i}"], [f"h{i}"]))
            h = f"h{i}"
    finally:
        writer.close()
    nodes += [
        helper.make_node("Constant", [], ["c_batch"], value=helper.make_tensor("", TensorProto.INT64, [1], [-1])),
        helper.make_node("Constant", [], ["c_rest"], value=helper.make_tensor("", TensorProto.INT64, [2], [8, hidden // 8])),
        helper.make_node("Concat", ["c_batch", "c_rest"], ["shape"], axis=0),
        helper.make_node("Reshape", [h, "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "big_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, hidden // 8])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="graphopt-bench")
    model.ir_version = 8
    # The protos only reference the data file, so this writes a few KB.
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))
    return path, writer.bytes


# ----------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------
# A tiny launcher: fork (not vfork) + exec from a small process, then wait4.
# Measuring the child straight from this process would be wrong: Linux records
# the pre-exec address space's high-water mark in the child's ru_maxrss, and
# with vfork that is this (large) process's RSS.
_LAUNCHER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "sys.stderr.write(f'\\nPEAK_RSS_KIB={usage.ru_maxrss}\\n')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_peak_rss(cmd: list[str]) -> tuple[int, float, int, str]:
    """Run ``cmd``; returns (exit code, seconds, peak RSS in bytes, stderr tail)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    peak = next((int(ln.split("=", 1)[1]) * 1024 for ln in reversed(lines) if ln.startswith("PEAK_RSS_KIB=")), 0)
    tail = [ln for ln in lines if ln.strip() and not ln.startswith("PEAK_RSS_KIB=")][-3:]
    return proc.returncode, seconds, peak, "\n".join(tail)


def graphopt_cmd(src: Path, dst: Path, pipeline: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "graphopt.cli", "opt", str(src), "-o", str(dst)]
    return cmd + (["-p", pipeline] if pipeline else [])


def check_external(path: Path) -> tuple[int, int, list[str]]:
    """Nodes, external-data bytes referenced, and problems with the saved model."""
    problems: list[str] = []
    proto = onnx.load(str(path), load_external_data=False)
    referenced = 0
    sizes: dict[str, int] = {}
    from graphopt.ir import _DTYPE_BITS, iter_tensor_protos  # the same size table the loader uses

    for t in iter_tensor_protos(proto.graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        file = path.parent / info.get("location", "")
        if info.get("location", "") not in sizes:
            sizes[info.get("location", "")] = file.stat().st_size if file.is_file() else -1
        size = sizes[info.get("location", "")]
        want = int(np.prod(t.dims, dtype=np.int64)) * _DTYPE_BITS.get(t.data_type, 0) // 8
        offset, length = int(info.get("offset", 0)), int(info.get("length", want))
        if size < 0:
            problems.append(f"{t.name}: data file '{info.get('location')}' missing")
        elif length != want or offset + length > size:
            problems.append(f"{t.name}: offset {offset} length {length}, want {want} bytes in a {size}-byte file")
        referenced += length
    return len(proto.graph.node), referenced, problems


def compare_ort(original: Path, optimized: Path, hidden: int) -> float:
    """Max relative error of optimized vs original in onnxruntime, one model at a
    time (each session holds the full weights)."""
    import gc

    import onnxruntime as ort

    from graphopt.runtime import relative_error

    x = np.random.default_rng(1).standard_normal((2, hidden), dtype=np.float32)
    outs = []
    for path in (original, optimized):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x}))
        del sess
        gc.collect()
    return max(relative_error(a, b) for a, b in zip(outs[1], outs[0]))


@dataclass
class Result:
    layers: int
    hidden: int
    weight_bytes: int
    pipeline: str
    exit_code: int
    seconds: float
    peak_rss_bytes: int
    ratio: float
    nodes_before: int = 0
    nodes_after: int = 0
    output_external_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    rel_error: float | None = None
    per_pass: dict[str, dict[str, float]] = field(default_factory=dict)
    ok: bool = False
    error: str = ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the result as JSON here")
    ap.add_argument("--layers", type=int, default=33, help="layers of hidden x hidden float32 (default 33)")
    ap.add_argument("--hidden", type=int, default=4096, help="layer width (default 4096: 64 MiB per layer)")
    ap.add_argument("-p", "--pipeline", help="graphopt pipeline (default: graphopt's default, simplify)")
    ap.add_argument("--per-pass", action="store_true", help="also measure each simplify pass alone, to find a culprit")
    ap.add_argument("--no-ort", action="store_true", help="skip the onnxruntime comparison (needs ~2x weights of RAM)")
    ap.add_argument("--tmp", default=None, help="folder for the generated files (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="graphopt-bigmodel-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        src, weight_bytes = generate(work, args.layers, args.hidden)
        print(f"generated {src} ({weight_bytes / 2**30:.2f} GiB of weights) in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr, flush=True)
        (work / "out").mkdir()
        dst = work / "out" / "big.onnx"
        rc, seconds, peak, err = run_peak_rss(graphopt_cmd(src, dst, args.pipeline))
        res = Result(args.layers, args.hidden, weight_bytes, args.pipeline or "default", rc, seconds, peak,
                     peak / weight_bytes, error=err if rc else "")
        res.nodes_before = len(onnx.load(str(src), load_external_data=False).graph.node)
        if rc == 0:
            res.nodes_after, res.output_external_bytes, res.problems = check_external(dst)
            if not res.problems and not args.no_ort:
                try:
                    res.rel_error = compare_ort(src, dst, args.hidden)
                except Exception as exc:  # onnxruntime rejected the output: a graphopt bug
                    res.error = f"onnxruntime: {str(exc).strip().splitlines()[-1][-300:]}"
        if args.per_pass:
            for name in SIMPLIFY_PASSES:
                one = work / "out" / f"{name}.onnx"
                prc, psec, ppeak, perr = run_peak_rss(graphopt_cmd(src, one, name))
                res.per_pass[name] = {"exit_code": prc, "seconds": round(psec, 2), "peak_rss_bytes": ppeak,
                                      "ratio": round(ppeak / weight_bytes, 4)}
                for f in (one, one.with_name(one.name + ".data")):
                    f.unlink(missing_ok=True)
                print(f"  {name}: rc={prc} peak {ppeak / 2**20:.0f} MiB{' ' + perr if prc else ''}",
                      file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    res.ok = (rc == 0 and not res.error and res.ratio < GOAL_RATIO and not res.problems
              and (res.rel_error is None or res.rel_error <= TOLERANCE))
    print(f"weights        {weight_bytes / 2**30:.2f} GiB ({args.layers} x {args.hidden}x{args.hidden} float32)")
    print(f"graphopt opt   exit {rc}, {seconds:.1f}s, nodes {res.nodes_before} -> {res.nodes_after}"
          + (f"  ERROR: {res.error}" if rc else ""))
    print(f"peak RSS       {peak / 2**20:.0f} MiB = {res.ratio:.3f} x weight bytes (goal < {GOAL_RATIO})")
    print(f"output data    {res.output_external_bytes / 2**30:.2f} GiB referenced; "
          + ("all external tensors in range" if not res.problems else f"{len(res.problems)} PROBLEMS: {res.problems[:3]}"))
    print("onnxruntime    " + (f"relative error {res.rel_error:.2e}" if res.rel_error is not None
                               else res.error if res.error.startswith("onnxruntime") else "skipped"))
    for name, m in res.per_pass.items():
        print(f"  -p {name:20s} peak {m['peak_rss_bytes'] / 2**20:7.0f} MiB = {m['ratio']:.3f} x weights"
              + (f" (exit {m['exit_code']})" if m["exit_code"] else ""))
    print("PASS" if res.ok else "FAIL")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(res), indent=2) + "\n")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
