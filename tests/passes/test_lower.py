"""lower: the lowered form of docs/architecture.md for every preset, numerically equal to the layer simulation."""

import pytest
import torch
from tiny_models import by_name, dit_inputs, outlier_dit, prepared

from svdq_compiler.codegen.spec import ActQuant
from svdq_compiler.fx_utils import aten
from svdq_compiler.ir import QuantOpInfo
from svdq_compiler.report import format_layers

CALIB = [dit_inputs(seed=s) for s in range(4)]
PASSES = ("annotate_linears", "calibrate", "smooth", "lowrank", "quantize_weights", "lower")
svdq = torch.ops.svdq


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_int4_lowered_form_and_report():
    model = outlier_dit()
    # the toy AdaLN layer reads 32 channels: a rank-32 branch would be a full 16-bit copy of it
    gm, ctx, results = prepared(model, CALIB[0], CALIB, passes=PASSES, weight_only_rank=0)
    ops = targets(gm)
    # q/k/v share one quantize_act and one down projection; 6 W4A4 gemms, one W4A16 (AdaLN).
    assert ops.count(svdq.quantize_act.default) == 4 and ops.count(svdq.gemm.default) == 6
    assert ops.count(svdq.weight_only_linear.default) == 1
    quantizers = [n for n in gm.graph.nodes if n.target == svdq.quantize_act.default]
    qkv = next(n for n in quantizers if n.meta["svdq"].linears == ["blocks.0.q", "blocks.0.k", "blocks.0.v"])
    assert qkv.args[2] == 0 and qkv.args[3] == "int4"
    down = next(n for n in quantizers if "blocks.0.down" in n.meta["svdq"].linears)
    assert down.args[2] == pytest.approx(0.171875) and down.args[3] == "uint4"
    # the annotation's frozen ActQuant is what the node's arguments say: shift, format, group
    for node in (qkv, down):
        assert node.meta["svdq"].spec == ActQuant(node.args[3], node.args[4], node.args[2])
    # Remaining aten.linear nodes: 16-bit layers and branch projections only.
    infos = by_name(gm)
    gemm = next(n for n in gm.graph.nodes if n.target == svdq.gemm.default and n.meta["svdq"].name == "blocks.0.k")
    assert gemm.meta["svdq"] is infos["blocks.0.k"] and infos["blocks.0.k"].qweight == "blocks.0.k.qweight"
    add = next(iter(gemm.users))
    assert add.target == aten.add.Tensor and isinstance(add.meta["svdq"], QuantOpInfo)
    up = add.args[1]
    assert up.target == aten.linear.default and up.args[2].target == "blocks.0.k.bias"
    assert not any(hasattr(gm.get_submodule(f"blocks.0.{n}"), "weight") for n in "qkv")
    # The lowered graph equals the quantize_weights simulation: per-layer errors were measured on what runs.
    x = dit_inputs(seed=5)
    y = model(*x)
    assert float((gm(*x) - y).norm() / y.norm()) < 0.1
    report = gm.meta["svdq_layers"]
    totals = report["totals"]
    # Rank 32 on 64 channels: the branch is half a 16-bit weight, so this toy compresses little.
    assert totals["quantized_layers"] == 7 and totals["compression_ratio"] > 1.2
    assert totals["model_bytes_after"] == sum(t.numel() * t.element_size() for t in
                                              list(gm.parameters()) + list(gm.buffers()))
    row = next(r for r in report["layers"] if r["name"] == "blocks.0.q")
    assert row["role"] == "qkv" and row["rank"] == 32 and row["lambda_range"][0] > 0
    k_row = next(r for r in report["layers"] if r["name"] == "blocks.0.k")
    assert k_row["bytes_after"] < k_row["bytes_before"]
    shared = 64 * 4 + 32 * 64 * 4  # λ and the q/k/v L2 are counted once, on the group's first layer
    assert row["bytes_after"] - k_row["bytes_after"] == shared
    text = format_layers(report)
    assert "blocks.0.down" in text and "A:uint4" in text and "compression" in text


@pytest.mark.parametrize("preset, bound", [("nvfp4", 0.12), ("w8a8", 0.02), ("w4a16-nf4", 0.3),
                                           ("w4a4-rtn", 0.6), ("w4a4-smoothquant", 0.35)])
def test_every_preset_lowers_and_runs(preset, bound):
    model = outlier_dit()
    gm, ctx, results = prepared(model, CALIB[0], CALIB, preset, passes=PASSES)
    x = dit_inputs(seed=5)
    y = model(*x)
    assert float((gm(*x) - y).norm() / y.norm()) < bound
    ops = targets(gm)
    if preset == "w4a16-nf4":
        assert svdq.gemm.default not in ops and ops.count(svdq.weight_only_linear.default) == 7
    else:
        assert ops.count(svdq.gemm.default) == 6
    if preset in ("w4a4-rtn", "w4a4-smoothquant"):  # no branch
        assert not any(n.meta.get("svdq") and getattr(n.meta["svdq"], "op", "") == "lora_down"
                       for n in gm.graph.nodes)


def test_a_bf16_model_compiles_in_bf16():
    """The model dtype is the module's: a bf16 model gets bf16 λ, branch, biases and int4 scales, and takes bf16
    inputs (QuantConfig has no dtype field to contradict it)."""
    from svdq_compiler import QuantConfig

    assert "dtype" not in QuantConfig.preset("int4").to_dict()
    model = outlier_dit().to(torch.bfloat16)
    calib = [tuple(t.to(torch.bfloat16) for t in inputs) for inputs in CALIB]
    gm, _, _ = prepared(model, calib[0], calib, passes=PASSES)
    from svdq_compiler.ir import get_attr_value

    for name in ("blocks.0.q.smooth", "blocks.0.q.lora_down", "blocks.0.k.lora_up", "blocks.0.k.wscales"):
        assert get_attr_value(gm, name).dtype == torch.bfloat16, name
    x = tuple(t.to(torch.bfloat16) for t in dit_inputs(seed=5))
    y, out = model(*x).float(), gm(*x)
    assert out.dtype == torch.bfloat16 and float((out.float() - y).norm() / y.norm()) < 0.1


