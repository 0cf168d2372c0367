"""The README's examples are code users copy: they must run as written."""
from __future__ import annotations

import re
from pathlib import Path

import onnx

import graphopt
from graphopt import registry

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_resnet.onnx"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_writing_a_pass_example_registers_and_runs():
    block = next(b for b in python_blocks() if "register_pass" in b)
    registry._PASSES.pop("name-nodes", None)
    try:
        exec(compile(block, "README.md", "exec"), {})
        proto = onnx.helper.make_model(
            onnx.helper.make_graph(
                [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                [onnx.helper.make_tensor_value_info("x", 1, [2])], [onnx.helper.make_tensor_value_info("y", 1, [2])],
            )
        )
        model = graphopt.Model.from_proto(proto)
        result = graphopt.optimize(model, "name-nodes{prefix=n_}")
        assert result.changed and model.graph.nodes[0].name == "n_Relu_0"
        assert not graphopt.optimize(model, "name-nodes").changed
    finally:
        registry._PASSES.pop("name-nodes", None)


def test_api_example_runs(tmp_path, monkeypatch):
    block = next(b for b in python_blocks() if "graphopt.load(" in b)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.onnx").write_bytes(EXAMPLE.read_bytes())
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "model.opt.onnx").exists()


def test_documented_pipeline_is_the_registered_one():
    text = registry.get_pipeline("simplify")
    assert text in README.read_text()


def test_every_pass_is_documented_in_readme():
    body = README.read_text()
    for name in registry.passes():
        if name.startswith("test-"):
            continue
        assert f"`{name}`" in body, f"pass {name} missing from README"
