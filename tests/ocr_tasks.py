"""The OCR tasks the PP-OCR det/rec/cls models are scored on: seeded rendered
inputs with known ground truth, the models' pre/post-processing, the metrics.

benchmarks/ocr_eval.py runs the models on these and reports the metrics;
tests/test_ocr_eval.py checks these pure parts.  The code lives here, in
tests/, so that it exists once and tests import nothing from benchmarks/
(benchmarks put tests/ on ``sys.path``).

* rec: text lines (words, numbers, dates, codes, punctuation; ASCII drawn from
  the recognizer's dictionary) rendered in several fonts and sizes with mild
  augmentation, scaled to height 48.  Metrics: exact-match rate and character
  accuracy (mean of ``1 - edit_distance / max(len(pred), len(truth))``, the
  PaddleOCR convention).
* det: 640x640 pages with several lines at known positions.  Metrics:
  precision/recall/F1 of predicted boxes vs the ink boxes of the lines at
  IoU >= 0.5, and "box agreement" (F1 of model B's boxes against model A's).
* cls: text lines, half of them turned 180 degrees.  Metrics: accuracy vs the
  known orientation and agreement rate between two models.

Pre/post-processing follows RapidOCR 1.4.4 (the wheel the models come from):
inputs are BGR as ``cv2.imread`` gives them; rec and cls use
``(x/255 - 0.5)/0.5`` with height 48 (rec width ``max(320, ceil(48*w/h))``,
zero padded; cls 48x192, squeezed if wider); det uses ``(x/255 - 0.5)/0.5``
too (RapidOCR's config; PaddleOCR itself uses ImageNet mean/std, available via
``det_norm="imagenet"``), resized so the short side is ``det_side`` rounded to
a multiple of 32 (RapidOCR: 736; we default to 640 so a 640x640 page is fed
as is, matching the pinned benchmark shape).  DB post-processing is simplified
to axis-aligned boxes of 8-connected components of ``prob > 0.3`` (after
RapidOCR's 2x2 dilation), kept when their mean probability is >= 0.5 and
expanded by RapidOCR's unclip distance ``area * 1.6 / perimeter``.

Datasets are lists built one sample at a time from ``(kind, seed, index)``,
so ``n=50`` is a prefix of ``n=200`` and results do not depend on ``n``.
Calibration data uses a different seed (``CALIB_SEED``) from evaluation
(``EVAL_SEED``), so the two never share samples.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

try:  # Pillow is needed for rendering only; the metric code works without it.
    from PIL import Image, ImageDraw, ImageFilter, ImageFont
except ImportError:  # pragma: no cover - reported by _need_pil()
    Image = ImageDraw = ImageFilter = ImageFont = None  # type: ignore[assignment]

EVAL_SEED = 0
CALIB_SEED = 1
REC_HEIGHT = 48
REC_MIN_WIDTH = 320  # RapidOCR rec_img_shape [3, 48, 320]: narrower lines are padded to it
CLS_SHAPE = (48, 192)
DET_SIDE = 640
PAGE_SIZE = (640, 640)  # width, height
DB_THRESH = 0.3
DB_BOX_THRESH = 0.5
DB_UNCLIP_RATIO = 1.6
DB_MIN_SIZE = 3
IOU_THRESH = 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_KIND_TAG = {"rec": 101, "det": 202, "cls": 303}

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels

# ----------------------------------------------------------------------------
# Fonts
# ----------------------------------------------------------------------------

FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.fonts",
    "~/.local/share/fonts",
    "/Library/Fonts",
    "/System/Library/Fonts",
    "C:/Windows/Fonts",
)
# Latin fonts from Debian's fonts-dejavu-core and fonts-liberation, in the
# order used; only those found are used, so results depend on what is installed
# (the metrics report which fonts were used).
PREFERRED_FONTS = (
    "DejaVuSans.ttf",
    "LiberationSerif-Regular.ttf",
    "DejaVuSansMono.ttf",
    "LiberationSans-Regular.ttf",
    "DejaVuSerif.ttf",
    "LiberationSans-Bold.ttf",
)


class FontsNotFound(RuntimeError):
    """No usable TrueType font: rendering is impossible."""


def find_fonts(extra_dirs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The preferred fonts found in standard places (``$GRAPHOPT_OCR_FONT_DIR`` first).

    Raises FontsNotFound with an install hint when none is there."""
    dirs = [os.environ["GRAPHOPT_OCR_FONT_DIR"]] if os.environ.get("GRAPHOPT_OCR_FONT_DIR") else []
    dirs += [str(d) for d in extra_dirs] + list(FONT_DIRS)
    found: dict[str, Path] = {}
    for d in dirs:
        root = Path(d).expanduser()
        if not root.is_dir():
            continue
        for name in PREFERRED_FONTS:
            if name not in found:
                hits = sorted(root.rglob(name))
                if hits:
                    found[name] = hits[0]
    if not found:
        raise FontsNotFound(
            f"none of {', '.join(PREFERRED_FONTS)} found under {', '.join(dirs)}; "
            "install them (Debian: apt-get install fonts-dejavu-core fonts-liberation) "
            "or point GRAPHOPT_OCR_FONT_DIR at a folder holding them"
        )
    return [found[n] for n in PREFERRED_FONTS if n in found]


