"""Artifact folders: written atomically with a manifest, loaded back through
the backend the manifest names.

A backend writes its files into a fresh temporary folder beside the
destination; the manifest goes in last and the folder is renamed into place,
so a failed or interrupted compile never leaves a partial artifact.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from graphopt.backends.base import Artifact, CompileOptions, Runner, TensorSpec
from graphopt.backends.base import input_specs  # noqa: F401  (its home is base; importable here as the README once showed)
from graphopt.calibration import check_input_shapes
from graphopt.errors import ModelError, UsageError, first_line

MANIFEST = "manifest.json"
FORMAT = "graphopt-artifact/1"


def compile_model(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backend: str = "tvm",
    target: str = "x86_64",
    options: CompileOptions | None = None,
) -> Path:
    """Compile an ONNX file into the artifact folder ``out``; returns ``out``.

    Checks that need no model (backend, target, options, output folder) run
    first; an existing artifact at ``out`` is replaced only once the new one
    is complete.
    """
    from graphopt.backends.registry import get_backend
    from graphopt import __version__
    from graphopt.files import umask
    from graphopt.ir import load

    options = options or CompileOptions()
    be = get_backend(backend)
    target_info = be.resolve_target(target)
    be.check_options(options)
    out = Path(out)
    model_path = Path(model_path)
    check_output_folder(out, model_path)

    start = time.perf_counter()
    model = load(model_path)
    check_input_shapes(model, options.input_shapes)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        result = be.compile(model, target, options, tmp)
        manifest = {
            "format": FORMAT,
            "backend": be.name,
            "target": {**target_info, **result.target},
            "inputs": [s.as_dict() for s in result.inputs],
            "outputs": [s.as_dict() for s in result.outputs],
            "files": dict(result.files),
            "model": {"path": str(model_path), "sha256": sha256(model_path), "bytes": model_path.stat().st_size},
            "input_shapes": {k: list(v) for k, v in options.input_shapes.items()},
            "versions": {"graphopt": __version__, "python": platform.python_version(), **be.versions()},
            "compiled_on": platform.machine(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "compile_seconds": round(time.perf_counter() - start, 3),
            **result.extra,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, default=str)
            f.write("\n")
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_runner(path: str | os.PathLike) -> Runner:
    """A runner for an artifact folder (any backend, through its manifest) or
    for a plain .onnx file (onnxruntime)."""
    path = Path(path)
    if path.is_dir():
        artifact = read_artifact(path)
        from graphopt.backends.registry import get_backend

        try:
            be = get_backend(str(artifact.manifest.get("backend")))
        except UsageError:
            raise ModelError(f"{path}: compiled by backend '{artifact.manifest.get('backend')}', "
                             "which is not installed here") from None
        return be.load(artifact)
    if not path.exists():
        raise ModelError(f"{path}: no such file or artifact folder")
    from graphopt.backends.onnxruntime import model_runner

    return model_runner(path)


def read_artifact(path: Path) -> Artifact:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ModelError(f"{path}: not a graphopt artifact (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{manifest_path}: unreadable manifest ({first_line(exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelError(f"{manifest_path}: not a {FORMAT} manifest")
    return Artifact(path, manifest)


def check_output_folder(out: Path, model_path: Path | None = None) -> None:
    """``out`` may be new, an empty folder, or an artifact to replace; never a
    file, a folder with other contents, or a folder holding the input model."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"-o {out}: output folder '{parent}' does not exist")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise UsageError(f"-o {out}: exists and is not a folder")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise UsageError(f"-o {out}: folder is not empty and is not a graphopt artifact; refusing to replace it")
        if model_path is not None and out.resolve() in model_path.resolve().parents:
            raise UsageError(f"-o {out}: the input model is inside this folder; refusing to replace it")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def time_runner(run: Callable[[], Any], repeat: int, warmup: int = 1) -> dict[str, float]:
    """Warm-up runs, then ``repeat`` timed runs; milliseconds."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": repeat}


def _replace_folder(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, old / "artifact")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "artifact", out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
