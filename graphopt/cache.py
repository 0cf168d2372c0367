"""An on-disk cache of command outputs, so a build system can call graphopt like
a compiler and pay for a run only when one of its inputs changed.

A cache entry is keyed by a :class:`CacheKey`: the sha256 over everything that
decides the output bytes (the input model and its external-data files,
calibration data, the canonical pipeline text, output-changing flags, the
versions of graphopt and its libraries, and the source of the code that runs).
Any command that writes one model can reuse it::

    key = CacheKey("compress")
    key.add_model("input", path)              # model file + its external data
    key.add_text("pipeline", str(pipeline))    # canonical text, options included
    key.add_calibration("calib", spec)         # file / folder contents, random:N as text
    key.add_value("seed", 0)                   # any JSON-able flag value
    key.add_code(pipeline.passes())            # source of graphopt and of these passes
    key.add_versions()
    cache = Cache.from_options(cache_dir, no_cache)   # None when disabled
    entry = cache.lookup(key) if cache else None
    if entry: entry.restore(output)            # atomic copy to the output path
    else: ...run...; cache.store(key, output, report=..., stats=...)

Entries are folders ``ROOT/v1/KK/KEY`` written into a temporary folder and
renamed into place, so a crash never leaves half an entry; ``meta.json`` records
the sha256 of every file, and an entry that fails the check is removed and
treated as a miss.
"""
from __future__ import annotations

import hashlib
import time
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable

from graphopt.errors import UsageError

ENV_VAR = "GRAPHOPT_CACHE_DIR"
# Set to 1 to turn the cache off unless --cache-dir is given (test suites, CI).
ENV_OFF = "GRAPHOPT_NO_CACHE"
LAYOUT = "v1"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "meta.json"
# Libraries whose version can change the bytes graphopt writes.
LIBRARIES = ("onnx", "onnxruntime", "onnx_graphsurgeon", "numpy")
_CHUNK = 4 * 2**20