def _need_pil() -> None:
    if Image is None:
        raise ImportError("rendering OCR inputs needs Pillow: pip install pillow")


_FONT_CACHE: dict[tuple[str, int], "ImageFont.FreeTypeFont"] = {}


def _font(path: Path, size: int) -> "ImageFont.FreeTypeFont":
    key = (str(path), size)
    if key not in _FONT_CACHE:
        _FONT_CACHE[key] = ImageFont.truetype(str(path), size)
    return _FONT_CACHE[key]


# ----------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------

WORDS = (
    "the of and to in is for on that by with from at as this be are or an was "
    "not all new more can will about page home search free contact business "
    "service price order total amount date time number name address email phone "
    "street city state country invoice receipt customer account payment bank card "
    "credit balance due paid tax discount item quantity unit description product "
    "model version system data report summary table figure chapter section note "
    "open close start stop exit entrance warning danger caution notice please "
    "thank you welcome hello world station platform train bus airport gate flight "
    "hotel room floor building office market store coffee tea milk bread water "
    "apple orange green blue red black white yellow north south east west left "
    "right center public private police hospital school library museum park "
    "street road avenue bridge river lake mountain island garden window door "
    "monday tuesday friday sunday january march june october december morning "
    "evening today tomorrow weekly daily online support delivery shipping return "
    "limited edition special offer sale best quality original genuine made china "
    "london paris berlin tokyo beijing shanghai madrid rome vienna oslo"
).split()
MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
ASCII_ALPHABET = "".join(chr(c) for c in range(33, 127)) + " "


def _case(word: str, rng: np.random.Generator) -> str:
    r = rng.random()
    return word.upper() if r < 0.2 else word.capitalize() if r < 0.55 else word


def _words(rng: np.random.Generator, lo: int, hi: int) -> str:
    n = int(rng.integers(lo, hi + 1))
    return " ".join(_case(str(rng.choice(WORDS)), rng) for _ in range(n))


def _number(rng: np.random.Generator) -> str:
    kind = int(rng.integers(6))
    if kind == 0:
        return str(int(rng.integers(0, 100000)))
    if kind == 1:
        return f"{int(rng.integers(1, 10**7)):,}"
    if kind == 2:
        return f"{rng.uniform(0, 1000):.2f}"
    if kind == 3:
        return f"{rng.uniform(0, 100):.1f}%"
    if kind == 4:
        cur = str(rng.choice(["$", "USD ", "EUR ", "#"]))
        return f"{cur}{rng.uniform(1, 5000):.2f}"
    return f"+{int(rng.integers(1, 99))} {int(rng.integers(100, 999))}-{int(rng.integers(1000, 9999))}"


