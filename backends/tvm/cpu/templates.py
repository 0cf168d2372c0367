"""Template schedules with knobs: a default configuration from the shape and
the target, other configurations for the template search to measure.

A template rule names its knobs and their values for one kernel, the default
first (:meth:`TemplateRule.knobs`), and schedules the kernel for any
configuration of them (:meth:`TemplateRule.schedule`).  Built with
``choices`` (kernel key -> configuration, the search's winners), it applies
the recorded configuration to the kernels it has one for and the default to
the rest.  Kernels are keyed by their structure (:func:`kernel_key`), so a
winner found on one model applies to the same kernel in another.
"""
from __future__ import annotations

from typing import Any, Mapping

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from graphopt.backends.tvm.cpu.generic import GuardedRule

Config = dict[str, Any]


def kernel_key(func: tirx.PrimFunc) -> str:
    """A stable key of an unscheduled kernel: the structural hash of its
    parameters and body (not its name: the same kernel in two models, or
    twice in one, gets one key)."""
    bare = tirx.PrimFunc(func.params, func.body, func.ret_type)
    return f"{tvm_ffi.structural_hash(bare):016x}"


def default_config(knobs: Mapping[str, list]) -> Config:
    return {name: values[0] for name, values in knobs.items()}


class TemplateRule(GuardedRule):
    """A schedule rule with knobs.  Subclasses define :meth:`knobs` and
    :meth:`schedule`."""

    def __init__(self, choices: Mapping[str, Config] | None = None) -> None:
        super().__init__()
        self.choices = dict(choices or {})

    def knobs(self, func: tirx.PrimFunc, target: tvm.target.Target) -> dict[str, list] | None:
        """Each knob's values for ``func``, the default first; None where the
        rule does not schedule ``func``."""
        raise NotImplementedError

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target, config: Config) -> s_tir.Schedule | None:
        raise NotImplementedError

    def configured(self, func: tirx.PrimFunc, target: tvm.target.Target) -> tuple[Config, Config] | None:
        """(the configuration recorded for ``func``, the default), the first
        the default too where nothing valid was recorded: a record whose
        knobs no longer match (another graphopt version) is ignored."""
        knobs = self.knobs(func, target)
        if knobs is None:
            return None
        default = default_config(knobs)
        chosen = self.choices.get(kernel_key(func)) if self.choices else None  # no hashing without records
        if chosen and set(chosen) == set(knobs) and all(chosen[k] in knobs[k] for k in knobs):
            return dict(chosen), default
        return default, default

    def _apply(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        configs = self.configured(func, target)
        if configs is None:
            return None
        chosen, default = configs
        if chosen != default:
            try:
                return self.schedule(func, target, chosen)
            except Exception:  # a schedule primitive refused the recorded choice
                pass
        return self.schedule(func, target, default)
