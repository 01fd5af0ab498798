"""interpreter_fma.fma_fp32: x·y + z rounded once, checked against exact rational arithmetic, ties included;
and the interpreter in use rounds its fma once (as a GPU does) whatever the Triton version."""

from fractions import Fraction

import numpy as np
import torch
import triton
import triton.language as tl

from svdq_compiler.codegen.interpreter_fma import fma_fp32


def exactly_rounded(x: float, y: float, z: float) -> np.float32:
    """The fp32 nearest to the exact x·y + z, ties to even (by comparing with both fp32 neighbours)."""
    exact = Fraction(x) * Fraction(y) + Fraction(z)
    guess = np.float32(float(exact))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    distances = [abs(Fraction(float(c)) - exact) for c in candidates]
    best = min(distances)
    nearest = [c for c, d in zip(candidates, distances) if d == best]
    return nearest[0] if len(nearest) == 1 else next(c for c in nearest if c.view(np.int32) % 2 == 0)


def test_fma_fp32_rounds_once():
    rng = np.random.default_rng(0)
    n = 4000
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32)
    y = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32)
    z = (-(x.astype(np.float64) * y)).astype(np.float32)  # the cancellations of a division's remainder
    z[::2] = (rng.standard_normal(n // 2) * np.exp2(rng.integers(-20, 20, n // 2))).astype(np.float32)
    # 2^-24·(1 + 2^-23)·(1 − 2^-23) + (1 + 2^-23) = 1 + 3·2^-24 − 2^-70: fp64 rounds it onto the midpoint of two
    # fp32 values, where ties-to-even would go up; the exact sum is just below
    x[:2], y[:2], z[:2] = 2.0 ** -24 * (1 + 2.0 ** -23), 1 - 2.0 ** -23, 1 + 2.0 ** -23
    x[1], z[1] = -x[1], -z[1]
    got = fma_fp32(x, y, z)
    want = np.array([exactly_rounded(float(a), float(b), float(c)) for a, b, c in zip(x, y, z)], dtype=np.float32)
    assert np.array_equal(got.view(np.int32), want.view(np.int32))
    assert got[0] == np.float32(1 + 2.0 ** -23) and got[1] == -got[0]
    twice = (x * y + z).astype(np.float32)
    assert not np.array_equal(twice.view(np.int32), want.view(np.int32))  # the cases do need the single rounding


@triton.jit
def _fma(x_ptr, y_ptr, z_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.fma(tl.load(x_ptr + i), tl.load(y_ptr + i), tl.load(z_ptr + i)))


def test_the_interpreter_rounds_its_fma_once():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(1024, generator=gen), torch.randn(1024, generator=gen)
    z = -(x.double() * y.double()).float()  # x·y + z is the rounding error of the product: zero if rounded twice
    out = torch.empty(1024)
    _fma[(1,)](x, y, z, out, BLOCK=1024)
    want = fma_fp32(x.numpy(), y.numpy(), z.numpy())
    assert torch.equal(out.view(torch.int32), torch.from_numpy(want).view(torch.int32))
    assert out.abs().max() > 0
