"""Terminal output shared by every live display: progress bars and status lines.

Live displays (the pass manager's status line, calibration and tuning bars)
must share one console to nest instead of overwriting each other, and show
only on a terminal so logs and CI output stay clean.
"""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_CONSOLE = None


def console():
    """The process-wide ``rich`` console on stderr.  Live displays (the pass
    manager's status line, calibration bars) must share it to nest instead of
    overwriting each other."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    description: str = "calibrating",
    quiet: bool = False,
) -> Iterator[T]:
    """Iterate ``iterable`` with a ``rich`` progress bar on stderr.

    The bar shows only when stderr is a terminal and ``quiet`` is false, so logs
    and CI output stay clean.  It is removed when the loop ends, breaks, or is
    interrupted (Ctrl-C propagates as ``KeyboardInterrupt``).
    """
    if quiet or not sys.stderr.isatty():
        yield from iterable
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    shared = console()
    if getattr(shared, "_live", None) is not None and not hasattr(shared, "_live_stack"):
        # rich < 14.1 cannot nest live displays: leave the one that is showing alone
        yield from iterable
        return

    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    bar = Progress(
        TextColumn("graphopt: {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=shared,
        transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total)
        for item in iterable:
            yield item
            bar.advance(task)
