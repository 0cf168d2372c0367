"""The backend registry: built-in backends and plug-ins.

Backends register with :func:`register_backend`.  Other packages add backends
through the ``graphopt.backends`` entry-point group; an entry point may name a
module (importing it runs its decorators) or a :class:`Backend` subclass.  A
plug-in that fails to load is reported by :func:`plugin_errors`, never fatal.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import Callable, TypeVar

from graphopt.backends.base import Backend
from graphopt.errors import UsageError
from graphopt.pass_base import _suggest
from graphopt.registry import entry_points, load_entry_points

ENTRY_POINT_GROUP = "graphopt.backends"
BUILTIN_MODULES = ("graphopt.backends.onnxruntime", "graphopt.backends.tvm")  # pyproject.toml's entry points for the built-ins

_BACKENDS: dict[str, type[Backend]] = {}
_loaded = False
_plugin_errors: list[str] = []

B = TypeVar("B", bound=type[Backend])


def register_backend(name: str) -> Callable[[B], B]:
    def decorate(cls: B) -> B:
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise TypeError(f"{cls!r} is not a graphopt Backend")
        if name in _BACKENDS and _BACKENDS[name] is not cls:
            raise ValueError(f"backend name '{name}' is already registered")
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return decorate


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    # The built-in backends come through the project's own entry points, like
    # plug-ins, and first; neither imports onnxruntime or TVM until used.  A
    # source tree used without `pip install` has no entry points: import them by name.
    eps = _entry_points()
    builtin = [ep for ep in eps if ep.value in BUILTIN_MODULES]
    if not builtin:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
    load_entry_points(
        builtin + [ep for ep in eps if ep.value not in BUILTIN_MODULES],
        accept=lambda obj: isinstance(obj, type) and issubclass(obj, Backend) and obj not in _BACKENDS.values(),
        register=lambda obj, ep_name: register_backend(obj.name or ep_name)(obj),
        errors=_plugin_errors,
        label="backend entry point",
        tolerate=(ValueError,),  # a name clash is reported, not fatal
    )


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return entry_points(ENTRY_POINT_GROUP)


def backends() -> dict[str, type[Backend]]:
    _ensure_loaded()
    return dict(sorted(_BACKENDS.items()))


def plugin_errors() -> list[str]:
    _ensure_loaded()
    return list(_plugin_errors)


def get_backend(name: str) -> Backend:
    """A fresh instance of the backend registered as ``name``."""
    _ensure_loaded()
    try:
        return _BACKENDS[name]()
    except KeyError:
        known = ", ".join(sorted(_BACKENDS))
        raise UsageError(f"--backend '{name}': unknown backend{_suggest(name, list(_BACKENDS))} "
                         f"(known: {known})") from None
