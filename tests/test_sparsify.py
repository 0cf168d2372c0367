"""sparsify: exact zero fractions, N:M groups along the reduction axis, bounded output change."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import apply, make_model, op_types, ort_run, random_feeds, vi
from graphopt import runtime
from graphopt.errors import UsageError
from graphopt.pipeline import parse as parse_pipeline

F = np.float32


def _net(seed=0):
    """Conv [16, 8, 3, 3] -> Relu -> Flatten -> Gemm (transB) -> MatMul [K, N], plus a tiny Conv."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": rng.standard_normal((16, 8, 3, 3)).astype(F),
        "b1": rng.standard_normal(16).astype(F),
        "w2": (3.0 * rng.standard_normal((32, 16 * 4 * 4))).astype(F),  # another scale: global scope normalizes
        "c2": rng.standard_normal(32).astype(F),
        "w3": rng.standard_normal((32, 24)).astype(F),
        "w0": rng.standard_normal((8, 8, 1, 1)).astype(F),  # 64 elements: under min-size
    }
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
        helper.make_node("Conv", ["c0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Flatten", ["r1"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "c2"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "w3"], ["y"], name="mm"),
    ]
    return make_model(nodes, [vi("x", [2, 8, 4, 4])], [vi("y", [2, 24])], inits)


def _weights(proto):
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _cos(before, after):
    feeds = random_feeds(before, seed=3)
    return runtime.cosine_similarity(ort_run(after, feeds)["y"], ort_run(before, feeds)["y"])


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_layer_scope_exact_fraction(ratio):
    proto = _net()
    _, result, after = apply(proto, f"sparsify{{ratio={ratio},min-size=100}}")
    assert op_types(after) == op_types(proto)
    old, new = _weights(proto), _weights(after)
    for name in ("w1", "w2", "w3"):
        w = new[name]
        assert np.count_nonzero(w == 0) == round(ratio * w.size)
        kept = w != 0
        assert np.array_equal(w[kept], old[name][kept])  # survivors untouched
        # the zeroed ones are the smallest magnitudes
        assert np.abs(old[name][~kept]).max() <= np.abs(old[name][kept]).min()
    for name in ("w0", "b1", "c2"):  # under min-size, biases
        assert np.array_equal(new[name], old[name])
    stats = result.records[0].stats
    assert stats["tensors"] == 3 and stats["per_tensor"]["w2"] == pytest.approx(ratio, abs=1e-3)
    total = sum(old[n].size for n in ("w1", "w2", "w3"))
    assert stats["zeroed"] == sum(round(ratio * old[n].size) for n in ("w1", "w2", "w3"))
    assert stats["sparsity"] == pytest.approx(stats["zeroed"] / total, abs=1e-6)
    assert stats["bitmask_bytes"] < stats["dense_bytes"]
    cos = _cos(proto, after)
    assert 1.0 - ratio < cos < 1.0 - 1e-6  # changed, but not destroyed


def test_global_scope_normalizes_per_tensor_scale():
    proto = _net()
    _, result, after = apply(proto, "sparsify{ratio=0.5,scope=global,min-size=100}")
    new = _weights(after)
    sizes = {n: new[n].size for n in ("w1", "w2", "w3")}
    zeros = {n: int(np.count_nonzero(new[n] == 0)) for n in sizes}
    assert sum(zeros.values()) == round(0.5 * sum(sizes.values()))
    # w2 is 3x larger in scale; without normalization it would keep almost everything
    assert 0.35 < zeros["w2"] / sizes["w2"] < 0.65
    assert result.records[0].stats["sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_along_reduction_axis(n, m):
    proto = _net()
    _, result, after = apply(proto, f"sparsify{{n={n},m={m},min-size=100}}")
    old, new = _weights(proto), _weights(after)
    # Conv [O, C, kh, kw]: groups of m consecutive input channels at every (o, kh, kw)
    rows = {"w1": new["w1"].transpose(0, 2, 3, 1).reshape(-1, 8),
            "w2": new["w2"],  # Gemm transB=1: [N, K]
            "w3": new["w3"].T}  # MatMul [K, N]
    orig = {"w1": old["w1"].transpose(0, 2, 3, 1).reshape(-1, 8), "w2": old["w2"], "w3": old["w3"].T}
    for name, r in rows.items():
        groups = r.reshape(-1, m)
        assert np.all(np.count_nonzero(groups, axis=1) == n), name
        og = np.abs(orig[name].reshape(-1, m))
        kept = groups != 0
        # in every group the kept ones are the n largest
        assert np.all(np.where(kept, og, np.inf).min(1) >= np.where(kept, -np.inf, og).max(1))
    stats = result.records[0].stats
    assert stats["pattern"] == f"{n}:{m}" and stats["sparsity"] == pytest.approx(1 - n / m)
    assert stats["nm_bytes"] < stats["dense_bytes"]
    assert _cos(proto, after) > 0.5


def test_nm_leaves_indivisible_reduction_alone():
    proto = _net()
    _, result, after = apply(proto, "sparsify{n=2,m=16,min-size=100}")
    new, old = _weights(after), _weights(proto)
    assert np.array_equal(new["w1"], old["w1"])  # C=8 is not a multiple of 16
    assert any("w1" not in n and "conv1" in n and "multiple of m=16" in n for n in result.records[0].notes)
    assert np.count_nonzero(new["w2"] == 0) == new["w2"].size * 14 // 16


def test_ops_selection_and_shared_weight():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 32)).astype(F)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
             helper.make_node("Add", ["a", "w"], ["y"], name="add")]  # the weight also read as data
    proto = make_model(nodes, [vi("x", [4, 32])], [vi("y", [4, 32])], {"w": w})
    _, result, after = apply(proto, "sparsify{ratio=0.5,min-size=16}")
    assert not result.records[0].changed
    assert any("also read elsewhere" in n for n in result.records[0].notes)
    _, result, _ = apply(_net(), "sparsify{ratio=0.5,min-size=100,ops=Conv}")
    assert list(result.records[0].stats["per_tensor"]) == ["w1"]


@pytest.mark.parametrize("text,message", [
    ("sparsify{ratio=1.0}", "must be in [0, 1)"),
    ("sparsify{ratio=-0.1}", "ratio"),
    ("sparsify{n=2}", "go together"),
    ("sparsify{n=4,m=4}", "0 < n < m"),
    ("sparsify{n=2,m=4,ratio=0.5}", "do not apply"),
    ("sparsify{ops=Relu}", "option 'ops'"),
])
def test_bad_options(text, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_pipeline(text)


def test_lossy_passes_under_verify_each(tmp_path):
    """--verify-each checks each compression pass (checker, strict shape inference,
    onnxruntime) and records the cosine it measured; heavy settings still pass."""
    import json
    from pathlib import Path

    from graphopt.cli import main

    example = Path(__file__).resolve().parents[1] / "examples" / "tiny_resnet.onnx"
    # binarize before share-weights: gathered weights are no constants any more
    pipe = ("sparsify{ratio=0.9,min-size=100},binarize{min-size=100},"
            "share-weights{bits=2,granularity=tensor,min-size=100},prune-blocks{count=2,samples=1}")
    report = tmp_path / "r.json"
    rc = main(["opt", str(example), "-o", str(tmp_path / "o.onnx"), "-p", pipe, "--verify-each", "-q",
               "--report", str(report)])
    assert rc == 0
    records = json.loads(report.read_text())["passes"]
    assert [r["pass"] for r in records] == ["sparsify", "binarize", "share-weights", "prune-blocks"]
    for r in records:
        assert r["changed"] and "cosine" in next(iter(r["stats"]["verify"].values()))
