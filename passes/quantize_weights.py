"""quantize_weights: quantize each quantized linear's weight (the residual, where it has a branch), measure every
layer's output error on the calibration sample, and move layers that exceed the sensitivity bound to a safer
scheme.

Requires: calibrate (and smooth/lowrank where the scheme asks for them). Ensures:
- every non-16-bit weight is quantized once (`quantize_weight` with the scheme's weight format and group; a
  weight shared by several call sites included; a k×k convolution's as its tap-major im2col matrix,
  svdq_compiler.conv); the QTensor is kept in `ctx.state["quantize_weights"]`
  for `lower`, and the graph's weight is replaced by its dequantized value, so the graph computes the model
  with quantized weights and 16-bit activations;
- `LinearInfo.errors["output_rel"]` is ‖y_q − y‖/‖y‖ of the layer as it will run (activation quantization,
  shift, branch) against the FP layer, on the calibration rows;
- sensitivity fallback (`fallback_error`, None = off): a weight whose error at any call site exceeds the bound
  moves to W4A16 (`weight_only_format`, unsmoothed, no branch; a convolution has no W4A16 form) and, if that
  still exceeds it, to 16-bit; its
  smoothing division and branch are removed from the graph, and `LinearInfo.fallback` says what happened.
"""

from __future__ import annotations

import statistics

import torch
import torch.fx

from svdq_compiler.config import FP_SCHEME, QuantConfig, Scheme
from svdq_compiler.fx_utils import drop_unused_attrs, erase_unused
from svdq_compiler.ir import LinearInfo, OpTag, get_attr_value, set_attr_value
from svdq_compiler.passes.calibrate import Calibration
from svdq_compiler.pipeline import PassContext, PassResult, register_pass
from svdq_compiler.quant import dequantize, quantize_weight
from svdq_compiler.svdquant import (GroupProblem, branch_add, conv_geometry, group_problem, layer_weight,
                                   members_by_group, quant_op)


def _branches(gm: torch.fx.GraphModule, infos: list[LinearInfo]) -> dict | None:
    branches = {info.weight: (get_attr_value(gm, info.lora_up).float(), get_attr_value(gm, info.lora_down).float())
                for info in infos if info.lora_up is not None}
    return branches or None


def relative_errors(problem: GroupProblem, smooth: torch.Tensor | None, dequantized: dict[str, torch.Tensor],
                    branches: dict | None) -> dict[str, float]:
    errors = problem.errors(smooth, {k: v.float() for k, v in dequantized.items()}, branches)
    energy = problem.reference_energy()
    return {name: (errors[name] / energy[name]) ** 0.5 if energy[name] > 0 else 0.0 for name in errors}


def _undo_smoothing_and_branch(gm: torch.fx.GraphModule, node: torch.fx.Node, info: LinearInfo
                               ) -> tuple[list[torch.fx.Node], list[str]]:
    """Make `node` read its raw input and drop its branch; returns the nodes and attributes that may be dead."""
    nodes, attrs = [], [a for a in (info.smooth, info.lora_up, info.lora_down) if a]
    x = node.args[0]
    if quant_op(x) == OpTag.SMOOTH_DIV:
        node.replace_input_with(x, x.args[0])
        nodes.append(x)
    total = branch_add(node)
    if total is not None:
        up = total.args[1]
        total.replace_all_uses_with(node)
        nodes += [total, up]
    info.smooth = info.lora_up = info.lora_down = None
    info.rank, info.shift = 0, 0.0
    return nodes, attrs


def _fall_back(problem: GroupProblem, failing: set[str], scheme: Scheme, config: QuantConfig, convolution: bool
               ) -> dict[str, tuple[Scheme, object, dict[str, float]]]:
    """Per failing weight: W4A16 (its QTensor) when that meets the bound, else 16-bit; with the W4A16 errors."""
    decisions: dict[str, tuple[Scheme, object, dict[str, float]]] = {k: (FP_SCHEME, None, {}) for k in failing}
    if scheme.act is None or convolution:  # already weight-only, or a conv (no weight-only conv): 16-bit next
        return decisions
    safer = config.scheme("w4a16")
    weight_only = GroupProblem.build(safer, problem.dtype, {k: problem.weights[k] for k in failing}, problem.rows,
                                     {}, [(m.name, m.weight_key, m.site, None) for m in problem.members
                                          if m.weight_key in failing])
    quantized = {k: quantize_weight(w.to(problem.dtype), safer.weight, safer.weight_group, name=k)
                 for k, w in weight_only.weights.items()}
    errors = relative_errors(weight_only, None, {k: dequantize(q) for k, q in quantized.items()}, None)
    for key in failing:
        worst = max(errors[m.name] for m in weight_only.members if m.weight_key == key)
        decisions[key] = (safer, quantized[key], errors) if worst <= config.fallback_error else \
            (FP_SCHEME, None, errors)
    return decisions


