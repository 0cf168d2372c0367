"""Calibration data: sample inputs that quantization and activation-based pruning run
the model on.

One reader, :class:`CalibrationData`, over four kinds of source, chosen by what
the spec names (``open_reader(spec, model)``, ``graphopt opt --calib SPEC``):

``data.npz``
    arrays named after the model's inputs, leading axis = samples (a ``.npy``
    for a model with one input).
``folder/`` of ``.npy`` / ``.npz``
    every ``.npz`` holds arrays named after the inputs; ``.npy`` files are for a
    model with one input; or one subfolder per input (``folder/x/*.npy``,
    ``folder/y/*.npy``), paired in sorted order.
``folder/`` of images
    (jpg, png, bmp, ...; searched recursively, sorted) for a model with one 4-D
    input, with a stated preprocessing (:func:`parse_preprocess`).
``random:N``
    N seeded random samples shaped like the model's inputs, for a smoke run.

How an array maps to samples: for a model input of rank r, an array of rank
r+1 has one sample per row of its leading axis; an array of rank r is cut along
axis 0 into batches of the model's batch size (its static or ``--input-shape``
pinned first dimension, else 1).  A sample is a ``{input name: array}`` dict
with the model's rank.  Arrays are read lazily, a sample at a time (``.npy``
memory-mapped, ``.npz`` members streamed), so data sets larger than memory
work.

Validation happens when the reader is opened, from array headers only: a
missing input, a shape that contradicts a static dimension of the model, a
dtype of another kind, no samples, an unreadable file: each is a one-line
:class:`~graphopt.errors.UsageError` naming the input and the file.  Float data
of another width than the model's (numpy's default float64 for a float32
input) is cast to the model's type, with a note; any other dtype difference
(int vs float, int64 vs int32, bool) is an error.

onnxruntime's calibrators (MinMax, Entropy, Percentile, Distribution) are used
as they are: :meth:`CalibrationData.as_ort_reader` is an
``onnxruntime.quantization.CalibrationDataReader`` and :func:`collect_ranges`
runs one of them over a model.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from graphopt.console import progress
from graphopt.errors import UsageError, first_line

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
ARRAY_EXTENSIONS = frozenset({".npy", ".npz"})
RANDOM_PREFIX = "random:"


# ----------------------------------------------------------------------------------
# Model inputs
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype (None if unknown), shape with None for a
    dimension that is still dynamic after ``--input-shape`` pinning (None shape:
    unknown rank)."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | None, ...] | None

    @property
    def batch(self) -> int:
        """Rows of axis 0 that make one sample when data comes in the model's rank."""
        if self.shape and isinstance(self.shape[0], int):
            return max(self.shape[0], 1)
        return 1

    def shape_text(self) -> str:
        if self.shape is None:
            return "any shape"
        return "x".join("?" if d is None else str(d) for d in self.shape) or "a scalar"

    def matches(self, shape: Sequence[int]) -> bool:
        if self.shape is None:
            return True
        return len(shape) == len(self.shape) and all(d is None or d == s for d, s in zip(self.shape, shape))


def check_input_names(model: Any, flag: str, names: Iterable[str]) -> None:
    """Each of ``names`` (given with ``flag``) is an input of the graphsurgeon ``model``."""
    inputs = [t.name for t in model.graph.inputs]
    for name in names:
        if name not in inputs:
            raise UsageError(f"{flag}: '{name}' is not an input of the model (inputs: {', '.join(inputs) or 'none'})")


def check_input_dims(model: Any, input_shapes: Mapping[str, Sequence[int]]) -> None:
    """``--input-shape`` keeps the rank and the static dims the model declares."""
    for t in model.graph.inputs:
        pinned = input_shapes.get(t.name)
        if pinned is None or t.shape is None:
            continue
        declared = [d if isinstance(d, int) and d >= 0 else "?" for d in t.shape]
        if len(pinned) != len(declared) or any(d != "?" and d != p for d, p in zip(declared, pinned)):
            shown = "x".join(str(d) for d in declared) or "a scalar"
            raise UsageError(
                f"--input-shape {t.name}={'x'.join(map(str, pinned))}: the model declares {t.name} as {shown}"
            )


def check_input_shapes(model: Any, input_shapes: Mapping[str, Sequence[int]]) -> None:
    """``--input-shape`` names a real input, with its rank and static dims."""
    check_input_names(model, "--input-shape", input_shapes)
    check_input_dims(model, input_shapes)


