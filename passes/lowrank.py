"""lowrank: give every quantized linear with a rank-r scheme (weight-only ones included) a 16-bit low-rank
branch, leaving the residual.

Requires: calibrate (and smooth, when the scheme smooths). Ensures, per group:
- per branch set (q/k/v reading one tensor stacked by rows; every other weight alone), L1 [N, r] = UΣ and
  L2 [r, K] = Vᵀ of the smoothed weight Ŵ from a float64 SVD (`svd`: "full", or "randomized"); q/k/v share L2;
- with `iterations` > 1, the refinement L = SVD_r(Ŵ − Q(Ŵ − L_prev)) keeps the iterate with the smallest output
  error of the group (the scheme's fake quantization on the calibration sample) and stops at the first that is worse
  (`early_stop`);
- the weight holds the residual R = Ŵ − L1·L2 (model dtype); L1 is `<layer>.lora_up`, L2 `<first of its
  set>.lora_down`; the graph computes `linear(xs, R, b) + linear(linear(xs, L2), L1)` (QuantOpInfo "lora_down",
  "lora_up", "lora_add"), with one down projection per (input, L2), so it still computes the FP function.
"""

from __future__ import annotations

import statistics

import torch
import torch.fx

from svdq_compiler.fx_utils import aten, get_attr_node, insert_call
from svdq_compiler.ir import LinearInfo, OpTag, QuantOpInfo, set_attr_value, set_info
from svdq_compiler.passes.calibrate import Calibration
from svdq_compiler.pipeline import PassContext, PassResult, register_pass
from svdq_compiler.svdquant import GroupProblem, group_problem, layer_name, members_by_group


def refine(problem: GroupProblem, smooth: torch.Tensor | None, rank: int, iterations: int, early_stop: bool,
           svd: str, seed: int) -> tuple[dict, list[float], int]:
    """The best branches, the error of every iterate tried, and the (1-based) iterate kept."""
    targets = problem.smoothed(smooth)
    previous = None
    best, history = None, []
    for iteration in range(1, iterations + 1):
        fit = targets if previous is None else {k: targets[k] - previous[k] for k in targets}
        branches = problem.branches(fit, rank, svd, seed)
        quantized = problem.quantized(problem.residuals(targets, branches))
        error = sum(problem.errors(smooth, quantized, branches).values())
        history.append(error)
        if best is None or error <= best[0]:
            best = (error, branches, iteration)
        elif early_stop:
            break
        previous = quantized
    return best[1], history, best[2]


def apply_branches(gm: torch.fx.GraphModule, members: list[tuple[torch.fx.Node, LinearInfo]],
                   problem: GroupProblem, smooth: torch.Tensor | None, branches: dict) -> None:
    """Store the residuals and factors, and add the branch to each member's output."""
    targets = problem.smoothed(smooth)
    residuals = problem.residuals(targets, branches)
    down_targets: dict[int, str] = {}
    for keys in problem.branch_sets:
        down = branches[keys[0]][1]
        down_targets[id(down)] = f"{layer_name(keys[0])}.lora_down"
        set_attr_value(gm, down_targets[id(down)], down.to(problem.dtype))
    for key, residual in residuals.items():
        set_attr_value(gm, key, residual.to(problem.dtype))
        set_attr_value(gm, f"{layer_name(key)}.lora_up", branches[key][0].to(problem.dtype))

    downs: dict[tuple[torch.fx.Node, str], torch.fx.Node] = {}
    for node, info in members:
        xs = node.args[0]
        down_target = down_targets[id(branches[info.weight][1])]
        serves = [i.name for n, i in members if n.args[0] is xs and i.weight in branches
                  and down_targets[id(branches[i.weight][1])] == down_target]
        if (xs, down_target) not in downs:
            weight = get_attr_node(gm, down_target, before=node)
            down = insert_call(gm, aten.linear.default, (xs, weight), before=node, meta_from=node)
            set_info(down, QuantOpInfo(op=OpTag.LORA_DOWN, linears=serves))
            downs[(xs, down_target)] = down
        up_target = f"{layer_name(info.weight)}.lora_up"
        with gm.graph.inserting_after(node):
            up_weight = gm.graph.get_attr(up_target)
        up = insert_call(gm, aten.linear.default, (downs[(xs, down_target)], up_weight), after=up_weight,
                         meta_from=node)
        total = insert_call(gm, aten.add.Tensor, (node, up), after=up, meta_from=node)
        node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        set_info(up, QuantOpInfo(op=OpTag.LORA_UP, linears=[info.name]))
        set_info(total, QuantOpInfo(op=OpTag.LORA_ADD, linears=[info.name]))
        info.rank = branches[info.weight][0].shape[1]
        info.lora_up, info.lora_down = up_target, down_target


@register_pass("lowrank", requires=("calibrate",),
               ensures="rank-r branches (float64 SVD, q/k/v share L2); weights hold the residual")
@torch.no_grad()
def lowrank(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Decompose each group's smoothed weights and attach the branches (module doc)."""
    config = ctx.config
    calibration: Calibration = ctx.state["calibrate"]
    groups = members_by_group(gm, lambda info: info.scheme is not None and info.scheme.rank > 0)
    kept_iterations, gains, report = [], [], {}
    for group, members in ctx.progress(groups.items(), "lowrank", total=len(groups)):
        scheme = members[0][1].scheme
        problem = group_problem(gm, members, calibration, scheme)
        smooth_target = members[0][1].smooth
        smooth = gm.get_buffer(smooth_target) if smooth_target is not None else None
        branches, history, kept = refine(problem, smooth, scheme.rank, config.iterations, config.early_stop,
                                         config.svd, config.calib_seed)
        apply_branches(gm, members, problem, smooth, branches)
        for _, info in members:
            info.errors["lowrank_iterations"] = kept
        kept_iterations.append(kept)
        gains.append(history[kept - 1] / history[0] if history[0] else 1.0)
        report[group] = {"branch_sets": [[layer_name(k) for k in keys] for keys in problem.branch_sets],
                         "iterations_tried": len(history), "kept": kept,
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