def default_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "graphopt"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------
class CacheKey:
    """What an output depends on, as named parts; :meth:`digest` is the key.

    Parts are added by name and the digest covers the sorted names, so the order
    of ``add_*`` calls does not matter and two commands never share an entry.
    """

    def __init__(self, command: str):
        self.parts: dict[str, Any] = {"command": command}

    def add_value(self, name: str, value: Any) -> "CacheKey":
        """A flag value (JSON-able: numbers, strings, lists, dicts, None)."""
        self.parts[name] = json.loads(json.dumps(value, sort_keys=True, default=str))
        return self

    add_text = add_value

    def add_file(self, name: str, path: str | os.PathLike | None) -> "CacheKey":
        """A file by its contents (not its name or mtime)."""
        self.parts[name] = None if path is None else sha256_file(path)
        return self

    def add_model(self, name: str, path: str | os.PathLike) -> "CacheKey":
        """An .onnx model and every external-data file it references, by contents."""
        import onnx

        from graphopt.ir import iter_tensor_protos, resolve_external_path

        path = Path(path)
        data = path.read_bytes()
        proto = onnx.ModelProto.FromString(data)
        files: dict[str, str] = {}
        for tensor in iter_tensor_protos(proto.graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location not in files:
                files[location] = sha256_file(resolve_external_path(path.parent, location, tensor.name))
        self.parts[name] = {"model": hashlib.sha256(data).hexdigest(), "external": dict(sorted(files.items()))}
        return self

    def add_calibration(self, name: str, spec: str | None) -> "CacheKey":
        """``random:N`` by its text; a file by its contents; a folder by the
        relative path and contents of every file under it."""
        if spec is None or spec.startswith("random:"):
            self.parts[name] = spec
            return self
        path = Path(spec)
        if path.is_dir():
            files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
            self.parts[name] = {p.relative_to(path).as_posix(): sha256_file(p) for p in files}
        else:
            self.parts[name] = sha256_file(path)
        return self

    def add_versions(self) -> "CacheKey":
        """graphopt, Python and the libraries in :data:`LIBRARIES`."""
        import importlib.metadata

        from graphopt import __version__

        versions = {"graphopt": __version__, "python": ".".join(map(str, sys.version_info[:3]))}
        for lib in LIBRARIES:
            module = sys.modules.get(lib)
            version = getattr(module, "__version__", None)
            if version is None:
                try:
                    version = importlib.metadata.version(lib.replace("_", "-"))
                except importlib.metadata.PackageNotFoundError:
                    version = "absent"
            versions[lib] = str(version)
        self.parts["versions"] = versions
        return self

    def add_code(self, passes: Iterable[Any] = ()) -> "CacheKey":
        """The source of graphopt's own packages and of the modules defining the
        given passes (plug-ins included): an edited pass in a development
        checkout, where the version number stays put, still misses."""
        self.parts["code"] = code_fingerprint(tuple(sorted({type(p).__module__ if not isinstance(p, type)
                                                            else p.__module__ for p in passes})))
        return self

    def digest(self) -> str:
        text = json.dumps(self.parts, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


_CODE_CACHE: dict[tuple[str, ...], str] = {}


def code_fingerprint(modules: tuple[str, ...] = ()) -> str:
    if modules in _CODE_CACHE:
        return _CODE_CACHE[modules]
    import graphopt
    import graphopt.passes as builtin_passes

    h = hashlib.sha256()
    roots = [Path(graphopt.__file__).parent, Path(builtin_passes.__file__).parent]
    files: list[Path] = []
    for root in roots:
        files.extend(sorted(root.rglob("*.py")))
    for name in modules:
        file = getattr(sys.modules.get(name), "__file__", None)
        if file and not any(Path(file).is_relative_to(r) for r in roots):
            files.append(Path(file))
    for file in files:
        h.update(file.name.encode() + b"\0")
        h.update(hashlib.sha256(file.read_bytes()).digest())
    _CODE_CACHE[modules] = h.hexdigest()
    return _CODE_CACHE[modules]


# ----------------------------------------------------------------------------------
class Entry:
    """A checked cache entry: the stored model (and data file) plus meta.json."""

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder = folder
        self.meta = meta

    @property
    def report(self) -> dict[str, Any] | None:
        return self.meta.get("report")

    @property
    def stats(self) -> dict[str, Any]:
        return self.meta.get("stats", {})

    def restore(self, output: str | os.PathLike) -> Path:
        """Copy the cached model to ``output`` atomically (data file first, then the
        model, each through a temporary file and a rename), pointing its external
        data at ``OUTPUT.data`` as a fresh run would."""
        from graphopt.files import atomic_files

        output = Path(output)
        location = self.meta.get("data_location")
        model_bytes = (self.folder / MODEL_FILE).read_bytes()
        with atomic_files() as beside:
            if location:
                new_location = output.name + ".data"
                if new_location != location:
                    model_bytes = _relocate(model_bytes, location, new_location)
                shutil.copyfile(self.folder / DATA_FILE, beside(output.with_name(new_location)))
            beside(output).write_bytes(model_bytes)
        return output


class Cache:
    """A cache folder; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def from_options(cls, cache_dir: str | None, no_cache: bool = False) -> "Cache | None":
        """The cache selected by ``--cache-dir``/``GRAPHOPT_CACHE_DIR``/default, or
        None with ``--no-cache`` (or ``GRAPHOPT_NO_CACHE=1`` and no ``--cache-dir``).
        A cache folder that cannot be created is a usage error naming it."""
        if no_cache or (not cache_dir and os.environ.get(ENV_OFF, "") not in ("", "0")):
            return None
        root = Path(cache_dir).expanduser() if cache_dir else default_dir()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            flag = "--cache-dir" if cache_dir else (ENV_VAR if os.environ.get(ENV_VAR) else "cache folder")
            raise UsageError(f"{flag} {root}: cannot create ({exc.strerror or exc})") from None
        return cls(root)

    def folder(self, key: CacheKey | str) -> Path:
        digest = key if isinstance(key, str) else key.digest()
        return self.root / LAYOUT / digest[:2] / digest

    def lookup(self, key: CacheKey | str, *, need_report: bool = False) -> Entry | None:
        """The entry for ``key`` if present and intact; a damaged one is removed.
        With ``need_report``, an entry stored without a report counts as a miss."""
        folder = self.folder(key)
        if not folder.is_dir():
            return None
        try:
            meta = json.loads((folder / META_FILE).read_text())
            for name, info in meta["files"].items():
                path = folder / name
                if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
                    raise ValueError(f"{name} does not match its checksum")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            _remove(folder)
            return None
        if need_report and meta.get("report") is None:
            return None
        return Entry(folder, meta)

    def store(self, key: CacheKey, output: str | os.PathLike, *, report: dict[str, Any] | None = None,
              stats: dict[str, Any] | None = None) -> Path | None:
        """Copy a freshly written model (and its ``OUTPUT.data`` if the model
        references it) into a new entry; returns the entry folder, or None when
        the cache cannot be written (never an error: the output is already done)."""
        output = Path(output)
        final = self.folder(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        except OSError:
            return None
        try:
            files = {MODEL_FILE: output}
            location = _external_location(output)
            if location:
                files[DATA_FILE] = output.with_name(location)
            meta: dict[str, Any] = {"layout": LAYOUT, "key": key.parts, "data_location": location, "files": {},
                                    "stats": stats or {}, "report": report}
            for name, src in files.items():
                shutil.copyfile(src, tmp / name)
                meta["files"][name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
            if final.exists():  # a damaged or report-less entry being rebuilt
                _remove(final)
            try:
                os.rename(tmp, final)
            except OSError:  # another process stored the same key first
                _remove(tmp)
            return final
        except OSError:
            _remove(tmp)
            return None

    def clear(self) -> None:
        _remove(self.root / LAYOUT)


# ----------------------------------------------------------------------------------
def _external_location(model_path: Path) -> str | None:
    """``NAME.data`` if the model written at ``model_path`` references it (graphopt
    writes all external weights into that one file)."""
    data = model_path.with_name(model_path.name + ".data")
    if not data.is_file():
        return None
    import onnx

    from graphopt.ir import iter_tensor_protos

    proto = onnx.load_model(str(model_path), load_external_data=False)
    for tensor in iter_tensor_protos(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return data.name
    return None


def _relocate(model_bytes: bytes, old: str, new: str) -> bytes:
    import onnx

    from graphopt.ir import iter_tensor_protos

    proto = onnx.ModelProto.FromString(model_bytes)
    for tensor in iter_tensor_protos(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    return proto.SerializeToString(deterministic=True)


def _remove(path: Path) -> None:
    """Move aside, then delete: a reader never sees a half-deleted entry."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{uuid.uuid4().hex}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------
# Command glue: flags, and the hit/miss steps of ``graphopt opt``
# ----------------------------------------------------------------------------------
# Options that exist to watch the passes run: a run with them bypasses the cache.
DIAGNOSTIC_OPTIONS = ("dump-dir", "print-ir-after", "time-passes")
# Run options that do not change the output file.
_NOT_IN_KEY = ("report",) + DIAGNOSTIC_OPTIONS


def add_arguments(parser: Any) -> None:
    parser.add_argument("--cache-dir", metavar="DIR",
                        help=f"reuse outputs of identical runs from this folder (default: ${ENV_VAR} or "
                             "~/.cache/graphopt)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the output cache")


def opt_key(args: Any, pipeline: Any, run_opts: dict[str, Any], calib: dict[str, Any] | None,
            input_shapes: dict[str, list[int]]) -> CacheKey:
    """Everything that decides the bytes ``graphopt opt`` writes."""
    key = CacheKey("opt")
    key.add_model("input", args.input)
    key.add_text("pipeline", str(pipeline))
    key.add_calibration("calib", calib["spec"] if calib else None)
    key.add_value("calib-options", {k: v for k, v in (calib or {}).items() if k != "spec"})
    key.add_file("inputs", getattr(args, "inputs", None))
    key.add_value("input-shapes", dict(sorted(input_shapes.items())))
    key.add_value("run", {k: v for k, v in sorted(run_opts.items()) if k not in _NOT_IN_KEY})
    key.add_code(pipeline.passes())
    key.add_versions()
    return key


class CommandCache:
    """The cache as one command run sees it: ``status`` is "hit", "miss" or
    "off" (disabled, or bypassed for diagnostics)."""

    def __init__(self, cache: Cache | None = None, key: CacheKey | None = None, input_path: str = ""):
        self.cache = cache
        self.key = key
        self.input_path = input_path
        self.status = "miss" if cache is not None and key is not None else "off"

    @classmethod
    def for_opt(cls, args: Any, pipeline: Any, run_opts: dict[str, Any], calib: dict[str, Any] | None,
                input_shapes: dict[str, list[int]]) -> "CommandCache":
        if any(run_opts.get(k) for k in DIAGNOSTIC_OPTIONS):
            return cls()
        cache = Cache.from_options(getattr(args, "cache_dir", None), getattr(args, "no_cache", False))
        if cache is None:
            return cls()
        try:
            key = opt_key(args, pipeline, run_opts, calib, input_shapes)
        except Exception:  # unreadable input or calibration data: the normal run names the problem
            return cls()
        return cls(cache, key, str(args.input))

    def restore(self, output: Path, report_path: str | None, log: Any = None) -> Entry | None:
        """On a hit, write ``output`` (and the report, marked ``"cache": "hit"``)."""
        if self.cache is None or self.key is None or self._overwrites_input(output):
            return None  # the normal run refuses to overwrite the input, in one line
        start = time.perf_counter()
        entry = self.cache.lookup(self.key, need_report=bool(report_path))
        if entry is None:
            return None
        try:
            entry.restore(output)
        except OSError as exc:
            if exc.filename and Path(exc.filename).parent == entry.folder:
                return None  # the entry went away under us (rebuilt by another run): a miss
            raise UsageError(f"-o {output}: cannot write ({exc.strerror or exc})") from None
        self.status = "hit"
        seconds = time.perf_counter() - start
        if report_path:
            from graphopt.files import write_json_atomic

            report = dict(entry.report or {}, cache="hit", output=str(output), seconds=round(seconds, 6),
                          cached_seconds=(entry.report or {}).get("seconds"))
            report["input"] = self.input_path
            try:
                write_json_atomic(Path(report_path), report)
            except OSError as exc:
                raise UsageError(f"--report {report_path}: cannot write ({exc.strerror or exc})") from None
        if log is not None:
            log.cache = "hit"
            log.nodes = dict(entry.stats.get("nodes", log.nodes))
            log.timing("restore", seconds)
        return entry

    def _overwrites_input(self, output: Path) -> bool:
        inp = Path(self.input_path)
        external = (self.key.parts.get("input") or {}).get("external", {}) if self.key else {}
        protected = {inp.resolve()} | {(inp.parent / loc).resolve() for loc in external}
        out = output.resolve()
        return out in protected or out.with_name(out.name + ".data") in protected

    def store(self, output: Path, report: dict[str, Any] | None, stats: dict[str, Any]) -> None:
        if self.cache is not None and self.key is not None and self.status == "miss":
            self.cache.store(self.key, output, report=report, stats=stats)
