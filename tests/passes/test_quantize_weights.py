"""quantize_weights: one quantization per weight, output errors that match the layer's simulation, fallback."""

import torch
from tiny_models import by_name, dit_inputs, outlier_dit, prepared

from svdq_compiler.ir import get_attr_value
from svdq_compiler.quant import dequantize
from svdq_compiler.svdquant import quant_op

CALIB = [dit_inputs(seed=s) for s in range(4)]
PASSES = ("annotate_linears", "calibrate", "smooth", "lowrank", "quantize_weights")


def test_weights_are_quantized_once_and_errors_recorded():
    model = outlier_dit()
    gm, ctx, results = prepared(model, CALIB[0], CALIB, passes=PASSES)
    store = ctx.state["quantize_weights"]
    infos = by_name(gm)
    quantized = [i for i in infos.values() if i.scheme.kind != "fp"]
    assert sorted(store) == sorted(i.weight for i in quantized)
    for info in quantized:
        # The graph now holds the dequantized weight: the model with quantized weights, 16-bit activations.
        assert torch.equal(get_attr_value(gm, info.weight), dequantize(store[info.weight]))
        assert 0 < info.errors["output_rel"] < 0.2
    assert store["blocks.0.q.weight"].fmt == "int4" and store["blocks.0.ada.weight"].group_size == 64
    stats = results["quantize_weights"].stats
    assert stats["weights_quantized"] == 7 and stats["fallbacks"] == []
    x = dit_inputs(seed=3)
    y = model(*x)
    assert float((gm(*x) - y).norm() / y.norm()) < 0.1


def test_sensitivity_fallback_moves_layers_and_cleans_the_graph():
    model = outlier_dit()
    gm, ctx, results = prepared(model, CALIB[0], CALIB, passes=PASSES, fallback_error=0.03)
    infos = by_name(gm)
    fallen = {n: i for n, i in infos.items() if i.fallback}
    assert fallen and results["quantize_weights"].stats["fallbacks"]
    for name, info in fallen.items():
        assert info.smooth is None and info.lora_up is None and info.rank == 0
        assert info.scheme.kind in ("weight_only", "fp")
        assert "> 0.03" in info.fallback
        node = next(n for n in gm.graph.nodes if n.meta.get("svdq") is info)
        assert quant_op(node.args[0]) != "smooth_div" and all(quant_op(u) != "lora_add" for u in node.users)
        if info.scheme.kind == "weight_only":
            assert info.errors["output_rel"] <= 0.03
    x = dit_inputs(seed=3)
    torch.testing.assert_close(gm(*x), model(*x), rtol=0.2, atol=0.2)
    # Nothing unused is left behind.
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert all(name in used for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()))
    _, _, baseline = prepared(model, CALIB[0], CALIB, "w4a4-rtn", passes=PASSES)
    assert baseline["quantize_weights"].stats["fallbacks"] == []  # off in the baselines
