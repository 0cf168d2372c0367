"""Error types, each carrying the process exit code the CLI reports for it.

Expected failures (bad input, bad options, a pass refusing a model) raise one of
these with a one-line message that names the file, node, pass or option; the
CLI prints that line and exits with the code.  Anything else is a bug and is
reported as an internal error.
"""
from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 2
    BAD_MODEL = 3
    PASS_FAILED = 4
    INTERRUPTED = 130


class GraphoptError(Exception):
    """Base of every expected error; ``str(err)`` is the one-line message."""

    exit_code: ExitCode = ExitCode.INTERNAL


class UsageError(GraphoptError):
    """Bad command line, pipeline text, pass option or config file."""

    exit_code = ExitCode.USAGE


class ModelError(GraphoptError):
    """The model file is missing, unreadable, truncated or not valid ONNX."""

    exit_code = ExitCode.BAD_MODEL


class PassError(GraphoptError):
    """A pass could not transform the model."""

    exit_code = ExitCode.PASS_FAILED


class VerificationError(PassError):
    """A pass produced a model that fails the checker or changes the outputs."""


def first_line(exc: BaseException, limit: int = 300, default: str | None = None) -> str:
    """The first non-blank line of an exception's message, at most ``limit``
    characters (cut with "..."); ``default`` (else the exception's type name)
    when the message is empty.  Expected errors are reported in one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__ if default is None else default
    text = lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
