"""lowrank: optimal rank-r factors of the smoothed weights (q/k/v share L2), the refinement loop, the graph form."""

import dataclasses

import pytest
import torch
from tiny_models import by_name, dit_inputs, outlier_dit, prepared

from svdq_compiler.config import QuantConfig
from svdq_compiler.ir import get_attr_value
from svdq_compiler.svdquant import (GroupProblem, group_problem, low_rank, low_rank_scaled, members_by_group,
                                    quant_op, right_vectors_from_gram)
from svdq_compiler.passes.lowrank import refine

CALIB = [dit_inputs(seed=s) for s in range(4)]
PASSES = ("annotate_linears", "calibrate", "smooth", "lowrank")


def decaying(rows, cols, seed=0):
    """A matrix with singular values falling from 10 to 1e-3."""
    g = torch.Generator().manual_seed(seed)
    rank = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=torch.float64)).Q
    return (u * torch.logspace(1, -3, rank, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("shape", [(96, 48), (40, 120)])
def test_full_svd_factors_are_the_best_rank_r_approximation(shape):
    weight = decaying(*shape)
    up, down = low_rank(weight.float(), 8, "full")
    assert up.shape == (shape[0], 8) and down.shape == (8, shape[1]) and up.dtype == torch.float64
    torch.testing.assert_close(down @ down.T, torch.eye(8, dtype=torch.float64))  # Σ sits in L1
    sigma = torch.linalg.svdvals(weight.float().double())
    residual = torch.linalg.matrix_norm(weight.float().double() - up @ down)
    assert residual == pytest.approx(float(sigma[8:].pow(2).sum().sqrt()), rel=1e-9)
    assert low_rank(weight, 500)[0].shape[1] == min(shape)  # the rank is clamped to the matrix
    # float32 (the smoothing search's) is as good to float32's precision on this well-scaled matrix
    up32, down32 = low_rank(weight.float(), 8, "full", dtype=torch.float32)
    assert up32.dtype == torch.float32
    assert torch.linalg.matrix_norm(weight.float().double() - (up32 @ down32).double()) == pytest.approx(
        float(residual), rel=1e-4)


def test_a_start_near_the_answer_finds_the_range_without_subspace_iterations():
    """`near` (the previous refinement iterate's factors) starts the sketch: on a slowly decaying spectrum, a
    sketch with no subspace iteration misses the optimum by several percent from a Gaussian start and by a
    fraction of a percent from the factors of a nearby matrix."""
    g = torch.Generator().manual_seed(5)
    for shape in [(256, 96), (96, 256)]:
        base = torch.randn(*shape, generator=g) + 3 * decaying(*shape, 5).float()
        weight = base + 0.05 * torch.randn(*shape, generator=g)  # the next iterate: base plus noise
        best_up, best_down = low_rank(weight, 16, "full")
        optimum = float(torch.linalg.matrix_norm(weight - best_up @ best_down))

        def excess(**options):
            up, down = low_rank(weight, 16, "randomized", power_iterations=0, **options)
            return float(torch.linalg.matrix_norm(weight - up @ down)) / optimum - 1

        assert excess(near=low_rank(base, 16, "full")) < 0.003 < 0.02 < excess()


def test_randomized_svd_is_within_one_percent_of_the_optimum():
    for seed, shape in enumerate([(192, 64), (64, 256), (300, 300)]):
        weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) + 3 * decaying(*shape, seed)
        best_up, best_down = low_rank(weight, 32, "full")
        optimum = torch.linalg.matrix_norm(weight.double() - best_up @ best_down)
        up, down = low_rank(weight, 32, "randomized", seed=seed)
        excess = torch.linalg.matrix_norm(weight.double() - up @ down) / optimum - 1
        assert 0 <= excess < 0.01


def test_gram_factors_match_the_svd_for_every_smoothing_candidate():
    """The search decomposes W·diag(λ) of every candidate from one Gram matrix WᵀW: within 1% of the
    optimum residual, like the randomized SVD, and exact where the rank covers the whole spectrum."""
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(192, 64, generator=g) + 3 * decaying(192, 64)).float()
    scales = torch.rand(5, 64, generator=g) * 4 + 0.25
    smoothed = weight * scales.unsqueeze(-2)
    gram = scales.unsqueeze(-1) * (weight.T @ weight) * scales.unsqueeze(-2)
    right = right_vectors_from_gram(gram, 32)
    up, down = smoothed @ right, right.mT
    assert up.shape == (5, 192, 32) and down.shape == (5, 32, 64)
    torch.testing.assert_close(down @ down.mT, torch.eye(32).expand(5, 32, 32), atol=1e-4, rtol=0)
    for candidate in range(5):
        best_up, best_down = low_rank(smoothed[candidate], 32, "full")
        optimum = torch.linalg.matrix_norm(smoothed[candidate].double() - best_up @ best_down)
        excess = torch.linalg.matrix_norm((smoothed[candidate] - up[candidate] @ down[candidate]).double())
        assert 0 <= excess / optimum - 1 < 0.01
    right = right_vectors_from_gram(gram[0], 64)
    torch.testing.assert_close(smoothed[0] @ right @ right.mT, smoothed[0], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("shape", [(64, 256), (192, 64), (96, 96)])
def test_scaled_factors_are_the_randomized_svd_of_each_scaled_weight(shape):
    """low_rank_scaled runs low_rank's randomized algorithm (same seeded sketch) on W·diag(λ) for every λ at
    once, through products with W alone."""
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(*shape, generator=g) + 3 * decaying(*shape)).float()
    scales = torch.rand(4, shape[1], generator=g) * 4 + 0.25
    ups, downs = low_rank_scaled(weight, scales, 32, seed=3)
    assert ups.shape == (4, shape[0], 32) and downs.shape == (4, 32, shape[1])
    for scale, up, down in zip(scales, ups, downs):
        reference_up, reference_down = low_rank(weight * scale, 32, "randomized", seed=3, dtype=torch.float32,
                                                power_iterations=2)
        torch.testing.assert_close(up @ down, reference_up @ reference_down, atol=1e-3, rtol=1e-3)


