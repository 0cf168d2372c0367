"""Generate examples/tiny_resnet.onnx, the model the README's first command optimizes.

It is shaped like a typical PyTorch export of a small residual CNN, with the
clutter exporters leave behind: Conv+BatchNormalization pairs, Identity and
inference Dropout nodes, a Cast to the same type, a Shape->Gather->Concat
chain computing the flatten shape at run time, and MatMul+Add instead of Gemm.
Weights are seeded random, so the file is reproducible:

    python examples/make_example.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).with_name("tiny_resnet.onnx")


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def conv_bn(x: str, name: str, cin: int, cout: int, k: int, stride: int, relu: bool) -> str:
        w = const(f"{name}.weight", (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32))
        nodes.append(helper.make_node("Conv", [x, w], [f"{name}.conv"], name=f"{name}/Conv",
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        bn = [const(f"{name}.bn.{p}", v.astype(np.float32)) for p, v in (
            ("scale", rng.uniform(0.5, 1.5, cout)), ("bias", rng.normal(0, 0.1, cout)),
            ("mean", rng.normal(0, 0.1, cout)), ("var", rng.uniform(0.5, 1.5, cout)))]
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.conv", *bn], [f"{name}.bn"],
                                      name=f"{name}/BatchNormalization", epsilon=1e-5))
        if not relu:
            return f"{name}.bn"
        nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.relu"], name=f"{name}/Relu"))
        return f"{name}.relu"

    x = conv_bn("input", "stem", 3, 16, 3, 2, True)
    for i, (cin, cout, stride) in enumerate([(16, 16, 1), (16, 32, 2), (32, 32, 1)]):
        name = f"layer{i}"
        y = conv_bn(x, f"{name}.0", cin, cout, 3, stride, True)
        y = conv_bn(y, f"{name}.1", cout, cout, 3, 1, False)
        skip = x if (cin == cout and stride == 1) else conv_bn(x, f"{name}.down", cin, cout, 1, stride, False)
        nodes.append(helper.make_node("Identity", [skip], [f"{name}.skip"], name=f"{name}/Identity"))
        nodes.append(helper.make_node("Add", [y, f"{name}.skip"], [f"{name}.add"], name=f"{name}/Add"))
        nodes.append(helper.make_node("Relu", [f"{name}.add"], [f"{name}.out"], name=f"{name}/Relu"))
        x = f"{name}.out"

    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool/GlobalAveragePool"))
    # Flatten the exporter way: shape computed at run time from Shape/Gather.
    nodes += [
        helper.make_node("Shape", ["pool"], ["pool.shape"], name="flatten/Shape"),
        helper.make_node("Gather", ["pool.shape", const("zero", np.array(0, np.int64))], ["batch"],
                         name="flatten/Gather", axis=0),
        helper.make_node("Unsqueeze", ["batch", const("axes0", np.array([0], np.int64))], ["batch1"],
                         name="flatten/Unsqueeze"),
        helper.make_node("Concat", ["batch1", const("minus1", np.array([-1], np.int64))], ["flat.shape"],
                         name="flatten/Concat", axis=0),
        helper.make_node("Reshape", ["pool", "flat.shape"], ["flat"], name="flatten/Reshape"),
        helper.make_node("Dropout", ["flat"], ["drop"], name="head/Dropout"),
        helper.make_node("Cast", ["drop"], ["drop.f32"], name="head/Cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["drop.f32", const("fc.weight", (rng.standard_normal((32, 10)) * 0.2).astype(np.float32))],
                         ["fc.mm"], name="fc/MatMul"),
        helper.make_node("Add", ["fc.mm", const("fc.bias", rng.normal(0, 0.1, 10).astype(np.float32))], ["logits"],
                         name="fc/Add"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_resnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="graphopt-example")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    onnx.save(build(), OUT)
    print(f"wrote {OUT}")
