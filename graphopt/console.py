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


class StatusReport:
    """Progress of long work step by step: a transient ``rich`` bar on a
    terminal, one line per step otherwise (logs, CI); lines printed while the
    bar shows go above it.  Subclasses report their steps."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = None
        self._task = None

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(f"graphopt: {text}")
        else:
            print(f"graphopt: {text}", file=sys.stderr, flush=True)

    def start_bar(self, verb: str, description: str, total: int, counted: bool = True) -> None:
        """Show the bar (on a terminal only): ``graphopt: <verb> <description>``,
        with ``done/total`` when ``counted``."""
        if not self.enabled or not sys.stderr.isatty():
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn(f"graphopt: {verb} {{task.description}}"), BarColumn(),
                   *([MofNCompleteColumn()] if counted else []), TimeElapsedColumn()]
        self._bar = Progress(*columns, console=console(), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
