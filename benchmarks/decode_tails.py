"""Decode tails in float (quantize-static's ``float-tails``, default on) on a
YOLOX-style detector: box regression decoded to pixels (``exp() * stride``
plus grid offsets) concatenated with sigmoid objectness and class scores in
one output, the layout that one quantization scale cannot carry.

The detector is built here as ONNX (seeded weights: a SiLU conv trunk to
stride 32, a head per stride 8/16/32, 20 classes, 256x256 input), quantized
as a user does (``graphopt opt -p simplify,quantize-static[{float-tails=false}]
--calib random:16``), and both files are run by onnxruntime against the fp32
model on 8 seeded N(0, 1) inputs: worst absolute error and worst cosine of
the box part (pixels) and the score part separately, and latency medians
(2 threads, spinning off, interleaved, 3 warm-up rounds dropped).

    python benchmarks/decode_tails.py
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def yolox_like(classes: int = 20, size: int = 256) -> onnx.ModelProto:
    """The detector: a SiLU conv trunk to stride 32 and a YOLOX-style head per stride 8/16/32."""
    rng = np.random.default_rng(0)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def conv(x: str, cin: int, cout: int, k: int, stride: int, name: str, silu: bool = True) -> str:
        w = const(name + "_w", (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32))
        b = const(name + "_b", (rng.standard_normal(cout) * 0.1).astype(np.float32))
        nodes.append(helper.make_node("Conv", [x, w, b], [name], pads=[k // 2] * 4, strides=[stride, stride], name=name))
        if not silu:
            return name
        nodes.append(helper.make_node("Sigmoid", [name], [name + "_sg"]))
        nodes.append(helper.make_node("Mul", [name, name + "_sg"], [name + "_a"]))
        return name + "_a"

    f8 = conv(conv(conv("images", 3, 16, 3, 2, "stem"), 16, 32, 3, 2, "c1"), 32, 48, 3, 2, "c2")
    f16 = conv(f8, 48, 64, 3, 2, "c3")
    f32 = conv(f16, 64, 96, 3, 2, "c4")
    outs = []
    for stride, feature, cin in ((8, f8, 48), (16, f16, 64), (32, f32, 96)):
        side = size // stride
        head = conv(feature, cin, 48, 3, 1, f"h{stride}")
        reg = conv(head, 48, 4, 1, 1, f"reg{stride}", silu=False)
        obj = conv(head, 48, 1, 1, 1, f"obj{stride}", silu=False)
        cls = conv(head, 48, classes, 1, 1, f"cls{stride}", silu=False)
        gy, gx = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
        grid = np.stack([gx, gy]).reshape(1, 2, side, side).astype(np.float32)
        n = f"d{stride}"
        nodes += [
            helper.make_node("Split", [reg, const(n + "_sp", np.array([2, 2], np.int64))], [n + "_xy", n + "_wh"], axis=1),
            helper.make_node("Add", [n + "_xy", const(n + "_grid", grid)], [n + "_xyg"]),
            helper.make_node("Mul", [n + "_xyg", const(n + "_s", np.array(float(stride), np.float32))], [n + "_xyp"]),
            helper.make_node("Exp", [n + "_wh"], [n + "_whe"]),
            helper.make_node("Mul", [n + "_whe", n + "_s"], [n + "_whp"]),
            helper.make_node("Sigmoid", [obj], [n + "_obj"]),
            helper.make_node("Sigmoid", [cls], [n + "_cls"]),
            helper.make_node("Concat", [n + "_xyp", n + "_whp", n + "_obj", n + "_cls"], [n + "_cat"], axis=1),
            helper.make_node("Reshape", [n + "_cat", const(n + "_shape", np.array([1, 5 + classes, -1], np.int64))],
                             [n + "_flat"]),
        ]
        outs.append(n + "_flat")
    nodes.append(helper.make_node("Concat", outs, ["cat"], axis=2))
    nodes.append(helper.make_node("Transpose", ["cat"], ["detections"], perm=[0, 2, 1]))
    graph = helper.make_graph(nodes, "yolox_like",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, None, 5 + classes])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def session(path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="graphopt-tails-") as tmp:
        src = str(Path(tmp) / "yolox_like.onnx")
        onnx.save(yolox_like(), src)
        variants = {}
        for name, opts in (("float-tails (default)", ""), ("float-tails=false", "{float-tails=false}")):
            out = str(Path(tmp) / f"q{len(variants)}.onnx")
            subprocess.run([sys.executable, "-m", "graphopt.cli", "opt", src, "-o", out, "-q", "-p",
                            "simplify,quantize-static" + opts, "--calib", "random:16"], check=True, cwd=ROOT)
            variants[name] = session(out)
        base = session(src)
        rng = np.random.default_rng(7)
        xs = [rng.standard_normal((1, 3, 256, 256)).astype(np.float32) for _ in range(8)]
        refs = [base.run(None, {"images": x})[0][0] for x in xs]
        print("| variant | boxes max abs err (px) | boxes worst cosine | scores max abs err | scores worst cosine |")
        print("|---|---|---|---|---|")
        for name, s in variants.items():
            got = [s.run(None, {"images": x})[0][0] for x in xs]
            box = max(float(np.abs(g[:, :4] - r[:, :4]).max()) for g, r in zip(got, refs))
            score = max(float(np.abs(g[:, 4:] - r[:, 4:]).max()) for g, r in zip(got, refs))
            bc = min(cosine(g[:, :4], r[:, :4]) for g, r in zip(got, refs))
            sc = min(cosine(g[:, 4:], r[:, 4:]) for g, r in zip(got, refs))
            print(f"| {name} | {box:.3f} | {bc:.5f} | {score:.4f} | {sc:.5f} |")
        runners = {"fp32": base, **variants}
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(25):
            for k, s in runners.items():
                t0 = time.perf_counter()
                s.run(None, {"images": xs[0]})
                times[k].append(time.perf_counter() - t0)
        print("latency ms:", {k: round(statistics.median(v[3:]) * 1e3, 2) for k, v in times.items()})


if __name__ == "__main__":
    main()
