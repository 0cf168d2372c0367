"""The manager's structural verifier (graphopt/verify.py): after every pass that
reports a change the graph keeps its input and output names, has no dangling
edge and stays in topological order; under the tests a pass that reports no
change must leave the model as it was."""
from __future__ import annotations

import onnx.parser
import onnx_graphsurgeon as gs
import pytest

import graphopt
from graphopt import registry
from graphopt.errors import PassError
from graphopt.ir import Model
from graphopt.manager import PassManager
from graphopt.pass_base import Pass, PassResult
from graphopt.pipeline import parse
from graphopt.verify import first_difference, snapshot, structure_errors

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y) {
    r = Relu(x)
    y = Neg(r)
}
"""


def model() -> Model:
    return Model.from_proto(onnx.parser.parse_model(TEXT))


def _dangle(m: Model) -> None:
    relu = m.graph.nodes[0]
    relu.inputs[0] = gs.Variable("nowhere", dtype=relu.inputs[0].dtype)


def _swap(m: Model) -> None:
    m.graph.nodes.reverse()


def _rename_output(m: Model) -> None:
    m.graph.outputs[0].name = "z"


def _drop_relu_silently(m: Model) -> None:
    relu, neg = m.graph.nodes
    neg.inputs[0] = relu.inputs[0]
    m.graph.nodes.remove(relu)


@pytest.fixture
def run_edit():
    names = []

    def run(edit, changed: bool = True, check_unchanged: bool = False):
        name = f"test-verify-{len(names)}"
        names.append(name)
        graphopt.register_pass(name)(type("Edit", (Pass,), {
            "run": lambda self, m, ctx: (edit(m), PassResult(changed))[1]}))
        m = model()
        PassManager(parse(name), check_unchanged=check_unchanged).run(m)
        return m

    yield run
    for name in names:
        registry._PASSES.pop(name, None)


@pytest.mark.parametrize("edit, message", [
    (_dangle, "reads 'nowhere' which nothing produces (a dangling edge)"),
    (_swap, "reads 'r' before it is produced (nodes out of topological order)"),
    (_rename_output, "graph outputs changed from ['y'] to ['z']"),
])
def test_a_pass_that_breaks_the_graph_is_named(run_edit, edit, message):
    with pytest.raises(PassError, match=r"pass 'test-verify-0' left a broken graph: .*") as info:
        run_edit(edit)
    assert message in str(info.value)


def test_a_correct_rewrite_passes_the_verifier(run_edit):
    m = run_edit(_drop_relu_silently)
    assert structure_errors(m) == [] and [n.op for n in m.graph.nodes] == ["Neg"]


def test_changed_false_that_changed_the_model_is_caught(run_edit):
    with pytest.raises(PassError, match=r"reported no change but changed node 0 \('' Relu became '' Neg\)"):
        run_edit(_drop_relu_silently, changed=False, check_unchanged=True)
    run_edit(_drop_relu_silently, changed=False, check_unchanged=False)  # off: trusted, as before


def test_snapshot_compares_values_not_encodings():
    a, b = model(), model()
    assert snapshot(a) == snapshot(b)
    _swap(b)
    assert first_difference(snapshot(a), snapshot(b)) == "node 0 ('' Relu became '' Neg)"