def input_specs(model: Any, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[InputSpec]:
    """The inputs a caller must feed: graph inputs that are not initializers.

    ``model`` is a :class:`graphopt.ir.Model`, an ``onnx.ModelProto`` or a path.
    """
    import onnx

    pinned = dict(input_shapes or {})
    raw: list[tuple[str, Any, Any]] = []
    if isinstance(model, (str, Path)):
        from graphopt.ir import load

        model = load(model)
    if isinstance(model, onnx.ModelProto):
        inits = {t.name for t in model.graph.initializer}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            dtype = tt.elem_type if vi.type.HasField("tensor_type") else None
            shape = (
                [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
                if tt.HasField("shape")
                else None
            )
            raw.append((vi.name, dtype, shape))
    else:
        import onnx_graphsurgeon as gs

        skip = set(getattr(getattr(model, "info", None), "initializer_inputs", ()) or ())
        for t in model.graph.inputs:
            if not isinstance(t, gs.Variable) or t.name in skip:
                continue
            raw.append((t.name, t.dtype, t.shape))
    specs = []
    for name, dtype, shape in raw:
        dims = None
        if shape is not None:
            dims = [d if isinstance(d, int) and d >= 0 and not isinstance(d, bool) else None for d in shape]
            if name in pinned and len(pinned[name]) == len(dims):
                dims = [p if d is None else d for d, p in zip(dims, pinned[name])]
        elif name in pinned:
            dims = list(pinned[name])
        specs.append(InputSpec(name, _np_dtype(dtype), None if dims is None else tuple(dims)))
    return specs


def _np_dtype(dtype: Any) -> np.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        import onnx

        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(dtype)))
        except Exception:
            return None
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