def test_branches_are_attached_and_the_graph_is_unchanged():
    model = outlier_dit()
    gm, ctx, results = prepared(model, CALIB[0], CALIB, passes=PASSES, iterations=1, svd="full")  # truncated SVD
    x = dit_inputs(seed=13)
    torch.testing.assert_close(gm(*x), model(*x), rtol=1e-4, atol=1e-4)
    stats = results["lowrank"].stats
    assert stats["groups"] == 5 and stats["branches"] == 5  # the weight-only AdaLN layer has one too
    infos = by_name(gm)
    assert {infos[f"blocks.0.{n}"].lora_down for n in "qkv"} == {"blocks.0.q.lora_down"}
    assert infos["blocks.0.k"].lora_up == "blocks.0.k.lora_up" and infos["blocks.0.k"].rank == 32
    downs = [n for n in gm.graph.nodes if quant_op(n) == "lora_down"]
    assert len(downs) == 5
    qkv_down = next(n for n in downs if n.meta["svdq"].linears == ["blocks.0.q", "blocks.0.k", "blocks.0.v"])
    assert sorted(quant_op(u) for u in qkv_down.users) == ["lora_up"] * 3
    assert qkv_down.args[0] is next(n for n in gm.graph.nodes if quant_op(n) == "smooth_div"
                                    and "blocks.0.q" in n.meta["svdq"].linears)
    # The stored factors are the truncated SVD of the stacked smoothed weights, and the weights the residual.
    smooth = get_attr_value(gm, "blocks.0.q.smooth")
    stacked = torch.cat([getattr(model.blocks[0], n).weight * smooth for n in "qkv"]).detach()
    up = torch.cat([get_attr_value(gm, f"blocks.0.{n}.lora_up") for n in "qkv"])
    down = get_attr_value(gm, "blocks.0.q.lora_down")
    reference_up, reference_down = low_rank(stacked, 32, "full")
    torch.testing.assert_close(up @ down, (reference_up @ reference_down).float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(get_attr_value(gm, "blocks.0.v.weight"),
                               stacked[128:] - (up @ down)[128:], atol=1e-5, rtol=1e-4)


def test_refinement_keeps_the_best_iterate_and_stops_early():
    model = outlier_dit()
    gm, ctx, _ = prepared(model, CALIB[0], CALIB, passes=("annotate_linears", "calibrate", "smooth"))
    members = members_by_group(gm, lambda i: i.scheme.rank > 0)["blocks.0.out"]
    problem = group_problem(gm, members, ctx.calibration, members[0][1].scheme)
    smooth = get_attr_value(gm, members[0][1].smooth)
    _, history, kept = refine(problem, smooth, 32, 12, True, "full", 0)
    assert kept == history.index(min(history)) + 1 and history[kept - 1] < history[0]
    if len(history) < 12:  # stopped: the last iterate was the first to get worse
        assert history[-1] > min(history) and all(a >= b for a, b in zip(history[:kept], history[1:kept]))
    _, unstopped, _ = refine(problem, smooth, 32, len(history) + 2, False, "full", 0)
    assert len(unstopped) == len(history) + 2 and unstopped[:len(history)] == pytest.approx(history)
    _, results = prepared(model, CALIB[0], CALIB, passes=PASSES, iterations=4)[1:]
    assert results["lowrank"].stats["error_vs_first_median"] < 1.0


def test_lowrank_alone_on_a_hand_annotated_group():
    """Before: a and b read x (group "a", rank 8, no smoothing), annotated by hand with a hand-made calibration.
    Expected: per linear x·L2ᵀ, ·L1ᵀ and an add after the residual linear (separate L2s: only smoothed q/k/v
    share one); c untouched; the same function up to fp32 rounding (R + L1·L2 = W)."""
    import dataclasses

    from hand_built import W4A4, SharedInput, before, calibration_of, context, outlier_rows, run_one
    from torch.testing import FileCheck

    from svdq_compiler.ir import format_ir

    torch.manual_seed(0)
    model, x = SharedInput(), torch.randn(4, 64)
    scheme = dataclasses.replace(W4A4, smooth=False)
    gm = before(model, x, {"a": scheme, "b": scheme}, groups={"b": "a"})
    ctx = context(calibration=calibration_of(gm, {"x": outlier_rows()}), available=("linears", "calibration"))
    gm = run_one(gm, ctx, "lowrank")
    FileCheck().check("# svdq: lora_down for a") \
        .check("linear_default = torch.ops.aten.linear.default(x, a_lora_down)") \
        .check("# svdq: a role=other group=a").check("rank=8") \
        .check("linear = torch.ops.aten.linear.default(x, a_weight, a_bias)").check("# svdq: lora_up for a") \
        .check("linear_default_1 = torch.ops.aten.linear.default(linear_default, a_lora_up)") \
        .check("# svdq: lora_add for a").check("torch.ops.aten.add.Tensor(linear, linear_default_1)") \
        .check("# svdq: lora_down for b").check("# svdq: b role=other group=a").check("# svdq: lora_add for b") \
        .check("torch.ops.aten.linear.default(add, c_weight").run(format_ir(gm))
    from svdq_compiler.ir import get_attr_value

    assert get_attr_value(gm, "b.lora_down").shape == (8, 64) and get_attr_value(gm, "b.lora_up").shape == (32, 8)
    assert not torch.equal(get_attr_value(gm, "a.weight"), model.a.weight)  # the weight is now the residual
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)


