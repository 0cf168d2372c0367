"""The IR: load/save round trips, external data, and the load-time safety checks.

A round trip (``graphopt.load`` then ``graphopt.save`` with no pass in between)
must keep everything a model says about itself, and the saved model must run
in onnxruntime with the same outputs.  The input model and its data file are
never touched.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
import graphopt.cli
from graphopt.errors import ModelError, UsageError
from graphopt.ir import ExternalValues, Model

from conftest import LIGHT_MODELS, assert_same_outputs, make_model, ort_run, vi


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Hashes of every file in a folder (to prove nothing was modified or added)."""
    return {p.name: sha(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


# -- models ---------------------------------------------------------------------------
def rich_model() -> onnx.ModelProto:
    """Custom domains, a model-local function, metadata and doc strings."""
    # my.domain::Swish is implemented by a model-local function: x * sigmoid(x)
    swish = helper.make_function(
        "my.domain",
        "Swish",
        ["X"],
        ["Y"],
        [helper.make_node("Sigmoid", ["X"], ["S"]), helper.make_node("Mul", ["X", "S"], ["Y"])],
        opset_imports=[helper.make_opsetid("", 17)],
        doc_string="x * sigmoid(x)",
    )
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="matmul"),
        helper.make_node("Gelu", ["mm"], ["g"], name="gelu", domain="com.microsoft"),
        helper.make_node("Swish", ["g"], ["y"], name="swish", domain="my.domain"),
        helper.make_node("Relu", ["x"], ["z"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "rich",
        [vi("x", [2, 8])],
        [vi("y", [2, 8]), vi("z", [2, 8])],
        [numpy_helper.from_array(w, "w")],
        doc_string="graph doc",
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 17),
            helper.make_opsetid("com.microsoft", 1),
            helper.make_opsetid("my.domain", 1),
        ],
        functions=[swish],
        producer_name="test-exporter",
        producer_version="9.9.9",
        doc_string="model doc",
        domain="org.example",
        model_version=42,
    )
    model.ir_version = 8
    helper.set_model_props(model, {"author": "me", "license": "MIT", "zz": "last"})
    onnx.checker.check_model(model)
    return model


def ir3_model() -> onnx.ModelProto:
    """An old (IR v3) exporter's model: every initializer is also a graph input."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.ones(4, dtype=np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ir3",
        [vi("x", [2, 3]), vi("w", [3, 4]), vi("b", [4])],
        [vi("y", [2, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model


def weighted_model(n: int = 64) -> onnx.ModelProto:
    """Two big weights (external-data candidates) and one small one."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((n, n)).astype(np.float32)
    w2 = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n,)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("Add", ["a", "b"], ["ab"], name="add"),
        helper.make_node("Relu", ["ab"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    return make_model(nodes, [vi("x", [1, n])], [vi("y", [1, n])], {"w1": w1, "w2": w2, "b": b})


def save_external(proto: onnx.ModelProto, path: Path, location: str = "weights.bin") -> Path:
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    onnx.save_model(
        proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
        size_threshold=1024,
    )
    return path


def round_trip(tmp_path: Path, proto: onnx.ModelProto, **save_kwargs) -> onnx.ModelProto:
    src = tmp_path / "in.onnx"
    onnx.save(proto, str(src))
    out = tmp_path / "out.onnx"
    graphopt.save(graphopt.load(src), out, **save_kwargs)
    return onnx.load(str(out))


# -- round trips ----------------------------------------------------------------------
def test_round_trip_keeps_model_level_fields(tmp_path):
    proto = rich_model()
    got = round_trip(tmp_path, proto)
    onnx.checker.check_model(got)
    assert {o.domain: o.version for o in got.opset_import} == {"": 17, "com.microsoft": 1, "my.domain": 1}
    assert [(p.key, p.value) for p in got.metadata_props] == [(p.key, p.value) for p in proto.metadata_props]
    assert got.doc_string == "model doc"
    assert got.graph.doc_string == "graph doc"
    assert (got.producer_name, got.producer_version) == ("test-exporter", "9.9.9")
    assert (got.domain, got.model_version) == ("org.example", 42)
    assert got.ir_version == 8
    assert [i.name for i in got.graph.input] == ["x"]
    assert [o.name for o in got.graph.output] == ["y", "z"]


def test_saved_model_annotates_only_what_the_source_annotated(tmp_path):
    """Inferred shapes stay graphopt's: a written model keeps the source's
    value_info (refined) and gains none, unless --write-shapes asks for all."""
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
         helper.make_node("Abs", ["b"], ["y"])],
        [vi("x", ["n", 4])], [vi("y", ["n", 4])],
    )
    proto.graph.value_info.append(vi("a", None))
    src = tmp_path / "in.onnx"
    onnx.save(proto, str(src))
    model = graphopt.load(src)
    graphopt.optimize(model, "infer-shapes")
    graphopt.save(model, tmp_path / "plain.onnx")
    graphopt.save(model, tmp_path / "all.onnx", write_shapes=True)
    plain = onnx.load(str(tmp_path / "plain.onnx"))
    every = onnx.load(str(tmp_path / "all.onnx"))
    assert [v.name for v in plain.graph.value_info] == ["a"]
    assert [d.dim_param or d.dim_value for d in plain.graph.value_info[0].type.tensor_type.shape.dim] == ["n", 4]
    assert sorted(v.name for v in every.graph.value_info) == ["a", "b"]
    assert_same_outputs(proto, plain, rel=0)