# ----------------------------------------------------------------------------------
# Lazy arrays
# ----------------------------------------------------------------------------------
class _ArrayRef:
    """An array on disk known by its header; rows are read on demand."""

    label: str  # for messages: the file (and member)
    shape: tuple[int, ...]
    dtype: np.dtype

    def rows(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def whole(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _read_header(f, label: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except Exception as exc:
        raise UsageError(f"--calib {label}: not a readable array ({first_line(exc, limit=10**6)})") from None
    if dtype.hasobject:
        raise UsageError(f"--calib {label}: holds Python objects; only numeric arrays are read")
    return tuple(shape), fortran, dtype


class _NpyRef(_ArrayRef):
    def __init__(self, path: Path):
        self.path = path
        self.label = str(path)
        try:
            with open(path, "rb") as f:
                self.shape, _, self.dtype = _read_header(f, self.label)
        except OSError as exc:
            raise UsageError(f"--calib {path}: cannot read ({exc.strerror or exc})") from None

    def _map(self) -> np.ndarray:
        try:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise UsageError(f"--calib {self.path}: not a readable .npy ({first_line(exc, limit=10**6)})") from None

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.array(self._map()[start:stop])

    def whole(self) -> np.ndarray:
        return np.array(self._map())


class _NpzMemberRef(_ArrayRef):
    """One ``.npy`` member of a zip, streamed: only the rows asked for are read.

    Sequential reads of a compressed member decompress it once; a backward
    seek restarts it (so iterate in order).  Fortran-ordered members are read
    whole once and kept.
    """

    def __init__(self, archive: "_Zip", member: str):
        self.archive = archive
        self.member = member
        self.label = f"{archive.path} ({member})"
        self._fh = None
        self._cached: np.ndarray | None = None
        try:
            with archive.zip().open(member) as f:
                self.shape, self.fortran, self.dtype = _read_header(f, self.label)
                self.offset = f.tell()
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"--calib {self.label}: cannot read ({first_line(exc, limit=10**6)})") from None
        inner = math.prod(self.shape[1:]) if self.shape else 1
        self.row_bytes = inner * self.dtype.itemsize

    def _read(self, offset: int, nbytes: int) -> bytes:
        if self._fh is None:
            self._fh = self.archive.zip().open(self.member)
        self._fh.seek(self.offset + offset)
        data = self._fh.read(nbytes)
        if len(data) != nbytes:
            raise UsageError(f"--calib {self.label}: truncated array data")
        return data

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self.fortran:
            return np.array(self.whole()[start:stop])
        try:
            data = self._read(start * self.row_bytes, (stop - start) * self.row_bytes)
        except UsageError:
            raise
        except Exception as exc:  # corrupt deflate stream, bad CRC, ...
            raise UsageError(f"--calib {self.label}: cannot read ({first_line(exc, limit=10**6)})") from None
        return np.frombuffer(data, dtype=self.dtype).reshape((stop - start,) + self.shape[1:]).copy()

    def whole(self) -> np.ndarray:
        if self._cached is None:
            try:
                with self.archive.zip().open(self.member) as f:
                    self._cached = np.lib.format.read_array(f, allow_pickle=False)
            except Exception as exc:
                raise UsageError(f"--calib {self.label}: cannot read ({first_line(exc, limit=10**6)})") from None
        return self._cached

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _Zip:
    """A zip file opened on first use and closed by ``close`` (reopened if needed)."""

    def __init__(self, path: Path):
        self.path = path
        self._zip: zipfile.ZipFile | None = None

    def zip(self) -> zipfile.ZipFile:
        if self._zip is None:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except OSError as exc:
                raise UsageError(f"--calib {self.path}: cannot read ({exc.strerror or exc})") from None
            except Exception as exc:
                raise UsageError(f"--calib {self.path}: not a readable .npz ({first_line(exc, limit=10**6)})") from None
        return self._zip

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def _npz_members(archive: _Zip) -> dict[str, _NpzMemberRef]:
    out = {}
    for member in archive.zip().namelist():
        if member.endswith(".npy"):
            out[member[: -len(".npy")]] = _NpzMemberRef(archive, member)
    return out


# ----------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------
class _Source:
    kind = ""
    label = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass


@dataclasses.dataclass
class _Column:
    """How one input's samples come out of one array."""

    ref: _ArrayRef
    stacked: bool  # rank r+1: sample i = arr[i]; else arr[i*batch:(i+1)*batch]
    batch: int
    count: int
    cast: np.dtype | None

    def read(self, i: int) -> np.ndarray:
        if not self.ref.shape:  # a scalar is one sample
            out = self.ref.whole()
        elif self.stacked:
            out = self.ref.rows(i, i + 1)[0]
        else:
            out = self.ref.rows(i * self.batch, (i + 1) * self.batch)
        return out.astype(self.cast) if self.cast is not None else out


class _ArraySource(_Source):
    """Chunks of samples (one per file or file tuple), each a column per input."""

    def __init__(self, kind: str, label: str, specs: list[InputSpec], note: Callable[[str], None]):
        self.kind = kind
        self.label = label
        self.specs = specs
        self.note = note
        self.chunks: list[dict[str, _Column]] = []
        self.starts: list[int] = []
        self.total = 0
        self.refs: list[_ArrayRef] = []
        self.zips: list[_Zip] = []
        self._noted: set[str] = set()

    def add_chunk(self, arrays: Mapping[str, _ArrayRef], where: str) -> None:
        columns = {}
        for spec in self.specs:
            ref = arrays.get(spec.name)
            if ref is None:
                have = ", ".join(sorted(arrays)) or "none"
                raise UsageError(
                    f"--calib {where}: no array for model input '{spec.name}' (arrays: {have})"
                )
            columns[spec.name] = self._column(spec, ref)
        counts = {name: c.count for name, c in columns.items()}
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"'{n}' has {c}" for n, c in counts.items())
            raise UsageError(f"--calib {where}: inputs have different numbers of samples ({shown})")
        count = next(iter(counts.values()), 0)
        if count == 0:
            return
        self.chunks.append(columns)
        self.starts.append(self.total)
        self.total += count
        self.refs.extend(arrays.values())

    def _column(self, spec: InputSpec, ref: _ArrayRef) -> _Column:
        where = ref.label
        shape = ref.shape
        if spec.shape is None:
            # unknown rank: the leading axis is the samples axis
            return _Column(ref, bool(shape), 1, shape[0] if shape else 1, self._cast(spec, ref))
        rank = len(spec.shape)
        batch = spec.batch
        if len(shape) == rank + 1:
            stacked, count, sample_shape = True, shape[0], shape[1:]
        elif len(shape) == rank and rank > 0:
            stacked = False
            if shape[0] % batch:
                raise UsageError(
                    f"--calib {where}: input '{spec.name}' has {shape[0]} rows, not a multiple of the "
                    f"model's batch size {batch}"
                )
            count, sample_shape = shape[0] // batch, (batch,) + shape[1:]
        elif len(shape) == rank == 0:
            stacked, count, sample_shape = False, 1, ()
        else:
            raise UsageError(
                f"--calib {where}: input '{spec.name}': expected {spec.shape_text()} "
                f"(or N samples of it), got {_shape_text(shape)}"
            )
        if not spec.matches(sample_shape):
            raise UsageError(
                f"--calib {where}: input '{spec.name}': expected {spec.shape_text()}, "
                f"got samples of {_shape_text(sample_shape)}"
            )
        return _Column(ref, stacked, batch, count, self._cast(spec, ref))

    def _cast(self, spec: InputSpec, ref: _ArrayRef) -> np.dtype | None:
        """None when the dtype matches; the model's float type for float data of
        another width (with a note, once per input); else an error."""
        if spec.dtype is None or ref.dtype == spec.dtype:
            return None
        if ref.dtype.kind == "f" and spec.dtype.kind == "f":
            if spec.name not in self._noted:
                self._noted.add(spec.name)
                self.note(f"calibration: casting input '{spec.name}' from {ref.dtype} to {spec.dtype}")
            return spec.dtype
        raise UsageError(f"--calib {ref.label}: input '{spec.name}' is {ref.dtype}, the model expects {spec.dtype}")

    def __len__(self) -> int:
        return self.total

    def read(self, index: int) -> dict[str, np.ndarray]:
        k = bisect.bisect_right(self.starts, index) - 1
        local = index - self.starts[k]
        return {name: col.read(local) for name, col in self.chunks[k].items()}

    def close(self) -> None:
        for ref in self.refs:
            ref.close()
        for z in self.zips:
            z.close()


def _npz_source(path: Path, specs: list[InputSpec], note: Callable[[str], None]) -> _ArraySource:
    src = _ArraySource("npz", str(path), specs, note)
    archive = _Zip(path)
    src.zips.append(archive)
    arrays = _npz_members(archive)
    extra = sorted(set(arrays) - {s.name for s in specs})
    src.add_chunk(arrays, str(path))
    if extra:
        note(f"calibration: ignoring arrays of {path} that are not model inputs: {', '.join(extra)}")
    return src


def _npy_source(path: Path, specs: list[InputSpec], note: Callable[[str], None]) -> _ArraySource:
    if len(specs) != 1:
        raise UsageError(
            f"--calib {path}: a .npy file feeds a model with one input; this model has {len(specs)} "
            f"({', '.join(s.name for s in specs)}): use a .npz"
        )
    src = _ArraySource("npy", str(path), specs, note)
    src.add_chunk({specs[0].name: _NpyRef(path)}, str(path))
    return src


def _array_folder_source(folder: Path, specs: list[InputSpec], note: Callable[[str], None]) -> _ArraySource:
    src = _ArraySource("folder", str(folder), specs, note)
    names = [s.name for s in specs]
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in ARRAY_EXTENSIONS)
    subdirs = {p.name: p for p in folder.iterdir() if p.is_dir()}
    if not files and names and all(n in subdirs for n in names):
        # folder/<input>/*.npy, paired in sorted order
        per_input = {
            n: sorted(p for p in subdirs[n].iterdir() if p.is_file() and p.suffix.lower() == ".npy") for n in names
        }
        counts = {n: len(v) for n, v in per_input.items()}
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"{folder / n} has {c}" for n, c in counts.items())
            raise UsageError(f"--calib {folder}: input folders hold different numbers of .npy files ({shown})")
        for i in range(next(iter(counts.values()))):
            src.add_chunk({n: _NpyRef(per_input[n][i]) for n in names}, str(per_input[names[0]][i]))
        return src
    for path in files:
        if path.suffix.lower() == ".npz":
            archive = _Zip(path)
            src.zips.append(archive)
            arrays: dict[str, _ArrayRef] = dict(_npz_members(archive))
        else:
            if len(names) != 1:
                raise UsageError(
                    f"--calib {path}: a .npy file feeds a model with one input; this model has "
                    f"{len(names)} ({', '.join(names)}): use .npz files or one subfolder per input"
                )
            arrays = {names[0]: _NpyRef(path)}
        src.add_chunk(arrays, str(path))
    return src


