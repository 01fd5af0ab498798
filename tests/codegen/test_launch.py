"""Launcher logic that needs no kernel: tile configurations, operand addressing, the native-FP4 check."""

import pytest
import torch

from svdq_compiler.codegen import launch
from svdq_compiler.codegen.configs import (arch_family, gemm_configs, m_bucket, quantize_configs,
                                           weight_only_configs)
from svdq_compiler.codegen.generate import Target
from svdq_compiler.codegen.spec import ActQuant, GemmSpec, QuantizeNext, QuantizeSpec, WeightOnlySpec

HOPPER, ADA, AMPERE = Target("cuda", (9, 0)), Target("cuda", (8, 9)), Target("cuda", (8, 0))


def test_arch_families_and_m_buckets():
    assert [arch_family(t) for t in (HOPPER, ADA, Target("cuda", (8, 6)), AMPERE, Target("cuda", (12, 0)))] == [
        "hopper", "ada", "ada", "ampere", "hopper"]
    assert [m_bucket(m) for m in (1, 16, 17, 256, 4095, 4096, 100000)] == [16, 16, 32, 256, 4096, 4096, 8192]


@pytest.mark.parametrize("target", [HOPPER, ADA, AMPERE])
def test_gemm_configs_fit_the_spec(target):
    spec = GemmSpec("int4", 64, 32, True, "bfloat16", k=3072, n=3072)
    big = gemm_configs(spec, target, 4096)
    assert big and all(c.block_m >= 64 and c.num_warps in (4, 8) for c in big)
    assert all(c.block_m <= 64 for c in gemm_configs(spec, target, 16))  # no 128-row tiles for 16 tokens
    nvfp4 = gemm_configs(GemmSpec("nvfp4", 16, 32, True, "bfloat16"), target, 4096)
    assert all(c.block_k % 32 == 0 for c in nvfp4)
    wide = GemmSpec("int4", 64, 0, False, "bfloat16",
                    quantize_next=QuantizeNext(ActQuant("uint4", 64, 0.171875)))
    assert all(c.block_n % 64 == 0 for c in gemm_configs(wide, target, 4096))


@pytest.mark.parametrize("target", [HOPPER, ADA, AMPERE])
def test_weight_only_configs_serve_one_row_and_token_streams(target):
    spec = WeightOnlySpec("nf4", 64, 0, True, "bfloat16", k=3072, n=18432)
    modulation = weight_only_configs(spec, target, 1)
    # one row per sample: 16-row tiles (the smallest dot), narrow N so N = 18432 makes hundreds of programs,
    # several groups per K step so each program keeps loads in flight
    assert modulation and all(c.block_m <= 32 and c.block_n <= 128 for c in modulation)
    assert any(c.block_m == 16 and c.block_n <= 64 for c in modulation)
    assert all(c.groups_per_step * 64 >= 128 for c in modulation)
    tokens = weight_only_configs(spec, target, 4096)
    assert any(c.block_m >= 128 for c in tokens) and all(c.num_warps in (4, 8) for c in tokens)
    wide_groups = weight_only_configs(WeightOnlySpec("int4", 128, 0, True, "bfloat16"), target, 1)
    assert all(c.groups_per_step >= 1 and c.groups_per_step * 128 <= 256 for c in wide_groups)


def test_interpreter_uses_one_configuration_per_size_class():
    interp = Target("interpreter")
    (config,) = gemm_configs(GemmSpec("int4", 64, 32, True, "bfloat16"), interp, 33)
    assert (config.block_m, config.block_n, config.num_stages) == (16, 32, 1)  # ragged tests: several tiles
    (config,) = gemm_configs(GemmSpec("int4", 64, 32, True, "bfloat16"), interp, 4096)
    assert (config.block_m, config.block_n) == (64, 64)  # a model's forward: fewer, larger programs
    (config,) = gemm_configs(GemmSpec("int4", 64, 0, False, "bfloat16", quantize_next=QuantizeNext(
        ActQuant("int4", 128))), interp, 8)
    assert config.block_n == 128  # whole groups of the next layer in a tile
    (config,) = quantize_configs(QuantizeSpec(ActQuant("nvfp4", 16), 0, "bfloat16"), interp, 8)
    assert config.step % 16 == 0 and config.block_m == 16
    (config,) = weight_only_configs(WeightOnlySpec("nf4", 64, 0, True, "bfloat16"), interp, 33)
    assert (config.block_m, config.block_n, config.groups_per_step) == (16, 32, 2)  # steps past the end of K


