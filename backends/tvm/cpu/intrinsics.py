"""Tensor intrinsics of graphopt's int8 kernels.

TVM registers an AVX-512 VNNI intrinsic whose accumulator is a global
buffer; graphopt's register tiles accumulate in ``local`` buffers, so the
same 16-lane dot product is registered here for a local accumulator:
``C[i] += sum_k u8(A[k]) * s8(B[i, k])`` for 16 lanes of 4 products, one
``vpdpbusd`` (the four bytes of ``A`` broadcast as one 32-bit lane).
"""
from __future__ import annotations

import functools

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

VNNI_16X4_LOCAL = "graphopt_vnni_dot_16x4_local"


@T.prim_func(s_tir=True)
def _dot_16x4_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x4_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        lane = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        # LLVM >= 19 types the byte operands as 64 x i8
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"), T.reinterpret(T.broadcast(lane, 16), dtype="uint8x64"),
            B.vload([0, 0], dtype="int8x64"), dtype="int32x16",
        )


@functools.cache
def vnni_16x4_local() -> str:
    """The intrinsic's name, registered on first use."""
    TensorIntrin.register(VNNI_16X4_LOCAL, _dot_16x4_desc, _dot_16x4_vnni)
    return VNNI_16X4_LOCAL