class _RandomSource(_Source):
    kind = "random"

    def __init__(self, count: int, specs: list[InputSpec], seed: int):
        self.label = f"random:{count}"
        self.count = count
        self.seed = seed
        self.specs = specs
        for spec in specs:
            if spec.shape is None:
                raise UsageError(f"--calib {self.label}: input '{spec.name}' has no known shape; pin it with --input-shape")
            if spec.dtype is None or spec.dtype.kind not in "biuf":
                raise UsageError(
                    f"--calib {self.label}: cannot make random data for input '{spec.name}' "
                    f"of type {spec.dtype}; give calibration files"
                )

    def __len__(self) -> int:
        return self.count

    def read(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0xCA1B, index])
        out = {}
        for spec in self.specs:
            shape = [1 if d is None else d for d in spec.shape or ()]
            dtype = spec.dtype
            assert dtype is not None
            if dtype.kind == "b":
                out[spec.name] = rng.random(shape) > 0.5
            elif dtype.kind in "iu":
                out[spec.name] = rng.integers(0, 4, size=shape).astype(dtype)
            else:
                out[spec.name] = rng.standard_normal(shape).astype(dtype)
        return out


# ----------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """How an image becomes an input tensor.

    ``value = (pixel / scale - mean) / std`` per channel, with pixels 0..255
    after resizing to ``resize`` (height, width; default: the model's static
    size).  ``fit``: ``stretch`` (ignore the aspect ratio), ``crop`` (scale the
    shorter side, center crop) or ``pad`` (scale the longer side, center on a
    ``pad``-valued canvas).  ``channels``: RGB or BGR order (one channel: gray).
    ``layout``: NCHW or NHWC (default: from the model's input shape, else NCHW).
    """

    resize: tuple[int, int] | None = None
    fit: str = "stretch"
    pad: float = 0.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0
    layout: str | None = None
    channels: str = "RGB"


PRESETS: dict[str, dict[str, Any]] = {
    # torchvision's ImageNet normalization; center crop to the model's size
    "imagenet": {"fit": "crop", "scale": 255.0,
                 "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    # pixel values 0..255 as they are
    "raw": {},
}
_PRE_KEYS = ("resize", "fit", "pad", "mean", "std", "scale", "layout", "channels")


def parse_preprocess(text: str | ImagePreprocess | Mapping[str, Any] | None) -> ImagePreprocess | None:
    """``imagenet``, ``raw``, or comma-separated ``key=value`` (after an optional
    preset), e.g. ``resize=224x224,fit=crop,scale=255,mean=0.485;0.456;0.406,
    std=0.229;0.224;0.225,layout=NCHW,channels=RGB``.  Lists take ``;`` or
    ``[a,b,c]``."""
    if text is None or isinstance(text, ImagePreprocess):
        return text
    flag = "--calib-preprocess"
    if isinstance(text, Mapping):
        items = [(str(k).replace("_", "-"), v) for k, v in text.items()]
        shown = repr(dict(text))
    else:
        shown = f"'{text}'"
        parts = [p.strip() for p in _split_top(text)]
        if not any(parts):
            raise UsageError(f"{flag} {shown}: empty; give a preset ({', '.join(PRESETS)}) or key=value items")
        items = []
        for part in parts:
            key, sep, value = part.partition("=")
            items.append((key.strip().lower(), value.strip() if sep else None))
    fields: dict[str, Any] = {}
    for key, value in items:
        if value is None:
            if key not in PRESETS:
                raise UsageError(f"{flag} {shown}: unknown preset '{key}' (presets: {', '.join(PRESETS)})")
            fields.update(PRESETS[key])
            continue
        if key not in _PRE_KEYS:
            raise UsageError(f"{flag} {shown}: unknown key '{key}' (keys: {', '.join(_PRE_KEYS)})")
        try:
            fields[key] = _convert_pre(key, value)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{flag} {shown}: {key}: {exc}") from None
    return ImagePreprocess(**fields)


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _floats(value: Any) -> tuple[float, ...]:
    if isinstance(value, str):
        value = [v for v in re.split(r"[;,\s]+", value.strip().strip("[]")) if v]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    try:
        out = tuple(float(v) for v in value)
    except (ValueError, TypeError):
        out = ()
    if not out or len(out) > 4 or not all(math.isfinite(v) for v in out):
        raise ValueError(f"expected 1 to 4 finite numbers separated by ';', got {value!r}")
    return out


def _convert_pre(key: str, value: Any) -> Any:
    if key == "resize":
        try:
            if isinstance(value, str):
                dims = [int(d) for d in re.split(r"[x;,]", value.lower().strip().strip("[]"))]
            elif isinstance(value, int):
                dims = [value]
            else:
                dims = [int(d) for d in value]
        except (ValueError, TypeError):
            dims = []
        if len(dims) == 1:
            dims = dims * 2
        if len(dims) != 2 or min(dims) < 1:
            raise ValueError(f"expected HxW such as 224x224, got {value!r}")
        return (dims[0], dims[1])
    if key == "fit":
        v = str(value).lower()
        if v not in ("stretch", "crop", "pad"):
            raise ValueError(f"expected stretch, crop or pad, got {value!r}")
        return v
    if key in ("mean", "std"):
        vals = _floats(value)
        if key == "std" and any(v == 0 for v in vals):
            raise ValueError("must not be 0")
        return vals
    if key in ("scale", "pad"):
        try:
            v = float(value)
        except (ValueError, TypeError):
            v = math.nan
        if not math.isfinite(v) or (key == "scale" and v <= 0):
            raise ValueError(f"expected a {'positive ' if key == 'scale' else ''}number, got {value!r}")
        return v
    if key == "layout":
        v = str(value).upper()
        if v not in ("NCHW", "NHWC"):
            raise ValueError(f"expected NCHW or NHWC, got {value!r}")
        return v
    if key == "channels":
        v = str(value).upper()
        if v not in ("RGB", "BGR"):
            raise ValueError(f"expected RGB or BGR, got {value!r}")
        return v
    raise ValueError(f"unknown key {key}")


class _ImageSource(_Source):
    kind = "images"

    def __init__(self, folder: Path, files: list[Path], spec: InputSpec, pre: ImagePreprocess,
                 note: Callable[[str], None]):
        self.label = str(folder)
        self.files = files
        self.spec = spec
        self.pre = pre
        where = f"--calib {folder}"
        if spec.dtype is not None and spec.dtype.kind not in "fiu":
            raise UsageError(f"{where}: input '{spec.name}' is {spec.dtype}; images feed float or integer inputs")
        shape = spec.shape
        if shape is None or len(shape) != 4:
            raise UsageError(
                f"{where}: images feed a 4-D input (NCHW or NHWC); input '{spec.name}' is {spec.shape_text()}"
            )
        layout = pre.layout
        if layout is None:
            nchw = shape[1] in (1, 3) and shape[3] not in (1, 3)
            nhwc = shape[3] in (1, 3) and shape[1] not in (1, 3)
            layout = "NHWC" if nhwc and not nchw else "NCHW"
        self.layout = layout
        c_axis, h_axis, w_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
        channels = shape[c_axis] if shape[c_axis] is not None else max(len(pre.mean), len(pre.std), 3)
        if channels not in (1, 3):
            raise UsageError(
                f"{where}: input '{spec.name}' ({spec.shape_text()}, {layout}) has {channels} channels; "
                "images give 1 (gray) or 3"
            )
        self.channels = channels
        for key in ("mean", "std"):
            vals = getattr(pre, key)
            if len(vals) not in (1, channels):
                raise UsageError(f"--calib-preprocess: {key} has {len(vals)} values, input '{spec.name}' has {channels} channels")
        if pre.resize is not None:
            size = pre.resize
        elif shape[h_axis] is not None and shape[w_axis] is not None:
            size = (shape[h_axis], shape[w_axis])
        else:
            raise UsageError(
                f"{where}: input '{spec.name}' has a dynamic height or width ({spec.shape_text()}); "
                "give resize=HxW in --calib-preprocess"
            )
        self.size = size
        self.batch = spec.batch
        got = [0, 0, 0, 0]
        got[0], got[c_axis], got[h_axis], got[w_axis] = self.batch, channels, size[0], size[1]
        if not spec.matches(got):
            raise UsageError(
                f"{where}: input '{spec.name}': expected {spec.shape_text()}, "
                f"preprocessing gives {_shape_text(got)} ({layout})"
            )
        self.count = len(files) // self.batch
        if self.count == 0:
            raise UsageError(f"{where}: {len(files)} images, fewer than the model's batch size {self.batch}")
        if len(files) % self.batch:
            note(f"calibration: {len(files) % self.batch} images of {folder} left over after batches of {self.batch}")
        self.dtype = spec.dtype or np.dtype(np.float32)
        self.mean = np.asarray(pre.mean, np.float32)
        self.std = np.asarray(pre.std, np.float32)

    def __len__(self) -> int:
        return self.count

    def _image(self, path: Path) -> np.ndarray:
        from PIL import Image

        h, w = self.size
        pre = self.pre
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                if pre.fit == "stretch":
                    img = img.resize((w, h), Image.BILINEAR)
                else:
                    iw, ih = img.size
                    ratio = max(w / iw, h / ih) if pre.fit == "crop" else min(w / iw, h / ih)
                    nw, nh = max(1, round(iw * ratio)), max(1, round(ih * ratio))
                    img = img.resize((nw, nh), Image.BILINEAR)
                    if pre.fit == "crop":
                        left, top = (nw - w) // 2, (nh - h) // 2
                        img = img.crop((left, top, left + w, top + h))
                    else:
                        fill = int(round(pre.pad)) if self.channels == 1 else (int(round(pre.pad)),) * 3
                        canvas = Image.new(img.mode, (w, h), fill)
                        canvas.paste(img, ((w - nw) // 2, (h - nh) // 2))
                        img = canvas
                arr = np.asarray(img, dtype=np.float32)
        except Exception as exc:
            raise UsageError(f"--calib {path}: cannot read image ({first_line(exc, limit=10**6)})") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if pre.channels == "BGR" and self.channels == 3:
            arr = arr[:, :, ::-1]
        arr = (arr / np.float32(pre.scale) - self.mean) / self.std
        if self.layout == "NCHW":
            arr = arr.transpose(2, 0, 1)
        return arr

    def read(self, index: int) -> dict[str, np.ndarray]:
        files = self.files[index * self.batch:(index + 1) * self.batch]
        batch = np.stack([self._image(p) for p in files])
        if self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            batch = np.clip(np.rint(batch), info.min, info.max)
        return {self.spec.name: np.ascontiguousarray(batch.astype(self.dtype))}


# ----------------------------------------------------------------------------------
# The reader
# ----------------------------------------------------------------------------------
CACHE_BYTES = 1 << 30  # samples kept in memory per calibration source


class CalibrationData:
    """Samples for calibration: ``len``, iteration (dicts ``input name -> array``
    with the model's rank), indexing, ``split`` and an onnxruntime adapter.

    Iterate in order where possible: sources stream from disk.  ``track()``
    iterates with a progress bar.  Views (``split``, ``take``) share the source.
    """

    def __init__(self, source: _Source, specs: list[InputSpec], indices: Sequence[int] | None = None,
                 *, quiet: bool = False):
        self._source = source
        self.specs = specs
        self._indices = list(range(len(source))) if indices is None else list(indices)
        self.quiet = quiet

    # -- basics ---------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def kind(self) -> str:
        """``npz``, ``npy``, ``folder``, ``images`` or ``random``."""
        return self._source.kind

    @property
    def source(self) -> str:
        return self._source.label

    @property
    def indices(self) -> list[int]:
        """Positions of these samples in the whole source."""
        return list(self._indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __repr__(self) -> str:
        return f"CalibrationData({self.source!r}, {len(self)} samples, inputs={self.input_names})"

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self._read(self._indices[i])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        try:
            for index in self._indices:
                yield self._read(index)
        finally:
            self._source.close()

    def _read(self, index: int) -> dict[str, np.ndarray]:
        """Sample ``index``, kept (read-only, up to ``CACHE_BYTES`` per source,
        shared by views) for the passes that read the samples again and again:
        pruning runs the model on them once per layer and per trial, and
        decoding images or drawing random inputs each time cost more than the
        run (PP-OCR det: 24 of 296 s)."""
        cache = self._source.__dict__.setdefault("_samples", {})
        if index in cache:
            return dict(cache[index])
        sample = self._source.read(index)
        size = sum(np.asarray(a).nbytes for a in sample.values())
        used = self._source.__dict__.get("_sample_bytes", 0)
        if used + size <= CACHE_BYTES:
            for a in sample.values():
                if isinstance(a, np.ndarray):
                    a.flags.writeable = False
            cache[index] = sample
            self._source.__dict__["_sample_bytes"] = used + size
        return dict(sample)

    def track(self, description: str = "calibrating", quiet: bool | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Iterate with a progress bar on a terminal (see :func:`progress`)."""
        return progress(iter(self), len(self), description, self.quiet if quiet is None else quiet)

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> "CalibrationData":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- views ----------------------------------------------------------------------
    def _view(self, indices: Sequence[int]) -> "CalibrationData":
        return CalibrationData(self._source, self.specs, indices, quiet=self.quiet)

    def take(self, n: int) -> "CalibrationData":
        """The first ``n`` samples."""
        return self._view(self._indices[: max(n, 0)])

    def split(self, holdout_fraction: float, seed: int = 0) -> tuple["CalibrationData", "CalibrationData"]:
        """``(calibration, holdout)``: a seeded random ``holdout_fraction`` of the
        samples is held out (at least one, leaving at least one, when the
        fraction is above 0).  Both keep source order; the same seed gives the
        same split."""
        if not 0 <= holdout_fraction < 1:
            raise UsageError(f"calibration holdout fraction must be in [0, 1), got {holdout_fraction}")
        n = len(self)
        if holdout_fraction == 0:
            return self._view(self._indices), self._view([])
        if n < 2:
            raise UsageError(f"calibration data {self.source} has {n} sample(s); cannot hold any out")
        k = min(max(round(n * holdout_fraction), 1), n - 1)
        perm = np.random.default_rng([seed, 0x501D]).permutation(n)
        held = set(perm[:k].tolist())
        return (
            self._view([x for j, x in enumerate(self._indices) if j not in held]),
            self._view([x for j, x in enumerate(self._indices) if j in held]),
        )

    # -- onnxruntime ----------------------------------------------------------------
    def as_ort_reader(self, description: str | None = None):
        """An ``onnxruntime.quantization.CalibrationDataReader`` over these samples
        (``get_next`` returns a feed dict, then None).  With ``description``, a
        progress bar follows as onnxruntime pulls samples."""
        return _make_ort_reader(self, description)


def _make_ort_reader(data: CalibrationData, description: str | None):
    from onnxruntime.quantization import CalibrationDataReader

    class GraphoptCalibrationReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.data = data
            self._range = (0, len(data))
            self.rewind()

        def _start(self) -> Iterator[dict[str, np.ndarray]]:
            view = self.data._view(self.data._indices[self._range[0]:self._range[1]])
            return view.track(description) if description else iter(view)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = self._start()

        def set_range(self, start_index: int, end_index: int) -> None:
            self._range = (start_index, end_index)
            self.rewind()

        def __len__(self) -> int:
            return len(range(*self._range))

    return GraphoptCalibrationReader()


def collect_ranges(model: Any, data: CalibrationData, method: str = "minmax", *,
                   op_types: Sequence[str] | None = None, extra_options: Mapping[str, Any] | None = None,
                   description: str | None = "calibrating"):
    """Run one of onnxruntime's calibrators over ``data``; returns its
    ``TensorsData`` (per tensor name: lowest/highest, and a histogram for the
    histogram methods).  ``method``: minmax, entropy, percentile or distribution.

    ``model`` is a :class:`graphopt.ir.Model`, an ``onnx.ModelProto`` or a path;
    it is written to a temporary folder for onnxruntime.
    """
    import tempfile

    import onnx
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}
    if method not in methods:
        raise UsageError(f"calibration method '{method}': expected one of {', '.join(methods)}")
    with tempfile.TemporaryDirectory(prefix="graphopt-calib-") as tmp:
        path = Path(tmp) / "model.onnx"
        if isinstance(model, (str, Path)):
            path = Path(model)
        elif isinstance(model, onnx.ModelProto):
            onnx.save(model, path)
        else:
            from graphopt.ir import save

            save(model, path)
        calibrator = create_calibrator(
            path, list(op_types) if op_types else None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=methods[method], extra_options=dict(extra_options or {}),
        )
        calibrator.collect_data(data.as_ort_reader(description))
        return calibrator.compute_data()


# ----------------------------------------------------------------------------------
# Opening
# ----------------------------------------------------------------------------------
def check_spec(spec: str, preprocess: Any = None, max_samples: int | None = None) -> ImagePreprocess | None:
    """Checks that need no model (run before loading it): the path exists,
    ``random:N`` is well formed, the preprocessing parses, the cap is positive."""
    if max_samples is not None and max_samples < 1:
        raise UsageError(f"--calib-samples must be at least 1, got {max_samples}")
    pre = parse_preprocess(preprocess)
    spec = str(spec)
    if spec.startswith(RANDOM_PREFIX):
        _random_count(spec)
        if pre is not None:
            raise UsageError(f"--calib-preprocess applies to a folder of images, not to {spec}")
        return pre
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"--calib {spec}: no such file or folder")
    if path.is_file() and path.suffix.lower() not in ARRAY_EXTENSIONS:
        raise UsageError(f"--calib {spec}: expected a .npz or .npy file, a folder of .npy/.npz or images, or random:N")
    if pre is not None and path.is_file():
        raise UsageError(f"--calib-preprocess applies to a folder of images, not to {spec}")
    return pre


