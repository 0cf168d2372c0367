"""What a pass is: a named class with typed options and one ``run`` method.

A pass declares its options as class attributes::

    @register_pass("prune-channels")
    class PruneChannels(Pass):
        '''Remove output channels with the lowest importance.'''
        ratio = Option(float, 0.3, "fraction of channels removed per group")

and reads them as ``self.ratio``.  The option's name in pipeline text is the
attribute name with dashes (``min_channels`` -> ``min-channels``).  ``run``
returns a :class:`PassResult` that says whether the model changed, which the
manager uses for fixpoint iteration and for its report.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from graphopt.errors import UsageError

if TYPE_CHECKING:
    from graphopt.context import PassContext
    from graphopt.ir import Model


class Option:
    """A typed pass option with a default and a one-line doc."""

    def __init__(
        self,
        type: type,
        default: Any,
        doc: str,
        *,
        choices: Sequence[Any] | None = None,
        min: float | None = None,
        max: float | None = None,
    ):
        self.type = type
        self.default = default
        self.doc = doc
        self.choices = tuple(choices) if choices is not None else None
        self.min = min
        self.max = max
        self.attr = ""
        self.name = ""

    def __set_name__(self, owner: type, attr: str) -> None:
        self.attr = attr
        self.name = attr.replace("_", "-")

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj._options.get(self.attr, self.default)

    @property
    def type_name(self) -> str:
        if self.choices:
            return "|".join(str(c) for c in self.choices)
        return {int: "int", float: "float", bool: "bool", str: "string", list: "list"}.get(self.type, self.type.__name__)

    def convert(self, value: Any, where: str) -> Any:
        """Coerce a value from pipeline text (a string) or a config file to the option's type."""
        try:
            value = _coerce(self.type, value)
        except (TypeError, ValueError):
            raise UsageError(
                f"{where}: option '{self.name}' expects {self.type_name}, got '{_show(value)}'"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise UsageError(
                f"{where}: option '{self.name}' must be one of {self.type_name}, got '{_show(value)}'"
            )
        if self.min is not None and value < self.min or self.max is not None and value > self.max:
            lo = "-inf" if self.min is None else self.min
            hi = "inf" if self.max is None else self.max
            raise UsageError(f"{where}: option '{self.name}' must be in [{lo}, {hi}], got '{_show(value)}'")
        return value


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _coerce(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(str(value).strip(), 0) if isinstance(value, str) else int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        out = float(value)
        if not math.isfinite(out):
            raise ValueError(value)
        return out
    if kind is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    if kind is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(";") if v.strip()] if value else []
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        raise TypeError(value)
    return kind(value)


@dataclasses.dataclass
class PassResult:
    """What a pass did: whether the model changed, counters, and what it left alone."""

    changed: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    # Why nothing changed, in one line: shown when the pass was asked for by
    # name and left the model as it was.
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far a pass may move the model's outputs; --verify-each checks it.

    Exact passes bound the relative error ``max|new - old| / max|old|`` (scale-
    aware, not fooled by outputs that cross zero).  Lossy passes (quantization)
    cannot promise that: one flipped class in a softmax is a relative error near
    1.  They bound the cosine similarity of each output to the model before the
    pass instead, loose enough for honest quantization noise and tight enough to
    catch a broken rewrite; their real fidelity goal is the --fidelity budget.
    """

    relative: float | None = 1e-4
    cosine: float | None = None
    lossy: bool = False

    def check(self, actual, expected, relative: float | None = None) -> tuple[bool, str]:
        """(within tolerance, the measured figure as text); ``relative`` overrides
        the relative bound of exact passes (the run's --tolerance)."""
        from graphopt.runtime import cosine_similarity, relative_error

        if self.cosine is not None:
            cos = cosine_similarity(actual, expected)
            return cos >= self.cosine, f"cosine {cos:.4g} (tolerance >= {self.cosine:g})"
        limit = relative if relative is not None else self.relative
        err = relative_error(actual, expected)
        return err <= limit, f"relative error {err:.3g} (tolerance {limit:g})"


class Pass:
    """Base class of every pass."""

    name: ClassVar[str] = ""
    tolerance: ClassVar[Tolerance] = Tolerance()
    # False for passes a named pipeline (simplify) brought in; see PassManager.
    explicit: bool = True

    def __init__(self, **options: Any):
        self._options: dict[str, Any] = {}
        known = self.option_specs()
        for key, value in options.items():
            attr = key.replace("-", "_")
            if attr not in known:
                raise UsageError(f"pass '{self.name}': unknown option '{key}'{_suggest(key, known)}")
            self._options[attr] = known[attr].convert(value, f"pass '{self.name}'")

    @classmethod
    def option_specs(cls) -> dict[str, Option]:
        # The class's own options first, then inherited ones (mixins); the
        # most derived definition of a name wins.
        specs: dict[str, Option] = {}
        for klass in cls.__mro__:
            for attr, value in vars(klass).items():
                if isinstance(value, Option):
                    specs.setdefault(attr, value)
        return specs

    def explicit_options(self) -> dict[str, Any]:
        """The options given when the pass was made (pipeline text, config or
        keyword), by attribute name, converted; defaults not included.  What
        tells "set to its default" from "not set"."""
        return dict(self._options)

    def is_set(self, option: str) -> bool:
        """Whether ``option`` (attribute or option name) was given explicitly."""
        return option.replace("-", "_") in self._options

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def run(self, model: "Model", ctx: "PassContext") -> PassResult:
        raise NotImplementedError

    def __str__(self) -> str:
        """Textual form, e.g. ``prune-channels{ratio=0.3}`` (non-default options only)."""
        parts = [
            f"{spec.name}={format_option_value(self._options[attr])}"
            for attr, spec in self.option_specs().items()
            if attr in self._options and self._options[attr] != spec.default
        ]
        return self.name + ("{" + ",".join(parts) + "}" if parts else "")

    __repr__ = __str__


def format_option_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return '"' + ";".join(map(str, value)) + '"'
    if isinstance(value, str) and any(c in value for c in ',{}()" ='):
        return '"' + value.replace('"', '\\"') + '"'
    return str(value)


def _suggest(word: str, candidates) -> str:
    import difflib

    names = [c.replace("_", "-") for c in candidates]
    close = difflib.get_close_matches(word.replace("_", "-"), names, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
