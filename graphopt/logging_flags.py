"""``--quiet`` and ``--json`` for commands that build a file, so a build system
can run graphopt silently and read one machine-readable line of outcome.

A command opts in with :func:`add_arguments` on its parser and the
:func:`json_summary` decorator on its handler; inside, it records what happened
on :func:`run_log` (output, cache hit/miss, sizes, timings).  With ``--json`` the
decorator prints exactly one JSON object on stdout when the command ends,
also when it fails (then with ``"status": "error"``, the exit code and the
one-line message, which still goes to stderr as well).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from typing import Any, Callable

from graphopt.errors import ExitCode, GraphoptError, first_line


# Commands whose parser has --json from here (for errors raised before they run).
_JSON_COMMANDS: set[str] = set()


def add_arguments(parser: argparse.ArgumentParser, *, quiet: bool = True) -> None:
    """``--json`` (and ``-q/--quiet`` unless the parser has it already)."""
    _JSON_COMMANDS.add(parser.prog.split()[-1])
    if quiet:
        parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on stderr but errors")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout at the end: status, exit code, output, cache, "
                             "timings, sizes, error")


@dataclasses.dataclass
class RunLog:
    """The outcome of one command, as printed by ``--json``."""

    command: str
    status: str = "ok"
    exit_code: int = 0
    output: str | None = None
    cache: str = "off"  # hit, miss or off
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    size: dict[str, int | None] = dataclasses.field(default_factory=lambda: {"before": None, "after": None})
    nodes: dict[str, int | None] = dataclasses.field(default_factory=lambda: {"before": None, "after": None})
    error: str | None = None
    _start: float = dataclasses.field(default_factory=time.perf_counter, repr=False)

    def timing(self, name: str, seconds: float) -> None:
        self.timings[name] = round(seconds, 6)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("_start")
        out["timings"] = dict(self.timings, total=round(time.perf_counter() - self._start, 6))
        return out


def run_log(args: argparse.Namespace) -> RunLog:
    """The command's RunLog (a detached one when the handler is not decorated)."""
    log = getattr(args, "_run_log", None)
    if log is None:
        log = RunLog(command=str(getattr(args, "command", "")))
        args._run_log = log
    return log


def exit_code_of(exc: BaseException) -> int:
    """The exit code ``graphopt.cli.main`` gives for ``exc``."""
    if isinstance(exc, GraphoptError):
        return int(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        return int(ExitCode.INTERRUPTED)
    return int(ExitCode.INTERNAL)


def json_summary(handler: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command handler so ``--json`` prints its RunLog on stdout at the end."""

    @functools.wraps(handler)
    def wrapper(args: argparse.Namespace) -> int:
        log = run_log(args)
        if not getattr(args, "json", False):
            return int(handler(args) or 0)
        try:
            code = int(handler(args) or 0)
        except BaseException as exc:
            log.status, log.exit_code = "error", exit_code_of(exc)
            log.error = _message(exc)
            _emit(log)
            try:
                exc.json_reported = True  # type: ignore[attr-defined]
            except AttributeError:
                pass
            raise
        log.exit_code = code
        log.status = "ok" if code == 0 else "error"
        _emit(log)
        return code

    return wrapper


def report_unhandled(argv: list[str], exc: BaseException) -> None:
    """For ``main``: an error the command handler never saw (a command line that
    does not parse) still prints the JSON object when the command line asks for
    ``--json`` of a command that has it."""
    if getattr(exc, "json_reported", False) or "--json" not in argv:
        return
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in _JSON_COMMANDS:
        _emit(RunLog(command=command, status="error", exit_code=exit_code_of(exc), error=_message(exc)))


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; no output written"
    if isinstance(exc, GraphoptError):
        return first_line(exc)
    return f"internal error: {type(exc).__name__}: {first_line(exc, default='')}"


def _emit(log: RunLog) -> None:
    print(json.dumps(log.as_dict(), sort_keys=False, default=str), file=sys.stdout, flush=True)