def test_round_trip_keeps_model_local_functions(tmp_path):
    proto = rich_model()
    got = round_trip(tmp_path, proto)
    assert [(f.domain, f.name) for f in got.functions] == [("my.domain", "Swish")]
    fn = got.functions[0]
    assert [n.op_type for n in fn.node] == ["Sigmoid", "Mul"]
    assert list(fn.input) == ["X"] and list(fn.output) == ["Y"]
    assert {(n.domain, n.op_type) for n in got.graph.node} >= {("my.domain", "Swish"), ("com.microsoft", "Gelu")}
    assert_same_outputs(proto, got, rel=0)


def test_ir3_model_is_read_as_onnxruntime_reads_it(tmp_path):
    """Before IR 4 initializers had to be listed as inputs, yet onnxruntime
    treats them as constants that cannot be fed: loading raises the model to
    IR 4 with the initializers unlisted, and says so."""
    proto = ir3_model()
    src = tmp_path / "in.onnx"
    onnx.save(proto, str(src))
    model = graphopt.load(src)
    assert len(model.info.load_notes) == 1 and "IR version 3 raised to 4" in model.info.load_notes[0]
    out = tmp_path / "out.onnx"
    graphopt.save(model, out)
    got = onnx.load(str(out))
    assert got.ir_version == 4
    assert [i.name for i in got.graph.input] == ["x"]
    assert sorted(t.name for t in got.graph.initializer) == ["b", "w"]
    onnx.checker.check_model(got)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    assert_same_outputs(proto, got, rel=0, feeds=feeds)


def test_ir3_model_with_unlisted_initializers_is_accepted(tmp_path):
    """onnxruntime runs an IR 3 model whose initializers are not graph inputs
    (the checker refuses it): graphopt takes it too, and folds it."""
    proto = ir3_model()
    del proto.graph.input[1:]
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(proto, str(src))
    assert graphopt.cli.main(["opt", str(src), "-o", str(out), "-q", "--no-cache"]) == 0
    got = onnx.load(str(out))
    assert got.ir_version == 4
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    assert_same_outputs(proto, got, rel=1e-6, feeds=feeds)


