"""The pass registry: built-in passes, named pipelines, and plug-ins.

Passes register with :func:`register_pass`.  Other packages add passes through
the ``graphopt.passes`` entry-point group; an entry point may name a module
(importing it runs its decorators) or a :class:`Pass` subclass.
"""
from __future__ import annotations

import importlib.metadata
import sys
from typing import Callable, TypeVar

from graphopt.errors import UsageError
from graphopt.pass_base import Pass, _suggest

ENTRY_POINT_GROUP = "graphopt.passes"

_PASSES: dict[str, type[Pass]] = {}
_PIPELINES: dict[str, tuple[str, str]] = {}  # name -> (pipeline text, doc)
_loaded = False
_plugin_errors: list[str] = []

P = TypeVar("P", bound=type[Pass])


def register_pass(name: str) -> Callable[[P], P]:
    def decorate(cls: P) -> P:
        if not issubclass(cls, Pass):
            raise TypeError(f"{cls!r} is not a graphopt Pass")
        if name in _PIPELINES or (name in _PASSES and _PASSES[name] is not cls):
            raise ValueError(f"pass name '{name}' is already registered")
        cls.name = name
        _PASSES[name] = cls
        return cls

    return decorate


def register_pipeline(name: str, text: str, doc: str) -> None:
    """Register a named pipeline usable as an element of any pipeline."""
    if name in _PASSES:
        raise ValueError(f"pipeline name '{name}' is already a pass")
    _PIPELINES[name] = (text, doc)


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import passes  # noqa: F401  (built-in passes register themselves)

    for ep in _entry_points():
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plug-in must not break graphopt
            _plugin_errors.append(f"entry point '{ep.name}' ({ep.value}): {exc}")
            continue
        if isinstance(obj, type) and issubclass(obj, Pass) and obj.name not in _PASSES:
            register_pass(obj.name or ep.name)(obj)


def _entry_points():
    eps = importlib.metadata.entry_points()
    if sys.version_info >= (3, 10):
        return list(eps.select(group=ENTRY_POINT_GROUP))
    return list(eps.get(ENTRY_POINT_GROUP, []))  # pragma: no cover


def passes() -> dict[str, type[Pass]]:
    _ensure_loaded()
    return dict(sorted(_PASSES.items()))


def pipelines() -> dict[str, tuple[str, str]]:
    _ensure_loaded()
    return dict(sorted(_PIPELINES.items()))


def plugin_errors() -> list[str]:
    _ensure_loaded()
    return list(_plugin_errors)


def get_pass(name: str) -> type[Pass]:
    _ensure_loaded()
    try:
        return _PASSES[name]
    except KeyError:
        raise UsageError(f"unknown pass '{name}'{_suggest(name, list(_PASSES) + list(_PIPELINES))}") from None


def get_pipeline(name: str) -> str | None:
    _ensure_loaded()
    entry = _PIPELINES.get(name)
    return entry[0] if entry else None