def test_quantize_configs_step_in_whole_groups():
    for fmt, group in (("int4", 64), ("nvfp4", 16), ("int8", 0), ("int8", 64), ("int8", 256)):
        configs = quantize_configs(QuantizeSpec(ActQuant(fmt, group), 32, "bfloat16"), HOPPER, 4096)
        assert configs and all(c.step % max(group, 1) == 0 and c.step >= 128 for c in configs)


def test_grouped_int8_gemm_steps_by_group_and_kernel_a_keeps_steps_that_do_not_spill():
    (config, *_) = gemm_configs(GemmSpec("int8", 64, 32, True, "bfloat16"), HOPPER, 4096)
    assert config.block_k == 0  # one group per iteration, like int4
    grouped = quantize_configs(QuantizeSpec(ActQuant("int8", 64), 32, "bfloat16"), HOPPER, 4096)
    assert (32, 256) not in {(c.block_m, c.step) for c in grouped}  # spills on sm_90 (AOT gate)
    assert {(c.block_m, c.step) for c in grouped} >= {(16, 256), (32, 128)}


@pytest.mark.parametrize("shape, lead, expect", [
    ((7, 5, 32), (7, 5), (35, 0, 32)),  # a full [B, T, N] residual: the row dims merge into one
    ((7, 1, 32), (7, 5), (5, 32, 0)),  # a per-sample gate broadcast over T
    ((32,), (7, 5), (35, 0, 0)),  # a vector broadcast to every row
    ((35, 32), (35,), (35, 0, 32)),  # plain 2-D
])
def test_operand_rows_split_into_at_most_two_levels(shape, lead, expect):
    operand = torch.randn(shape)
    tensor, inner, stride_outer, stride_inner, stride_n = launch._row_strides(operand, lead, 32, "test", 0)
    assert (inner, stride_outer, stride_inner, stride_n) == (*expect, 1)
    assert tensor.data_ptr() == operand.data_ptr()  # addressed in place, not copied
    m = torch.arange(torch.Size(lead).numel())
    rows = (m // inner) * stride_outer + (m % inner) * stride_inner
    expanded = operand.expand(*lead, 32).reshape(-1, 32)
    flat = operand.reshape(-1)
    assert torch.equal(flat[rows[:, None] + torch.arange(32)[None, :]], expanded)


def test_operands_needing_three_row_levels_are_copied_and_bad_shapes_rejected():
    operand = torch.randn(2, 1, 5, 32)
    tensor, inner, *_ = launch._row_strides(operand, (2, 3, 5), 32, "test", 0)
    assert tensor.is_contiguous() and tuple(tensor.shape) == (2, 3, 5, 32) and inner == 30
    with pytest.raises(launch.KernelInputError, match="does not broadcast to the output"):
        launch._row_strides(torch.randn(3, 32), (2, 5), 32, "test", 1)


def test_native_fp4_is_checked_against_the_exact_path_once(monkeypatch):
    spec = GemmSpec("nvfp4", 16, 0, False, "bfloat16")
    blackwell = Target("cuda", (10, 0))
    monkeypatch.setattr(launch, "_device_key", lambda device: "test-gpu")
    monkeypatch.setattr(launch, "_FP4_CHECKED", {})
    exact = torch.linspace(1, 2, 64)
    calls = []

    def agreeing(target):
        calls.append(target.fp4_mma)
        return [exact + (1e-5 if target.fp4_mma else 0)]

    assert launch._dot_scaled_verified(spec, torch.device("cpu"), agreeing, blackwell)
    assert launch._dot_scaled_verified(spec, torch.device("cpu"), agreeing, blackwell)
    assert calls == [False, True]  # checked once, then remembered

    monkeypatch.setattr(launch, "_FP4_CHECKED", {})
    with pytest.warns(RuntimeWarning, match="results differ from the exact dequantize path"):
        assert not launch._dot_scaled_verified(spec, torch.device("cpu"),
                                               lambda t: [exact * (2 if t.fp4_mma else 1)], blackwell)

    def failing(target):
        if target.fp4_mma:
            raise RuntimeError("unsupported scale type")
        return [exact]

    monkeypatch.setattr(launch, "_FP4_CHECKED", {})
    with pytest.warns(RuntimeWarning, match="does not compile here"):
        assert not launch._dot_scaled_verified(spec, torch.device("cpu"), failing, blackwell)


def test_cpu_kernels_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(launch.KernelInputError, match="set TRITON_INTERPRET=1 before Python starts"):
        launch.current_target(torch.device("cpu"))
