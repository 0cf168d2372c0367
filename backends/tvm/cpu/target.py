"""What a schedule needs to know about a CPU target."""
from __future__ import annotations

import dataclasses
import functools

import tvm


def vector_lanes(target: tvm.target.Target, dtype_bits: int = 32) -> int:
    """Elements of ``dtype_bits`` in one vector register of ``target``: 16 fp32
    on AVX-512, 8 on AVX/AVX2, 4 on SSE, NEON and the rest."""
    return max(1, vector_bits(target) // dtype_bits)


def vector_bits(target: tvm.target.Target) -> int:
    # LLVM's own answer (llvm_get_vector_width) reports the host's width for
    # any x86 CPU name, so the width is read off the CPU's features instead.
    features = cpu_features(target)
    if "avx512f" in features:
        return 512
    if "avx" in features:
        return 256
    return 128


def cpu_features(target: tvm.target.Target) -> frozenset[str]:
    """The features LLVM enables for the target's CPU, with ``mattr`` applied."""
    attrs = target.attrs
    return _features(str(attrs.get("mtriple", "")), str(attrs.get("mcpu", "")),
                     tuple(str(a) for a in attrs.get("mattr", []) or []))


@functools.lru_cache(maxsize=32)
def _features(mtriple: str, mcpu: str, mattr: tuple[str, ...]) -> frozenset[str]:
    from tvm.target import codegen

    config = {"kind": "llvm", **({"mtriple": mtriple} if mtriple else {}), **({"mcpu": mcpu} if mcpu else {})}
    try:
        found = {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(config))}
    except Exception:
        found = set()
    for attr in mattr:
        if attr[:1] == "+":
            found.add(attr[1:])
        elif attr[:1] == "-":
            found.discard(attr[1:])
    return frozenset(found)


def vector_registers(target: tvm.target.Target) -> int:
    """Architectural vector registers: 32 on AVX-512 and AArch64, 16 on x86
    without AVX-512 and on 32-bit ARM (NEON's q registers)."""
    if "avx512f" in cpu_features(target):
        return 32
    triple = str(target.attrs.get("mtriple", "")) or _host_triple()
    return 32 if _is_aarch64(target) or triple.startswith("riscv") else 16


def _host_triple() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_triple())


def num_cores(target: tvm.target.Target) -> int:
    return max(1, int(target.attrs.get("num-cores", 1) or 1))


# Waking workers that sleep (a pool that does not spin, as in a process that
# runs other work between calls) costs tens of microseconds, so a kernel
# runs on one core unless its estimated single-core time is above this.
PARALLEL_MIN_US = 30.0
# An elementwise pass is bound by memory: about this many elements per
# microsecond on one core.
_ELEMENTS_PER_US = 2000.0


def parallel_worthwhile(target: tvm.target.Target, macs: int = 0, elements: int = 0) -> bool:
    """Whether a kernel of ``macs`` vectorized multiply-adds and ``elements``
    memory-bound element steps is worth running on all cores of ``target``:
    its single-core estimate (two FMA vectors a cycle at ~3 GHz) exceeds the
    wake-up cost."""
    if num_cores(target) <= 1:
        return False
    macs_per_us = 2 * vector_lanes(target) * 3000.0
    return macs / macs_per_us + elements / _ELEMENTS_PER_US > PARALLEL_MIN_US


@dataclasses.dataclass(frozen=True)
class Int8Dot:
    """A dot-product instruction int8 convolutions run on: each of its
    ``lanes`` int32 accumulators adds four products of activation bytes
    (``data``: uint8, or int8 where the instruction multiplies signed bytes
    only) and int8 weights."""

    intrinsic: str  # the registered tensor intrinsic (graphopt.backends.tvm.cpu.intrinsics)
    lanes: int
    data: str
    # products summed in pairs in a saturating int16 (AVX2 vpmaddubsw): exact
    # only for weights intrinsics.pairs_fit_int16 accepts
    pairs_int16: bool = False


def int8_dot(target: tvm.target.Target) -> Int8Dot | None:
    """The dot product int8 convolutions use on ``target``, or None:

    * AVX-512 VNNI ``vpdpbusd``: uint8 x int8, 16 lanes; AVX-VNNI: 8 lanes;
    * AVX2 ``vpmaddubsw`` + ``vpmaddwd``: uint8 x int8, 8 lanes, its pair
      sums saturating int16: used only for weights that cannot saturate
      (7-bit weights, as ``quantize-static{reduce-range=true}`` makes);
    * AArch64 i8mm ``usdot``: uint8 x int8, 4 lanes;
    * AArch64 dotprod ``sdot``: int8 x int8, 4 lanes; uint8 activations are
      shifted by -128 first and the shift's ``128 * sum(W)`` added back
      (``graphopt.backends.tvm.cpu.layout``).

    Other int8 convolutions run their exact small integers on the float
    templates (``graphopt.backends.tvm.cpu.layout``)."""
    from graphopt.backends.tvm.cpu import intrinsics

    features = cpu_features(target)
    name = None
    if "avx512vnni" in features and "avx512f" in features:
        name = "vpdpbusd"
    elif "avxvnni" in features and "avx2" in features and "avx512f" not in features:
        name = "vpdpbusd256"
    elif "avx2" in features and "avx512f" not in features:
        name = "vpmaddubsw"
    elif _is_aarch64(target) and "neon" in features:
        name = "usdot" if "i8mm" in features else "sdot" if "dotprod" in features else None
    if name is None:
        return None
    return Int8Dot(intrinsics.dot_intrinsic(name), *intrinsics.dot_operands(name), pairs_int16=name == "vpmaddubsw")


def _is_aarch64(target: tvm.target.Target) -> bool:
    triple = str(target.attrs.get("mtriple", "")) or _host_triple()
    return triple.startswith(("aarch64", "arm64"))
