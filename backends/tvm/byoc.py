"""Bring your own codegen: hand parts of a Relax module to an accelerator plug-in.

An :class:`Accelerator` names the op groups it claims (Relax dataflow patterns)
and a codegen that turns the claimed functions into runtime modules.
:func:`partition` runs TVM's pattern-based BYOC flow::

    FuseOpsByPattern(patterns)    # each match becomes a "Composite" function
    MergeCompositeFunctions()     # adjacent composites -> one "Codegen" function
    RunCodegen()                  # relax.ext.<name>(functions) -> runtime modules

so the claimed parts run as calls into the plug-in's modules and the rest is
compiled for the host as usual.  See backends/refaccel for a worked plug-in.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.transform import FusionPattern

# (name without the accelerator prefix, pattern, annotations, check or None)
PatternSpec = tuple[str, Any, dict, Callable | None]


@dataclass
class Accelerator:
    """What a plug-in tells the partitioner.

    ``patterns`` are tried in order (put larger fusions first); ``codegen`` is
    called as ``codegen(functions, options, constant_names)`` with the merged
    functions and returns a list of runtime modules whose functions are named
    after each function's ``global_symbol``."""

    name: str
    patterns: Sequence[PatternSpec]
    codegen: Callable[..., list]
    description: str = ""
    claims: Sequence[str] = field(default_factory=tuple)

    def fusion_patterns(self) -> list[FusionPattern]:
        out = []
        for pname, pattern, marks, check in self.patterns:
            args = (f"{self.name}.{pname}", pattern, marks)
            out.append(FusionPattern(*args, check) if check is not None else FusionPattern(*args))
        return out

    def register(self) -> None:
        """Register the codegen as ``relax.ext.<name>`` (what RunCodegen calls)."""
        tvm_ffi.register_global_func(f"relax.ext.{self.name}", self.codegen, override=True)


def _op_name(expr) -> str | None:
    op = getattr(expr, "op", None)
    return getattr(op, "name", None) if isinstance(expr, relax.Call) else None


def _short(name: str) -> str:
    return name.removeprefix("relax.")


def _ops_in(expr) -> Counter:
    """Relax operators called in ``expr`` (not descending into nested functions)."""
    found: Counter = Counter()

    def visit(e) -> None:
        name = _op_name(e)
        if name is not None:
            found[_short(name)] += 1

    relax.analysis.post_order_visit(expr, visit)
    return found


def _composites(func: relax.Function) -> list[tuple[str, Counter]]:
    """(composite pattern name, ops inside) for each composite a merged function calls."""
    out: list[tuple[str, Counter]] = []

    def visit(e) -> None:
        if isinstance(e, relax.Function) and e.attrs is not None and "Composite" in e.attrs:
            out.append((str(e.attrs["Composite"]), _ops_in(e.body)))

    relax.analysis.post_order_visit(func.body, visit)
    if func.attrs is not None and "Composite" in func.attrs:
        out.append((str(func.attrs["Composite"]), _ops_in(func.body)))
    return out


def offload_stats(mod: tvm.IRModule, accelerator: Accelerator) -> dict:
    """Which ops run on the accelerator and which on the host, read from a module
    after MergeCompositeFunctions (before RunCodegen replaces the functions)."""
    external: dict[str, list[str]] = {}
    on_accel: Counter = Counter()
    patterns: Counter = Counter()
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function) or func.attrs is None:
            continue
        if str(func.attrs.get("Codegen", "")) != accelerator.name:
            continue
        comps = _composites(func)
        external[str(func.attrs.get("global_symbol", gv.name_hint))] = [c for c, _ in comps]
        for cname, ops in comps:
            patterns[cname.removeprefix(accelerator.name + ".")] += 1
            on_accel.update(ops)
    host = _ops_in(mod["main"].body)
    return {
        "accelerator": accelerator.name,
        "external_functions": external,
        "patterns": dict(patterns),
        "accelerator_ops": dict(on_accel),
        "host_ops": dict(host),
        "offloaded_calls": len(external),
    }


def partition(mod: tvm.IRModule, accelerator: Accelerator) -> tuple[tvm.IRModule, dict]:
    """Claim composite functions by the accelerator's patterns (FuseOpsByPattern,
    MergeCompositeFunctions, RunCodegen); the rest stays on the host.  Stats say
    which ops run where."""
    accelerator.register()
    # Constant reshapes (an ONNX bias as imported) become constants the patterns see.
    mod = relax.transform.FoldConstant()(mod)
    mod = relax.transform.FuseOpsByPattern(accelerator.fusion_patterns(), bind_constants=False)(mod)
    mod = relax.transform.MergeCompositeFunctions()(mod)
    stats = offload_stats(mod, accelerator)
    try:
        mod = relax.transform.RunCodegen()(mod)
    except Exception as exc:  # the plug-in's codegen failed: one line naming it
        from graphopt.backends.base import CompileError
        from graphopt.errors import first_line

        raise CompileError(f"accelerator '{accelerator.name}': code generation failed "
                           f"({first_line(exc)})") from None
    return mod, stats
