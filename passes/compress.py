"""compress: data-free low rank and weight quantization, the streaming compile's replacement for lowrank +
quantize_weights (no activations to measure output errors on).

Requires: linears, calibration (synthetic rows). Ensures: one float64 SVD per branch set (`GroupProblem.branches`,
attached by `rewrites.apply_branches`) for every W4A4/W8A8 group with a rank, then each residual quantized once
into `ctx.quantized`, which `lower` packs from.

Departure from lowrank + quantize_weights: without activation data their output-error search (iterated
refinement) and sensitivity fallback have nothing to measure, so they are not run; each layer reports its
weight-space error ‖Q(R) − R‖ / ‖Ŵ‖ (Ŵ the smoothed weight, R its residual; on ERROR_ROWS rows) instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from svdq_compiler.ir import LinearInfo, get_attr_value
from svdq_compiler.pipeline import PassContext, PassResult, register_pass
from svdq_compiler.quant import QTensor, dequantize, quantize_weight
from svdq_compiler.rewrites import apply_branches
from svdq_compiler.svdquant import every_quantized_weight_stored, group_problem, members_by_group

ERROR_ROWS = 256  # output rows (evenly spaced) each layer's weight-space error is estimated on


@register_pass("compress", requires=("linears", "calibration"), produces=("branches", "quantized"),
               ensures=every_quantized_weight_stored, summary="data-free branches; residuals quantized once")
@torch.no_grad()
def compress(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Attach the branches and quantize the residuals (module doc)."""
    config, calibration = ctx.config, ctx.calibration
    store: dict[str, Any] = {}
    ctx.quantized = store
    groups = members_by_group(gm, lambda info: info.scheme is not None and info.scheme.kind != "fp")
    branch_sets = 0
    errors: dict[str, float] = {}
    for members_all in groups.values():
        by_scheme: dict[Any, list] = {}
        for node, info in members_all:
            by_scheme.setdefault(info.scheme, []).append((node, info))
        for scheme, members in by_scheme.items():
            smooth_target = members[0][1].smooth
            smooth = get_attr_value(gm, smooth_target) if smooth_target else None
            if scheme.act is not None and scheme.rank:
                problem = group_problem(gm, members, calibration, scheme)
                branches = problem.branches(problem.smoothed(smooth), scheme.rank, config.svd, config.calib_seed)
                apply_branches(gm, members, problem, smooth, branches)
                branch_sets += len(problem.branch_sets)
            for _, info in members:
                if info.weight not in store:
                    errors[info.weight] = _quantize_residual(gm, info, scheme, store)
                info.note_error("weight_rel", errors[info.weight])
    return PassResult(gm, bool(store), {"weights_quantized": len(store), "branch_sets": branch_sets,
                                        "weight_rel_max": round(max(errors.values()), 5) if errors else None})


def _quantize_residual(gm: torch.fx.GraphModule, info: LinearInfo, scheme, store: dict) -> float:
    """Quantize a layer's residual into `store`; returns ‖Q(R) − R‖ / ‖Ŵ‖ estimated on ERROR_ROWS rows."""
    residual = get_attr_value(gm, info.weight)
    q = store[info.weight] = quantize_weight(residual, scheme.weight, scheme.weight_group, name=info.weight)
    rows = torch.linspace(0, residual.shape[0] - 1, min(ERROR_ROWS, residual.shape[0])).long()
    sample = QTensor(q.codes[rows], q.scales[rows], q.fmt, q.group_size, q.k, q.dtype,
                     q.tensor_scale if q.tensor_scale is None or q.tensor_scale.dim() == 0 else q.tensor_scale[rows])
    exact = residual[rows].float()
    smoothed = exact
    if info.lora_up is not None:
        smoothed = exact + get_attr_value(gm, info.lora_up)[rows].float() @ get_attr_value(gm, info.lora_down).float()
    error = dequantize(sample, torch.float32)[:, : info.in_features] - exact
    return float(error.norm() / smoothed.norm().clamp_min(1e-30))