def _date(rng: np.random.Generator) -> str:
    y, m, d = int(rng.integers(1990, 2031)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    kind = int(rng.integers(5))
    if kind == 0:
        return f"{y}-{m:02d}-{d:02d}"
    if kind == 1:
        return f"{d:02d}/{m:02d}/{y}"
    if kind == 2:
        return f"{MONTHS[m - 1]} {d}, {y}"
    if kind == 3:
        return f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}"
    return f"{d}.{m}.{y} {int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}"


def _code(rng: np.random.Generator) -> str:
    letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
    kind = int(rng.integers(4))
    if kind == 0:
        prefix = "".join(rng.choice(list(letters), size=int(rng.integers(2, 4))))
        return f"{prefix}-{int(rng.integers(100, 99999))}"
    if kind == 1:
        user = str(rng.choice(WORDS[40:])) + str(rng.choice(["", ".", "_"])) + str(rng.choice(WORDS[40:]))
        return f"{user}@{rng.choice(['example', 'mail', 'corp'])}.{rng.choice(['com', 'org', 'net'])}"
    if kind == 2:
        return f"www.{rng.choice(WORDS[40:])}.com/{rng.choice(WORDS[40:])}"
    return f"No.{int(rng.integers(1, 999))}"


def _punctuated(rng: np.random.Generator) -> str:
    w = _words(rng, 1, 3)
    kind = int(rng.integers(6))
    if kind == 0:
        return w + str(rng.choice(list("!?.:;")))
    if kind == 1:
        return f"({w})"
    if kind == 2:
        return f'"{w}"'
    if kind == 3:
        return f"{w}, {_words(rng, 1, 2)}"
    if kind == 4:
        return f"[{int(rng.integers(1, 99))}] {w}"
    return f"{w} - {_number(rng)}"


_GENERATORS: tuple[tuple[float, Callable[[np.random.Generator], str]], ...] = (
    (0.35, lambda r: _words(r, 1, 4)),
    (0.15, _number),
    (0.15, _date),
    (0.15, _code),
    (0.20, _punctuated),
)


def random_text(rng: np.random.Generator, max_chars: int = 28) -> str:
    """One line of mostly-English ASCII text, at most ``max_chars`` long."""
    weights = np.array([w for w, _ in _GENERATORS])
    while True:
        gen = _GENERATORS[int(rng.choice(len(_GENERATORS), p=weights / weights.sum()))][1]
        text = gen(rng).strip()
        if 1 <= len(text) <= max_chars:
            return text


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------


def _sample_rng(kind: str, seed: int, index: int) -> np.random.Generator:
    """Independent generator per sample, so datasets are prefix-stable."""
    return np.random.default_rng([_KIND_TAG[kind], seed, index])


