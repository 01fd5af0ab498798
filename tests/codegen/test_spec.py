"""Kernel specs: canonical text, round trip, stable hash, validation with clear errors."""

import pytest

from svdq_compiler.codegen.spec import (GENERATOR_VERSION, ActQuant, Epilogue, GemmSpec, QuantizeNext, QuantizeSpec,
                                        SpecError, parse_spec)
from svdq_compiler.errors import SvdqError


def _gemm(**overrides):
    values = dict(act="int4", group_size=64, rank=32, bias=True, dtype="bfloat16", k=3072, n=12288,
                  epilogue=(Epilogue("gelu_tanh"), Epilogue("mul"), Epilogue("add_scalar", 0.5)),
                  quantize_next=QuantizeNext(ActQuant("uint4", 64, 0.171875), rank=32, emit_output=True))
    values.update(overrides)
    return GemmSpec(**values)


def test_round_trip_is_exact_and_text_is_canonical():
    specs = [_gemm(), _gemm(act="nvfp4", group_size=16, quantize_next=None, epilogue=()),
             QuantizeSpec(ActQuant("uint4", 64, 0.171875), rank=32, dtype="float16", k=None),
             QuantizeSpec(ActQuant("int8", 0, smooth=False), rank=0, dtype="bfloat16", k=40),
             _gemm(act="int8", group_size=64, quantize_next=QuantizeNext(ActQuant("int8", 128), rank=16))]
    for spec in specs:
        text = spec.to_string()
        assert " " not in text and text.startswith("{")
        again = parse_spec(text)
        assert again == spec and again.to_string() == text and again.hash == spec.hash


def test_hash_depends_on_every_field_and_the_generator_version(monkeypatch):
    base = _gemm()
    base_hash = base.hash
    variants = [_gemm(act="uint4"), _gemm(rank=16), _gemm(bias=False), _gemm(dtype="float16"), _gemm(k=None),
                _gemm(n=3072), _gemm(epilogue=(Epilogue("gelu_erf"),)), _gemm(quantize_next=None)]
    hashes = {base.hash} | {v.hash for v in variants}
    assert len(hashes) == len(variants) + 1
    monkeypatch.setattr("svdq_compiler.codegen.spec.GENERATOR_VERSION", GENERATOR_VERSION + 1)
    assert _gemm().hash != base_hash


def test_names_are_valid_identifiers_and_unique_per_spec():
    assert _gemm().name.isidentifier() and _gemm().name.startswith("svdq_gemm_int4_r32_")
    assert _gemm().name != _gemm(rank=16).name


@pytest.mark.parametrize("text, message", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"kind": "conv"}', "unknown spec kind"),
    ('{"kind": "gemm", "act": "int4"}', "incomplete GemmSpec"),
])
def test_malformed_text_is_rejected_clearly(text, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(text)


@pytest.mark.parametrize("spec, message", [
    (_gemm(act="int3"), "unknown activation format 'int3'"),
    (_gemm(group_size=16), "power-of-two group size of at least 32"),
    (_gemm(act="nvfp4", group_size=64), "nvfp4 needs group_size 16"),
    (_gemm(dtype="float64"), "unknown dtype"),
    (_gemm(rank=-1), "rank must be >= 0"),
    (_gemm(epilogue=(Epilogue("tanh"),)), "unknown epilogue 'tanh'"),
    (_gemm(epilogue=(Epilogue("mul_scalar"),)), "needs a scalar value"),
    (_gemm(quantize_next=QuantizeNext(ActQuant("int8", 0))), "cannot be an epilogue"),
    (_gemm(act="int8", group_size=16), "int8 kernels need group_size 0 .per token. or a power of two from 32 to 256"),
    (_gemm(act="int8", group_size=512), "from 32 to 256"),
    (_gemm(act="int8", group_size=96), "from 32 to 256"),
    (_gemm(act="uint8", group_size=256), "uint8 kernels need group_size 0 .per token. or a power of two from 32 to 128"),
    (QuantizeSpec(ActQuant("int4", 64, shift=0.5), 0, "bfloat16"), r"only meaningful for unsigned \(uint4, uint8\)"),
    (QuantizeSpec(ActQuant("int8", 64, shift=0.5), 0, "bfloat16"), "only meaningful for unsigned"),
])
def test_invalid_specs_name_the_problem(spec, message):
    with pytest.raises(SpecError, match=message) as info:
        parse_spec(spec.to_string())
    assert isinstance(info.value, SvdqError) and "spec" in str(info.value)


def test_unknown_fields_are_rejected():
    text = _gemm().to_string().replace('"act":', '"colour":"red","act":')
    with pytest.raises(SpecError, match=r"unknown field\(s\) \['colour'\]"):
        parse_spec(text)


def test_operand_count_and_output_flags():
    spec = _gemm(epilogue=(Epilogue("mul"), Epilogue("silu"), Epilogue("add")))
    assert spec.operand_count == 2 and spec.emits_output
    assert not _gemm(quantize_next=QuantizeNext(ActQuant("int4", 64))).emits_output
    assert _gemm(act="uint4").weight == "int4"


def test_grouped_int8_takes_the_per_group_loop_and_per_token_int8_the_k_steps():
    assert _gemm(act="int8", group_size=64).integer_groups and _gemm().integer_groups
    assert not _gemm(act="int8", group_size=0, quantize_next=None).integer_groups
    assert not _gemm(act="nvfp4", group_size=16, quantize_next=None).integer_groups
