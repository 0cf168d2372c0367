"""Tensor intrinsics of graphopt's int8 kernels: one dot-product instruction.

Each sums ``C[i] += sum_k A[k] * B[i, k]`` for ``lanes`` int32 lanes of four
byte products: the four bytes of ``A`` (one column's activations) are
broadcast as one 32-bit lane against ``lanes`` groups of four weights.
TVM registers similar intrinsics with a global accumulator; graphopt's
register tiles accumulate in ``local`` buffers, so these are its own.

=========  ================  =======  ==================================
name       instruction       lanes    operands
=========  ================  =======  ==================================
vpdpbusd   AVX-512 VNNI      16       uint8 activations x int8 weights
usdot      AArch64 i8mm      4        uint8 activations x int8 weights
sdot       AArch64 dotprod   4        int8 activations x int8 weights
=========  ================  =======  ==================================
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


@functools.cache
def dot_intrinsic(name: str) -> str:
    """The registered name of the tensor intrinsic for instruction ``name``
    (registered on first use)."""
    llvm_name, lanes, data = _INSTRUCTIONS[name]
    registered = f"graphopt_{name}_{lanes}x4_local"
    TensorIntrin.register(registered, _desc(lanes, data), _impl(llvm_name, lanes, data))
    return registered


def dot_operands(name: str) -> tuple[int, str]:
    """(lanes, activation dtype) of instruction ``name``."""
    _, lanes, data = _INSTRUCTIONS[name]
    return lanes, data