def _add_noise(arr: np.ndarray, rng: np.random.Generator, sigma_max: float) -> np.ndarray:
    sigma = rng.uniform(0, sigma_max)
    noisy = arr.astype(np.float32) + rng.normal(0, sigma, arr.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _colors(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Light, slightly tinted background and dark ink."""
    bg = int(rng.integers(175, 256))
    ink = int(rng.integers(0, 80))
    tint = rng.integers(-12, 13, size=3)
    bg_c = tuple(int(np.clip(bg + t, 0, 255)) for t in tint)
    ink_c = tuple(int(np.clip(ink + t, 0, 255)) for t in tint)
    return bg_c, ink_c  # type: ignore[return-value]


def render_line(text: str, rng: np.random.Generator, fonts: Sequence[Path], augment: bool = True) -> np.ndarray:
    """RGB uint8 image of one text line, cropped with a margin like a det crop."""
    _need_pil()
    font_path = fonts[int(rng.integers(len(fonts)))]
    size = int(rng.integers(26, 44))
    font = _font(font_path, size)
    x0, y0, x1, y1 = font.getbbox(text)
    pad_x = int(size * rng.uniform(0.15, 0.5))
    pad_top = int(size * rng.uniform(0.1, 0.3))
    pad_bottom = int(size * rng.uniform(0.1, 0.3))
    bg, ink = _colors(rng) if augment else ((255, 255, 255), (0, 0, 0))
    img = Image.new("RGB", (x1 - x0 + 2 * pad_x, y1 - y0 + pad_top + pad_bottom), bg)
    ImageDraw.Draw(img).text((pad_x - x0, pad_top - y0), text, font=font, fill=ink)
    if augment:
        angle = rng.uniform(-1.5, 1.5)
        img = img.rotate(angle, resample=Image.BILINEAR, fillcolor=bg)
        if rng.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
        if rng.random() < 0.3:  # low-resolution source, as small print on a page is
            low_h = int(rng.integers(20, 32))
            img = img.resize((max(1, round(img.width * low_h / img.height)), low_h), Image.BILINEAR)
    h = REC_HEIGHT
    w = max(1, int(round(img.width * h / img.height)))
    img = img.resize((w, h), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return _add_noise(arr, rng, 6.0) if augment else arr.copy()


def make_rec_dataset(n: int = 200, seed: int = EVAL_SEED, fonts: Sequence[Path] | None = None) -> list[tuple[np.ndarray, str]]:
    """``n`` (RGB line image at height 48, text) pairs."""
    fonts = list(fonts) if fonts is not None else find_fonts()
    out = []
    for i in range(n):
        rng = _sample_rng("rec", seed, i)
        text = random_text(rng)
        out.append((render_line(text, rng, fonts), text))
    return out


def make_cls_dataset(n: int = 200, seed: int = EVAL_SEED, fonts: Sequence[Path] | None = None) -> list[tuple[np.ndarray, int]]:
    """``n`` (RGB line image, label) pairs; label 1 means turned 180 degrees (odd indices)."""
    fonts = list(fonts) if fonts is not None else find_fonts()
    out = []
    for i in range(n):
        rng = _sample_rng("cls", seed, i)
        img = render_line(random_text(rng), rng, fonts)
        label = i % 2
        out.append((np.ascontiguousarray(img[::-1, ::-1]) if label else img, label))
    return out


def render_page(rng: np.random.Generator, fonts: Sequence[Path], size: tuple[int, int] = PAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """RGB page with several text lines; returns (image, (k, 4) ink boxes x0,y0,x1,y1).

    Lines sit in rows separated by at least 0.6 line heights, and a second
    segment on a row is at least 2.5 em away, so each segment is one DB box."""
    _need_pil()
    width, height = size
    bg, _ = _colors(rng)
    page = np.empty((height, width, 3), np.float32)
    page[:] = bg
    # Mild vertical shading across the page.
    page *= np.linspace(1.0, rng.uniform(0.85, 1.0), height, dtype=np.float32)[:, None, None]
    boxes: list[Box] = []
    margin = 16
    y = margin + int(rng.integers(0, 40))
    while True:
        fsize = int(rng.integers(18, 42))
        font = _font(fonts[int(rng.integers(len(fonts)))], fsize)
        if y + fsize * 1.3 > height - margin:
            break
        x = margin + int(rng.integers(0, width // 4))
        row_bottom = y
        for _ in range(1 + int(rng.random() < 0.4)):
            text = random_text(rng, max_chars=24)
            if x + font.getlength(text) > width - margin:
                break
            _, ink = _colors(rng)
            # Draw into a local mask (cheaper than a page-sized one), then blend.
            rw, rh = min(width - x, int(font.getlength(text)) + fsize), min(height - y, 2 * fsize)
            mask = Image.new("L", (rw, rh), 0)
            ImageDraw.Draw(mask).text((0, 0), text, font=font, fill=255)
            local = mask.getbbox()
            if local is None:
                continue
            bbox = (x + local[0], y + local[1], x + local[2], y + local[3])
            alpha = np.asarray(mask, np.float32)[..., None] / 255.0
            region = page[y : y + rh, x : x + rw]
            region[:] = region * (1 - alpha) + np.asarray(ink, np.float32) * alpha
            # Line box: ink extent across, cap top to descender bottom down (the
            # same for every string, as line annotations are).
            _, cap_top, _, desc_bottom = font.getbbox("Hg")
            boxes.append((float(bbox[0]), float(y + cap_top), float(bbox[2]), float(y + desc_bottom)))
            row_bottom = max(row_bottom, bbox[3])
            x = bbox[2] + int(fsize * rng.uniform(2.5, 6))
        y = max(row_bottom, y + fsize) + int(fsize * rng.uniform(0.6, 2.0))
    img = Image.fromarray(np.clip(np.rint(page), 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    arr = _add_noise(np.asarray(img), rng, 5.0)
    return arr, np.array(boxes, np.float32).reshape(-1, 4)


def make_det_dataset(n: int = 50, seed: int = EVAL_SEED, fonts: Sequence[Path] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (RGB 640x640 page, (k, 4) ground-truth line boxes) pairs."""
    fonts = list(fonts) if fonts is not None else find_fonts()
    return [render_page(_sample_rng("det", seed, i), fonts) for i in range(n)]


# ----------------------------------------------------------------------------
# Preprocessing (RapidOCR 1.4.4 conventions)
# ----------------------------------------------------------------------------


def _to_bgr_float(img: np.ndarray) -> np.ndarray:
    """RGB uint8 HxWx3 -> BGR float32 CxHxW in [0, 255]: RapidOCR reads with cv2."""
    return np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1), dtype=np.float32)


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    _need_pil()
    if img.shape[1] == width and img.shape[0] == height:
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def _line_input(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to ``height`` keeping aspect (squeezed if wider than ``width``),
    normalise to [-1, 1] and zero-pad on the right to ``width``."""
    h, w = img.shape[:2]
    resized_w = min(width, int(math.ceil(height * w / h)))
    x = _to_bgr_float(_resize(img, resized_w, height)) / 255.0
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = (x - 0.5) / 0.5
    return out


def rec_width(img: np.ndarray) -> int:
    """Input width RapidOCR uses for one line on its own: its real width at height
    48, at least 320."""
    h, w = img.shape[:2]
    return max(REC_MIN_WIDTH, int(REC_HEIGHT * max(REC_MIN_WIDTH / REC_HEIGHT, w / h)))


def rec_preprocess(img: np.ndarray, width: int | None = None) -> np.ndarray:
    """(1, 3, 48, W) rec input.  ``width=None``: W = rec_width(img) (the real
    width, as RapidOCR does with one line per batch); a fixed width squeezes
    wider lines and pads narrower ones (used for calibration tensors)."""
    return _line_input(img, REC_HEIGHT, width or rec_width(img))[None]


def cls_preprocess(img: np.ndarray) -> np.ndarray:
    """(1, 3, 48, 192) cls input, as RapidOCR's TextClassifier builds it."""
    return _line_input(img, *CLS_SHAPE)[None]


def det_preprocess(img: np.ndarray, side: int = DET_SIDE, norm: str = "half") -> np.ndarray:
    """(1, 3, H, W) det input: short side scaled to ``side`` ("min" limit type),
    both sides rounded to multiples of 32; ``norm`` "half" is (x/255-0.5)/0.5
    (RapidOCR), "imagenet" is ImageNet mean/std (PaddleOCR)."""
    h, w = img.shape[:2]
    ratio = side / min(h, w) if min(h, w) < side else 1.0
    rh = max(32, int(round(int(h * ratio) / 32) * 32))
    rw = max(32, int(round(int(w * ratio) / 32) * 32))
    x = _to_bgr_float(_resize(img, rw, rh)) / 255.0
    if norm == "imagenet":  # BGR order, as PaddleOCR applies the RGB-listed constants to cv2 images
        mean = np.array(IMAGENET_MEAN, np.float32)[:, None, None]
        std = np.array(IMAGENET_STD, np.float32)[:, None, None]
    elif norm == "half":
        mean, std = np.float32(0.5), np.float32(0.5)
    else:
        raise ValueError(f"det norm must be 'half' or 'imagenet', not {norm!r}")
    return ((x - mean) / std)[None].astype(np.float32)


# ----------------------------------------------------------------------------
# Post-processing
# ----------------------------------------------------------------------------


def charset_from_dict(characters: Sequence[str]) -> list[str]:
    """CTC class list: blank at 0, the dictionary, then a space (RapidOCR/PaddleOCR)."""
    return ["<blank>", *characters, " "]


def ctc_greedy_decode(probs: np.ndarray, charset: Sequence[str]) -> str:
    """Best-path CTC decoding of (T, C) scores: argmax, merge repeats, drop blanks (class 0)."""
    idx = np.asarray(probs).argmax(axis=-1)
    keep = np.ones(idx.shape, bool)
    keep[1:] = idx[1:] != idx[:-1]
    keep &= idx != 0
    return "".join(charset[i] for i in idx[keep])


def _dilate_2x2(mask: np.ndarray) -> np.ndarray:
    """cv2.dilate with a 2x2 kernel (anchor at its centre, i.e. top-left pixel rounding)."""
    out = mask.copy()
    out[1:, :] |= mask[:-1, :]
    out[:, 1:] |= mask[:, :-1]
    out[1:, 1:] |= mask[:-1, :-1]
    return out


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels of a boolean mask (scipy if available)."""
    try:
        from scipy import ndimage
    except ImportError:
        return _label_bfs(mask)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    return labels, int(n)


def _label_bfs(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels = np.zeros(mask.shape, np.int32)
    h, w = mask.shape
    n = 0
    for sy, sx in zip(*np.nonzero(mask)):
        if labels[sy, sx]:
            continue
        n += 1
        labels[sy, sx] = n
        stack = [(sy, sx)]
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = n
                        stack.append((ny, nx))
    return labels, n


def db_boxes(
    prob: np.ndarray,
    out_shape: tuple[int, int],
    thresh: float = DB_THRESH,
    box_thresh: float = DB_BOX_THRESH,
    unclip_ratio: float = DB_UNCLIP_RATIO,
) -> np.ndarray:
    """Axis-aligned text boxes (k, 4) in ``out_shape`` (h, w) pixels from a DB
    probability map (H, W): components of ``prob > thresh``, scored by the mean
    probability inside their box, expanded by ``area * unclip_ratio / perimeter``."""
    prob = np.asarray(prob, np.float32)
    ph, pw = prob.shape
    labels, n = label_components(_dilate_2x2(prob > thresh))
    out_h, out_w = out_shape
    boxes: list[Box] = []
    try:
        from scipy import ndimage

        slices = ndimage.find_objects(labels)
    except ImportError:
        slices = [None] * n
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            slices[k - 1] = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    for sl in slices:
        if sl is None:
            continue
        y0, y1 = sl[0].start, sl[0].stop - 1  # pixel centres, as contour points are
        x0, x1 = sl[1].start, sl[1].stop - 1
        w, h = x1 - x0, y1 - y0
        if min(w, h) < DB_MIN_SIZE:
            continue
        if float(prob[y0 : y1 + 1, x0 : x1 + 1].mean()) < box_thresh:
            continue
        d = w * h * unclip_ratio / (2.0 * (w + h))
        bx0, by0, bx1, by1 = x0 - d, y0 - d, x1 + d, y1 + d
        if min(bx1 - bx0, by1 - by0) < DB_MIN_SIZE + 2:
            continue
        sx, sy = out_w / pw, out_h / ph
        box = (
            float(np.clip(round(bx0 * sx), 0, out_w - 1)),
            float(np.clip(round(by0 * sy), 0, out_h - 1)),
            float(np.clip(round(bx1 * sx), 0, out_w - 1)),
            float(np.clip(round(by1 * sy), 0, out_h - 1)),
        )
        if box[2] - box[0] > 3 and box[3] - box[1] > 3:
            boxes.append(box)
    return np.array(boxes, np.float32).reshape(-1, 4)


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def rec_metrics(preds: Sequence[str], truths: Sequence[str]) -> dict[str, float]:
    """Exact-match rate, character accuracy (mean of 1 - ed/max(len)), and the
    exact-match rate ignoring spaces (the Chinese model is loose about spaces)."""
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions for {len(truths)} truths")
    n = max(1, len(truths))
    exact = sum(p == t for p, t in zip(preds, truths))
    exact_nospace = sum(p.replace(" ", "") == t.replace(" ", "") for p, t in zip(preds, truths))
    acc = sum(1.0 - edit_distance(p, t) / max(len(p), len(t), 1) for p, t in zip(preds, truths))
    return {"exact_match": exact / n, "char_accuracy": acc / n, "exact_match_nospace": exact_nospace / n}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (n, 4) and (m, 4) x0,y0,x1,y1 boxes -> (n, m)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_boxes(pred: np.ndarray, truth: np.ndarray, iou_thresh: float = IOU_THRESH) -> dict[tuple[int, int], float]:
    """One-to-one matches at IoU >= iou_thresh, greedy by highest IoU:
    ``{(pred_index, truth_index): iou}``."""
    iou = box_iou(pred, truth)
    if iou.size == 0:
        return {}
    pairs = np.argwhere(iou >= iou_thresh)
    order = np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")
    used_p: set[int] = set()
    used_t: set[int] = set()
    out: dict[tuple[int, int], float] = {}
    for p, t in pairs[order]:
        p, t = int(p), int(t)
        if p not in used_p and t not in used_t:
            used_p.add(p)
            used_t.add(t)
            out[(p, t)] = float(iou[p, t])
    return out


def det_metrics(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], iou_thresh: float = IOU_THRESH) -> dict[str, float]:
    """Micro-averaged precision/recall/F1 of predicted boxes over all images,
    and the mean IoU of the matched pairs (box tightness, which F1 ignores)."""
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions for {len(truths)} truths")
    pairs = [match_boxes(p, t, iou_thresh) for p, t in zip(preds, truths)]
    matched = sum(len(m) for m in pairs)
    ious = [float(v) for m in pairs for v in m.values()]
    n_pred = sum(len(np.asarray(p).reshape(-1, 4)) for p in preds)
    n_true = sum(len(np.asarray(t).reshape(-1, 4)) for t in truths)
    precision = matched / n_pred if n_pred else float(n_true == 0)
    recall = matched / n_true if n_true else float(n_pred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    mean_iou = float(np.mean(ious)) if ious else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "mean_iou": mean_iou, "n_pred": n_pred, "n_true": n_true}


def agreement(a: Sequence[object], b: Sequence[object]) -> float:
    """Fraction of positions where two prediction lists agree."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} predictions")
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def rec_agreement(preds_a: Sequence[str], preds_b: Sequence[str]) -> dict[str, float]:
    """How often B reads the same string as A, and B's character accuracy taking A as truth."""
    m = rec_metrics(preds_b, preds_a)
    return {"agreement": m["exact_match"], "char_agreement": m["char_accuracy"]}


