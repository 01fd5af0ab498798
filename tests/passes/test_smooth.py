"""smooth: the reference grid, λ's formula and repairs, the search's choice, the applied graph form."""

import pytest
import torch
from tiny_models import by_name, dit_inputs, outlier_dit, prepared, tiny_dit

from svdq_compiler.fx_utils import aten
from svdq_compiler.ir import get_attr_value
from svdq_compiler.svdquant import group_problem, members_by_group, quant_op, raw_input, smoothing_candidates, \
    smoothing_scale

CALIB = [dit_inputs(seed=s) for s in range(4)]


def test_reference_grid_has_39_candidates_with_identity():
    grid = smoothing_candidates("svdquant", 20)
    assert len(grid) == 39 and grid[0] == (0.0, 0.0) and len(set(grid)) == 39
    assert (0.05, 0.0) in grid and (0.95, 0.0) in grid and (0.05, 0.95) in grid and (0.95, 0.05) in grid
    smoothquant = smoothing_candidates("smoothquant", 20)
    assert len(smoothquant) == 20 and all(abs(a + b - 1) < 1e-12 for a, b in smoothquant[1:])
    assert smoothing_candidates("svdquant", 10)[1:4] == [(0.1, 0.0), (0.2, 0.0), (0.3, 0.0)]


def test_scale_formula_and_dead_channels():
    a = torch.tensor([4.0, 0.0, 9.0, 1.0])
    b = torch.tensor([1.0, 2.0, 0.0, 4.0])
    scale = smoothing_scale(a, b, 0.5, 0.5, torch.float32)
    # 4^.5/1^.5 = 2; a dead activation (0) and a dead weight column (÷0 → inf) both get 1.
    torch.testing.assert_close(scale, torch.tensor([2.0, 1.0, 1.0, 0.5]))
    assert torch.equal(smoothing_scale(a, b, 0.0, 0.0, torch.bfloat16), torch.ones(4, dtype=torch.bfloat16))
    half = smoothing_scale(torch.tensor([1e6, 1.0]), torch.tensor([1e-6, 1.0]), 0.9, 0.9, torch.float16)
    assert half.dtype == torch.float16 and torch.isfinite(half).all() and half[0] == 1  # overflow → 1


def test_outliers_are_smoothed_and_the_graph_is_unchanged():
    model = outlier_dit()
    gm, ctx, results = prepared(model, CALIB[0], CALIB, passes=("annotate_linears", "calibrate", "smooth"))
    stats = results["smooth"].stats
    # 4 W4A4 groups and the AdaLN layer's weight-only (AWQ) search
    assert results["smooth"].modified and stats["groups"] == 5 and stats["candidates"] == 19  # smooth_grid 10
    qkv = stats["per_group"]["blocks.0.q"]
    assert (qkv["alpha"], qkv["beta"]) != (0.0, 0.0) and qkv["error_ratio"] < 0.5
    x = dit_inputs(seed=11)
    torch.testing.assert_close(gm(*x), model(*x), rtol=1e-4, atol=1e-4)
    infos = by_name(gm)
    smooth = get_attr_value(gm, "blocks.0.q.smooth")
    assert infos["blocks.0.k"].smooth == "blocks.0.q.smooth" and smooth.shape == (64,)
    # Weights are stored smoothed; λ is largest on the outlier channels.
    torch.testing.assert_close(get_attr_value(gm, "blocks.0.q.weight"), model.blocks[0].q.weight * smooth)
    assert set(smooth.topk(2).indices.tolist()) == {3, 17}
    # One runtime division per (group, input) feeds q, k and v.
    divs = [n for n in gm.graph.nodes if quant_op(n) == "smooth_div"]
    assert len(divs) == 5 and all(d.target == aten.div.Tensor for d in divs)
    qkv_div = next(d for d in divs if "blocks.0.q" in d.meta["svdq"].linears)
    assert sorted(u.name for u in qkv_div.users) == sorted(n.name for n, i in members_by_group(
        gm, lambda i: True)["blocks.0.q"])


