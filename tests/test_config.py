"""QuantConfig presets, overrides and per-role schemes."""

import pytest

from svdq_compiler import PRESETS, QuantConfig
from svdq_compiler.errors import InputError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    config = QuantConfig.preset(name)
    assert config.preset_name == name
    assert QuantConfig.from_dict(config.to_dict()) == config


def test_overrides_apply_to_any_field():
    config = QuantConfig.preset("int4", rank=16, smooth="none", iterations=3, group_size=128)
    assert (config.rank, config.smooth, config.iterations, config.group_size) == (16, "none", 3, 128)


def test_int8_groups_without_a_kernel_need_the_reference_ops():
    with pytest.raises(InputError, match=r"group_size=16: int8 kernels need group_size 0 \(per token\) or a power of "
                                         r"two from 32 to 256, got 16.*allow_reference_ops=true"):
        QuantConfig.preset("w8a8", group_size=16)
    assert QuantConfig.preset("w8a8", group_size=16, allow_reference_ops=True).scheme("w4a4").act_group == 16


def test_unknown_preset_and_field_are_clear_errors():
    with pytest.raises(InputError, match="w4a4-rtn"):
        QuantConfig.preset("int3")
    with pytest.raises(InputError, match="valid fields"):
        QuantConfig.preset("int4", ranks=3)
    with pytest.raises(InputError, match=r"weight_rounding must be one of \['rtn', 'gptq'\], got 'awq'"):
        QuantConfig.preset("int4", weight_rounding="awq")


def test_role_schemes():
    config = QuantConfig.preset("int4")
    assert config.scheme_for_role("adaln").kind == "weight_only"
    assert config.scheme_for_role("embed").kind == "fp"
    main = config.scheme_for_role("qkv")
    assert (main.weight, main.act, main.rank, main.smooth, main.shift) == ("int4", "int4", 32, True, 0.0)
    assert config.scheme_for_role("mlp_down", unsigned_input=True).shift == 0.171875
    assert QuantConfig.preset("nvfp4").scheme_for_role("mlp_down", unsigned_input=True).shift == 0.0
    assert QuantConfig.preset("w4a16-nf4").scheme_for_role("qkv").describe() == "W:nf4/g64 A:16"
    # w8a8 groups its activations as its weights; group 0 is the per-token / per-channel form
    assert QuantConfig.preset("w8a8").scheme_for_role("out").describe() == "W:int8/g64 A:int8/g64 +smooth +r16"
    assert QuantConfig.preset("w8a8", group_size=0).scheme_for_role("out").describe() == \
        "W:int8/ch A:int8/tok +smooth +r16"
