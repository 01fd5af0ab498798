"""compress: Before (a hand-annotated group and its synthetic calibration) → compress → Expected: the branch in
the graph and every quantized residual in ctx.quantized, with its weight-space error."""

import torch
from hand_built import W4A4, SharedInput, before, context, run_one
from torch.testing import FileCheck

from svdq_compiler.calibration import isotropic_calibration
from svdq_compiler.ir import format_ir, get_attr_value
from svdq_compiler.quant import dequantize


def test_compress_alone_on_a_hand_annotated_group():
    """a and b read x (group "a", W4A4 rank 8), calibrated with isotropic rows; c stays 16-bit."""
    torch.manual_seed(0)
    model, x = SharedInput(), torch.randn(4, 64)
    gm = before(model, x, {"a": W4A4, "b": W4A4}, groups={"b": "a"})
    ctx = context(calibration=isotropic_calibration(gm, 64, 0), available=("linears", "calibration"))
    gm = run_one(gm, ctx, "compress")
    FileCheck().check("# svdq: lora_down for a").check("torch.ops.aten.linear.default(x, a_lora_down)") \
        .check("# svdq: a role=other group=a").check("rank=8").check("weight_rel=") \
        .check("# svdq: lora_add for a").check("# svdq: lora_down for b").check("# svdq: b role=other") \
        .check("# svdq: lora_add for b").check("torch.ops.aten.linear.default(add, c_weight").run(format_ir(gm))
    assert sorted(ctx.quantized) == ["a.weight", "b.weight"]
    for name in ("a", "b"):
        residual = get_attr_value(gm, f"{name}.weight")
        weight = getattr(model, name).weight
        # the graph still holds the residual R (lower packs Q(R) from ctx.quantized); R + L1·L2 = W
        rebuilt = residual + get_attr_value(gm, f"{name}.lora_up") @ get_attr_value(gm, f"{name}.lora_down")
        torch.testing.assert_close(rebuilt, weight, rtol=1e-4, atol=1e-5)
        error = (dequantize(ctx.quantized[f"{name}.weight"]) - residual).norm() / weight.norm()
        assert 0 < error < 0.2
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