def test_iterates_are_ranked_on_the_search_rows():
    """Like the smoothing search, refinement ranks its iterates on `search_rows` of the sample rows (a group
    with fewer, the AdaLN one at M = batch, on all of its own)."""
    model = outlier_dit()
    ranked = {}
    for rows in (16, None):
        _, _, results = prepared(model, CALIB[0], CALIB, passes=PASSES, search_rows=rows)
        ranked[rows] = {name: group["ranked_on_rows"] for name, group in results["lowrank"].stats["per_group"].items()}
    assert ranked[None]["blocks.0.q"] == 64 and ranked[None]["blocks.0.ada"] == 8
    assert ranked[16] == {name: min(16, count) for name, count in ranked[None].items()}


def test_a_problem_under_another_scheme_quantizes_its_activations_afresh():
    """quantize_weights measures a fallback scheme on `dataclasses.replace(problem, scheme=…)`: the activation
    rows the first scheme quantized (cached per λ) must not carry over to it."""
    config = QuantConfig.preset("int4")
    rows = {"x": torch.randn(16, 64, generator=torch.Generator().manual_seed(0))}
    problem = GroupProblem.build(config.scheme("w4a4"), torch.float32, {"a.weight": torch.randn(32, 64)}, rows, {},
                                 [("a", "a.weight", "x", None)])
    quantized_rows = problem.act_inputs(None)["x"][0]
    assert problem.act_inputs(None)["x"][0] is quantized_rows  # one λ: made once
    weight_only = dataclasses.replace(problem, scheme=config.scheme("w4a16"))
    assert torch.equal(weight_only.act_inputs(None)["x"][0], rows["x"])  # no activation quantization
