"""The graph rewrites of SVDQuant that more than one driver applies (the smooth and lowrank passes, the
streaming compile's data-free passes, the Nunchaku import): dividing a group's input by λ, and attaching
low-rank branches. Passes import them from here."""

from __future__ import annotations

import torch
import torch.fx

from svdq_compiler.fx_utils import aten, get_attr_node, insert_call
from svdq_compiler.ir import LinearInfo, OpTag, QuantOpInfo, get_attr_value, set_attr_value, set_info
from svdq_compiler.svdquant import GroupProblem, layer_name, raw_input


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
