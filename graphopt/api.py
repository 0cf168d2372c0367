"""The Python API: the same operations as the CLI, as functions.

>>> import graphopt
>>> model = graphopt.load("model.onnx")
>>> result = graphopt.optimize(model, "fold-constants,cse")
>>> graphopt.save(model, "model.opt.onnx")
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from graphopt.context import PassContext
from graphopt.ir import Model, load, save
from graphopt.manager import Instrument, PassManager, RunResult
from graphopt.pipeline import Pipeline, parse

DEFAULT_PIPELINE = "simplify"


def optimize(
    model: Model,
    pipeline: str | Pipeline = DEFAULT_PIPELINE,
    *,
    context: PassContext | None = None,
    instruments: Sequence[Instrument] = (),
) -> RunResult:
    """Run a pipeline (text or parsed) over ``model`` in place."""
    if isinstance(pipeline, str):
        pipeline = parse(pipeline)
    return PassManager(pipeline, instruments).run(model, context or PassContext())


def optimize_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    pipeline: str | Pipeline = DEFAULT_PIPELINE,
    **kwargs: Any,
) -> RunResult:
    """Load, optimize and atomically save; ``src`` is never modified."""
    if isinstance(pipeline, str):
        pipeline = parse(pipeline)  # fail on a bad pipeline before reading the model
    model = load(src)
    result = optimize(model, pipeline, **kwargs)
    save(model, dst, protect=[src])
    return result


def inspect(model: Model | str | os.PathLike) -> dict[str, Any]:
    """Inputs, outputs, op histogram, parameters and MACs of a model."""
    from graphopt.summary import summarize

    if not isinstance(model, Model):
        model = load(model)
    return summarize(model)


__all__ = ["load", "save", "optimize", "optimize_file", "inspect", "parse", "PassContext", "Model"]