@register_pass("quantize_weights", requires=("calibrate",),
               ensures="weights quantized (QTensors in ctx.state), per-layer output errors, sensitivity fallback")
@torch.no_grad()
def quantize_weights(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Quantize, measure, fall back (module doc)."""
    config = ctx.config
    calibration: Calibration = ctx.state["calibrate"]
    store: dict = {}
    ctx.state["quantize_weights"] = store
    groups = members_by_group(gm, lambda info: info.scheme is not None and info.scheme.kind != "fp")
    fallbacks, errors_seen, dead, touched_attrs = [], [], [], []
    for members_all in ctx.progress(groups.values(), "quantize_weights", total=len(groups)):
        by_scheme: dict[Scheme, list] = {}
        for node, info in members_all:
            by_scheme.setdefault(info.scheme, []).append((node, info))
        for scheme, members in by_scheme.items():
            infos = [info for _, info in members]
            problem = group_problem(gm, members, calibration, scheme)
            smooth = get_attr_value(gm, infos[0].smooth) if infos[0].smooth else None
            branches = _branches(gm, infos)
            residuals = {info.weight: layer_weight(gm, node, info) for node, info in members}
            # a convolution's weight is quantized as its im2col matrix and stored back in the conv's shape
            graph_shape = {info.weight: conv_geometry(gm, node, info).weight for node, info in members
                           if info.kind == "conv"}
            quantized = {k: quantize_weight(r, scheme.weight, scheme.weight_group, name=k)
                         for k, r in residuals.items()}
            dequantized = {k: dequantize(q) for k, q in quantized.items()}
            errors = relative_errors(problem, smooth, dequantized, branches)
            worst = {}
            for info in infos:
                info.errors["output_rel"] = errors[info.name]
                worst[info.weight] = max(worst.get(info.weight, 0.0), errors[info.name])
            failing = {k for k, e in worst.items() if config.fallback_error is not None
                       and e > config.fallback_error}
            decisions = _fall_back(problem, failing, scheme, config, bool(graph_shape)) if failing else {}
            for node, info in members:
                if info.weight not in decisions:
                    continue
                safer, safer_q, safer_errors = decisions[info.weight]
                before = info.errors["output_rel"]
                nodes, attrs = _undo_smoothing_and_branch(gm, node, info)
                dead += nodes
                touched_attrs += attrs
                info.scheme = safer
                group = safer.weight_group
                info.pad_k = -info.in_features % group if group else 0
                if safer_q is not None:
                    quantized[info.weight], dequantized[info.weight] = safer_q, dequantize(safer_q)
                    after = safer_errors[info.name]
                    info.errors["output_rel"] = after
                    info.fallback = (f"{scheme.describe()} error {before:.3f} > {config.fallback_error} → "
                                     f"{safer.describe()} (error {after:.3f})")
                else:
                    quantized.pop(info.weight, None)
                    dequantized[info.weight] = problem.weights[info.weight].to(problem.dtype)
                    info.errors["output_rel"] = 0.0
                    tried = f", W4A16 error {safer_errors[info.name]:.3f}" if safer_errors else ""
                    info.fallback = f"{scheme.describe()} error {before:.3f}{tried} > {config.fallback_error} → 16-bit"
                fallbacks.append(f"{info.name}: {info.fallback}")
            for key, weight in dequantized.items():
                set_attr_value(gm, key, graph_shape.get(key, lambda w: w)(weight.to(problem.dtype)))
            store.update(quantized)
            errors_seen += [info.errors["output_rel"] for info in infos if info.scheme.kind != "fp"]
    erase_unused(gm, dead)
    dropped = drop_unused_attrs(gm, touched_attrs)
    stats = {
        "weights_quantized": len(store),
        "output_rel_median": round(statistics.median(errors_seen), 4) if errors_seen else None,
        "output_rel_max": round(max(errors_seen), 4) if errors_seen else None,
        "fallback_bound": config.fallback_error,
        "fallbacks": fallbacks,
        "dropped_attributes": len(dropped),
    }
    return PassResult(gm, bool(store) or bool(fallbacks), stats)
