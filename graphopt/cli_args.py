"""Arguments and checks that several ``graphopt`` commands share (opt,
inspect, compile, run, compress), so each command module imports them from
here rather than from another command."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from graphopt.errors import UsageError


def check_output_path(path: Path, flag: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: output folder '{parent}' does not exist")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder")


def add_metric_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metric", action="append", metavar="NAME=MODULE:FUNCTION",
                        help="a task metric for fidelity specs, repeatable: NAME=module.path:function or "
                             "NAME=path/to/file.py:function, called per held-out sample as "
                             "function(reference, candidate, inputs) -> float, higher is better")


def register_metrics(args: argparse.Namespace) -> None:
    """Load every ``--metric`` so that fidelity specs (the run's and the passes')
    can name them."""
    from graphopt import metrics

    metrics.register_options(getattr(args, "metric", None))


def parse_input_shapes(items: Sequence[str]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = [int(d) for d in dims.lower().split("x")] if dims else []
            if any(d < 0 for d in shape):
                raise ValueError
        except ValueError:
            raise UsageError(f"--input-shape '{item}': expected NAME=DxDxD, e.g. input=1x3x224x224") from None
        shapes[name] = shape
    return shapes


def load_npz(path: str, flag: str) -> dict[str, Any]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except Exception as exc:
        raise UsageError(f"{flag} {path}: not a readable .npz ({str(exc).splitlines()[0] if str(exc) else exc})") from None
