"""User metrics: task-level fidelity written by the model's user.

A user metric scores one held-out sample: ``function(reference, candidate,
inputs) -> float``, each argument a dict of name to numpy array (reference:
the float model's outputs; inputs: the sample's feeds), higher is better.
Its value over a set of samples is the mean.  Fidelity specs name it like a
built-in metric (``--fidelity "box_f1>=0.99,cosine>=0.9"``).

Metrics come from ``--metric NAME=module.path:function`` or
``--metric NAME=path/to/file.py:function`` (:func:`load`, then
:func:`register`), or from installed packages through the entry-point group
``graphopt.metrics`` (the entry point's name is the metric's name; loaded on
first lookup).  A metric that raises or returns a non-finite value is a
one-line :class:`UsageError` naming it.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from graphopt.errors import UsageError, first_line

ENTRY_POINT_GROUP = "graphopt.metrics"
Arrays = Mapping[str, np.ndarray]
MetricFunction = Callable[[Arrays, Arrays, Arrays], float]

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class UserMetric:
    name: str
    function: MetricFunction
    origin: str  # where it came from, for messages: "file.py:function", "pkg.mod:fn (entry point)"

    def score(self, reference: Arrays, candidate: Arrays, inputs: Arrays) -> float:
        """The function's value on one sample; an exception or a value that is
        not a finite number is a UsageError naming the metric."""
        try:
            value = self.function(dict(reference), dict(candidate), dict(inputs))
        except Exception as exc:  # the user's code: report it, do not crash
            raise UsageError(f"metric '{self.name}' ({self.origin}) raised {type(exc).__name__}: "
                             f"{first_line(exc)}") from None
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"metric '{self.name}' ({self.origin}) returned {type(value).__name__}, "
                             "not a number") from None
        if not math.isfinite(value):
            raise UsageError(f"metric '{self.name}' ({self.origin}) returned {value}")
        return value


_REGISTERED: dict[str, UserMetric] = {}
_entry_points_loaded = False


def register(metric: UserMetric) -> UserMetric:
    _REGISTERED[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def lookup(name: str) -> UserMetric | None:
    """The metric registered as ``name`` (``--metric`` or an entry point), or None."""
    if name not in _REGISTERED:
        _load_entry_points()
    return _REGISTERED.get(name)


def registered() -> dict[str, UserMetric]:
    _load_entry_points()
    return dict(sorted(_REGISTERED.items()))


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from graphopt.registry import entry_points

    for ep in entry_points(ENTRY_POINT_GROUP):
        if ep.name in _REGISTERED:
            continue  # --metric wins over an installed one of the same name
        try:
            function = ep.load()
        except Exception as exc:
            print(f"graphopt: warning: metric entry point '{ep.name}' ({ep.value}) cannot load: {first_line(exc)}",
                  file=sys.stderr)
            continue
        if callable(function):
            register(UserMetric(ep.name, function, f"{ep.value} (entry point)"))


def load(text: str, where: str = "--metric") -> UserMetric:
    """``NAME=module.path:function`` or ``NAME=path/to/file.py:function``."""
    name, sep, target = text.partition("=")
    name, target = name.strip(), target.strip()
    example = "e.g. --metric box_f1=my_metrics:box_f1 or --metric box_f1=metrics.py:box_f1"
    if not sep or not _NAME.match(name) or ":" not in target:
        raise UsageError(f"{where} '{text}': expected NAME=module:function or NAME=file.py:function ({example})")
    from graphopt.fidelity import METRICS

    if name.lower() in METRICS:
        raise UsageError(f"{where} '{text}': '{name}' is a built-in metric; name yours differently")
    source, _, attr = target.rpartition(":")
    if source.endswith(".py") or "/" in source or "\\" in source:
        module = _module_from_file(Path(source), where, text)
    else:
        try:
            module = importlib.import_module(source)
        except Exception as exc:
            raise UsageError(f"{where} '{text}': cannot import module '{source}': {first_line(exc)}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise UsageError(f"{where} '{text}': '{source}' has no function '{attr}'")
    return UserMetric(name, function, target)


def _module_from_file(path: Path, where: str, text: str) -> Any:
    if not path.is_file():
        raise UsageError(f"{where} '{text}': no such file: {path}")
    spec = importlib.util.spec_from_file_location(f"graphopt_user_metric_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{where} '{text}': cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UsageError(f"{where} '{text}': {path} failed to load: {type(exc).__name__}: {first_line(exc)}") from None
    return module


def register_options(texts: list[str] | None, where: str = "--metric") -> list[UserMetric]:
    """Load and register every ``--metric`` given; a name given twice is an error."""
    found: list[UserMetric] = []
    for text in texts or []:
        metric = load(text, where)
        if any(m.name == metric.name for m in found):
            raise UsageError(f"{where}: metric '{metric.name}' is given twice")
        found.append(register(metric))
    return found


__all__ = ["ENTRY_POINT_GROUP", "UserMetric", "load", "lookup", "register", "register_options", "registered",
           "unregister"]
