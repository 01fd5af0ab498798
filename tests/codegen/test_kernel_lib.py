"""The arithmetic of kernel_lib's division-free helpers, run under the interpreter from the approximate
reciprocals CUDA gives (Triton's fp32 `/` is div.full there, up to 2 ulp off; the interpreter's is exact), against
IEEE division: what makes kernel A's codes bit for bit on a GPU as well."""

import pytest
import torch
import triton
import triton.language as tl

from svdq_compiler.codegen.kernel_lib import nearest_code_bits, quotient_rn, refine_reciprocal

BLOCK = 4096


@triton.jit
def _quotients(x_ptr, d_ptr, y_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.load(d_ptr + i)
    tl.store(out_ptr + i, quotient_rn(tl.load(x_ptr + i), d, refine_reciprocal(d, tl.load(y_ptr + i))))


@triton.jit
def _codes(v_ptr, r_ptr, out_ptr, lo: tl.constexpr, hi: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, nearest_code_bits(tl.load(v_ptr + i), tl.load(r_ptr + i), lo, hi) - 0x4B400000)


def _off_by(values: torch.Tensor, ulps: torch.Tensor) -> torch.Tensor:
    """fp32 values moved by `ulps` units in the last place (positive values)."""
    return (values.view(torch.int32) + ulps.to(torch.int32)).view(torch.float32)


def test_quotient_rn_is_ieee_division_from_a_reciprocal_two_ulp_off():
    gen = torch.Generator().manual_seed(3)
    n = 8 * BLOCK
    # x: a model's values (bf16), some with the uint4 shift added in fp32; d: smoothing factors, any fp32
    x = (torch.randn(n, generator=gen) * torch.exp2(torch.randint(-20, 20, (n,), generator=gen).float()))
    x = x.to(torch.bfloat16).float()
    x[::3] += 0.171875
    d = torch.exp2(torch.rand(n, generator=gen) * 24 - 12)
    y = _off_by(1.0 / d, torch.randint(-2, 3, (n,), generator=gen))
    out = torch.empty(n)
    _quotients[(n // BLOCK,)](x, d, y, out, BLOCK=BLOCK)
    assert torch.equal(out.view(torch.int32), (x / d).view(torch.int32))
    # the product alone (one rounding, then a second) is not the quotient: the corrections are doing the work
    assert not torch.equal((x * y).view(torch.int32), (x / d).view(torch.int32))


@pytest.mark.parametrize("dtype, lo, hi", [(torch.bfloat16, -7, 7), (torch.float16, -7, 7), (torch.bfloat16, 0, 15)])
def test_nearest_code_bits_rounds_like_dividing_from_a_reciprocal_two_ulp_off(dtype, lo, hi):
    gen = torch.Generator().manual_seed(5)
    n = 8 * BLOCK
    span = 30 if dtype == torch.bfloat16 else 8  # normal scales, and codes·scale in range
    scale = (torch.rand(n, generator=gen) + 0.5) * torch.exp2(torch.randint(-span, span, (n,), generator=gen).float())
    scale = scale.to(dtype).float()
    v = (torch.rand(n, generator=gen) * (hi - lo) + lo) * scale
    # exact ties: half-integer multiples of scales with three significant bits (the products keep eight)
    ties = slice(0, n, 2)
    scale[ties] = (torch.randint(1, 8, (n // 2,), generator=gen) * 2.0 ** -3
                   * torch.exp2(torch.randint(-span, span, (n // 2,), generator=gen).float()))
    v[ties] = (torch.randint(lo, hi, (n // 2,), generator=gen) + 0.5) * scale[ties]
    v = v.to(dtype).float()
    assert torch.equal(v[ties], ((v[ties] / scale[ties]) * 2).round() / 2 * scale[ties])  # still ties
    expected = torch.clamp(torch.round(v / scale), lo, hi).to(torch.int32)  # round half to even
    missed = 0
    for ulps in (-2, -1, 0, 1, 2):
        r = _off_by(1.0 / scale, torch.full((n,), ulps))
        out = torch.empty(n, dtype=torch.int32)
        _codes[(n // BLOCK,)](v, r, out, lo, hi, BLOCK=BLOCK)
        assert torch.equal(out, expected), f"reciprocal {ulps} ulp off"
        missed += int((torch.clamp(torch.round(v * r), lo, hi).to(torch.int32) != expected).sum())
    assert missed  # rounding the product alone gets some ties wrong: the snap to 2^-14 is doing the work


def _run_ptx(text: str, inputs: dict[str, int]) -> dict[str, int]:
    """Run straight-line PTX of 32-bit integer instructions (mov, and, or, shl, shr, prmt in its default mode,
    lop3) as the PTX ISA defines them; registers and `$n` operands by name, immediates in hex or decimal."""
    regs = dict(inputs)

    def value(operand: str) -> int:
        return int(operand, 0) & 0xFFFFFFFF if operand[0].isdigit() else regs[operand]

    for statement in text.strip("{} ").split(";"):
        tokens = statement.replace(",", " ").split()
        if not tokens or tokens[0] == ".reg":
            continue
        op, dest, args = tokens[0].split(".")[0], tokens[1], [value(t) for t in tokens[2:]]
        if op == "mov":
            result = args[0]
        elif op == "and":
            result = args[0] & args[1]
        elif op == "or":
            result = args[0] | args[1]
        elif op == "shl":
            result = args[0] << args[1]
        elif op == "shr":
            result = args[0] >> args[1]
        elif op == "prmt":
            pool = (args[1] << 32 | args[0]).to_bytes(8, "little")
            result = 0
            for k in range(4):
                nibble = args[2] >> (4 * k) & 15
                byte = pool[nibble & 7]
                result |= (0xFF if byte & 0x80 else 0) << (8 * k) if nibble & 8 else byte << (8 * k)
        elif op == "lop3":
            a, b, c, lut = args
            result = sum(1 << i for i in range(32) if lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1)) & 1)
        else:
            raise AssertionError(f"no rule for {op}")
        regs[dest] = result & 0xFFFFFFFF
    return regs


def test_nf4_lookup_ptx_gives_the_codebook_value_of_every_nibble():
    """kernel W's compiled NF4 lookup (`nf4_values_ptx`), run instruction by instruction on all 256 bytes, four
    to a register as Triton packs them, against quant.NF4_CODEBOOK's fp32 bits."""
    from svdq_compiler.codegen.kernel_lib import _NF4_VALUES_PTX
    from svdq_compiler.quant import NF4_CODEBOOK

    codebook = torch.tensor(NF4_CODEBOOK, dtype=torch.float32).view(torch.int32).tolist()
    bits = [b & 0xFFFFFFFF for b in codebook]
    for first in range(0, 256, 4):
        regs = _run_ptx(_NF4_VALUES_PTX.value, {"$8": int.from_bytes(bytes(range(first, first + 4)), "little")})
        for e in range(4):
            byte = first + e
            assert regs[f"${e}"] == bits[byte & 15], f"low nibble of byte {byte}"
            assert regs[f"${4 + e}"] == bits[byte >> 4], f"high nibble of byte {byte}"