@pytest.mark.parametrize("path", LIGHT_MODELS[:3], ids=lambda p: p.stem)
def test_round_trip_light_models(tmp_path, path):
    proto = onnx.load(str(path))
    got = round_trip(tmp_path, proto)
    real_inputs = {i.name for i in proto.graph.input} - {t.name for t in proto.graph.initializer}
    assert [i.name for i in got.graph.input] == [i.name for i in proto.graph.input if i.name in real_inputs]
    assert [o.name for o in got.graph.output] == [o.name for o in proto.graph.output]
    assert got.ir_version == max(proto.ir_version, 4)
    assert len(got.graph.node) == len(proto.graph.node)
    rng = np.random.default_rng(0)
    feeds = {
        i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
        for i in proto.graph.input
        if i.name in real_inputs
    }
    assert_same_outputs(proto, got, rel=0, feeds=feeds)


def test_save_is_deterministic(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(rich_model(), str(src))
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    graphopt.save(graphopt.load(src), a)
    graphopt.save(graphopt.load(src), b)
    assert a.read_bytes() == b.read_bytes()
    # and saving the same loaded model twice
    model = graphopt.load(src)
    graphopt.save(model, a)
    graphopt.save(model, b)
    assert a.read_bytes() == b.read_bytes()


def test_save_refuses_to_overwrite_the_input(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(rich_model(), str(src))
    before = sha(src)
    with pytest.raises(UsageError, match="overwrite the input"):
        graphopt.save(graphopt.load(src), src, protect=[src])
    with pytest.raises(UsageError, match="overwrite the input"):
        graphopt.optimize_file(src, src, "eliminate-dead-code")
    assert sha(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_save_into_missing_folder_is_usage_error(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(rich_model(), str(src))
    with pytest.raises(UsageError, match="does not exist"):
        graphopt.save(graphopt.load(src), tmp_path / "nope" / "out.onnx")


# -- external data --------------------------------------------------------------------
def test_external_data_loads_lazily(tmp_path, monkeypatch):
    src = save_external(weighted_model(), tmp_path / "in.onnx")
    assert (tmp_path / "weights.bin").exists()

    def forbidden(self, *a, **k):
        raise AssertionError(f"external weight '{self.tensor.name}' was read during load")

    monkeypatch.setattr(ExternalValues, "read_bytes", forbidden)
    monkeypatch.setattr(ExternalValues, "iter_chunks", forbidden)
    monkeypatch.setattr(ExternalValues, "load", forbidden)
    model = graphopt.load(src)
    consts = {c.name: c for c in model.constants()}
    assert isinstance(consts["w1"]._values, ExternalValues)
    assert isinstance(consts["w2"]._values, ExternalValues)
    assert not isinstance(consts["b"]._values, ExternalValues)  # 256 bytes: stays inline
    assert consts["w1"]._values.path == (tmp_path / "weights.bin").resolve()
    assert tuple(consts["w1"]._values.shape) == (64, 64)


def test_external_values_read_the_right_bytes(tmp_path):
    proto = weighted_model()
    src = save_external(proto, tmp_path / "in.onnx")
    model = graphopt.load(src)
    consts = {c.name: c for c in model.constants()}
    want = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for name in ("w1", "w2"):
        np.testing.assert_array_equal(consts[name]._values.load(), want[name])


def test_external_data_saved_as_external(tmp_path):
    proto = weighted_model()
    indir = tmp_path / "in"
    indir.mkdir()
    src = save_external(proto, indir / "in.onnx")
    before = snapshot(indir)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "out.onnx"
    graphopt.save(graphopt.load(src), out, external_data=True)
    assert sorted(p.name for p in outdir.iterdir()) == ["out.onnx", "out.onnx.data"]
    got = onnx.load(str(out), load_external_data=False)
    ext = {t.name for t in got.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert ext == {"w1", "w2"}
    for t in got.graph.initializer:
        if t.name in ext:
            assert {e.key: e.value for e in t.external_data}["location"] == "out.onnx.data"
    full = onnx.load(str(out))  # follows the data file
    assert_same_outputs(proto, full, rel=0)
    # onnxruntime reading the data file itself, from the path
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], want[0])
    assert snapshot(indir) == before


def test_external_data_inlined_when_not_asked(tmp_path):
    proto = weighted_model()
    src = save_external(proto, tmp_path / "in.onnx")
    before = snapshot(tmp_path)
    out = tmp_path / "out.onnx"
    graphopt.save(graphopt.load(src), out, external_data=False)
    assert not (tmp_path / "out.onnx.data").exists()
    got = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location != TensorProto.EXTERNAL for t in got.graph.initializer)
    assert_same_outputs(proto, got, rel=0)
    before["out.onnx"] = sha(out)
    assert snapshot(tmp_path) == before


def test_external_save_is_deterministic(tmp_path):
    src = save_external(weighted_model(), tmp_path / "in.onnx")
    outs = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        graphopt.save(graphopt.load(src), d / "m.onnx", external_data=True)
        outs.append(((d / "m.onnx").read_bytes(), (d / "m.onnx.data").read_bytes()))
    assert outs[0] == outs[1]


def test_external_save_refuses_to_overwrite_input_data(tmp_path):
    # in.onnx keeps its weights in 'out.onnx.data': saving out.onnx with external
    # data would overwrite the input's weights.
    src = save_external(weighted_model(), tmp_path / "in.onnx", location="out.onnx.data")
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match="external data"):
        graphopt.save(graphopt.load(src), tmp_path / "out.onnx", external_data=True, protect=[src])
    assert snapshot(tmp_path) == before


def _set_location(proto: onnx.ModelProto, name: str, **kv: str) -> None:
    for t in proto.graph.initializer:
        if t.name == name:
            entries = {e.key: e.value for e in t.external_data}
            entries.update(kv)
            del t.external_data[:]
            for k, v in entries.items():
                t.external_data.add(key=k, value=v)
            return
    raise KeyError(name)


def _external_proto(tmp_path: Path) -> tuple[Path, onnx.ModelProto]:
    src = save_external(weighted_model(), tmp_path / "in.onnx")
    return src, onnx.load(str(src), load_external_data=False)


@pytest.mark.parametrize("location", ["../weights.bin", "sub/../../weights.bin", "/etc/passwd", "ABSOLUTE"])
def test_external_location_escaping_folder_is_rejected(tmp_path, location):
    src, proto = _external_proto(tmp_path)
    if location == "ABSOLUTE":
        location = str((tmp_path / "weights.bin").resolve())  # absolute, even if inside
    _set_location(proto, "w1", location=location)
    onnx.save(proto, str(src))
    with pytest.raises(ModelError, match="'w1'") as err:
        graphopt.load(src)
    assert "leaves the model's folder" in str(err.value) or "outside" in str(err.value)


def test_external_symlink_escaping_folder_is_rejected(tmp_path):
    inner = tmp_path / "model"
    inner.mkdir()
    src = save_external(weighted_model(), inner / "in.onnx")
    outside = tmp_path / "secret.bin"
    (inner / "weights.bin").rename(outside)
    (inner / "weights.bin").symlink_to(outside)
    with pytest.raises(ModelError, match="'w1'.*leaves the model's folder"):
        graphopt.load(src)


def test_external_symlink_inside_folder_is_rejected_like_onnx_does(tmp_path):
    # onnx's checker refuses external data behind any symbolic link; graphopt
    # reports that as a model error naming the tensor.
    src = save_external(weighted_model(), tmp_path / "in.onnx")
    (tmp_path / "real.bin").write_bytes((tmp_path / "weights.bin").read_bytes())
    (tmp_path / "weights.bin").unlink()
    (tmp_path / "weights.bin").symlink_to("real.bin")
    with pytest.raises(ModelError, match="w1"):
        graphopt.load(src)


def test_missing_external_data_file(tmp_path):
    src, _ = _external_proto(tmp_path)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelError, match="'w1'.*not found"):
        graphopt.load(src)


