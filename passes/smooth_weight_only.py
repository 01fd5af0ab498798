"""smooth_weight_only: data-free smoothing, the streaming compile's replacement for `smooth` (no activations).

Requires: linears, calibration (synthetic isotropic rows: the streaming compile has no activation data).
Ensures, for every group whose members' scheme smooths and quantizes activations: λ = 1/b^β, b the weights'
per-column ranges, with β chosen among `PassContext.weight_only_betas` by smooth's own search (output error with
the group's quantizers and rank-r branch, on the synthetic rows); applied as smooth applies λ (x/λ at run time).

Departure from `smooth`: no α (there is no activation range to balance against), so the candidates are
(0, β); where β = 0 wins nothing is inserted.
"""

from __future__ import annotations

import torch
import torch.fx

from svdq_compiler.ir import get_attr_value
from svdq_compiler.pipeline import PassContext, PassResult, register_pass
from svdq_compiler.rewrites import apply_smoothing
from svdq_compiler.svdquant import group_problem, members_by_group, search, unmet_in_groups


def _smoothed(info) -> bool:
    return info.scheme is not None and info.scheme.smooth and info.scheme.act is not None


def _every_group_searched(gm: torch.fx.GraphModule, ctx: PassContext) -> list[str]:
    return unmet_in_groups(gm, _smoothed, lambda info: info.smooth_beta is not None, "no smoothing search result")


@register_pass("smooth_weight_only", requires=("linears", "calibration"), produces=("smoothed",),
               ensures=_every_group_searched, summary="λ = 1/b^β per group, β searched on synthetic rows")
@torch.no_grad()
def smooth_weight_only(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Search β per group and apply λ (module doc)."""
    config, betas = ctx.config, ctx.weight_only_betas
    candidates = [(0.0, beta) for beta in betas]
    groups = members_by_group(gm, _smoothed)
    chosen = {}
    for group, members in groups.items():
        scheme = members[0][1].scheme
        problem = group_problem(gm, members, ctx.calibration, scheme)
        ones = torch.ones(members[0][1].in_features, device=get_attr_value(gm, members[0][1].weight).device)
        (alpha, beta), scale, error, identity_error = search(problem, ones, candidates, scheme.rank,
                                                             config.search_svd, config.calib_seed)
        if beta:
            apply_smoothing(gm, members, group, scale)
        for _, info in members:
            info.smooth_alpha, info.smooth_beta = alpha, beta
            info.note_error("smooth_ratio", error / identity_error if identity_error else 1.0)
        chosen[group] = beta
    return PassResult(gm, any(chosen.values()), {"groups": len(groups), "betas": list(betas), "chosen": chosen})
