"""Pipelines: their textual form, their TOML form, and the objects they build.

Textual grammar (MLIR-like)::

    pipeline := element (',' element)*
    element  := NAME ['{' option (',' option)* '}'] ['(' pipeline ')']
    option   := NAME '=' value
    value    := bare word | "quoted string" | '[' value (',' value)* ']'

``NAME`` is a registered pass, a named pipeline (``simplify``), or
``fixpoint{max-iterations=N}(...)``, which repeats its children until none of
them changes the model or N rounds have run.

Everything is parsed and every option validated before any pass runs, so a
typo in the last element fails fast instead of after an hour of work.
"""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, Iterator, Union

from graphopt.errors import UsageError
from graphopt.pass_base import Option, Pass, format_option_value
from graphopt import registry

FIXPOINT = "fixpoint"
DEFAULT_MAX_ITERATIONS = 8


@dataclasses.dataclass
class Fixpoint:
    """Run ``elements`` repeatedly until a round changes nothing (at most N rounds)."""

    elements: list["Element"]
    max_iterations: int = DEFAULT_MAX_ITERATIONS

    def __str__(self) -> str:
        opts = "" if self.max_iterations == DEFAULT_MAX_ITERATIONS else f"{{max-iterations={self.max_iterations}}}"
        return f"{FIXPOINT}{opts}(" + ",".join(map(str, self.elements)) + ")"


Element = Union[Pass, Fixpoint]


@dataclasses.dataclass
class Pipeline:
    elements: list[Element]

    def __str__(self) -> str:
        return ",".join(map(str, self.elements))

    def passes(self) -> Iterator[Pass]:
        """Every pass instance, in order, fixpoint members included once."""

        def walk(elements: list[Element]) -> Iterator[Pass]:
            for el in elements:
                if isinstance(el, Fixpoint):
                    yield from walk(el.elements)
                else:
                    yield el

        return walk(self.elements)


_FIXPOINT_MAX = Option(int, DEFAULT_MAX_ITERATIONS, "most rounds", min=1, max=1000)
_FIXPOINT_MAX.__set_name__(Fixpoint, "max_iterations")


# ----------------------------------------------------------------------------------
# Textual form
# ----------------------------------------------------------------------------------
class _Parser:
    def __init__(self, text: str, expanding: tuple[str, ...] = ()):
        self.text = text
        self.pos = 0
        self.expanding = expanding

    def error(self, msg: str) -> UsageError:
        return UsageError(f"pipeline '{self.text}': {msg} at column {self.pos + 1}")

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = self.peek() or "end of text"
            raise self.error(f"expected '{ch}', found '{found}'")
        self.pos += 1

    def name(self) -> str:
        self.skip_ws()
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isalnum() or self.text[self.pos] in "-_.:"):
            self.pos += 1
        if start == self.pos:
            found = self.peek() or "end of text"
            raise self.error(f"expected a pass name, found '{found}'")
        return self.text[start : self.pos]

    def value(self) -> Any:
        ch = self.peek()
        if ch == '"':
            self.pos += 1
            out = []
            while self.pos < len(self.text) and self.text[self.pos] != '"':
                if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                    self.pos += 1
                out.append(self.text[self.pos])
                self.pos += 1
            self.expect('"')
            return "".join(out)
        if ch == "[":
            self.pos += 1
            items = []
            if self.peek() != "]":
                items.append(self.value())
                while self.peek() == ",":
                    self.pos += 1
                    items.append(self.value())
            self.expect("]")
            return items
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ",{}()[]\"=" and not self.text[self.pos].isspace():
            self.pos += 1
        if start == self.pos:
            raise self.error("expected a value")
        return self.text[start : self.pos]

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.peek() != "{":
            return opts
        self.pos += 1
        if self.peek() == "}":
            self.pos += 1
            return opts
        while True:
            key = self.name()
            self.expect("=")
            if key in opts:
                raise self.error(f"option '{key}' given twice")
            opts[key] = self.value()
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("}")
            return opts

    def pipeline(self) -> list[Element]:
        elements = [*self.element()]
        while self.peek() == ",":
            self.pos += 1
            elements.extend(self.element())
        return elements

    def element(self) -> list[Element]:
        name = self.name()
        opts = self.options()
        if name == FIXPOINT:
            unknown = [k for k in opts if k != _FIXPOINT_MAX.name]
            if unknown:
                raise UsageError(f"{FIXPOINT}: unknown option '{unknown[0]}' (it takes max-iterations)")
            self.expect("(")
            inner = self.pipeline()
            self.expect(")")
            n = _FIXPOINT_MAX.convert(opts.get(_FIXPOINT_MAX.name, DEFAULT_MAX_ITERATIONS), FIXPOINT)
            return [Fixpoint(inner, n)]
        if self.peek() == "(":
            raise self.error(f"'{name}' does not take a nested pipeline")
        named = registry.get_pipeline(name)
        if named is not None:
            if opts:
                raise UsageError(f"named pipeline '{name}' takes no options")
            if name in self.expanding:
                raise UsageError(f"named pipeline '{name}' refers to itself")
            return _Parser(named, self.expanding + (name,)).parse()
        instance = registry.get_pass(name)(**opts)
        # Named in the text itself, not brought in by a named pipeline: a pass
        # asked for that way says why when it changes nothing.
        instance.explicit = not self.expanding
        return [instance]

    def parse(self) -> list[Element]:
        if not self.text.strip():
            raise UsageError("pipeline is empty")
        elements = self.pipeline()
        if self.peek():
            raise self.error(f"unexpected '{self.peek()}'")
        return elements


