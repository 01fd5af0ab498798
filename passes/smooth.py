"""smooth: per smoothing group, search λ = a^α / b^β and migrate activation outliers into the weights.

Requires: linears, calibration (ctx.calibration). Ensures, for every group whose members' scheme smooths (a weight-only scheme
too: then the search is activation-aware weight scaling, AWQ, with 16-bit activations and no branch in the loop):
- λ is the candidate with the smallest summed squared output error over the group's members on the calibration
  sample, measured with the group's activation and weight quantizers and — when a W4A4/W8A8 scheme has a
  branch — a one-shot rank-r branch refitted to each candidate inside the loop (`search_svd`, randomized and
  float32 by default: only the ranking matters; `GroupProblem.search_branches`); candidates are ranked on a
  seeded subset of `search_rows` sample rows, a chunk of weight rows at a time (`GroupProblem.candidate_errors`),
  and the error ratio against λ = 1 is that subset's; candidates follow the reference grid (λ = 1, (c, 0),
  (c, 1 − c); 39 for smooth_grid 20) or SmoothQuant's α-only family (`smooth="smoothquant"`); a tie goes to the
  later candidate, as in the reference; with `search_refine` they are evaluated coarse to fine (every other c
  of each family, then the neighbours of each family's best: `svdquant.coarse_to_fine`);
- the weights are stored as W·diag(λ) (model dtype); λ is a buffer `<group>.smooth` in the model dtype and the
  division x/λ stays a runtime step: one `aten.div` (QuantOpInfo "smooth_div") per (group, input) feeds the
  members, so the graph still computes the FP function;
- where λ = 1 wins nothing is inserted; α, β and the error ratio against λ = 1 are recorded on each member.

Departures from the reference (deepcompressor), on purpose:
- the objective is the summed output error of the group's own linears on the sampled rows (the reference
  evaluates whole attention modules or blocks); calibration is FP-propagated, as in the reference;
- λ is rounded to the model dtype once, and that value both scales the weights and divides at run time (the
  reference scales with the fp32 λ); a channel whose λ is 0 or not finite gets 1 (the reference resets the
  whole vector);
- the in-loop SVD is randomized and float32 (it only ranks candidates; tools/bench_lowrank.py measures it
  within 1% of the optimum residual) and decomposes W·diag(λ) before its rounding to the model dtype: a tall
  branch set from its Gram matrix diag(λ)·WᵀW·diag(λ), reused across candidates
  (`svdquant.right_vectors_from_gram`), any other with every candidate's products through W at once
  (`svdquant.low_rank_scaled`);
- candidates are ranked on `search_rows` = 128 seeded sample rows (on tiny-flux within 0.1% mean, 1.1% max of
  the all-rows winner's objective) and `search_outputs` = 1024 seeded output rows of each weight, each
  candidate's branch being the whole weight's (on FLUX-12B-sized groups: the same λ in 7 of 8 groups, the other
  0.04% worse on every row, at half the CPU time; bench/results/smooth-search-flux12b.json).
"""

from __future__ import annotations

import statistics

import torch
import torch.fx

from svdq_compiler.calibration import Calibration
from svdq_compiler.pipeline import PassContext, PassResult, register_pass
from svdq_compiler.rewrites import apply_smoothing
from svdq_compiler.svdquant import (group_problem, members_by_group, raw_input, search, smoothing_candidates,
                                    unmet_in_groups)


def _smoothed(info) -> bool:
    return info.scheme is not None and info.scheme.smooth


def _every_group_searched(gm: torch.fx.GraphModule, ctx: PassContext) -> list[str]:
    return unmet_in_groups(gm, _smoothed, lambda info: info.smooth_alpha is not None, "no smoothing search result")


@register_pass("smooth", requires=("linears", "calibration"), produces=("smoothed",), ensures=_every_group_searched,
               summary="smoothed weights; x/λ is a runtime aten.div per group")
@torch.no_grad()
def smooth(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Search λ per group and apply it (module doc)."""
    config = ctx.config
    calibration: Calibration = ctx.calibration
    candidates = smoothing_candidates(config.smooth, config.smooth_grid)
    groups = members_by_group(gm, _smoothed)
    report, ratios, identity = {}, [], 0
    for group, members in ctx.progress(groups.items(), "smooth", total=len(groups)):
        scheme = members[0][1].scheme
        problem = group_problem(gm, members, calibration, scheme)
        act_absmax = torch.stack([calibration.sites[raw_input(n).name].absmax(info.shift)
                                  for n, info in members]).amax(0)
        # a weight-only (AWQ) search ranks λ by the weight quantization alone: its branch comes after
        search_rank = scheme.rank if scheme.act is not None else 0
        (alpha, beta), scale, error, identity_error = search(problem, act_absmax, candidates, search_rank,
                                                             config.search_svd, config.calib_seed,
                                                             config.search_rows, config.search_refine,
                                                             config.search_outputs)
        ratio = error / identity_error if identity_error else 1.0
        if alpha == 0 and beta == 0:
            identity += 1
        else:
            apply_smoothing(gm, members, group, scale)
        for _, info in members:
            info.smooth_alpha, info.smooth_beta = alpha, beta
            info.note_error("smooth_ratio", ratio)
        ratios.append(ratio)
        report[group] = {"alpha": alpha, "beta": beta, "error_ratio": round(ratio, 4),
                         "lambda_range": [float(scale.min()), float(scale.max())]}
    stats = {
        "groups": len(groups),
        "candidates": len(candidates),
        "kept_identity": identity,
        "error_ratio_median": round(statistics.median(ratios), 4) if ratios else None,
        "error_ratio_max": round(max(ratios), 4) if ratios else None,
        "search_svd": config.search_svd,
        "search_refine": config.search_refine,
        "per_group": report,
    }
    return PassResult(gm, len(groups) > identity, stats)
