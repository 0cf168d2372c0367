"""refaccel: a reference accelerator plug-in for graphopt's TVM backend.

It is the template a hardware team copies.  The plug-in says which op groups
its device runs (``patterns.py``: float32 conv2d(+bias)(+relu),
matmul(+bias)(+relu), relu, clip) and how to produce code for them
(``codegen.py``: C source, one exported function per claimed region, built
into the deployable library by TVM's C source module).  Here the "device" is
the host CPU running that generated C; a real plug-in emits calls into its
driver or kernel library from the same places.

    from graphopt.backends.refaccel import ACCELERATOR
    from graphopt.backends.tvm.byoc import partition
    mod, stats = partition(mod, ACCELERATOR)
"""
from __future__ import annotations

from graphopt.backends.refaccel.codegen import codegen
from graphopt.backends.refaccel.patterns import CLAIMS, patterns
from graphopt.backends.tvm.byoc import Accelerator

NAME = "refaccel"

ACCELERATOR = Accelerator(
    name=NAME,
    patterns=patterns(),
    codegen=codegen,
    description="reference accelerator: float32 NCHW conv2d, 2-D-weight matmul, relu, clip as generated C",
    claims=CLAIMS,
)

__all__ = ["ACCELERATOR", "NAME"]
