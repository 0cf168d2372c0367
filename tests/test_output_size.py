"""The default pipeline never writes a model bigger than its input (beyond a
few KB of annotations), on the path users take: the CLI, a written file."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphopt.cli
from conftest import LIGHT_MODELS, assert_same_outputs

SLACK = (1.01, 4096)  # output bytes <= 1.01 * input bytes + 4 KB


@pytest.mark.parametrize("path", LIGHT_MODELS, ids=lambda p: p.stem)
def test_default_pipeline_output_is_not_bigger(tmp_path, path):
    out = tmp_path / "out.onnx"
    assert graphopt.cli.main(["opt", str(path), "-o", str(out), "-q", "--no-cache"]) == 0
    factor, slack = SLACK
    assert out.stat().st_size <= factor * path.stat().st_size + slack
    proto = onnx.load(str(path))
    inits = {t.name for t in proto.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in proto.graph.input if i.name not in inits}
    assert_same_outputs(proto, onnx.load(str(out)), rel=1e-5, feeds=feeds)
