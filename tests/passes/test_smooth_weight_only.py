"""smooth_weight_only: Before (a hand-annotated group whose weights have outlier columns, synthetic rows) →
smooth_weight_only → Expected: λ = 1/b^β applied as x/λ, β among the candidates, the same function."""

import dataclasses

import torch
from hand_built import W4A4, SharedInput, before, context, run_one
from torch.testing import FileCheck

from svdq_compiler.calibration import isotropic_calibration
from svdq_compiler.ir import format_ir, get_attr_value


def test_smooth_weight_only_alone_on_a_hand_annotated_group():
    torch.manual_seed(0)
    model, x = SharedInput(), torch.randn(4, 64)
    with torch.no_grad():  # two input columns 30× the rest in both weights: what 1/b^β evens out
        for linear in (model.a, model.b):
            linear.weight[:, [5, 40]] *= 30
    scheme = dataclasses.replace(W4A4, rank=0)  # no branch to absorb the outlier columns: β must do it
    gm = before(model, x, {"a": scheme, "b": scheme}, groups={"b": "a"})
    ctx = context(calibration=isotropic_calibration(gm, 64, 0), available=("linears", "calibration"),
                  weight_only_betas=(0.0, 0.5, 1.0))
    gm = run_one(gm, ctx, "smooth_weight_only")
    FileCheck().check("a_smooth = self.a.smooth").check("# svdq: smooth_div for a, b") \
        .check("torch.ops.aten.div.Tensor(x, a_smooth)").check("# svdq: a role=other group=a").check("α=0 β=") \
        .check("torch.ops.aten.linear.default(div_tensor, a_weight").check("linear.default(div_tensor, b_weight") \
        .run(format_ir(gm))
    info = next(n.meta["svdq"] for n in gm.graph.nodes if getattr(n.meta.get("svdq"), "name", "") == "a")
    beta = info.smooth_beta
    assert beta in (0.5, 1.0) and info.errors["smooth_ratio"] < 1  # smoothing beat λ = 1 on the synthetic rows
    ranges = torch.maximum(model.a.weight.abs().amax(0), model.b.weight.abs().amax(0))
    torch.testing.assert_close(get_attr_value(gm, "a.smooth"), ranges.pow(-beta), rtol=1e-5, atol=0)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