def test_truncated_external_data_file(tmp_path):
    src, _ = _external_proto(tmp_path)
    data = (tmp_path / "weights.bin").read_bytes()
    (tmp_path / "weights.bin").write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelError, match="truncated"):
        graphopt.load(src)


def test_external_length_not_matching_shape(tmp_path):
    src, proto = _external_proto(tmp_path)
    _set_location(proto, "w1", length="100")
    onnx.save(proto, str(src))
    with pytest.raises(ModelError, match="'w1'"):
        graphopt.load(src)


@pytest.mark.parametrize("field,value", [("offset", "-5"), ("offset", "abc"), ("length", "-1"), ("length", "x")])
def test_external_bad_offset_or_length(tmp_path, field, value):
    src, proto = _external_proto(tmp_path)
    _set_location(proto, "w1", **{field: value})
    onnx.save(proto, str(src))
    with pytest.raises(ModelError, match="'w1'"):
        graphopt.load(src)


def test_external_data_without_location(tmp_path):
    src, proto = _external_proto(tmp_path)
    t = next(t for t in proto.graph.initializer if t.name == "w1")
    del t.external_data[:]
    onnx.save(proto, str(src))
    with pytest.raises(ModelError, match="'w1'"):
        graphopt.load(src)


def test_raw_data_of_wrong_size(tmp_path):
    proto = weighted_model()
    proto.graph.initializer[0].raw_data = proto.graph.initializer[0].raw_data[:-4]
    src = tmp_path / "in.onnx"
    onnx.save(proto, str(src))
    with pytest.raises(ModelError, match="'w1'.*bytes"):
        graphopt.load(src)