def test_the_winner_has_the_smallest_error_of_all_candidates():
    model = outlier_dit()
    gm, ctx, _ = prepared(model, CALIB[0], CALIB)
    members = members_by_group(gm, lambda i: i.scheme.smooth)["blocks.0.up"]
    node, info = members[0]
    problem = group_problem(gm, members, ctx.calibration, info.scheme)
    act = ctx.calibration.sites[raw_input(node).name].absmax()
    errors = {}
    for alpha, beta in smoothing_candidates("svdquant", ctx.config.smooth_grid):
        scale = smoothing_scale(act, problem.weight_absmax(), alpha, beta, torch.float32)
        smoothed = problem.smoothed(scale)
        branches = problem.search_branches(scale.unsqueeze(0), 32, "randomized", 0)[0]
        quantized = problem.quantized(problem.residuals(smoothed, branches))
        errors[(alpha, beta)] = sum(problem.errors(scale, quantized, branches).values())
    from svdq_compiler.pipeline import PASS_REGISTRY

    result = PASS_REGISTRY["smooth"](gm, ctx)
    chosen = result.stats["per_group"]["blocks.0.up"]
    assert errors[(chosen["alpha"], chosen["beta"])] == pytest.approx(min(errors.values()), rel=1e-6)
    assert chosen["error_ratio"] == pytest.approx(min(errors.values()) / errors[(0.0, 0.0)], abs=1e-4)


def test_smoothquant_search_and_presets_without_smoothing():
    model = outlier_dit()
    _, _, results = prepared(model, CALIB[0], CALIB, "w4a4-smoothquant",
                             passes=("annotate_linears", "calibrate", "smooth"))
    for group in results["smooth"].stats["per_group"].values():
        assert group["alpha"] == 0 and group["beta"] == 0 or group["alpha"] + group["beta"] == pytest.approx(1)
    assert results["smooth"].stats["candidates"] == 10  # λ = 1 and (c, 1 − c) for c = 0.1 … 0.9
    _, _, results = prepared(tiny_dit(), CALIB[0], CALIB, "w4a4-rtn", passes=("annotate_linears", "calibrate",
                                                                               "smooth"))
    assert results["smooth"].stats["groups"] == 0 and not results["smooth"].modified


def synthetic_problem(preset="int4", rows=96, shift=False):
    """A q/k/v-like group of three weights reading one site with two outlier channels, plus a second site."""
    from svdq_compiler.config import QuantConfig
    from svdq_compiler.ir import Role
    from svdq_compiler.svdquant import GroupProblem

    config = QuantConfig.preset(preset)
    scheme = config.scheme("w4a4", unsigned_input=shift)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 64, generator=g)
    x[:, [3, 40]] *= 25
    weights = {f"w{i}": torch.randn(48, 64, generator=g) / 8 for i in range(3)}
    members = [(f"l{i}", f"w{i}", "x", Role.QKV) for i in range(3)]
    site_rows, shifts = {"x": x}, {}
    if shift:  # the down projection reads a post-GELU site
        site_rows = {"x": torch.nn.functional.gelu(x)}
        shifts = {"x": scheme.shift}
    return GroupProblem.build(scheme, torch.float32, weights, site_rows, shifts, members)


