"""graphopt's CPU schedule library for the TVM backend.

TVM 0.27 ships no CPU schedules (TOPI's x86/arm_cpu schedules and AutoTVM
were removed; DLight's CPU rules cover GEMV and reductions), so an untuned
CPU build is a set of single-threaded scalar loop nests.  This package gives
every kernel a schedule chosen from its shape and the target, with no
measurement, following NeoCPU (Liu et al., USENIX ATC 2019):

* :mod:`.layout` plans layouts at the Relax level: convolutions run in a
  channel-blocked layout (NCHW[x]c, x the target's vector lanes), their
  weights packed at compile time;
* :mod:`.conv2d` computes blocked convolutions (dense and depthwise) and
  schedules them: register tiles of output columns times one vector of
  output channels, reduction inside, epilogues at the tile, rows in parallel;
* :mod:`.generic` schedules the rest: injective kernels (layout transforms,
  elementwise chains) and spatial reductions (pooling) fused, parallel and
  vectorized.
"""
from __future__ import annotations

from graphopt.backends.tvm.cpu.target import vector_lanes

__all__ = ["vector_lanes"]
