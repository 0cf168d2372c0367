"""The pass registry: built-in passes, named pipelines, and plug-ins.

Passes register with :func:`register_pass`.  Other packages add passes through
the ``graphopt.passes`` entry-point group; an entry point may name a module
(importing it runs its decorators) or a :class:`Pass` subclass.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
from typing import Callable, Iterable, TypeVar

from graphopt.errors import UsageError
from graphopt.pass_base import Pass, _suggest

ENTRY_POINT_GROUP = "graphopt.passes"
BUILTIN_ENTRY_POINT, BUILTIN_MODULE = "builtin", "graphopt.passes"  # pyproject.toml's entry point for the built-in passes

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
    eps = _entry_points()
    # The built-in passes come through the project's own entry point, like a
    # plug-in, and first (a plug-in cannot take a built-in's name).  A source
    # tree used without `pip install` has no entry points: import them by name.
    builtin = [ep for ep in eps if ep.name == BUILTIN_ENTRY_POINT]
    if not builtin:
        importlib.import_module(BUILTIN_MODULE)
    load_entry_points(
        builtin + [ep for ep in eps if ep.name != BUILTIN_ENTRY_POINT],
        accept=lambda obj: isinstance(obj, type) and issubclass(obj, Pass) and obj.name not in _PASSES,
        register=lambda obj, ep_name: register_pass(obj.name or ep_name)(obj),
        errors=_plugin_errors,
        label="entry point",
    )


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return entry_points(ENTRY_POINT_GROUP)


def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of ``group``, on every supported Python."""
    eps = importlib.metadata.entry_points()
    if sys.version_info >= (3, 10):
        return list(eps.select(group=group))
    return list(eps.get(group, []))  # pragma: no cover


def load_entry_points(
    eps: Iterable[importlib.metadata.EntryPoint],
    *,
    accept: Callable[[object], bool],
    register: Callable[[object, str], object],
    errors: list[str],
    label: str,
    tolerate: tuple[type[Exception], ...] = (),
) -> None:
    """Load plug-ins and register those ``accept`` takes (a module registers
    itself on import).  A plug-in that fails to import, or whose registration
    raises one of ``tolerate``, is recorded in ``errors``: a broken plug-in must
    not break graphopt."""
    for ep in eps:
        try:
            obj = ep.load()
        except Exception as exc:
            errors.append(f"{label} '{ep.name}' ({ep.value}): {exc}")
            continue
        if not accept(obj):
            continue
        try:
            register(obj, ep.name)
        except tolerate as exc:
            errors.append(f"{label} '{ep.name}' ({ep.value}): {exc}")


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
