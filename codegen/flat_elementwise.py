"""Elementwise CPU kernels over tensors viewed flat (no ``from __future__ import annotations`` here:
TVMScript reads the buffer annotations as objects, and that import would turn them into strings)."""
import tvm
from tvm.script import tirx as T

LANES = 8  # 16 lanes ran the quantize's float → u8 conversion slower (Intel Xeon, AVX-512, 2026-12-08)


def flat_elementwise(shape, in_dtype: str, out_dtype: str, value) -> tvm.tirx.PrimFunc:
    """y = value(x) element by element, over the tensors viewed flat: parallel blocks of ``LANES``
    vector lanes and a serial tail. The scheduled N-D form (all loops fused, then split by 8) left the
    simplifier unable to prove a vector contiguous where its lanes crossed rows of 28: every index
    became a gather (ResNet-18's 128x28x28 quantize: 0.23 ms against 0.03 flat)."""
    n = 1
    for d in shape:
        n *= int(d)
    lanes = LANES
    main, rest = n // lanes, n % lanes

    @T.prim_func(private=True, s_tir=True)
    def func(x: T.Buffer(tuple(shape), in_dtype), y: T.Buffer(tuple(shape), out_dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        with T.sblock("root"):  # Relax's analyses (reshape pattern) expect a root block
            x_flat = T.decl_buffer((n,), in_dtype, data=x.data)
            y_flat = T.decl_buffer((n,), out_dtype, data=y.data)
            for i in T.parallel(main):
                for j in T.vectorized(lanes):
                    y_flat[i * lanes + j] = value(x_flat[i * lanes + j])
            for t in range(rest):
                y_flat[main * lanes + t] = value(x_flat[main * lanes + t])

    return func
