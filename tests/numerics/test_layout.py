"""Packed layouts: pack/unpack inverses, the documented index formulas, and the Nunchaku converters."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svdq_compiler.codegen.layout import (NunchakuLinear, PackedWeight, from_nunchaku, from_nunchaku_awq,
                                          pack_act, pack_codes, pack_weight, to_nunchaku, to_nunchaku_awq,
                                          unpack_act, unpack_codes, unpack_weight)
from svdq_compiler.errors import CheckpointError, QuantizationError
from svdq_compiler.quant import dequantize, quantize_act, quantize_weight

PROFILE = settings(max_examples=25, deadline=None)
CODE_RANGES = {"int4": (-8, 7, torch.int8), "uint4": (0, 15, torch.uint8), "nvfp4": (0, 15, torch.uint8),
               "nf4": (0, 15, torch.uint8)}


def random_codes(fmt, rows, k_pad, seed):
    low, high, dtype = CODE_RANGES[fmt]
    return torch.randint(low, high + 1, (rows, k_pad), generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- our layout ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(CODE_RANGES))
@PROFILE
@given(rows=st.integers(1, 5), groups=st.integers(1, 4), half_group=st.sampled_from([1, 4, 8, 32]),
       seed=st.integers(0, 2 ** 16))
def test_unpack_inverts_pack(fmt, rows, groups, half_group, seed):
    group = 16 if fmt == "nvfp4" else 2 * half_group
    codes = random_codes(fmt, rows, groups * group, seed)
    packed = pack_codes(codes, fmt, group)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, groups * group // 2)
    assert torch.equal(unpack_codes(packed, fmt, group), codes)


def test_split_halves_by_hand():
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, -1, -8, 7, 0, 1, 2, 3, -7]], dtype=torch.int8)  # two groups of 8
    packed = pack_codes(codes, "int4", 8)
    # group 0: byte j = channel j | channel j+4 << 4; group 1: channels 8..15, nibbles in two's complement
    assert packed.tolist() == [[0x40, 0x51, 0x62, 0x73, 0x1F, 0x28, 0x37, 0x90]]


def test_nvfp4_consecutive_pairs_by_hand():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0] + [0] * 10], dtype=torch.uint8)
    assert pack_codes(codes, "nvfp4", 16)[0, :3].tolist() == [0x21, 0x43, 0x0F]


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("nvfp4", 16), ("nf4", 64), ("int8", 0), ("int4", 32)])
def test_pack_weight_round_trip_and_layout(fmt, group):
    w = torch.randn(12, 100, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3))
    q = quantize_weight(w, fmt, group)
    packed = pack_weight(q)
    g = group or 100
    assert packed.wscales.shape == (q.k_pad // g, 12)  # group-major
    assert packed.qweight.shape == (12, q.k_pad // 2 if fmt != "int8" else 100)
    assert packed.wscales.dtype == {"nvfp4": torch.uint8, "int8": torch.float32}.get(fmt, torch.bfloat16)
    if fmt == "nvfp4":
        assert packed.wtscale.dtype == torch.float32 and packed.wtscale.shape == ()
        assert torch.equal(packed.wscales.view(torch.float8_e4m3fn).float(), q.scales.t().float())
    back = unpack_weight(packed)
    assert torch.equal(back.codes, q.codes) and torch.equal(dequantize(back), dequantize(q))


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("uint4", 64), ("nvfp4", 16), ("int8", 0)])
def test_pack_act_round_trip(fmt, group):
    x = torch.randn(2, 3, 80, generator=torch.Generator().manual_seed(4)).abs().to(torch.float16)
    q = quantize_act(x, fmt, group)
    codes, scales = pack_act(q)
    back = unpack_act(codes, scales, fmt, group, 80, x.dtype, q.tensor_scale)
    assert torch.equal(back.codes, q.codes) and torch.equal(dequantize(back), dequantize(q))


def test_packed_weight_rejects_wrong_dtypes_and_shapes():
    packed = pack_weight(quantize_weight(torch.randn(8, 64), "int4", 64))
    with pytest.raises(QuantizationError, match=r"int4 weight codes must be torch.uint8 \[N, 32\]"):
        PackedWeight(packed.qweight.to(torch.int8), packed.wscales, None, "int4", 64, 64, torch.float32)
    with pytest.raises(QuantizationError, match=r"scales must be the model dtype \[1, 8\] \(group-major\)"):
        PackedWeight(packed.qweight, packed.wscales.t(), None, "int4", 64, 64, torch.float32)
    with pytest.raises(QuantizationError, match="wtscale"):
        PackedWeight(packed.qweight, packed.wscales, torch.ones(()), "int4", 64, 64, torch.float32)
    with pytest.raises(QuantizationError, match="split halves"):
        pack_codes(torch.zeros(1, 18, dtype=torch.int8), "int4", 9)


# ---- Nunchaku W4A4: index formulas by hand --------------------------------------------------------------------


def nunchaku_position_of(n, k, n_total=256, k_total=256):
    """Where a single nonzero code at (n, k) lands in the Nunchaku qweight bytes: (byte, is_high_nibble)."""
    codes = torch.zeros(n_total, k_total, dtype=torch.int8)
    codes[n, k] = 5
    w = pack_weight(quantize_weight(codes.float(), "int4", 64))
    # quantization keeps code 5 only in the group holding it (scale 5/7 → code 7); find the nonzero nibble
    qweight = to_nunchaku(NunchakuLinear(_as_bf16(w)))["qweight"].view(torch.uint8).flatten()
    (byte,) = torch.nonzero(qweight).flatten().tolist()
    return byte, bool(qweight[byte] >> 4)


def _as_bf16(w):
    return PackedWeight(w.qweight, w.wscales.to(torch.bfloat16), w.wtscale, w.fmt, w.group_size, w.k,
                        torch.bfloat16)


@pytest.mark.parametrize("n,k,byte,high", [
    (0, 0, 0, False), (0, 1, 0, True), (0, 7, 3, True),
    (0, 8, 16, False),  # kl = 1 → word 4
    (0, 32, 4, False),  # kp = 1 → word 1
    (8, 0, 8, False),  # ns = 1 → word 2
    (1, 0, 64, False),  # nl = 1 → word 16
    (16, 0, 512, False),  # np = 1 → word 128
    (0, 64, 4096, False),  # kt = 1 → word 1024
    (128, 0, 16384, False),  # nt = 1 → word (1·K/64)·1024 = 4096
    (5, 45, 342, True),  # nl = 5, kp = 1, kl = 1, r = 5 → word 85, byte 85·4 + 2, odd r → high
])
def test_nunchaku_qweight_positions(n, k, byte, high):
    assert nunchaku_position_of(n, k) == (byte, high)


def test_nunchaku_vector_and_scale_positions():
    n_total, k_total = 256, 256
    marker = torch.zeros(n_total, dtype=torch.bfloat16)
    for n, value in [(1, 2.0), (2, 3.0), (8, 4.0), (16, 5.0), (37, 6.0), (128, 7.0)]:
        marker[n] = value
    codes = torch.zeros(n_total, k_total // 2, dtype=torch.uint8)
    scales = torch.ones(k_total // 64, n_total, dtype=torch.bfloat16)
    scales[2, 37] = 9.0
    scales[1, 0] = 8.0
    w = PackedWeight(codes, scales, None, "int4", 64, k_total, torch.bfloat16)
    out = to_nunchaku(NunchakuLinear(w, bias=marker))
    bias = out["bias"]
    # off(n) = (n//128)·128 + ((n%128)//16)·16 + ((n%8)//2)·4 + ((n%16)//8)·2 + n%2
    assert {v: bias.tolist().index(v) for v in (2.0, 3.0, 4.0, 5.0, 6.0, 7.0)} == {
        2.0: 1, 3.0: 4, 4.0: 2, 5.0: 16, 6.0: 41, 7.0: 128}
    flat = out["wscales"].flatten().tolist()
    # off(n, g) = (nt·K/64 + g)·128 + inner(n): (37, 2) → 2·128 + 32 + 8 + 0 + 1; (0, 1) → 128
    assert flat.index(9.0) == 297 and flat.index(8.0) == 128


def test_nunchaku_micro_scale_positions():
    k_total = 128
    scales = torch.full((k_total // 16, 256), 1.0).to(torch.float8_e4m3fn).view(torch.uint8)
    expected = {}
    for value, (n, s, offset) in zip([2.0, 3.0, 4.0, 6.0, 8.0, 0.5], [
            (0, 1, 1), (0, 4, 512), (1, 0, 64), (8, 0, 16), (32, 0, 4), (128, 0, 1024)]):
        scales[s, n] = torch.tensor(value).to(torch.float8_e4m3fn).view(torch.uint8)
        expected[value] = offset
    w = PackedWeight(torch.zeros(256, 64, dtype=torch.uint8), scales, torch.ones(()), "nvfp4", 16, k_total,
                     torch.bfloat16)
    flat = to_nunchaku(NunchakuLinear(w))["wscales"].flatten().float().tolist()
    assert {value: flat.index(value) for value in expected} == expected


def test_nunchaku_lowrank_positions():
    n_total = k_total = 128
    rank = 32
    # lora_up element (c, q): c walks the fragment lanes, q the register pairs; 16×16 tiles, c-tile major
    up_cases = {(0, 1): 1, (0, 2): 8, (0, 8): 2, (1, 0): 32, (8, 0): 4, (0, 16): 256, (16, 0): 512}
    # lora_down element (q, c) of A [r, K]: q walks the lanes, c the pairs; tiles still c-tile major
    down_cases = {(0, 1): 1, (0, 2): 8, (0, 8): 2, (1, 0): 32, (8, 0): 4, (16, 0): 256, (0, 16): 512}
    up = torch.zeros(n_total, rank, dtype=torch.bfloat16)
    down = torch.zeros(rank, k_total, dtype=torch.bfloat16)
    for value, index in enumerate(up_cases, start=2):
        up[index] = value
    for value, index in enumerate(down_cases, start=2):
        down[index] = value
    w = PackedWeight(torch.zeros(n_total, k_total // 2, dtype=torch.uint8),
                     torch.ones(k_total // 64, n_total, dtype=torch.bfloat16), None, "int4", 64, k_total,
                     torch.bfloat16)
    out = to_nunchaku(NunchakuLinear(w, lora_down=down, lora_up=up))
    for cases, packed in ((up_cases, out["lora_up"]), (down_cases, out["lora_down"])):
        flat = packed.flatten().tolist()
        assert [flat.index(value) for value in range(2, 2 + len(cases))] == list(cases.values())


# ---- Nunchaku W4A4: converters are inverses --------------------------------------------------------------------


def svdq_linear(fmt, n, k, rank, seed, *, smooth_power_of_two=False, channel_tscale=False):
    gen = torch.Generator().manual_seed(seed)
    bf16 = dict(dtype=torch.bfloat16)
    w = torch.randn(n, k, generator=gen).to(**bf16)
    q = quantize_weight(w, fmt, 64 if fmt == "int4" else 16)
    if channel_tscale:
        q.tensor_scale = (torch.rand(n, generator=gen) + 0.5).to(**bf16)
    if smooth_power_of_two:
        smooth = (2.0 ** torch.randint(-3, 4, (k,), generator=gen)).to(**bf16)
    else:
        smooth = (torch.rand(k, generator=gen) + 0.5).to(**bf16)
    return NunchakuLinear(pack_weight(q), bias=torch.randn(n, generator=gen).to(**bf16), smooth=smooth,
                          lora_down=torch.randn(rank, k, generator=gen).to(**bf16),
                          lora_up=torch.randn(n, rank, generator=gen).to(**bf16))


def assert_same_linear(a, b, *, exact_down=True):
    assert torch.equal(a.weight.qweight, b.weight.qweight)
    assert torch.equal(a.weight.wscales, b.weight.wscales)
    assert (a.weight.wtscale is None) == (b.weight.wtscale is None)
    if a.weight.wtscale is not None:
        assert torch.equal(a.weight.wtscale.reshape(-1), b.weight.wtscale.reshape(-1))
    for field in ("bias", "smooth", "lora_up"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    if exact_down:
        assert torch.equal(a.lora_down, b.lora_down)
    else:  # the 1/λ fold rounds to bf16 twice
        torch.testing.assert_close(a.lora_down, b.lora_down, rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize("n,k,rank", [(128, 128, 16), (200, 300, 20), (64, 80, 32)])
@pytest.mark.parametrize("naming", ["v1", "v2"])
def test_from_nunchaku_inverts_to_nunchaku(fmt, n, k, rank, naming):
    ours = svdq_linear(fmt, n, k, rank, seed=n + k, smooth_power_of_two=True)
    tensors = to_nunchaku(ours, naming=naming)
    assert ("proj_down" in tensors) == (naming == "v2") and ("smooth_factor" in tensors) == (naming == "v2")
    assert tensors["qweight"].shape == (-(-n // 128) * 128, -(-k // 128) * 64)
    back = from_nunchaku(tensors, fmt, in_features=k, out_features=n, rank=rank)
    assert_same_linear(back, ours)
    assert torch.equal(dequantize(unpack_weight(back.weight)), dequantize(unpack_weight(ours.weight)))


def test_lora_down_fold_is_inverse_up_to_rounding():
    ours = svdq_linear("int4", 128, 192, 32, seed=7)
    back = from_nunchaku(to_nunchaku(ours), "int4", in_features=192, out_features=128)
    assert back.lora_down.shape == (32, 192)
    assert_same_linear(back, ours, exact_down=False)


def test_to_nunchaku_inverts_from_nunchaku():
    tensors = to_nunchaku(svdq_linear("nvfp4", 384, 256, 32, seed=3, channel_tscale=True))
    assert "wcscales" in tensors and "wtscale" not in tensors
    again = to_nunchaku(from_nunchaku(tensors, "nvfp4", in_features=256, out_features=384))
    assert sorted(again) == sorted(tensors)
    for key in tensors:
        same = torch.equal(again[key].view(torch.uint8), tensors[key].view(torch.uint8)) \
            if tensors[key].dtype == torch.float8_e4m3fn else torch.equal(again[key], tensors[key])
        if key == "lora_down":
            torch.testing.assert_close(again[key], tensors[key], rtol=2 ** -7, atol=0)
        else:
            assert same, key


def test_from_nunchaku_reports_bad_checkpoints():
    tensors = to_nunchaku(svdq_linear("int4", 128, 128, 16, seed=1))
    with pytest.raises(CheckpointError, match="qweight has torch.int8 \\[128, 64\\], expected .* for in_features=256"):
        from_nunchaku(tensors, "int4", in_features=256, out_features=128)
    with pytest.raises(CheckpointError, match="wscales has torch.bfloat16"):
        from_nunchaku(tensors, "nvfp4", in_features=128, out_features=128)
    with pytest.raises(CheckpointError, match="missing qweight"):
        from_nunchaku({k: v for k, v in tensors.items() if k != "qweight"}, "int4", in_features=128,
                      out_features=128)
    with pytest.raises(QuantizationError, match="int4 with group 64 or nvfp4 with group 16"):
        to_nunchaku(NunchakuLinear(pack_weight(quantize_weight(torch.randn(8, 64).bfloat16(), "nf4", 64))))


# ---- Nunchaku AWQ W4A16 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k,splits", [(96, 192, 1), (48, 128, 6), (24, 320, 3)])
def test_awq_converters_are_inverses(n, k, splits):
    gen = torch.Generator().manual_seed(n * k)
    w = pack_weight(quantize_weight(torch.randn(n, k, generator=gen).bfloat16(), "int4", 64))
    bias = torch.randn(n, generator=gen).bfloat16()
    tensors = to_nunchaku_awq(w, bias, adanorm_splits=splits)
    assert tensors["qweight"].dtype == torch.int32 and tensors["qweight"].shape == (n // 4, k // 2)
    assert tensors["wscales"].shape[0] % 16 == 0  # G = 64: packs of 8 groups, an even number of packs
    assert torch.equal(tensors["wzeros"], (-(tensors["wscales"].float() * 7)).bfloat16())
    back, back_bias = from_nunchaku_awq(tensors, in_features=k, out_features=n, adanorm_splits=splits)
    assert torch.equal(back.qweight, w.qweight) and torch.equal(back.wscales, w.wscales)
    # the +1 of the scale chunks is added and removed in bf16
    torch.testing.assert_close(back_bias, bias, rtol=0, atol=2 ** -7 if splits > 1 else 0)


def test_awq_positions_and_adanorm_interleave_by_hand():
    n, k = 12, 128
    codes = torch.zeros(n, k, dtype=torch.int8)
    w = PackedWeight(pack_codes(codes, "int4", 64), torch.ones(2, n, dtype=torch.bfloat16), None, "int4", 64, k,
                     torch.bfloat16)
    plain = to_nunchaku_awq(w)["qweight"].view(torch.uint8).flatten()
    assert plain.eq(0x77).all()  # code 0 is the unsigned nibble 7 everywhere
    for (row, col), (byte, high) in {(0, 0): (0, False), (0, 8): (0, True), (0, 16): (1, False),
                                     (0, 1): (2, False), (0, 32): (16, False), (1, 0): (32, False),
                                     (4, 0): (256, False), (0, 64): (128, False)}.items():
        marked = codes.clone()
        marked[row, col] = 3  # nibble 10
        packed = to_nunchaku_awq(PackedWeight(pack_codes(marked, "int4", 64), w.wscales, None, "int4", 64, k,
                                              torch.bfloat16))["qweight"].view(torch.uint8).flatten()
        changed = torch.nonzero(packed != plain).flatten().tolist()
        assert changed == [byte] and (packed[byte] >> 4 if high else packed[byte] & 0xF) == 10, (row, col)
    bias = torch.arange(12, dtype=torch.bfloat16)  # module order: chunk j holds channels 2j, 2j+1
    out = to_nunchaku_awq(w, bias, adanorm_splits=6)["bias"]
    # row c·6 + j = chunk j's channel c (= module row 2j + c), +1 on chunks 1 and 4
    assert out.tolist() == [0, 3, 4, 6, 9, 10, 1, 4, 5, 7, 10, 11]