def test_a_buffer_the_forward_never_reads_survives_fuse_without_fused_kernels():
    """Unlifting gives an unread buffer a dead get_attr (PixArt's pos_embed off its native grid). With only
    W4A16 layers fuse fuses nothing, yet erases that node and deletes the buffer: it must report the change,
    so the graph's code is regenerated and no longer reads the deleted attribute."""
    model = outlier_dit()
    model.register_buffer("unused_table", torch.randn(4, 4))
    gm, _, results = prepared(model, CALIB[0], CALIB, "w4a16-nf4", passes=PASSES + ("fuse",))
    assert results["fuse"].modified and not hasattr(gm, "unused_table")
    x = dit_inputs(seed=5)
    torch.testing.assert_close(gm(*x), prepared(model, CALIB[0], CALIB, "w4a16-nf4", passes=PASSES)[0](*x))


def test_a_weight_only_layer_keeps_its_awq_scaling_and_branch_when_lowered():
    model = outlier_dit()
    gm, _, _ = prepared(model, CALIB[0], CALIB, passes=PASSES, weight_only_rank=4, weight_only_error=None)
    info = by_name(gm)["blocks.0.ada"]
    assert info.scheme.kind == "weight_only" and info.smooth and info.rank == 4, info.choice
    node = next(n for n in gm.graph.nodes if n.target == svdq.weight_only_linear.default)
    assert node.meta["svdq"] is info
    assert node.args[0].target == aten.div.Tensor and node.args[0].args[1].target == info.smooth
    add = next(iter(node.users))
    assert add.target == aten.add.Tensor and add.args[1].args[1].target == info.lora_up
    x = dit_inputs(seed=5)
    y = model(*x)
    assert float((gm(*x) - y).norm() / y.norm()) < 0.1


def test_nvfp4_activations_get_their_calibrated_tensor_scale():
    """Each nvfp4 quantize_act and the gemms reading its codes take one fp32 `<layer>.act_scale`:
    headroom · max over calibration of |x/λ| / (6·448)."""
    model = outlier_dit()
    gm, ctx, _ = prepared(model, CALIB[0], CALIB, "nvfp4", passes=PASSES)
    calibration = ctx.calibration
    quantizers = [n for n in gm.graph.nodes if n.target == svdq.quantize_act.default]
    assert quantizers and all(len(n.args) == 6 and n.args[5].op == "get_attr" for n in quantizers)
    for quantize in quantizers:
        scale = gm.get_buffer(quantize.args[5].target)
        assert scale.dtype == torch.float32 and scale.dim() == 0
        x, smooth = quantize.args[0], quantize.args[1]
        absmax = calibration.sites[x.name].absmax().float()
        if smooth is not None:
            absmax = absmax / gm.get_buffer(smooth.target).float()
        expected = ctx.config.nvfp4_act_headroom * absmax.max() / (6 * 448)
        torch.testing.assert_close(scale, expected, rtol=1e-6, atol=0)
        gemms = [u for codes in quantize.users for u in codes.users if u.target == svdq.gemm.default]
        assert gemms and all(g.args[9] is quantize.args[5] for g in gemms)


def test_lower_alone_on_a_hand_annotated_linear():
    """Before: one aten.linear annotated W4A4 by hand, its QTensor in ctx.quantized (no calibrate, smooth or
    lowrank ran). Expected: svdq.quantize_act feeding svdq.gemm, the bias added, no aten.linear left."""
    from torch.testing import FileCheck

    import svdq_compiler
    from svdq_compiler.config import Scheme
    from svdq_compiler.ir import LinearInfo, format_ir, set_info
    from svdq_compiler.pipeline import PassContext, run_passes, svdquant_pipeline
    from svdq_compiler.quant import quantize_weight

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    gm = svdq_compiler.capture(model, (torch.randn(3, 64),), dynamic_shapes=None)
    node = next(n for n in gm.graph.nodes if n.target == aten.linear.default)
    scheme = Scheme(weight="int4", act="int4", weight_group=64, act_group=64, smooth=False, rank=0)
    set_info(node, LinearInfo(name="0", weight="0.weight", bias="0.bias", in_features=64, out_features=32,
                              scheme=scheme))
    ctx = PassContext(config=svdq_compiler.QuantConfig.preset("int4"), verify_each=True,
                      available={"linears", "quantized"},
                      quantized={"0.weight": quantize_weight(model[0].weight.detach(), "int4", 64)})
    (lower,) = svdquant_pipeline(["lower"])
    gm = run_passes(gm, ctx, [lower])  # verify_each: lower's contract and the lowered-stage op allow-list
    FileCheck().check("# svdq: svdq.quantize_act for 0").check("torch.ops.svdq.quantize_act.default") \
        .check("# svdq: 0 role=other scheme=W:int4/g64 A:int4/g64").check("torch.ops.svdq.gemm.default") \
        .check("torch.ops.aten.add").check_not("aten.linear").run(format_ir(gm))
    x = torch.randn(3, 64)
    reference = model(x)
    assert float((gm(x) - reference).norm() / reference.norm()) < 0.15