@pytest.mark.parametrize("preset,shift", [("int4", False), ("int4", True), ("nvfp4", False), ("w8a8", False)])
def test_chunked_candidate_errors_match_the_whole_matrix_steps(preset, shift, monkeypatch):
    problem = synthetic_problem(preset, shift=shift)
    act = problem.rows["x"].add(problem.shifts.get("x", 0.0)).abs().amax(0)
    candidates = smoothing_candidates("svdquant", 20)[::6]
    smooths = torch.stack([smoothing_scale(act, problem.weight_absmax(), a, b, torch.float32)
                           for a, b in candidates])
    rank = problem.scheme.rank
    whole = []
    for smooth, branches in zip(smooths, problem.search_branches(smooths, rank, "randomized", 0)):
        smoothed = problem.smoothed(smooth)
        quantized = problem.quantized(problem.residuals(smoothed, branches))
        whole.append(sum(problem.errors(smooth, quantized, branches).values()))
    chunked = problem.candidate_errors(smooths, rank, "randomized", 0)
    torch.testing.assert_close(chunked, torch.tensor(whole), rtol=1e-4, atol=0)
    # In chunks of 5 of the 48 weight rows (the last one short), the result is the same.
    monkeypatch.setattr("svdq_compiler.svdquant.SEARCH_CHUNK_ROWS", 5)
    monkeypatch.setattr("svdq_compiler.svdquant.SEARCH_CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(problem.candidate_errors(smooths, rank, "randomized", 0), chunked, rtol=1e-5, atol=0)


def test_search_ranks_on_a_row_subset_and_reports_its_errors():
    from svdq_compiler.svdquant import search

    problem = synthetic_problem(rows=96)
    act = problem.rows["x"].abs().amax(0)
    candidates = smoothing_candidates("svdquant", 20)
    subset = problem.subsample(32, seed=0)
    assert subset.sample_rows() == 32 and problem.sample_rows() == 96
    # The subset's references are the FP outputs of its own rows.
    torch.testing.assert_close(subset.members[1].reference, subset.rows["x"] @ problem.weights["w1"].T)
    smooths = torch.stack([smoothing_scale(act, problem.weight_absmax(), a, b, torch.float32) for a, b in candidates])
    on_subset = subset.candidate_errors(smooths, 32, "randomized", 0)
    on_all = problem.candidate_errors(smooths, 32, "randomized", 0)
    chosen, scale, error, identity_error = search(problem, act, candidates, 32, "randomized", 0, search_rows=32)
    winner = candidates.index(chosen)
    assert on_subset[winner] == on_subset.min() and torch.equal(scale, smooths[winner])
    assert error == pytest.approx(float(on_subset[winner]), rel=1e-5)
    assert identity_error == pytest.approx(float(on_subset[0]), rel=1e-5) and error < 0.5 * identity_error
    # Without a subset (or with one as large as the sample) the search ranks on every row.
    assert search(problem, act, candidates, 32, "randomized", 0)[0] == candidates[int(on_all.argmin())]
    assert search(problem, act, candidates, 32, "randomized", 0, search_rows=96)[2] == pytest.approx(
        float(on_all.min()), rel=1e-5)
    # A candidate list without λ = 1 (weight-only smoothing) has no identity error.
    assert search(problem, act, candidates[1:], 32, "randomized", 0, search_rows=32)[3] is None


def test_search_ranks_on_an_output_subset_with_the_whole_weights_branches():
    """search_outputs: each weight keeps a seeded subset of its output rows (and the members' references there);
    a candidate's branch is the whole weight's, restricted to those rows, whether it comes from the stacked
    set's Gram matrix (tall) or from the weight itself (wide); nvfp4 keeps every row."""
    from svdq_compiler.config import QuantConfig
    from svdq_compiler.ir import Role
    from svdq_compiler.svdquant import GroupProblem, search

    problem = synthetic_problem()
    config = QuantConfig.preset("int4")
    wide = GroupProblem.build(config.scheme("w4a4"), torch.float32, {"w": torch.randn(40, 64) / 8},
                              problem.rows, {}, [("l", "w", "x", Role.OTHER)])
    act = problem.rows["x"].abs().amax(0)
    candidates = smoothing_candidates("svdquant", 20)
    smooths = torch.stack([smoothing_scale(act, problem.weight_absmax(), a, b, torch.float32) for a, b in candidates])
    for whole in (problem, wide):
        subset = whole.subsample_outputs(20, seed=0)
        for key, weight in subset.weights.items():
            kept = subset.kept_outputs[key]
            assert weight.shape[0] == 20 and torch.equal(weight, whole.weights[key][kept])
        for member in subset.members:
            torch.testing.assert_close(member.reference, subset.rows["x"] @ subset.weights[member.weight_key].T)
        for on_subset, on_whole in zip(subset.search_branches(smooths[::5], 8, "randomized", 0),
                                       whole.search_branches(smooths[::5], 8, "randomized", 0)):
            for key, (up, down) in on_subset.items():
                torch.testing.assert_close(up, on_whole[key][0][subset.kept_outputs[key]], rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(down, on_whole[key][1])
    # Ranked on 20 of 48 output rows, the winner is within 2% of the best candidate on every row.
    on_all = problem.candidate_errors(smooths, 32, "randomized", 0)
    chosen = search(problem, act, candidates, 32, "randomized", 0, search_outputs=20)[0]
    assert on_all[candidates.index(chosen)] <= 1.02 * on_all.min()
    assert search(problem, act, candidates, 32, "randomized", 0, search_outputs=48)[0] == \
        candidates[int(on_all.argmin())]
    nvfp4 = synthetic_problem("nvfp4")
    assert nvfp4.subsample_outputs(20) is nvfp4


def test_smooth_alone_on_a_hand_annotated_group():
    """Before: a and b read x and form group "a" (annotated by hand), c reads their sum and stays 16-bit;
    calibration holds rows with outlier channels 3 and 17 (no other pass ran). Expected: one x / a.smooth,
    annotated for a and b, that both linears read; c untouched; the same function (W·diag(λ) on x/λ)."""
    from hand_built import W4A4, SharedInput, before, calibration_of, context, outlier_rows, run_one
    from torch.testing import FileCheck

    from svdq_compiler.ir import format_ir

    torch.manual_seed(0)
    model, x = SharedInput(), torch.randn(4, 64)
    gm = before(model, x, {"a": W4A4, "b": W4A4}, groups={"b": "a"})
    ctx = context(calibration=calibration_of(gm, {"x": outlier_rows()}), available=("linears", "calibration"))
    gm = run_one(gm, ctx, "smooth")
    FileCheck().check("a_smooth = self.a.smooth").check("# svdq: smooth_div for a, b") \
        .check("div_tensor = torch.ops.aten.div.Tensor(x, a_smooth)").check("# svdq: a role=other group=a") \
        .check("α=").check("torch.ops.aten.linear.default(div_tensor, a_weight") \
        .check("torch.ops.aten.linear.default(div_tensor, b_weight") \
        .check("torch.ops.aten.linear.default(add, c_weight").run(format_ir(gm))
    FileCheck().check_count("aten.div", 1, exactly=True).run(format_ir(gm))
    smooth = gm.get_buffer("a.smooth")
    assert smooth[3] > 4 * smooth.median() and smooth[17] > 4 * smooth.median()  # the outliers are divided down
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_coarse_to_fine_evaluates_fewer_candidates_and_finds_a_smooth_minimum():
    from svdq_compiler.svdquant import coarse_to_fine

    candidates = smoothing_candidates("svdquant", 10)
    # A smooth error over c in each family: minimum at c = 0.7 (α-only) and c = 0.4 (balanced), the latter best.
    truth = {i: 1.0 if (a, b) == (0.0, 0.0) else (a - 0.7) ** 2 + 0.5 if b == 0 else (a - 0.4) ** 2 + 0.2
             for i, (a, b) in enumerate(candidates)}
    asked = []

    def evaluate(indices):
        asked.extend(indices)
        return {i: truth[i] for i in asked}

    coarse_to_fine(candidates, evaluate)
    evaluated = set(asked)
    assert 0 in evaluated and len(evaluated) < len(candidates)
    assert candidates[min(evaluated, key=truth.get)] == (0.4, 0.6)
    # Both families' neighbours of their coarse best were refined: c = 0.6 and 0.8 (α-only), 0.3 and 0.5.
    assert {(0.6, 0.0), (0.8, 0.0), (0.3, 0.7), (0.5, 0.5)} <= {candidates[i] for i in evaluated}
    # The SmoothQuant family alone, and a list with no family: every candidate outside a family is evaluated.
    asked.clear()
    coarse_to_fine([(0.0, 0.0), (0.0, 0.5), (0.0, 1.0)], lambda indices: asked.extend(indices) or {})
    assert sorted(asked) == [0, 1, 2]


def test_refined_search_reports_the_full_grids_errors_for_what_it_evaluates():
    from svdq_compiler.svdquant import search

    problem = synthetic_problem(rows=96)
    act = problem.rows["x"].abs().amax(0)
    candidates = smoothing_candidates("svdquant", 10)
    smooths = torch.stack([smoothing_scale(act, problem.weight_absmax(), a, b, torch.float32) for a, b in candidates])
    every = problem.candidate_errors(smooths, 32, "randomized", 0)
    full = search(problem, act, candidates, 32, "randomized", 0)
    refined = search(problem, act, candidates, 32, "randomized", 0, refine=True)
    assert full[0] == candidates[int(every.argmin())]
    assert refined[2] == pytest.approx(float(every[candidates.index(refined[0])]), rel=1e-5)
    assert refined[3] == pytest.approx(float(every[0]), rel=1e-5)
    assert refined[2] <= 1.02 * full[2]
