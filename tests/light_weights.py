"""onnx's ``light`` backend-test CNNs with seeded random weights.

Shared by tests and benchmarks (benchmarks put tests/ on ``sys.path`` and import
this module), so there is one definition of the models and of their weights.
It imports nothing from pytest or from the tests' conftest: importing it
registers no test passes.

As shipped, every weight of a light model is a ``ConstantOfShape`` fill (a few
KB per file), which makes quantization, pruning and fidelity figures degenerate;
:func:`randomize_light` gives each weight seeded values of a plausible scale.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def light_models() -> dict[str, Path]:
    """The light models, by name without the ``light_`` prefix (empty when this
    onnx wheel ships no backend test data)."""
    return {p.stem.removeprefix("light_"): p for p in sorted(LIGHT_DIR.glob("light_*.onnx"))}


def _role(proto: onnx.ModelProto, tensor: str) -> tuple[str, int, onnx.NodeProto | None]:
    """(op, input index, node) of the real consumer of a weight, looking through
    Unsqueeze/Reshape/Identity."""
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in proto.graph.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    seen = 0
    while seen < 8:
        uses = consumers.get(tensor, [])
        if len(uses) != 1:
            return ("?", -1, None)
        node, idx = uses[0]
        if node.op_type in ("Unsqueeze", "Reshape", "Identity") and idx == 0:
            tensor = node.output[0]
            seen += 1
            continue
        return (node.op_type, idx, node)
    return ("?", -1, None)


def randomize_light(path: Path, seed: int = 0) -> onnx.ModelProto:
    """A light model with every ConstantOfShape weight replaced by a seeded random
    initializer of the same shape, chosen by what consumes it:

    * Conv weight: He normal, std sqrt(2 / fan_in), fan_in = C_in/group * kH * kW;
      Gemm weight: std sqrt(1 / fan_in); Conv/Gemm bias: N(0, 0.01^2);
    * BatchNormalization: scale U(0.5, 1.5), bias N(0, 0.1^2), mean N(0, 0.1^2),
      var U(0.5, 1.5); a BN written as Mul/Add of Unsqueezed constants: Mul
      U(0.5, 1.5), Add N(0, 0.1^2);
    * anything else: N(0, 0.1^2).

    A final Softmax is removed so the output is logits (cosine and top-1 on a
    softmax of random weights would be trivially close to 1).  Everything else is
    the model as shipped, except that initializers are no longer listed as graph
    inputs (IR version raised to 4), so every tool treats them as constants, and
    the model is converted from opset 9 to 13 (onnx's version converter): the
    per-channel QDQ both quantizers write needs 13, onnxruntime's flow converts
    anyway, and graphopt's quantize-static leaves models below opset 10 alone."""
    proto = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in proto.graph.initializer}
    consts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant"}
    keep, new_inits = [], []
    for node in proto.graph.node:
        if node.op_type != "ConstantOfShape":
            keep.append(node)
            continue
        src = node.input[0]
        shape = (numpy_helper.to_array(inits[src]) if src in inits
                 else numpy_helper.to_array(consts[src].attribute[0].t)).astype(int).tolist()
        op, idx, consumer = _role(proto, node.output[0])
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0]) if shape else 1
        if op == "Conv" and idx == 1:
            arr = rng.standard_normal(shape) * math.sqrt(2.0 / max(fan_in, 1))
        elif op == "Gemm" and idx == 1:
            trans_b = any(a.name == "transB" and a.i for a in consumer.attribute)
            k = shape[1] if trans_b and len(shape) == 2 else shape[0] if len(shape) == 2 else fan_in
            arr = rng.standard_normal(shape) * math.sqrt(1.0 / max(k, 1))
        elif op in ("Conv", "Gemm") and idx == 2:
            arr = rng.standard_normal(shape) * 0.01
        elif (op == "BatchNormalization" and idx in (1, 4)) or op == "Mul":
            arr = rng.uniform(0.5, 1.5, shape)
        else:  # BN bias/mean, Add shift, others
            arr = rng.standard_normal(shape) * 0.1
        new_inits.append(numpy_helper.from_array(np.asarray(arr, np.float32).reshape(shape), node.output[0]))
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    proto.graph.initializer.extend(new_inits)
    last = proto.graph.node[-1]
    if last.op_type == "Softmax" and last.output[0] == proto.graph.output[0].name:
        out = proto.graph.output[0]
        proto.graph.node.pop()
        for n in proto.graph.node:
            for i, name in enumerate(n.output):
                if name == last.input[0]:
                    n.output[i] = out.name
    # drop the shape initializers nothing reads any more (and their graph inputs, if listed)
    used = {i for n in proto.graph.node for i in n.input}
    dropped = {t.name for t in proto.graph.initializer if t.name not in used}
    live = [t for t in proto.graph.initializer if t.name not in dropped]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(live)
    init_names = {t.name for t in live}
    inputs = [vi for vi in proto.graph.input if vi.name not in dropped and vi.name not in init_names]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    proto.ir_version = max(proto.ir_version, 4)  # IR 3 wants every initializer listed as an input
    proto = onnx.version_converter.convert_version(proto, 13)
    onnx.checker.check_model(proto)
    return proto
