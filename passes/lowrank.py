"""lowrank: give every quantized linear with a rank-r scheme (weight-only ones included) a 16-bit low-rank
branch, leaving the residual.

Requires: linears, calibration (and smooth, when the scheme smooths). Ensures, per group:
- per branch set (q/k/v reading one tensor stacked by rows; every other weight alone), L1 [N, r] = UΣ and
  L2 [r, K] = Vᵀ of the smoothed weight Ŵ from a float64 SVD (`svd`: "full", or "randomized"); q/k/v share L2;
- with `iterations` > 1, the refinement L = SVD_r(Ŵ − Q(Ŵ − L_prev)) keeps the iterate with the smallest output
  error of the group (the scheme's fake quantization on `search_rows` of the calibration sample, as the smoothing
  search ranks its candidates) and stops at the first that is worse
  (`early_stop`); each iterate's randomized SVD starts from the last iterate's branch, with one subspace
  iteration instead of four;
- the weight holds the residual R = Ŵ − L1·L2 (model dtype); L1 is `<layer>.lora_up`, L2 `<first of its
  set>.lora_down`; the graph computes `linear(xs, R, b) + linear(linear(xs, L2), L1)` (QuantOpInfo "lora_down",
  "lora_up", "lora_add"), with one down projection per (input, L2), so it still computes the FP function.

Departures from the reference: 3 refinement iterations by default, not up to 100 — more overfit the calibration
sample on held-out inputs (bench/results/lowrank-iterations.json, tools/bench_iterations.py); a randomized SVD,
not LAPACK's full one (within 0.4% of the optimal residual, bench/results/lowrank-svd.json).
"""

from __future__ import annotations

import statistics

import torch
import torch.fx

from svdq_compiler.pipeline import PassContext, PassResult, register_pass
from svdq_compiler.rewrites import apply_branches
from svdq_compiler.svdquant import GroupProblem, group_problem, layer_name, members_by_group, unmet_in_groups


def refine(problem: GroupProblem, smooth: torch.Tensor | None, rank: int, iterations: int, early_stop: bool,
           svd: str, seed: int) -> tuple[dict, list[float], int]:
    """The best branches, the error of every iterate tried, and the (1-based) iterate kept."""
    targets = problem.smoothed(smooth)
    previous = branches = None
    best, history = None, []
    for iteration in range(1, iterations + 1):
        fit = targets if previous is None else {k: targets[k] - previous[k] for k in targets}
        # each iterate refits a matrix close to the last (the last branch plus quantization noise): its branch
        # starts the next SVD
        branches = problem.branches(fit, rank, svd, seed, near=branches)
        quantized = problem.quantized(problem.residuals(targets, branches))
        error = sum(problem.errors(smooth, quantized, branches).values())
        history.append(error)
        if best is None or error <= best[0]:
            best = (error, branches, iteration)
        elif early_stop:
            break
        previous = quantized
    return best[1], history, best[2]



def _ranked(info) -> bool:
    return info.scheme is not None and info.scheme.rank > 0


def _every_branch_attached(gm: torch.fx.GraphModule, ctx: PassContext) -> list[str]:
    return unmet_in_groups(gm, _ranked, lambda info: info.lora_down is not None and info.lora_up is not None,
                           "its scheme has a rank but no branch is attached")


@register_pass("lowrank", requires=("linears", "calibration"), produces=("branches",), ensures=_every_branch_attached,
               summary="rank-r branches (float64 SVD, q/k/v share L2); weights hold the residual")
@torch.no_grad()
def lowrank(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Decompose each group's smoothed weights and attach the branches (module doc)."""
    config = ctx.config
    groups = members_by_group(gm, _ranked)
    kept_iterations, gains, report = [], [], {}
    for group, members in ctx.progress(groups.items(), "lowrank", total=len(groups)):
        scheme = members[0][1].scheme
        problem = group_problem(gm, members, ctx.calibration, scheme)
        smooth_target = members[0][1].smooth
        smooth = gm.get_buffer(smooth_target) if smooth_target is not None else None
        # the iterates are ranked like the smoothing candidates, on `search_rows` of the sample rows: the same
        # iterates kept as on every row (MiniLM int4/nvfp4/w8a8, tiny-flux int4 at 4 seeds), the pass 15–35% faster
        ranked = problem.ranking_rows(config.search_rows, config.calib_seed)
        branches, history, kept = refine(ranked, smooth, scheme.rank, config.iterations, config.early_stop,
                                         config.svd, config.calib_seed)
        apply_branches(gm, members, problem, smooth, branches)
        for _, info in members:
            info.errors["lowrank_iterations"] = kept
        kept_iterations.append(kept)
        gains.append(history[kept - 1] / history[0] if history[0] else 1.0)
        report[group] = {"branch_sets": [[layer_name(k) for k in keys] for keys in problem.branch_sets],
                         "iterations_tried": len(history), "kept": kept, "ranked_on_rows": ranked.sample_rows(),
                         "error_vs_first": round(gains[-1], 4)}
    stats = {
        "groups": len(groups),
        "branches": sum(len(r["branch_sets"]) for r in report.values()),
        "svd": config.svd,
        "iterations": config.iterations,
        "kept_iteration_median": statistics.median(kept_iterations) if kept_iterations else None,
        "error_vs_first_median": round(statistics.median(gains), 4) if gains else None,
        "per_group": report,
    }
    return PassResult(gm, bool(groups), stats)