def test_input_and_data_unchanged_after_cli_runs(tmp_path):
    from graphopt.cli import main

    src = save_external(weighted_model(), tmp_path / "in.onnx")
    before = snapshot(tmp_path)
    assert main(["opt", str(src), "-o", str(tmp_path / "o1.onnx"), "-p", "infer-shapes,eliminate-dead-code",
                 "-q"]) == 0
    assert main(["opt", str(src), "-o", str(tmp_path / "o2.onnx"), "-p", "eliminate-dead-code",
                 "--external-data", "-q"]) == 0
    assert main(["opt", str(src), "-o", str(tmp_path / "o3.onnx"), "-p", "infer-shapes,eliminate-dead-code",
                 "--dump-dir", str(tmp_path / "dumps"), "-q"]) == 0
    assert main(["opt", str(src), "-o", str(src), "-p", "eliminate-dead-code", "-q"]) == 2
    assert main(["opt", str(src), "-o", str(tmp_path / "weights.bin"), "-p", "eliminate-dead-code", "-q"]) == 2
    assert main(["inspect", str(src), "--json"]) == 0
    after = snapshot(tmp_path)
    assert {k: after[k] for k in before} == before
    assert set(after) == set(before) | {"o1.onnx", "o2.onnx", "o2.onnx.data", "o3.onnx"}


def test_to_proto_of_from_proto_without_files():
    """Model.from_proto/to_proto in memory (no folder) keep the same fields."""
    proto = rich_model()
    got = graphopt.Model.from_proto(proto).to_proto()
    assert [(f.domain, f.name) for f in got.functions] == [("my.domain", "Swish")]
    assert [(p.key, p.value) for p in got.metadata_props] == [(p.key, p.value) for p in proto.metadata_props]


def test_external_data_without_folder_is_model_error(tmp_path):
    src, proto = _external_proto(tmp_path)
    with pytest.raises(ModelError, match="'w1'"):
        graphopt.Model.from_proto(proto)