def _random_count(spec: str) -> int:
    text = spec[len(RANDOM_PREFIX):]
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(f"--calib {spec}: expected random:N with N >= 1 samples, e.g. random:16")
    return n


def open_reader(
    spec: str | Path,
    model: Any,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    preprocess: str | ImagePreprocess | Mapping[str, Any] | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
) -> CalibrationData:
    """Open calibration data for ``model`` and check it against the model's inputs.

    ``spec``: a ``.npz``, a folder of ``.npy``/``.npz``, a folder of images (needs
    ``preprocess``, see :func:`parse_preprocess`), or ``random:N``.
    ``model``: a :class:`graphopt.ir.Model`, ``onnx.ModelProto`` or path.
    ``input_shapes`` pins dynamic dimensions (like ``--input-shape``);
    ``max_samples`` keeps the first N samples; ``seed`` seeds ``random:N``.
    ``log`` receives notes (casts, ignored arrays) unless ``quiet``.
    Raises :class:`~graphopt.errors.UsageError` with a one-line message.
    """
    pre = check_spec(str(spec), preprocess, max_samples)

    def note(msg: str) -> None:
        if not quiet:
            (log or (lambda m: print(m, file=sys.stderr)))(msg)

    specs = input_specs(model, input_shapes)
    spec = str(spec)
    if not specs:
        raise UsageError(f"--calib {spec}: the model has no inputs to calibrate")
    source: _Source
    if spec.startswith(RANDOM_PREFIX):
        source = _RandomSource(_random_count(spec), specs, seed)
    else:
        path = Path(spec)
        if path.is_file() and path.suffix.lower() == ".npy":
            source = _npy_source(path, specs, note)
        elif path.is_file():
            source = _npz_source(path, specs, note)
        else:
            source = _folder_source(path, specs, pre, note)
    try:
        if len(source) == 0:
            raise UsageError(f"--calib {spec}: no samples")
        data = CalibrationData(source, specs, quiet=quiet)
        if max_samples is not None and max_samples < len(data):
            data = data.take(max_samples)
        if source.kind == "images":
            data[0]  # decode one image now: a preprocessing mistake shows before any pass runs
    except BaseException:
        source.close()
        raise
    source.close()
    return data