def parse(text: str) -> Pipeline:
    """Parse pipeline text into pass objects, validating every name and option."""
    return Pipeline(_Parser(text).parse())


# ----------------------------------------------------------------------------------
# TOML form
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    """A config file: the pipeline and options of the run (same names as CLI flags)."""

    pipeline: Pipeline | None
    run: dict[str, Any]


RUN_KEYS = {
    "verify-each": bool,
    "time-passes": bool,
    "seed": int,
    "tolerance": float,
    "dump-dir": str,
    "print-ir-after": list,
    "report": str,
    "external-data": bool,
    "write-shapes": bool,
    "calib": str,
    "calib-preprocess": str,
    "calib-samples": int,
    "fidelity": str,
}


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise UsageError(f"{path}: not a valid TOML config ({exc})") from None
    unknown = set(data) - {"pipeline", "run"}
    if unknown:
        raise UsageError(f"{path}: unknown key '{sorted(unknown)[0]}' (expected 'pipeline' and 'run')")
    pipeline = None
    if "pipeline" in data:
        pipeline = Pipeline(_steps_from_toml(data["pipeline"], str(path)))
    run = {}
    for key, value in (data.get("run") or {}).items():
        if key not in RUN_KEYS:
            raise UsageError(f"{path}: unknown [run] option '{key}'")
        spec = Option(RUN_KEYS[key], None, "")
        spec.name = key
        run[key] = spec.convert(value, f"{path} [run]")
    return Config(pipeline=pipeline, run=run)


def _steps_from_toml(value: Any, where: str) -> list[Element]:
    if isinstance(value, str):
        return _Parser(value).parse()
    if not isinstance(value, list):
        raise UsageError(f"{where}: 'pipeline' must be a string or an array of steps")
    out: list[Element] = []
    for step in value:
        if isinstance(step, str):
            out.extend(_Parser(step).parse())
        elif isinstance(step, dict) and "pass" in step:
            opts = {k: v for k, v in step.items() if k != "pass"}
            out.append(registry.get_pass(str(step["pass"]))(**opts))
        elif isinstance(step, dict) and FIXPOINT in step:
            extra = set(step) - {FIXPOINT, _FIXPOINT_MAX.name}
            if extra:
                raise UsageError(f"{where}: {FIXPOINT} step: unknown key '{sorted(extra)[0]}'")
            n = _FIXPOINT_MAX.convert(step.get(_FIXPOINT_MAX.name, DEFAULT_MAX_ITERATIONS), FIXPOINT)
            out.append(Fixpoint(_steps_from_toml(step[FIXPOINT], where), n))
        else:
            raise UsageError(f"{where}: each pipeline step needs a 'pass' or '{FIXPOINT}' key")
    return out


def to_toml(pipeline: Pipeline) -> str:
    """The TOML form of a pipeline: one [[pipeline]] table per top-level element."""
    lines: list[str] = []
    for el in pipeline.elements:
        lines.append("[[pipeline]]")
        if isinstance(el, Fixpoint):
            inner = ", ".join(_toml_str(str(e)) for e in el.elements)
            lines.append(f"{FIXPOINT} = [{inner}]")
            lines.append(f"max-iterations = {el.max_iterations}")
        else:
            lines.append(f"pass = {_toml_str(el.name)}")
            for attr, spec in el.option_specs().items():
                given = el.explicit_options()
                if attr in given and given[attr] != spec.default:
                    lines.append(f"{spec.name} = {_toml_value(given[attr])}")
        lines.append("")
    return "\n".join(lines)


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_str(str(v)) for v in value) + "]"
    return _toml_str(str(value))


__all__ = ["Pipeline", "Fixpoint", "Element", "parse", "load_config", "Config", "to_toml", "format_option_value"]
