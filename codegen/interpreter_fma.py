"""A fused multiply-add for the Triton interpreters that round it twice.

Triton 3.7 and older interpret `tl.fma(x, y, z)` as numpy's `x * y + z`: two roundings where a GPU rounds once.
`kernel_lib.quotient_rn` relies on the single rounding (its remainders are exact only then), so those
interpreters give quotients one ulp off, and codes that differ from the GPU's and from the reference ops. Newer
interpreters call a C fma; on older ones `use_fused_fma` puts `fma_fp32` in place of theirs.
"""

from __future__ import annotations

import numpy as np


def fma_fp32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """x·y + z rounded once to fp32 (round to nearest even), for fp32 arrays.

    The product of two fp32 values is exact in fp64; the sum is fp64's rounding plus its exact error (TwoSum).
    Rounding that fp64 sum to fp32 is right except where it lies exactly halfway between two fp32 values: there
    the error's sign, not evenness, decides.
    """
    x, y, z = np.broadcast_arrays(*(np.asarray(a, dtype=np.float32) for a in (x, y, z)))
    product = x.astype(np.float64) * y.astype(np.float64)
    addend = z.astype(np.float64)
    total = product + addend
    with np.errstate(invalid="ignore", over="ignore"):
        back = total - product
        error = (product - (total - back)) + (addend - back)
        rounded = total.astype(np.float32)
        off = total - rounded
        neighbour = np.nextafter(rounded, np.where(off > 0, np.float32(np.inf), np.float32(-np.inf)))
        halfway = (off != 0) & ((rounded + neighbour.astype(np.float64)) / 2 == total)
        beyond = halfway & (error != 0) & (np.sign(error) == np.sign(off))
    return np.where(beyond, neighbour, rounded).astype(np.float32)


def use_fused_fma() -> None:
    """Make the Triton interpreter's fp32 fma round once, where it rounds twice (idempotent)."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # no Triton: nothing is interpreted
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_fma, "_svdq_fused", False):
        return
    from triton._C.libtriton import interpreter as native

    if hasattr(native, "fma_fp32"):
        return  # this Triton's interpreter already rounds once
    interpreted = builder.create_fma

    def create_fma(self, x, y, z):
        if z.data.dtype != np.float32:
            return interpreted(self, x, y, z)
        return interpreter.TensorHandle(fma_fp32(x.data, y.data, z.data), z.dtype.scalar)

    create_fma._svdq_fused = True
    builder.create_fma = create_fma