def _folder_source(path: Path, specs: list[InputSpec], pre: ImagePreprocess | None,
                   note: Callable[[str], None]) -> _Source:
    try:
        top = list(path.iterdir())
    except OSError as exc:
        raise UsageError(f"--calib {path}: cannot read folder ({exc.strerror or exc})") from None
    names = {s.name for s in specs}
    has_arrays = any(p.is_file() and p.suffix.lower() in ARRAY_EXTENSIONS for p in top)
    per_input_dirs = bool(names) and all((path / n).is_dir() for n in names) and any(
        q.suffix.lower() == ".npy" for n in names for q in (path / n).iterdir()
    )
    if has_arrays or per_input_dirs:
        if pre is not None:
            raise UsageError(f"--calib-preprocess applies to a folder of images; {path} holds arrays")
        return _array_folder_source(path, specs, note)
    images = sorted(
        (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not images:
        raise UsageError(f"--calib {path}: no .npy, .npz or image files")
    if pre is None:
        raise UsageError(
            f"--calib {path}: a folder of images needs --calib-preprocess (e.g. 'imagenet', 'raw', or "
            "'resize=224x224,scale=255,mean=0.485;0.456;0.406,std=0.229;0.224;0.225')"
        )
    if len(specs) != 1:
        raise UsageError(
            f"--calib {path}: images feed a model with one input; this model has {len(specs)} "
            f"({', '.join(s.name for s in specs)})"
        )
    return _ImageSource(path, images, specs[0], pre, note)


# ----------------------------------------------------------------------------------
def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) or "a scalar"




__all__ = [
    "CalibrationData", "ImagePreprocess", "InputSpec", "PRESETS", "check_spec", "collect_ranges",
    "input_specs", "open_reader", "parse_preprocess",
]