def test_round_trip_subgraphs_and_sparse_initializers(tmp_path):
    """If branches reading outer-scope values, and a sparse initializer, survive a round trip."""
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["t"])], "then", [], [vi("t", [2, 3])])
    else_g = helper.make_graph([helper.make_node("Add", ["x", "sp"], ["e"])], "else", [], [vi("e", [2, 3])])
    vals = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sp")
    idx = numpy_helper.from_array(np.array([0, 5], np.int64), "sp_idx")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "z"], ["c"]),
            helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
        ],
        "subgraphs",
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        [numpy_helper.from_array(np.array(0, np.float32), "z")],
        sparse_initializer=[helper.make_sparse_tensor(vals, idx, [2, 3])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    got = round_trip(tmp_path, proto)
    onnx.checker.check_model(got)
    branches = {a.name: a.g for a in got.graph.node[-1].attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["Mul"]
    assert [n.op_type for n in branches["else_branch"].node] == ["Add"]
    for sign in (1, -1):
        feeds = {"x": sign * np.abs(np.random.default_rng(0).standard_normal((2, 3))).astype(np.float32)}
        assert_same_outputs(proto, got, rel=0, feeds=feeds)


def test_verify_each_with_external_data_from_another_directory(tmp_path, monkeypatch):
    from graphopt.cli import main

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    src = save_external(weighted_model(), model_dir / "in.onnx")
    before = snapshot(model_dir)
    monkeypatch.chdir(tmp_path)  # not the model's folder
    out = tmp_path / "o.onnx"
    assert main(["opt", str(src), "-o", str(out), "-p", "infer-shapes,eliminate-dead-code", "--verify-each",
                 "-q"]) == 0
    assert snapshot(model_dir) == before
    assert_same_outputs(weighted_model(), onnx.load(str(out)), rel=0)


def test_export_gives_duplicate_node_names_a_suffix():
    """A pass that names new nodes after old ones must not make the model unloadable."""
    import onnx_graphsurgeon as gs

    proto = make_model(
        [helper.make_node("Relu", ["x"], ["a"], name="n"), helper.make_node("Neg", ["a"], ["y"], name="n_gemm")],
        [vi("x", [2])], [vi("y", [2])],
    )
    model = Model.from_proto(proto)
    node = model.graph.nodes[1]
    mid = gs.Variable("b", dtype=np.float32, shape=[2])
    out = node.outputs[0]
    node.outputs[0] = mid
    model.graph.nodes.append(gs.Node("Abs", name="n", inputs=[mid], outputs=[out]))
    got = model.to_proto()
    assert [n.name for n in got.graph.node] == ["n", "n_gemm", "n_1"]
    feeds = {"x": np.array([-1.0, 2.0], np.float32)}
    np.testing.assert_array_equal(ort_run(got, feeds)["y"], [0.0, 2.0])  # |-(relu x)|


def _if_sharing_weight(outer_use: bool) -> onnx.ModelProto:
    """Both branches of an If (and, if ``outer_use``, the outer graph) read W."""
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32), "W")
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [], [vi("t", None)])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["e0"]), helper.make_node("Relu", ["e0"], ["e"])],
                              "else", [], [vi("e", None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    outputs = [vi("y", [2, 64])]
    if outer_use:
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["z"]))
        outputs.append(vi("z", [2, 64]))
    graph = helper.make_graph(nodes, "g", [vi("x", [2, 16])], outputs,
                              [w, onnx.numpy_helper.from_array(np.array(0, np.float32), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("outer_use", [False, True])
def test_weight_shared_by_subgraphs_is_written_once(tmp_path, outer_use):
    proto = _if_sharing_weight(outer_use)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(proto, str(src))
    assert graphopt.cli.main(["opt", str(src), "-o", str(out), "-q", "--no-cache"]) == 0
    got = onnx.load(str(out))
    copies = [t.name for g in [got.graph] + [a.g for n in got.graph.node for a in n.attribute if a.HasField("g")]
              for t in g.initializer if t.name == "W"]
    assert copies == ["W"] and any(t.name == "W" for t in got.graph.initializer)
    assert out.stat().st_size <= src.stat().st_size * 1.01 + 4096
    for x in (np.ones((2, 16), np.float32), -np.ones((2, 16), np.float32)):  # both branches
        assert_same_outputs(proto, got, rel=1e-6, feeds={"x": x})
