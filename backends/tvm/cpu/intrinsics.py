"""Tensor intrinsics of graphopt's int8 kernels: one dot-product instruction.

Each sums ``C[i] += sum_k A[k] * B[i, k]`` for ``lanes`` int32 lanes of four
byte products: the four bytes of ``A`` (one column's activations) are
broadcast as one 32-bit lane against ``lanes`` groups of four weights.
TVM registers similar intrinsics with a global accumulator; graphopt's
register tiles accumulate in ``local`` buffers, so these are its own.

============  ==================  =====  ===================================
name          instruction         lanes  operands
============  ==================  =====  ===================================
vpdpbusd      AVX-512 VNNI        16     uint8 activations x int8 weights
vpdpbusd256   AVX-VNNI            8      uint8 activations x int8 weights
vpmaddubsw    AVX2                8      uint8 x int8, pairs summed in int16
usdot         AArch64 i8mm        4      uint8 activations x int8 weights
sdot          AArch64 dotprod     4      int8 activations x int8 weights
============  ==================  =====  ===================================

``vpmaddubsw`` adds two byte products in a saturating int16 (then
``vpmaddwd`` by ones adds the pairs into int32): it computes the
description only for weights whose pairs cannot overflow 16 bits
(:func:`pairs_fit_int16`); the layout planner checks that per convolution.
"""
from __future__ import annotations

import functools

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

# name -> (LLVM intrinsic, lanes, activation dtype); each takes the
# accumulator, then the activation bytes, then the weight bytes.
_INSTRUCTIONS = {
    # LLVM >= 19 types the byte operands as 64 x i8
    "vpdpbusd": ("llvm.x86.avx512.vpdpbusd.512", 16, "uint8"),
    "vpdpbusd256": ("llvm.x86.avx512.vpdpbusd.256", 8, "uint8"),  # AVX-VNNI selects the same intrinsic
    "vpmaddubsw": ("llvm.x86.avx2.pmadd.ub.sw", 8, "uint8"),
    "usdot": ("llvm.aarch64.neon.usdot.v4i32.v16i8", 4, "uint8"),
    "sdot": ("llvm.aarch64.neon.sdot.v4i32.v16i8", 4, "int8"),
}


def _desc(lanes: int, data: str):
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), data, offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _impl(llvm_name: str, lanes: int, data: str):
    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), data, offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            column = T.reinterpret(A.vload([0], data + "x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                C.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(T.broadcast(column, lanes), dtype=f"{data}x{4 * lanes}"),
                B.vload([0, 0], dtype=f"int8x{4 * lanes}"),
                dtype=f"int32x{lanes}",
            )

    return impl


def _impl_pairs(llvm_name: str, lanes: int):
    """``vpmaddubsw`` (byte pairs into int16), then ``vpmaddwd`` by ones (int16
    pairs into int32), added to the accumulator."""
    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            column = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                T.reinterpret(T.broadcast(column, lanes), dtype=f"uint8x{4 * lanes}"),
                B.vload([0, 0], dtype=f"int8x{4 * lanes}"),
                dtype=f"int16x{2 * lanes}",
            )
            C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=f"int32x{lanes}") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                pairs, T.broadcast(T.int16(1), 2 * lanes), dtype=f"int32x{lanes}",
            )

    return impl


@functools.cache
def dot_intrinsic(name: str) -> str:
    """The registered name of the tensor intrinsic for instruction ``name``
    (registered on first use)."""
    llvm_name, lanes, data = _INSTRUCTIONS[name]
    registered = f"graphopt_{name}_{lanes}x4_local"
    impl = _impl_pairs(llvm_name, lanes) if name == "vpmaddubsw" else _impl(llvm_name, lanes, data)
    TensorIntrin.register(registered, _desc(lanes, data), impl)
    return registered


def pairs_fit_int16(weights) -> bool:
    """Whether ``vpmaddubsw`` is exact for these int8 weights [O, I, KH, KW]:
    every pair of adjacent input channels (0-1, 2-3 of each group of four)
    sums to at most 32767 and at least -32768 for any uint8 activations,
    i.e. its positive weights add to <= 128 and its negative ones to >= -128
    (7-bit weights, ``quantize-static{reduce-range=true}``, always do)."""
    import numpy as np

    w = np.asarray(weights, np.int64)
    channels = w.shape[1]
    if channels % 2:
        w = np.concatenate([w, np.zeros_like(w[:, :1])], axis=1)
    first, second = w[:, 0::2], w[:, 1::2]
    positive = np.maximum(first, 0) + np.maximum(second, 0)
    negative = np.minimum(first, 0) + np.minimum(second, 0)
    return bool(positive.max(initial=0) * 255 <= 32767 and negative.min(initial=0) * 255 >= -32768)


def dot_operands(name: str) -> tuple[int, str]:
    """(lanes, activation dtype) of instruction ``name``."""
    _, lanes, data = _INSTRUCTIONS[name]
    return lanes, data
