"""smooth: per smoothing group, search λ = a^α / b^β and migrate activation outliers into the weights.

Requires: calibrate. Ensures, for every group whose members' scheme smooths (a weight-only scheme too: then
the search is activation-aware weight scaling, AWQ, with 16-bit activations and no branch in the loop):
- λ is the candidate with the smallest summed squared output error over the group's members on the calibration
  sample, measured with the group's activation and weight quantizers and — when a W4A4/W8A8 scheme has a
  branch — a one-shot rank-r SVD branch inside the loop (`search_svd`, randomized and float32 by default: only the
  ranking matters); candidates are ranked on a seeded subset of `search_rows` sample rows, evaluated many at a
  time (`GroupProblem.candidate_errors`), and the winner's and λ = 1's errors are measured on every row;
  candidates follow the reference grid (λ = 1, (c, 0), (c, 1 − c); 39 for smooth_grid 20) or SmoothQuant's
  α-only family (`smooth="smoothquant"`); a tie goes to the later candidate, as in the reference;
- the weights are stored as W·diag(λ) (model dtype); λ is a buffer `<group>.smooth` in the model dtype and the
  division x/λ stays a runtime step: one `aten.div` (QuantOpInfo "smooth_div") per (group, input) feeds the
  members, so the graph still computes the FP function;
- where λ = 1 wins nothing is inserted; α, β and the error ratio against λ = 1 are recorded on each member.
"""

from __future__ import annotations

import statistics

import torch
import torch.fx

from svdq_compiler.fx_utils import aten, get_attr_node, insert_call
from svdq_compiler.ir import LinearInfo, OpTag, QuantOpInfo, get_attr_value, set_attr_value, set_info
from svdq_compiler.passes.calibrate import Calibration
from svdq_compiler.pipeline import PassContext, PassResult, register_pass
from svdq_compiler.svdquant import GroupProblem, group_problem, members_by_group, raw_input, \
    smoothing_candidates, smoothing_scale


def search(problem: GroupProblem, act_absmax: torch.Tensor, candidates, rank: int, svd: str, seed: int,
           search_rows: int | None = None) -> tuple[tuple[float, float], torch.Tensor, float, float | None]:
    """(α, β), λ, its error and the error of λ = 1 (None when λ = 1 is not a candidate), over the candidates.

    Every candidate is evaluated on at most `search_rows` of the sample rows (None: all of them), in batches;
    the winner's and λ = 1's errors are then measured on every sample row, so the reported ratio does not
    depend on the subset.
    """
    weight_absmax = problem.weight_absmax()
    smooths = torch.stack([smoothing_scale(act_absmax, weight_absmax, alpha, beta, problem.dtype)
                           for alpha, beta in candidates])
    subset = search_rows is not None and problem.sample_rows() > search_rows
    ranked = problem.subsample(search_rows, seed) if subset else problem
    errors = ranked.candidate_errors(smooths, rank, svd, seed)
    best = len(candidates) - 1 - int(errors.flip(0).argmin())  # a tie goes to the later candidate
    identity = candidates.index((0.0, 0.0)) if (0.0, 0.0) in candidates else None
    if subset:
        measured = sorted({best, identity} - {None})
        errors = dict(zip(measured, problem.candidate_errors(smooths[measured], rank, svd, seed).tolist()))
    else:
        errors = dict(enumerate(errors.tolist()))
    return candidates[best], smooths[best], errors[best], None if identity is None else errors[identity]


def apply_smoothing(gm: torch.fx.GraphModule, members: list[tuple[torch.fx.Node, LinearInfo]], group: str,
                    smooth: torch.Tensor) -> None:
    """Store W·diag(λ), register λ, and divide each member's input by λ at run time."""
    target = f"{group}.smooth"
    set_attr_value(gm, target, smooth, as_buffer=True)
    for weight in dict.fromkeys(info.weight for _, info in members):
        scaled = (get_attr_value(gm, weight).float() * smooth.float()).to(smooth.dtype)
        set_attr_value(gm, weight, scaled)
    divided: dict[torch.fx.Node, torch.fx.Node] = {}
    for node, info in members:
        x = raw_input(node)
        if x not in divided:
            first = next(n for n, _ in members if raw_input(n) is x)  # members are in graph order
            scale = get_attr_node(gm, target, before=first)
            divided[x] = insert_call(gm, aten.div.Tensor, (x, scale), before=first, meta_from=first)
            set_info(divided[x], QuantOpInfo(op=OpTag.SMOOTH_DIV, linears=[i.name for n, i in members
                                                                      if raw_input(n) is x]))
        node.replace_input_with(x, divided[x])
        info.smooth = target


@register_pass("smooth", requires=("calibrate",), ensures="smoothed weights; x/λ is a runtime aten.div per group")
@torch.no_grad()
def smooth(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Search λ per group and apply it (module doc)."""
    config = ctx.config
    calibration: Calibration = ctx.state["calibrate"]
    candidates = smoothing_candidates(config.smooth, config.smooth_grid)
    groups = members_by_group(gm, lambda info: info.scheme is not None and info.scheme.smooth)
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
                                                             config.search_rows)
        ratio = error / identity_error if identity_error else 1.0
        if alpha == 0 and beta == 0:
            identity += 1
        else:
            apply_smoothing(gm, members, group, scale)
        for _, info in members:
            info.smooth_alpha, info.smooth_beta = alpha, beta
            info.errors["smooth_ratio"] = ratio
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
        "per_group": report,
    }
    return PassResult(gm, len(groups) > identity, stats)
