"""The README's examples are code users copy: they must run as written."""
from __future__ import annotations

import re
from pathlib import Path

import onnx

import graphopt
from graphopt import registry, runtime

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


def test_api_example_runs(tmp_path, monkeypatch, capsys):
    """The Python API example on the bundled model: the file it writes is a
    simplified model (fewer nodes; BatchNormalization folded, Identity and
    Dropout gone) that a fresh onnxruntime session runs with the input model's
    outputs, within the pipeline's tolerance; what it prints is the written
    model's MACs and one line per pass run; nothing else is left in the folder
    (atomic save) and the input file is untouched."""
    block = next(b for b in python_blocks() if "graphopt.load(" in b)
    monkeypatch.chdir(tmp_path)
    original = EXAMPLE.read_bytes()
    (tmp_path / "model.onnx").write_bytes(original)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()

    written = tmp_path / "model.opt.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.opt.onnx"]
    assert (tmp_path / "model.onnx").read_bytes() == original
    before, after = onnx.load(str(EXAMPLE)), onnx.load(str(written))
    ops_before, ops_after = [n.op_type for n in before.graph.node], [n.op_type for n in after.graph.node]
    simplified_away = {"BatchNormalization", "Identity", "Dropout"}
    assert len(ops_after) < len(ops_before)
    assert simplified_away <= set(ops_before) and not simplified_away & set(ops_after)

    records = namespace["result"].records
    tolerance = max(registry.passes()[r.name].tolerance.relative for r in records)
    feeds = runtime.random_inputs(runtime.session(before), seed=0, shapes={"input": [2, 3, 64, 64]})
    want = runtime.run(runtime.session(before), feeds)
    got = runtime.run(runtime.session(written.read_bytes()), feeds)  # a fresh session on the file
    assert list(got) == list(want)
    for name in want:
        assert runtime.relative_error(got[name], want[name]) <= tolerance, name

    assert printed[0] == str(graphopt.inspect(str(written))["macs"]) and int(printed[0]) > 0
    assert [line.split()[:2] for line in printed[1:]] == [[r.name, str(r.changed)] for r in records]
    assert {r.name for r in records} == {p.name for p in graphopt.parse("simplify").passes()}


def test_documented_pipeline_is_the_registered_one():
    text = registry.get_pipeline("simplify")
    assert text in README.read_text()


def test_every_pass_is_documented_in_readme():
    body = README.read_text()
    for name in registry.passes():
        if name.startswith("test-"):
            continue
        assert f"`{name}`" in body, f"pass {name} missing from README"
