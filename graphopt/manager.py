"""The pass manager: runs a pipeline, owns fixpoint iteration, timing,
structural verification and instruments.

Passes only transform; everything around them (statistics, verification,
IR printing and dumps) is the manager's or an instrument's job, so a pass
author writes one ``run`` method and gets all of it for free.  After every
pass that reports a change the manager checks the graph's structure
(:mod:`graphopt.verify`), always; with ``GRAPHOPT_CHECK_UNCHANGED=1`` (the
test suite sets it) it also proves that a pass reporting no change left the
model as it was.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

from graphopt.context import PassContext
from graphopt.errors import GraphoptError, PassError, first_line
from graphopt.ir import Model
from graphopt.pass_base import Pass, PassResult
from graphopt.pipeline import Fixpoint, Pipeline
from graphopt.stats import GraphStats, graph_stats
from graphopt.verify import first_difference, io_names, snapshot, structure_errors


@dataclasses.dataclass
class PassRecord:
    """One execution of one pass (a pass inside a fixpoint runs once per round)."""

    name: str
    pipeline_text: str
    changed: bool
    seconds: float
    before: GraphStats
    after: GraphStats
    round: int | None = None
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    reason: str = ""  # the pass's word on why nothing changed

    def as_dict(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "text": self.pipeline_text,
            "round": self.round,
            "changed": self.changed,
            "seconds": round(self.seconds, 6),
            "before": self.before.as_dict(),
            "after": self.after.as_dict(),
            "stats": self.stats,
            "notes": self.notes,
            **({"reason": self.reason} if self.reason else {}),
        }


class Instrument:
    """Hooks around a run and around each pass (TVM's PassInstrument, LLVM's callbacks)."""

    def run_begin(self, model: Model, ctx: PassContext) -> None: ...

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None: ...

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, record: PassRecord) -> None: ...

    def run_end(self, model: Model, ctx: PassContext, records: list[PassRecord]) -> None: ...


@dataclasses.dataclass
class RunResult:
    records: list[PassRecord]
    # One line for each pass asked for by name that left the model as it was.
    unchanged: list[str] = dataclasses.field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(r.changed for r in self.records)


class PassManager:
    def __init__(self, pipeline: Pipeline, instruments: Sequence[Instrument] = (),
                 check_unchanged: bool | None = None):
        self.pipeline = pipeline
        self.instruments = list(instruments)
        if check_unchanged is None:
            check_unchanged = os.environ.get("GRAPHOPT_CHECK_UNCHANGED", "") not in ("", "0")
        self.check_unchanged = check_unchanged

    def run(self, model: Model, ctx: PassContext | None = None) -> RunResult:
        ctx = ctx or PassContext()
        records: list[PassRecord] = []
        self._ran: list[Pass] = []  # the pass of each record
        self._io = io_names(model)  # no pass may rename or drop the graph's inputs and outputs
        for inst in self.instruments:
            inst.run_begin(model, ctx)
        self._run_elements(self.pipeline.elements, model, ctx, records, None)
        for inst in self.instruments:
            inst.run_end(model, ctx, records)
        return RunResult(records, self._unchanged(records))

    def _unchanged(self, records: list[PassRecord]) -> list[str]:
        """Explicitly asked passes that changed nothing in any of their runs, and why."""
        runs: dict[int, list[PassRecord]] = {}
        for p, record in zip(self._ran, records):
            runs.setdefault(id(p), []).append(record)
        lines = []
        for p in self.pipeline.passes():
            mine = runs.pop(id(p), None)
            if not mine or not p.explicit or any(r.changed for r in mine):
                continue
            # The pass's own word, else the notes it left (they say what it skipped).
            notes = "; ".join(mine[-1].notes[:2])
            reason = next((r.reason for r in reversed(mine) if r.reason), "") or notes or "it found nothing to change"
            lines.append(f"{p} changed nothing: {reason}")
        return lines

    def _run_elements(self, elements, model, ctx, records, round_) -> bool:
        changed = False
        for el in elements:
            if isinstance(el, Fixpoint):
                changed |= self._run_fixpoint(el, model, ctx, records)
            else:
                changed |= self._run_pass(el, model, ctx, records, round_)
        return changed

    def _run_fixpoint(self, fp: Fixpoint, model, ctx, records) -> bool:
        changed = False
        for i in range(fp.max_iterations):
            if not self._run_elements(fp.elements, model, ctx, records, i + 1):
                break
            changed = True
        return changed

    def _run_pass(self, p: Pass, model: Model, ctx: PassContext, records, round_) -> bool:
        for inst in self.instruments:
            inst.before_pass(p, model, ctx)
        before = graph_stats(model.graph)
        kept = snapshot(model) if self.check_unchanged else None
        start = time.perf_counter()
        try:
            result = p.run(model, ctx)
        except GraphoptError as exc:
            msg = str(exc)
            raise type(exc)(msg if msg.startswith(f"pass '{p.name}'") else f"pass '{p.name}': {msg}") from exc
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:
            raise PassError(f"pass '{p.name}' failed: {type(exc).__name__}: {first_line(exc, default='')}") from exc
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise PassError(f"pass '{p.name}' returned {type(result).__name__}, not a PassResult")
        if result.changed:
            model.analyses.clear()
            errors = structure_errors(model, self._io)
            if errors:
                raise PassError(f"pass '{p.name}' left a broken graph: " + "; ".join(errors))
        elif kept is not None and (now := snapshot(model)) != kept:
            raise PassError(f"pass '{p.name}' reported no change but changed {first_difference(kept, now)}")
        record = PassRecord(
            name=p.name,
            pipeline_text=str(p),
            changed=result.changed,
            seconds=seconds,
            before=before,
            after=graph_stats(model.graph) if result.changed else before,
            round=round_,
            stats=result.stats,
            notes=result.notes,
            reason=result.reason,
        )
        records.append(record)
        self._ran.append(p)
        for inst in self.instruments:
            inst.after_pass(p, model, ctx, record)
        return result.changed


