"""Calibration data: every reader kind, validation errors, split, the onnxruntime
adapter, and ``graphopt opt --calib``."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt import calibration as cal
from graphopt.cli import main
from graphopt.errors import UsageError

from conftest import make_model, vi


def relu_model(shape=("N", 3, 4, 4), dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    return make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", list(shape), dtype)],
                      [vi("y", list(shape), dtype)])


def two_input_model() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [vi("a", [1, 5]), vi("b", [1, 5])],
        [vi("y", [1, 5])],
    )


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [False, True])
def test_npz_leading_axis_is_samples(tmp_path, compress):
    x = np.random.default_rng(0).standard_normal((5, 3, 4, 4)).astype(np.float32)
    path = tmp_path / "calib.npz"
    (np.savez_compressed if compress else np.savez)(path, x=x)
    data = cal.open_reader(path, relu_model())
    assert data.input_names == ["x"] and len(data) == 5 and data.kind == "npz"
    samples = list(data)
    assert all(s["x"].shape == (1, 3, 4, 4) for s in samples)
    np.testing.assert_array_equal(np.concatenate([s["x"] for s in samples]), x)
    np.testing.assert_array_equal(data[3]["x"][0], x[3])  # random access too


def test_npz_stacked_samples_and_static_batch(tmp_path):
    model = relu_model((2, 3, 4, 4))
    stacked = np.arange(3 * 2 * 3 * 4 * 4, dtype=np.float32).reshape(3, 2, 3, 4, 4)
    np.savez(tmp_path / "a.npz", x=stacked)
    data = cal.open_reader(tmp_path / "a.npz", model)
    assert len(data) == 3 and data[1]["x"].shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(data[1]["x"], stacked[1])
    # model rank: cut into batches of the model's batch size (2)
    np.savez(tmp_path / "b.npz", x=stacked.reshape(6, 3, 4, 4))
    data = cal.open_reader(tmp_path / "b.npz", model)
    assert len(data) == 3
    np.testing.assert_array_equal(data[2]["x"], stacked[2])


def test_single_npy_file(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((3, 3, 4, 4), np.float32))
    data = cal.open_reader(tmp_path / "x.npy", relu_model())
    assert data.kind == "npy" and len(data) == 3 and data[2]["x"].shape == (1, 3, 4, 4)
    np.save(tmp_path / "a.npy", np.ones((3, 1, 5), np.float32))
    with pytest.raises(UsageError) as exc:
        cal.open_reader(tmp_path / "a.npy", two_input_model())
    assert "one input" in one_line(exc)


def test_input_shape_pins_batch(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((8, 3, 4, 4), np.float32))
    data = cal.open_reader(tmp_path / "c.npz", relu_model(), input_shapes={"x": [4, 3, 4, 4]})
    assert len(data) == 2 and data[0]["x"].shape == (4, 3, 4, 4)


def test_folder_of_npy_and_npz(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((1, 3, 4, 4)).astype(np.float32) for _ in range(3)]
    for i, a in enumerate(arrays[:2]):
        np.save(tmp_path / f"s{i}.npy", a)
    np.savez(tmp_path / "s2.npz", x=arrays[2])
    (tmp_path / "README.txt").write_text("ignored")
    data = cal.open_reader(tmp_path, relu_model())
    assert data.kind == "folder" and len(data) == 3
    for got, want in zip(data, arrays):
        np.testing.assert_array_equal(got["x"], want)


def test_folder_per_input_subfolders(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            np.save(tmp_path / name / f"{i:03d}.npy", np.full((1, 5), i + (10 if name == "b" else 0), np.float32))
    data = cal.open_reader(tmp_path, two_input_model())
    assert len(data) == 4
    assert [(float(s["a"][0, 0]), float(s["b"][0, 0])) for s in data] == [(i, i + 10) for i in range(4)]


def test_npy_folder_needs_single_input_model(tmp_path):
    np.save(tmp_path / "0.npy", np.zeros((1, 5), np.float32))
    with pytest.raises(UsageError) as exc:
        cal.open_reader(tmp_path, two_input_model())
    assert "one input" in one_line(exc) and "0.npy" in str(exc.value)


def test_random_source_is_seeded_and_shaped():
    model = make_model(
        [helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "f"], ["y"])],
        [vi("x", ["N", 3]), vi("i", ["N", 3], TensorProto.INT64)],
        [vi("y", ["N", 3])],
    )
    a = cal.open_reader("random:4", model, seed=7, input_shapes={"x": [2, 3]})
    b = cal.open_reader("random:4", model, seed=7, input_shapes={"x": [2, 3]})
    c = cal.open_reader("random:4", model, seed=8, input_shapes={"x": [2, 3]})
    assert len(a) == 4 and a.kind == "random"
    s = a[0]
    assert s["x"].shape == (2, 3) and s["x"].dtype == np.float32
    assert s["i"].shape == (1, 3) and s["i"].dtype == np.int64
    for sa, sb in zip(a, b):
        np.testing.assert_array_equal(sa["x"], sb["x"])
    assert not np.array_equal(a[0]["x"], c[0]["x"])
    assert not np.array_equal(a[0]["x"], a[1]["x"])


def test_accepts_graphopt_model_and_path(tmp_path):
    proto = relu_model((1, 3, 4, 4))
    onnx.save(proto, tmp_path / "m.onnx")
    for model in (graphopt.Model.from_proto(proto), tmp_path / "m.onnx", proto):
        assert len(cal.open_reader("random:2", model)) == 2


def test_float64_is_cast_with_a_note(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((2, 3, 4, 4)))  # float64
    notes = []
    data = cal.open_reader(tmp_path / "d.npz", relu_model(), log=notes.append)
    assert data[0]["x"].dtype == np.float32
    assert len(notes) == 1 and "float64" in notes[0] and "'x'" in notes[0]


def test_samples_cap(tmp_path):
    np.savez(tmp_path / "e.npz", x=np.arange(10 * 48, dtype=np.float32).reshape(10, 3, 4, 4))
    data = cal.open_reader(tmp_path / "e.npz", relu_model(), max_samples=3)
    assert len(data) == 3 and data.indices == [0, 1, 2]


# ----------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------
def write_images(folder, n=3, size=(10, 6)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")


def test_image_folder_nchw_normalized(tmp_path):
    write_images(tmp_path / "imgs" / "class_b", 2)
    write_images(tmp_path / "imgs" / "class_a", 1)
    model = relu_model((1, 3, 8, 8))
    pre = "resize=8x8,scale=255,mean=0.5;0.5;0.5,std=0.5;0.5;0.5"
    data = cal.open_reader(tmp_path / "imgs", model, preprocess=pre)
    assert data.kind == "images" and len(data) == 3
    x = data[0]["x"]
    assert x.shape == (1, 3, 8, 8) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    # sorted order: class_a first
    assert data._source.files[0].parent.name == "class_a"


@pytest.mark.parametrize("fit", ["stretch", "crop", "pad"])
def test_image_fit_modes_and_nhwc_bgr(tmp_path, fit):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    red = np.zeros((4, 8, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(folder / "red.png")
    model = relu_model((1, 6, 6, 3))  # NHWC inferred
    data = cal.open_reader(folder, model, preprocess=f"raw,fit={fit},channels=BGR")
    x = data[0]["x"]
    assert x.shape == (1, 6, 6, 3)
    center = x[0, 3, 3]
    np.testing.assert_allclose(center, [0, 0, 255], atol=1)  # BGR: red is last
    if fit == "pad":
        assert x[0, 0, 3].max() == 0  # letterbox rows


def test_image_folder_needs_preprocess_and_readable_files(tmp_path):
    write_images(tmp_path / "imgs", 2)
    model = relu_model((1, 3, 8, 8))
    with pytest.raises(UsageError) as exc:
        cal.open_reader(tmp_path / "imgs", model)
    assert "--calib-preprocess" in one_line(exc)
    (tmp_path / "imgs" / "img0.png").write_bytes(b"not a png")
    with pytest.raises(UsageError) as exc:
        cal.open_reader(tmp_path / "imgs", model, preprocess="imagenet,resize=8x8")
    assert "img0.png" in one_line(exc)


def test_image_size_mismatch_names_input(tmp_path):
    write_images(tmp_path / "imgs", 1)
    with pytest.raises(UsageError) as exc:
        cal.open_reader(tmp_path / "imgs", relu_model((1, 3, 8, 8)), preprocess="resize=16x16")
    msg = one_line(exc)
    assert "'x'" in msg and "1x3x8x8" in msg and "1x3x16x16" in msg


@pytest.mark.parametrize("text, needle", [
    ("resize=abc", "resize"),
    ("std=0", "std"),
    ("layout=NCWH", "layout"),
    ("colour=RGB", "unknown key 'colour'"),
    ("bogus", "unknown preset 'bogus'"),
    ("mean=1;2;3;4;5", "mean"),
    ("", "empty"),
])
def test_bad_preprocess_strings(text, needle):
    with pytest.raises(UsageError) as exc:
        cal.parse_preprocess(text)
    assert needle in one_line(exc)


def test_preprocess_parse():
    pre = cal.parse_preprocess("imagenet,resize=[256,128],mean=[1,2,3],layout=nhwc,channels=bgr")
    assert pre.resize == (256, 128) and pre.mean == (1.0, 2.0, 3.0) and pre.layout == "NHWC"
    assert pre.channels == "BGR" and pre.scale == 255.0 and pre.fit == "crop"


# ----------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------
def test_missing_input_name(tmp_path):
    np.savez(tmp_path / "f.npz", inptu=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(UsageError) as exc:
        cal.open_reader(tmp_path / "f.npz", relu_model())
    msg = one_line(exc)
    assert "'x'" in msg and "f.npz" in msg and "inptu" in msg


def test_wrong_shape(tmp_path):
    np.savez(tmp_path / "g.npz", x=np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(UsageError) as exc:
        cal.open_reader(tmp_path / "g.npz", relu_model())
    msg = one_line(exc)
    assert "'x'" in msg and "?x3x4x4" in msg and "1x3x5x5" in msg
    np.savez(tmp_path / "h.npz", x=np.zeros((3, 4), np.float32))
    with pytest.raises(UsageError) as exc:
        cal.open_reader(tmp_path / "h.npz", relu_model())
    assert "'x'" in one_line(exc) and "3x4" in str(exc.value)


def test_wrong_dtype(tmp_path):
    np.savez(tmp_path / "i.npz", x=np.zeros((2, 3, 4, 4), np.int64))
    with pytest.raises(UsageError) as exc:
        cal.open_reader(tmp_path / "i.npz", relu_model())
    msg = one_line(exc)
    assert "'x'" in msg and "int64" in msg and "float32" in msg


def test_mismatched_sample_counts(tmp_path):
    np.savez(tmp_path / "j.npz", a=np.zeros((3, 1, 5), np.float32), b=np.zeros((2, 1, 5), np.float32))
    with pytest.raises(UsageError) as exc:
        cal.open_reader(tmp_path / "j.npz", two_input_model())
    assert "'a' has 3" in one_line(exc)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, needle", [
    (lambda p: np.savez(p / "k.npz", x=np.zeros((0, 3, 4, 4), np.float32)) or p / "k.npz", "no samples"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no .npy, .npz or image"),
    (lambda p: _write(p / "bad.npz", b"garbage"), "not a readable .npz"),
    (lambda p: p / "missing.npz", "no such file"),
    (lambda p: _write(p / "x.txt", b"x"), "expected a .npz or .npy"),
    (lambda p: "random:0", "random:N"),
    (lambda p: "random:lots", "random:N"),
])
def test_unusable_sources(tmp_path, make, needle):
    spec = make(tmp_path)
    with pytest.raises(UsageError) as exc:
        cal.open_reader(spec, relu_model())
    assert needle in one_line(exc)


def test_bad_npy_in_folder(tmp_path):
    (tmp_path / "0.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UsageError) as exc:
        cal.open_reader(tmp_path, relu_model())
    assert "0.npy" in one_line(exc)


# ----------------------------------------------------------------------------------
# Split, progress, onnxruntime
# ----------------------------------------------------------------------------------
def test_split_is_deterministic_and_disjoint(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.arange(20 * 48, dtype=np.float32).reshape(20, 3, 4, 4))
    data = cal.open_reader(tmp_path / "s.npz", relu_model())
    calib, held = data.split(0.25, seed=3)
    calib2, held2 = data.split(0.25, seed=3)
    _, held3 = data.split(0.25, seed=4)
    assert len(held) == 5 and len(calib) == 15
    assert held.indices == held2.indices and calib.indices == calib2.indices
    assert held.indices != held3.indices
    assert sorted(calib.indices + held.indices) == list(range(20))
    np.testing.assert_array_equal(held[0]["x"], data[held.indices[0]]["x"])
    assert len(data.split(0.0)[1]) == 0
    with pytest.raises(UsageError):
        data.split(1.0)
    with pytest.raises(UsageError):
        data.take(1).split(0.5)


def test_progress_passthrough_when_not_a_tty():
    assert list(cal.progress(range(5), description="x")) == [0, 1, 2, 3, 4]


def test_ort_reader_returns_the_same_samples(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader

    np.savez(tmp_path / "o.npz", x=np.random.default_rng(4).standard_normal((6, 3, 4, 4)).astype(np.float32))
    data = cal.open_reader(tmp_path / "o.npz", relu_model())
    reader = data.as_ort_reader()
    assert isinstance(reader, CalibrationDataReader) and len(reader) == 6
    got = []
    while (item := reader.get_next()) is not None:
        got.append(item)
    assert len(got) == 6
    for g, want in zip(got, data):
        np.testing.assert_array_equal(g["x"], want["x"])
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["x"], data[0]["x"])
    reader.set_range(2, 4)
    assert len(reader) == 2 and len(list(reader)) == 2


def test_collect_ranges_uses_onnxruntime_calibrator(tmp_path):
    x = np.linspace(-2, 3, 4 * 48, dtype=np.float32).reshape(4, 3, 4, 4)
    np.savez(tmp_path / "r.npz", x=x)
    proto = relu_model((1, 3, 4, 4))
    data = cal.open_reader(tmp_path / "r.npz", proto)
    ranges = cal.collect_ranges(proto, data, "minmax", op_types=["Relu"])
    lo, hi = ranges["y"].range_value
    assert np.ravel(lo)[0] == pytest.approx(0.0) and np.ravel(hi)[0] == pytest.approx(3.0)


# ----------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------
SEEN = []


@graphopt.register_pass("test-calib-consumer")
class CalibConsumer(graphopt.Pass):
    """Records the calibration data it is handed (for the CLI test)."""

    def run(self, model, ctx):
        SEEN.append((len(ctx.calibration), [s["x"].shape for s in ctx.calibration.track()]))
        return graphopt.PassResult(changed=False)


def test_cli_calib_reaches_passes(tmp_path):
    onnx.save(relu_model((1, 3, 4, 4)), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 3, 4, 4), np.float32))
    out = tmp_path / "out.onnx"
    SEEN.clear()
    rc = main(["opt", str(tmp_path / "m.onnx"), "-o", str(out), "-p", "infer-shapes,test-calib-consumer",
               "--calib", str(tmp_path / "c.npz"), "--calib-samples", "3", "-q"])
    assert rc == 0 and out.exists()
    assert SEEN == [(3, [(1, 3, 4, 4)] * 3)]
    assert main(["opt", str(tmp_path / "m.onnx"), "-o", str(out), "-p", "infer-shapes",
                 "--calib", "random:2", "-q"]) == 0


@pytest.mark.parametrize("extra, needle", [
    (["--calib", "{tmp}/wrong.npz"], "'x'"),
    (["--calib", "{tmp}/nope.npz"], "no such file"),
    (["--calib", "random:2", "--calib-preprocess", "imagenet"], "folder of images"),
    (["--calib", "{tmp}/wrong.npz", "--calib-preprocess", "resize=x"], "resize"),
    (["--calib-samples", "3"], "need --calib"),
    (["--calib", "random:2", "--calib-samples", "0"], "at least 1"),
])
def test_cli_bad_calib_exit_2_no_output(tmp_path, capsys, extra, needle):
    onnx.save(relu_model((1, 3, 4, 4)), tmp_path / "m.onnx")
    np.savez(tmp_path / "wrong.npz", y=np.zeros((4, 3, 4, 4), np.float32))
    out = tmp_path / "out.onnx"
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    rc = main(["opt", str(tmp_path / "m.onnx"), "-o", str(out), "-p", "infer-shapes", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and err.startswith("graphopt: error:") and needle in err


def test_cli_interrupt_during_calibration_writes_nothing(tmp_path, monkeypatch):
    onnx.save(relu_model((1, 3, 4, 4)), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"

    def interrupted(self, index):
        raise KeyboardInterrupt

    monkeypatch.setattr(cal._RandomSource, "read", interrupted)
    rc = main(["opt", str(tmp_path / "m.onnx"), "-o", str(out), "-p", "test-calib-consumer",
               "--calib", "random:2", "-q"])
    assert rc == 130 and not out.exists()
