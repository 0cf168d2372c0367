"""Files written so that a failure leaves nothing half-written.

Every output graphopt writes (models and their external data, reports,
calibration copies, run outputs, tuning records) goes through a temporary
file beside its destination that is renamed onto it only once it is whole.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def tmp_beside(path: Path) -> Path:
    """A new empty file beside ``path`` to write and then rename onto it, with the
    permissions a new file gets (0666 less the umask), as onnx.save's do."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600.
        os.fchmod(fd, 0o666 & ~umask())
    finally:
        os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_files() -> Iterator[Callable[[Path], Path]]:
    """Write several files so that a failure leaves none half-written: inside the
    block, ``beside(dest)`` gives a temporary file (:func:`tmp_beside`) to fill;
    when the block ends, each is renamed onto its destination in the order they
    were asked for (data before the model that points to it); when it raises,
    they are removed."""
    pending: list[tuple[Path, Path]] = []

    def beside(dest: Path) -> Path:
        tmp = tmp_beside(dest)
        pending.append((tmp, dest))
        return tmp

    try:
        yield beside
        while pending:
            os.replace(*pending[0])
            pending.pop(0)
    finally:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)


def umask() -> int:
    """The process's umask (reading it means setting it; it is put back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_files() as beside:
        beside(Path(path)).write_text(text)


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as indented JSON (values JSON does not know as their str)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def copy_atomic(src: Path, dst: Path) -> None:
    with atomic_files() as beside:
        shutil.copyfile(src, beside(Path(dst)))
