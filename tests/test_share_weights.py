"""share-weights (k-means clustering, gather and dense modes) and binarize."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import apply, make_model, op_types, ort_run, random_feeds, vi
from graphopt import runtime
from graphopt.context import PassContext
from graphopt.errors import UsageError
from graphopt.pipeline import parse as parse_pipeline
from graphopt.passes.sharing import kmeans_rows, pack_bits

F = np.float32


def _net(seed=0, opset=17):
    rng = np.random.default_rng(seed)
    inits = {
        "w1": rng.standard_normal((16, 8, 3, 3)).astype(F),
        "b1": rng.standard_normal(16).astype(F),
        "w2": rng.standard_normal((32, 256)).astype(F),  # Gemm transB=1
        "c2": rng.standard_normal(32).astype(F),
        "w3": rng.standard_normal((32, 24)).astype(F),  # MatMul [K, N]: channels on the last axis
        "w4": rng.standard_normal((24, 10)).astype(F),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Flatten", ["r1"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "c2"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "w3"], ["h"], name="mm"),
        helper.make_node("MatMul", ["h", "w4"], ["y"], name="head"),
    ]
    return make_model(nodes, [vi("x", [2, 8, 4, 4])], [vi("y", [2, 10])], inits, opset=opset)


def _weights(proto):
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _decoded(proto, tensor):
    """Evaluate an intermediate tensor of ``proto`` in onnxruntime."""
    probe = onnx.ModelProto.FromString(proto.SerializeToString())
    probe.graph.output.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    feeds = random_feeds(proto)
    return ort_run(probe, feeds)[tensor]


def test_kmeans_rows_assigns_nearest_and_beats_uniform_grid():
    x = np.random.default_rng(0).standard_normal((5, 700))
    book, labels = kmeans_rows(x, 8)
    assert book.shape == (5, 8) and labels.shape == (5, 700) and np.all(np.diff(book, axis=1) >= 0)
    nearest = np.abs(x[:, :, None] - book[:, None, :]).argmin(axis=2)
    assert np.array_equal(nearest, labels)
    err = np.linalg.norm(np.take_along_axis(book, labels, 1) - x)
    grid = np.linspace(x.min(1), x.max(1), 8).T
    grid_err = np.linalg.norm(np.take_along_axis(grid, np.abs(x[:, :, None] - grid[:, None, :]).argmin(2), 1) - x)
    assert err < 0.8 * grid_err
    few = np.array([[1.0, 1.0, 2.0, 5.0]])
    book, labels = kmeans_rows(few, 4)  # no more distinct values than clusters: exact
    assert np.array_equal(np.take_along_axis(book, labels, 1), few)


def test_pack_bits_order():
    assert pack_bits(np.array([1, 2, 15, 0]), 4).tolist() == [0x21, 0x0F]
    # 3 bits: 8 indices in 3 bytes, little-endian bit stream; 9 indices pad to 2 groups
    assert pack_bits(np.array([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == [0b11010001, 0b01011000, 0b00011111]
    assert pack_bits(np.arange(9) % 8, 3).size == 6


def _unpack(packed, bits, n):
    stream = np.unpackbits(packed, bitorder="little")[: n * bits].reshape(n, bits)
    return (stream.astype(np.int64) << np.arange(bits)).sum(axis=1)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("pack", [True, False])
def test_gather_mode_equals_dense_mode(granularity, pack):
    proto = _net()
    pipe = f"share-weights{{bits=3,granularity={granularity},min-size=250,pack={str(pack).lower()}}}"
    _, result, gathered = apply(proto, pipe)
    onnx.checker.check_model(gathered)
    _, dense_result, dense = apply(proto, pipe.replace("{", "{mode=dense,"))
    assert op_types(dense) == op_types(proto)
    decoders = [n.op_type for n in gathered.graph.node if n.input and n.input[0].endswith("_codebook")]
    assert decoders == ["GatherElements" if granularity == "channel" else "Gather"] * 3  # w1, w2, w3; w4 too small
    dense_w, stored = _weights(dense), _weights(gathered)
    assert "w1" not in stored and "w4" in stored
    for name, shape in (("w1", (16, 8, 3, 3)), ("w2", (32, 256)), ("w3", (32, 24))):
        w = dense_w[name]
        assert w.shape == shape
        per = w.reshape(16, -1) if name == "w1" else (w if name == "w2" else w.T)
        if granularity == "tensor":
            assert len(np.unique(w)) <= 8
        else:
            assert max(len(np.unique(row)) for row in per) <= 8
        book = stored[f"{name}_codebook"]
        index_name = f"{name}_indices3" if pack else f"{name}_indices"
        idx = stored[index_name]
        assert idx.dtype == np.uint8
        if pack:
            assert idx.size == -(-w.size // 8) * 3  # 8 indices in 3 bytes
            idx = _unpack(idx, 3, w.size)
        # the stored indices and codebook decode to exactly the dense-mode weights
        if granularity == "tensor":
            decoded = book[idx.reshape(shape).astype(np.int64)]
        elif name == "w3":  # [K, N]: indices [K, N], codebook [k, N]
            decoded = np.take_along_axis(book, idx.reshape(32, 24).astype(np.int64), axis=0)
        else:
            decoded = np.take_along_axis(book, idx.reshape(shape[0], -1).astype(np.int64), axis=1).reshape(shape)
        np.testing.assert_array_equal(decoded, w)
        # and so does the decoder in the graph
        out = next(n.output[0] for n in gathered.graph.node if n.input and n.input[0] in (f"{name}_codebook",))
        final = next((n.output[0] for n in gathered.graph.node if n.op_type == "Reshape" and n.input[0] == out), out)
        np.testing.assert_array_equal(_decoded(gathered, final), w)
    feeds = random_feeds(proto, seed=4)
    np.testing.assert_allclose(ort_run(gathered, feeds)["y"], ort_run(dense, feeds)["y"], rtol=1e-5, atol=1e-5)
    cos = runtime.cosine_similarity(ort_run(gathered, feeds)["y"], ort_run(proto, feeds)["y"])
    assert 0.9 < cos < 1.0
    stats = result.records[0].stats
    assert stats["tensors"] == 3 and stats["clusters"] == 8 and stats["bits"] == 3
    # 32-bit floats -> 3-bit indices in 4 (packed) or 8 bits, plus codebooks (one per channel: 8 floats each)
    assert stats["bytes_after"] < stats["bytes_before"] / ((9 if pack else 3.5) if granularity == "tensor" else
                                                           (6 if pack else 3))
    assert 0 < stats["weight_error_max"] < 0.3
    assert dense_result.records[0].stats["bytes_after"] == dense_result.records[0].stats["bytes_before"]
    assert len(gathered.SerializeToString()) < len(proto.SerializeToString()) * (0.5 if pack else 0.6)


def test_channel_gather_needs_opset_11():
    _, result, after = apply(_net(opset=10), "share-weights{min-size=250}")
    assert not result.records[0].changed and "opset >= 11" in result.records[0].notes[0]


def test_gather_leaves_alone_what_would_not_shrink():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((128, 1, 3, 3)).astype(F)  # depthwise: 9 weights per channel, 16 clusters
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=128, pads=[1, 1, 1, 1])]
    proto = make_model(nodes, [vi("x", [1, 128, 4, 4])], [vi("y", [1, 128, 4, 4])], {"w": w})
    _, result, after = apply(proto, "share-weights{bits=4}")
    assert not result.records[0].changed and "would not be smaller" in result.records[0].notes[0]
    _, result, after = apply(proto, "share-weights{bits=4,granularity=tensor}")
    assert op_types(after) == ["Cast", "Reshape", "Gather", "Div", "Div", "Mul", "Sub", "Reshape", "Reshape",
                               "Gather", "Conv"]
    assert result.records[0].stats["bytes_after"] == 128 * 9 // 2 + 16 * 4
    # dense mode has no size to save: 9 values and 16 clusters per channel is exact
    _, result, after = apply(proto, "share-weights{bits=4,mode=dense}")
    assert result.records[0].stats["weight_error_max"] == 0.0
    np.testing.assert_array_equal(_weights(after)["w"], w)


def test_weight_in_constant_node():
    """Some exporters (Paddle) keep weights in Constant nodes: the node goes, its value is decoded."""
    w = np.random.default_rng(3).standard_normal((64, 16)).astype(F)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "wv")),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    proto = make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 16])])
    _, result, after = apply(proto, "share-weights{bits=4,min-size=16}")
    assert "Constant" not in op_types(after) and "GatherElements" in op_types(after)
    _, _, dense = apply(proto, "share-weights{bits=4,min-size=16,mode=dense}")
    assert op_types(dense) == ["Constant", "MatMul"]
    value = numpy_helper.to_array(dense.graph.node[0].attribute[0].t)
    assert max(len(np.unique(value[:, j])) for j in range(16)) <= 16
    feeds = random_feeds(proto)
    np.testing.assert_allclose(ort_run(after, feeds)["y"], ort_run(dense, feeds)["y"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 6, 7, 8])
def test_every_bit_width_decodes_to_dense(bits):
    """Odd sizes too: 1001 weights is no whole number of packed groups (Slice)."""
    w = np.random.default_rng(bits).standard_normal((143, 7)).astype(F)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    for opset in (9, 17):
        proto = make_model(nodes, [vi("x", [3, 143])], [vi("y", [3, 7])], {"w": w}, opset=opset)
        _, result, gathered = apply(proto, f"share-weights{{bits={bits},granularity=tensor,min-size=16}}")
        onnx.checker.check_model(gathered)
        _, _, dense = apply(proto, f"share-weights{{bits={bits},granularity=tensor,min-size=16,mode=dense}}")
        assert len(np.unique(_weights(dense)["w"])) <= 2 ** bits
        feeds = random_feeds(proto)
        np.testing.assert_allclose(ort_run(gathered, feeds)["y"], ort_run(dense, feeds)["y"], rtol=1e-5, atol=1e-5)
        assert ("Slice" in op_types(gathered)) == (bits < 8 and 1001 % (8 // np.gcd(8, bits)) != 0)
        group = 8 // np.gcd(8, bits)  # indices per whole number of bytes
        index_bytes = 1001 if bits == 8 else -(-1001 // group) * group * bits // 8
        assert result.records[0].stats["bytes_after"] == 4 * 2 ** bits + index_bytes


def test_more_bits_less_error():
    errs = []
    for bits in (2, 4, 6):
        _, result, _ = apply(_net(), f"share-weights{{bits={bits},mode=dense,min-size=250}}")
        errs.append(result.records[0].stats["weight_error_mean"])
    assert errs[0] > errs[1] > errs[2] > 0


def test_binarize_two_values_per_channel_and_protection():
    proto = _net()
    feeds = random_feeds(proto, seed=5)
    ctx = PassContext(inputs=feeds)
    _, result, after = apply(proto, "binarize{min-size=250}", ctx)
    old, new = _weights(proto), _weights(after)
    assert op_types(after) == op_types(proto)
    assert np.array_equal(new["w1"], old["w1"]) and np.array_equal(new["w4"], old["w4"])  # first; under min-size
    # w3 is the last eligible weight (w4 is too small): protected by 'last'
    assert np.array_equal(new["w3"], old["w3"])
    w2 = new["w2"]
    for o in range(32):
        vals = np.unique(w2[o])
        scale = np.abs(old["w2"][o]).mean()
        np.testing.assert_allclose(np.sort(vals), [-scale, scale], rtol=1e-6)
        assert np.array_equal(np.sign(w2[o]), np.where(old["w2"][o] >= 0, 1, -1))
    stats = result.records[0].stats
    assert stats["tensors"] == 1
    want = runtime.cosine_similarity(ort_run(after, feeds)["y"][0], ort_run(proto, feeds)["y"][0])
    got = min(want, runtime.cosine_similarity(ort_run(after, feeds)["y"][1], ort_run(proto, feeds)["y"][1]))
    assert stats["cosine"] == pytest.approx(got, abs=1e-5)
    _, result, after = apply(proto, "binarize{min-size=250,protect=[]}")
    assert result.records[0].stats["tensors"] == 3
    assert any("not measured" in n for n in result.records[0].notes)
    w3 = _weights(after)["w3"]
    assert all(len(np.unique(np.abs(w3[:, j]))) == 1 for j in range(24))  # channels on the last axis


@pytest.mark.parametrize("text,message", [
    ("share-weights{bits=9}", "bits"),
    ("share-weights{granularity=row}", "granularity"),
    ("share-weights{ops=Add}", "option 'ops'"),
    ("binarize{ops=LSTM}", "option 'ops'"),
])
def test_bad_options(text, message):
    with pytest.raises(UsageError, match=message):
        parse_pipeline(text)