def det_agreement(boxes_a: Sequence[np.ndarray], boxes_b: Sequence[np.ndarray]) -> dict[str, float]:
    """Box agreement: precision/recall/F1 (IoU >= 0.5) of B's boxes taking A's as truth."""
    res = det_metrics(boxes_b, boxes_a)
    return {"agreement_f1": res["f1"], "agreement_precision": res["precision"],
            "agreement_recall": res["recall"], "agreement_mean_iou": res["mean_iou"]}


# ----------------------------------------------------------------------------
# Calibration data
# ----------------------------------------------------------------------------


def calibration_inputs(kind: str, n: int = 32, seed: int = CALIB_SEED, input_name: str = "x") -> dict[str, np.ndarray]:
    """``{input_name: (n, 3, H, W) float32}`` preprocessed inputs for a quantizer,
    drawn from ``seed`` (not the evaluation seed).  Fixed shapes so samples
    stack: rec 48x320 (longer lines squeezed), cls 48x192, det 640x640."""
    if seed == EVAL_SEED:
        raise ValueError(f"calibration seed {seed} is the evaluation seed; pick another")
    if kind == "rec":
        x = [rec_preprocess(img, REC_MIN_WIDTH) for img, _ in make_rec_dataset(n, seed)]
    elif kind == "cls":
        x = [cls_preprocess(img) for img, _ in make_cls_dataset(n, seed)]
    elif kind == "det":
        x = [det_preprocess(img) for img, _ in make_det_dataset(n, seed)]
    else:
        raise ValueError(f"kind must be rec, det or cls, not {kind!r}")
    return {input_name: np.concatenate(x, axis=0)}

