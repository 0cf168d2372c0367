"""The key proof that pruning updates every coupled tensor: on the real CNNs of
onnx's light models (with seeded random weights), remove about 30% of the
channels of every prunable group after zeroing what those channels feed into,
and the outputs must not move (relative 1e-5).  A tensor left unsliced fails
in onnxruntime; a slice at a wrong offset (Concat, Split, Flatten runs,
residual groups) changes the numbers."""
from __future__ import annotations

import pytest

import graphopt
from conftest import LIGHT_MODELS
from graphopt.ir import Model
from light_weights import light_models, randomize_light
from test_pruning_groups import assert_same, zero_and_prune

FAST = ("squeezenet", "inception_v1", "resnet50")


def _prepared(name: str):
    model = Model.from_proto(randomize_light(light_models()[name]))
    graphopt.optimize(model, "fold-constants")
    return model.to_proto()


def _check(name: str) -> None:
    proto = _prepared(name)
    reference, pruned, analysis, keep = zero_and_prune(proto, fraction=0.3, seed=1)
    prunable = [g for g in analysis.groups() if g.prunable]
    if name != "shufflenet":  # every group of shufflenet meets a grouped conv or a channel shuffle
        assert len(keep) >= 0.5 * len(prunable) > 0
    assert_same(reference, pruned, rel=1e-5)


@pytest.mark.parametrize("name", FAST)
def test_pruning_zeroed_channels_is_exact(name):
    if not LIGHT_MODELS:
        pytest.skip("onnx light models not found")
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted({p.stem.removeprefix("light_") for p in LIGHT_MODELS} - set(FAST)))
def test_pruning_zeroed_channels_is_exact_all_light_models(name):
    _check(name)
