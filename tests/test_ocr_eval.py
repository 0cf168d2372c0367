"""Unit tests of the OCR tasks benchmarks/ocr_eval.py scores models on
(tests/ocr_tasks.py): CTC decoding, DB boxes, box matching, metric arithmetic,
preprocessing shapes and rendering determinism.  No network, no rapidocr
wheel, no ONNX model is needed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ocr_tasks as ocr


def _fonts() -> list[Path]:
    pytest.importorskip("PIL")
    try:
        return ocr.find_fonts()
    except ocr.FontsNotFound as exc:
        pytest.skip(str(exc))


# --- CTC -------------------------------------------------------------------


def _one_hot(indices: list[int], classes: int) -> np.ndarray:
    probs = np.full((len(indices), classes), 0.01, np.float32)
    probs[np.arange(len(indices)), indices] = 0.9
    return probs


def test_charset_layout_blank_first_space_last() -> None:
    assert ocr.charset_from_dict(["a", "b"]) == ["<blank>", "a", "b", " "]


def test_ctc_merges_repeats_and_drops_blanks() -> None:
    charset = ocr.charset_from_dict(list("abc"))  # blank=0 a=1 b=2 c=3 space=4
    assert ocr.ctc_greedy_decode(_one_hot([0, 1, 1, 0, 2, 2, 2, 0], 5), charset) == "ab"
    # A blank between two equal symbols keeps both.
    assert ocr.ctc_greedy_decode(_one_hot([1, 0, 1, 4, 3, 3], 5), charset) == "aa c"
    assert ocr.ctc_greedy_decode(_one_hot([0, 0, 0], 5), charset) == ""


# --- edit distance and rec metrics ------------------------------------------


@pytest.mark.parametrize(
    "a, b, d",
    [("", "", 0), ("abc", "", 3), ("", "ab", 2), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("same", "same", 0)],
)
def test_edit_distance(a: str, b: str, d: int) -> None:
    assert ocr.edit_distance(a, b) == d
    assert ocr.edit_distance(b, a) == d


def test_rec_metrics_arithmetic() -> None:
    m = ocr.rec_metrics(["hello", "wor1d", "a b"], ["hello", "world", "ab"])
    assert m["exact_match"] == pytest.approx(1 / 3)
    # 1 - ed/max(len): 1, 1 - 1/5, 1 - 1/3
    assert m["char_accuracy"] == pytest.approx((1 + 0.8 + 2 / 3) / 3)
    assert m["exact_match_nospace"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        ocr.rec_metrics(["a"], [])


def test_agreement() -> None:
    assert ocr.agreement([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert ocr.rec_agreement(["ab", "cd"], ["ab", "ce"]) == {"agreement": 0.5, "char_agreement": 0.75}


# --- boxes -----------------------------------------------------------------


def test_box_iou_values() -> None:
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(ocr.box_iou(a, b), [[1.0, 50 / 150, 0.0]])
    assert ocr.box_iou(np.zeros((0, 4)), b).shape == (0, 3)


def test_match_boxes_is_one_to_one() -> None:
    truth = np.array([[0, 0, 10, 10]], np.float32)
    pred = np.array([[0, 0, 10, 10], [0, 0, 10, 9]], np.float32)
    assert list(ocr.match_boxes(pred, truth)) == [(0, 0)]
    # IoU exactly 1/3 is below the 0.5 threshold.
    assert ocr.match_boxes(np.array([[5, 0, 15, 10]], np.float32), truth) == {}


def test_det_metrics_arithmetic() -> None:
    truths = [np.array([[0, 0, 10, 10], [20, 0, 30, 10]], np.float32), np.zeros((0, 4), np.float32)]
    preds = [np.array([[0, 0, 10, 10]], np.float32), np.array([[50, 50, 60, 60]], np.float32)]
    m = ocr.det_metrics(preds, truths)
    assert (m["n_pred"], m["n_true"]) == (2, 2)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)
    assert m["mean_iou"] == pytest.approx(1.0)
    assert ocr.det_metrics([np.zeros((0, 4))], [np.zeros((0, 4))])["f1"] == 1.0
    assert ocr.det_metrics([np.zeros((0, 4))], [truths[0]])["f1"] == 0.0


def test_label_components_fallback_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) > 0.7
    labels, n = ocr._label_bfs(mask)
    assert ((labels > 0) == mask).all()
    pytest.importorskip("scipy")
    _, n_scipy = ocr.label_components(mask)
    assert n == n_scipy
    # Diagonal neighbours are connected (8-connectivity, like cv2 contours).
    assert ocr._label_bfs(np.eye(4, dtype=bool))[1] == 1


def test_db_boxes_unclip_scale_and_filters() -> None:
    prob = np.zeros((64, 128), np.float32)
    prob[20:30, 10:70] = 0.9  # a text line: w=59, h=9 between pixel centres
    prob[50:55, 100:120] = 0.35  # above thresh, mean below box_thresh: dropped
    prob[5:7, 5:7] = 0.9  # too small: dropped
    boxes = ocr.db_boxes(prob, (128, 256))  # output twice the map's size
    assert boxes.shape == (1, 4)
    # Dilation (2x2) grows the component by one pixel down/right: 60 x 10.
    w, h = 60, 10
    d = w * h * ocr.DB_UNCLIP_RATIO / (2 * (w + h))
    expected = np.array([10 - d, 20 - d, 70 + d, 30 + d]) * 2
    np.testing.assert_allclose(boxes[0], np.round(expected), atol=1)
    assert ocr.db_boxes(np.zeros((32, 32), np.float32), (32, 32)).shape == (0, 4)


# --- preprocessing -----------------------------------------------------------


def test_rec_preprocess_width_padding_and_range() -> None:
    pytest.importorskip("PIL")
    short = np.full((48, 100, 3), 255, np.uint8)
    x = ocr.rec_preprocess(short)
    assert x.shape == (1, 3, 48, 320) and x.dtype == np.float32
    assert np.allclose(x[..., :100], 1.0) and np.allclose(x[..., 100:], 0.0)
    long = np.zeros((24, 400, 3), np.uint8)  # 800 wide at height 48
    assert ocr.rec_preprocess(long).shape == (1, 3, 48, 800)
    fixed = ocr.rec_preprocess(long, width=320)
    assert fixed.shape == (1, 3, 48, 320) and np.allclose(fixed, -1.0)  # squeezed, no padding


def test_channel_order_is_bgr() -> None:
    pytest.importorskip("PIL")
    img = np.zeros((48, 48, 3), np.uint8)
    img[..., 0] = 255  # red in RGB
    x = ocr.cls_preprocess(img)
    assert x.shape == (1, 3, 48, 192)
    assert np.allclose(x[0, 2, :, :48], 1.0) and np.allclose(x[0, 0, :, :48], -1.0)


def test_det_preprocess_multiple_of_32() -> None:
    pytest.importorskip("PIL")
    assert ocr.det_preprocess(np.zeros((640, 640, 3), np.uint8)).shape == (1, 3, 640, 640)
    assert ocr.det_preprocess(np.zeros((640, 640, 3), np.uint8), side=736).shape == (1, 3, 736, 736)
    x = ocr.det_preprocess(np.zeros((500, 700, 3), np.uint8))
    assert x.shape[2] % 32 == 0 and x.shape[3] % 32 == 0 and x.shape[2] == 640
    assert np.allclose(x, -1.0)
    with pytest.raises(ValueError):
        ocr.det_preprocess(np.zeros((64, 64, 3), np.uint8), norm="bogus")


# --- rendering ---------------------------------------------------------------


def test_random_text_uses_ascii_and_is_seeded() -> None:
    a = [ocr.random_text(np.random.default_rng([1, i])) for i in range(300)]
    b = [ocr.random_text(np.random.default_rng([1, i])) for i in range(300)]
    assert a == b
    assert set("".join(a)) <= set(ocr.ASCII_ALPHABET)
    assert all(1 <= len(t) <= 28 and t == t.strip() for t in a)
    assert len(set(a)) > 250  # varied


def test_rec_dataset_deterministic_and_prefix_stable() -> None:
    fonts = _fonts()
    a = ocr.make_rec_dataset(6, seed=3, fonts=fonts)
    b = ocr.make_rec_dataset(4, seed=3, fonts=fonts)
    for (ia, ta), (ib, tb) in zip(a, b):
        assert ta == tb and ia.dtype == np.uint8 and np.array_equal(ia, ib)
    assert all(img.shape[0] == ocr.REC_HEIGHT and img.shape[2] == 3 for img, _ in a)
    c = ocr.make_rec_dataset(6, seed=4, fonts=fonts)
    assert [t for _, t in a] != [t for _, t in c]


def test_cls_dataset_labels_alternate() -> None:
    data = ocr.make_cls_dataset(4, seed=0, fonts=_fonts())
    assert [lab for _, lab in data] == [0, 1, 0, 1]


def test_det_pages_deterministic_with_boxes_inside() -> None:
    fonts = _fonts()
    (img, boxes), = ocr.make_det_dataset(1, seed=5, fonts=fonts)
    (img2, boxes2), = ocr.make_det_dataset(1, seed=5, fonts=fonts)
    assert np.array_equal(img, img2) and np.array_equal(boxes, boxes2)
    h, w = img.shape[:2]
    assert (h, w) == (ocr.PAGE_SIZE[1], ocr.PAGE_SIZE[0])
    assert len(boxes) >= 3
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    # Lines do not overlap, so each ground-truth box can be matched on its own.
    iou = ocr.box_iou(boxes, boxes)
    assert np.allclose(iou - np.diag(np.diag(iou)), 0)
    # Ink inside the boxes is darker than the page outside them.
    inside = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes.astype(int):
        inside[y0:y1, x0:x1] = True
    gray = img.mean(axis=2)
    assert gray[inside].mean() < gray[~inside].mean() - 10


def test_calibration_inputs_shapes_and_seed_guard() -> None:
    _fonts()
    rec = ocr.calibration_inputs("rec", n=2)
    assert list(rec) == ["x"] and rec["x"].shape == (2, 3, 48, 320) and rec["x"].dtype == np.float32
    assert ocr.calibration_inputs("cls", n=2, input_name="img")["img"].shape == (2, 3, 48, 192)
    with pytest.raises(ValueError):
        ocr.calibration_inputs("rec", n=2, seed=ocr.EVAL_SEED)
    with pytest.raises(ValueError):
        ocr.calibration_inputs("nope", n=1)


def test_find_fonts_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ocr, "FONT_DIRS", ())
    monkeypatch.setenv("GRAPHOPT_OCR_FONT_DIR", str(tmp_path))
    with pytest.raises(ocr.FontsNotFound, match="fonts-dejavu-core"):
        ocr.find_fonts()
