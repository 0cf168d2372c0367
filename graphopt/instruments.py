"""Instruments the CLI switches on: --time-passes, --verify-each, --print-ir-after, --dump-dir."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Mapping, TextIO

import numpy as np
import onnx

from graphopt import runtime
from graphopt.context import PassContext
from graphopt.errors import ModelError, UsageError, VerificationError, first_line
from graphopt.ir import Model, save
from graphopt.manager import Instrument, PassRecord
from graphopt.pass_base import Pass
from graphopt.printer import print_graph


class TimePasses(Instrument):
    """Prints a table of time per pass, most expensive first, like ``opt -time-passes``."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream

    def run_end(self, model, ctx, records: list[PassRecord]) -> None:
        stream = self.stream or sys.stderr
        totals: dict[str, list[float]] = {}
        for r in records:
            entry = totals.setdefault(r.name, [0.0, 0, 0])
            entry[0] += r.seconds
            entry[1] += 1
            entry[2] += int(r.changed)
        total = sum(v[0] for v in totals.values()) or 1e-12
        print("===== pass execution timing report =====", file=stream)
        print(f"{'seconds':>10} {'share':>7} {'runs':>5} {'changed':>8}  pass", file=stream)
        for name, (sec, runs, changed) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
            print(f"{sec:10.4f} {100 * sec / total:6.1f}% {runs:5d} {changed:8d}  {name}", file=stream)
        print(f"{total:10.4f} {100.0:6.1f}% {len(records):5d} {'':8}  total", file=stream)


class VerifyEach(Instrument):
    """After every pass that changed the model: checker, strict shape inference, and
    a numeric comparison with the model as it was before the pass.

    The comparison uses onnxruntime on seeded random inputs (or the given ones)
    and the relative error ``max|new-old| / max|old|`` per output, against the
    pass's declared tolerance unless the run sets one.
    """

    def __init__(self, inputs: Mapping[str, np.ndarray] | None = None, tolerance: float | None = None):
        self.inputs = dict(inputs) if inputs else None
        self.tolerance = tolerance
        self.reference: dict[str, np.ndarray] | None = None

    def run_begin(self, model: Model, ctx: PassContext) -> None:
        self.reference = self._evaluate(model, ctx, "the input model")

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, record: PassRecord) -> None:
        if not record.changed:
            return
        proto = model.to_proto()
        try:
            checkable = _without_external_weights(proto)
            onnx.checker.check_model(checkable)
            onnx.shape_inference.infer_shapes(checkable, check_type=True, strict_mode=True, data_prop=True)
        except Exception as exc:
            raise VerificationError(f"pass '{p.name}': output fails the onnx checker: {first_line(exc)}") from None
        outputs = self._evaluate(model, ctx, f"the output of pass '{p.name}'", proto)
        override = self.tolerance if self.tolerance is not None else ctx.tolerance
        assert self.reference is not None
        for name, expected in self.reference.items():
            if name not in outputs:
                raise VerificationError(f"pass '{p.name}': output '{name}' disappeared")
            ok, figure = p.tolerance.check(outputs[name], expected, override)
            if not ok:
                raise VerificationError(f"pass '{p.name}': output '{name}' moved: {figure}")
            record.stats.setdefault("verify", {})[name] = figure
        self.reference = outputs

    def _evaluate(self, model: Model, ctx: PassContext, what: str, proto=None) -> dict[str, np.ndarray]:
        # A failure on the input model is the input's fault (exit 3), not a pass's.
        error = ModelError if proto is None else VerificationError
        try:
            sess = runtime.session(proto or model.to_proto(), source_dir=model.source_dir)
        except Exception as exc:
            raise error(f"onnxruntime cannot load {what}: {first_line(exc)}") from None
        if self.inputs is None:
            self.inputs = dict(ctx.inputs) if ctx.inputs else runtime.random_inputs(
                sess, seed=ctx.seed, shapes=ctx.input_shapes
            )
        for inp in sess.get_inputs():
            if inp.name not in self.inputs:
                raise UsageError(f"--inputs: no data for model input '{inp.name}'")
            got = np.shape(self.inputs[inp.name])
            want = inp.shape
            if len(got) != len(want) or any(isinstance(w, int) and w >= 0 and w != g for w, g in zip(want, got)):
                shown = "x".join(str(w) if isinstance(w, int) else "?" for w in want)
                raise UsageError(
                    f"--inputs: input '{inp.name}' has shape {'x'.join(map(str, got))}, the model expects {shown}"
                )
        try:
            return runtime.run(sess, self.inputs)
        except Exception as exc:
            raise error(f"onnxruntime cannot run {what}: {first_line(exc)}") from None


class PrintIRAfter(Instrument):
    """Prints the graph after the named passes (or ``all``), like ``-print-after``."""

    def __init__(self, names: list[str], stream: TextIO | None = None, only_changed: bool = False):
        self.names = set(names)
        self.stream = stream
        self.only_changed = only_changed

    def after_pass(self, p, model, ctx, record) -> None:
        if ("all" in self.names or p.name in self.names) and (record.changed or not self.only_changed):
            stream = self.stream or sys.stderr
            print(f"// ----- IR after {p} (changed: {str(record.changed).lower()}) -----", file=stream)
            print(print_graph(model.graph), file=stream)


class DumpDir(Instrument):
    """Saves the model after each pass as ``DIR/NNN-<pass>.onnx`` (the input as 000-input)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.count = 0

    def run_begin(self, model, ctx) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--dump-dir {self.dir}: cannot create folder ({exc.strerror})") from None
        save(model, self.dir / "000-input.onnx")

    def after_pass(self, p, model, ctx, record) -> None:
        self.count += 1
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", p.name)
        save(model, self.dir / f"{self.count:03d}-{name}.onnx")


def _without_external_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy the checker can read from any folder: weights stored in external
    files become typed graph inputs (the checker would look for their files in
    the current directory; their values do not matter to it)."""
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    names = {t.name for t in external}
    kept = [t for t in out.graph.initializer if t.name not in names]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    listed = {i.name for i in out.graph.input}
    out.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external if t.name not in listed
    )
    out.ir_version = max(out.ir_version, 4)
    return out




class Progress(Instrument):
    """A live status line on a terminal: which pass runs, and how many have run.

    Only used when stderr is a terminal, so logs and CI output stay clean.
    """

    def __init__(self) -> None:
        self._status = None
        self._count = 0

    def run_begin(self, model, ctx) -> None:
        from graphopt.console import console

        self._status = console().status("graphopt: starting")
        self._status.start()

    def before_pass(self, p, model, ctx) -> None:
        if self._status is not None:
            self._status.update(f"graphopt: running {p} ({self._count} passes done, {len(model.graph.nodes)} nodes)")

    def after_pass(self, p, model, ctx, record) -> None:
        self._count += 1

    def run_end(self, model, ctx, records) -> None:
        self.close()

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
