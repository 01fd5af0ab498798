"""The per-layer report of a compile: for each linear its role, scheme, λ range, rank, bytes before and after,
relative output error on the calibration rows and the per-layer choice (every candidate form measured, and the
one kept); then the model totals and the compression ratio.

`layer_report(gm, config)` builds it from the LinearInfo annotations of a lowered graph (the `lower` pass
stores it in `gm.meta["svdq_layers"]`); `format_layers(report)` is the table `svdq-inspect --layers` prints.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from svdq_compiler import parameter_bytes
from svdq_compiler.config import QuantConfig
from svdq_compiler.ir import MODEL_BYTES_META, annotated_linears, get_attr_value
from svdq_compiler.quant import FOUR_BIT_FORMATS


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _bytes(gm: torch.fx.GraphModule, targets: list[str | None], counted: set[str]) -> int:
    total = 0
    for target in targets:
        if target and target not in counted:
            try:
                total += tensor_bytes(get_attr_value(gm, target))
            except AttributeError:
                continue
            counted.add(target)
    return total


def layer_report(gm: torch.fx.GraphModule, config: QuantConfig) -> dict[str, Any]:
    """The JSON-able report: {"layers": [...], "totals": {...}}. Shared tensors (a group's λ, a q/k/v L2, a
    weight with several call sites) are counted on the first layer that uses them."""
    layers, counted = [], set()
    for _, info in annotated_linears(gm):
        scheme = info.scheme
        quantized = scheme is not None and scheme.kind != "fp"
        if quantized:
            after = _bytes(gm, [info.qweight, info.wscales, info.wtscale, info.lora_up, info.bias, info.smooth,
                                info.lora_down], counted)
        else:
            after = _bytes(gm, [info.weight, info.bias], counted)
        smooth = get_attr_value(gm, info.smooth).float() if info.smooth else None
        first_site = "@" not in info.name  # a weight with several call sites counts once
        layers.append({
            "name": info.name,
            "kind": info.kind,
            "role": str(info.role),
            "role_reason": info.role_reason,
            "group": info.group,
            "scheme": scheme.describe() if scheme is not None else None,
            "skip_reason": info.skip_reason,
            "fallback": info.fallback,
            "choice": info.choice,
            "lambda_range": None if smooth is None else [float(smooth.min()), float(smooth.max())],
            "alpha": info.smooth_alpha,
            "beta": info.smooth_beta,
            "shift": info.shift,
            "rank": info.rank,
            "pad_k": info.pad_k,
            "bytes_before": info.bytes_before,
            "bytes_after": after,
            "output_rel_error": info.errors.get("output_rel") if quantized else None,
            "smooth_error_ratio": info.errors.get("smooth_ratio"),
            "weight_elements": info.in_features * info.out_features if first_site else 0,
            "four_bit_weight": bool(quantized and scheme.weight in FOUR_BIT_FORMATS),
        })
    return {"layers": layers,
            "totals": layer_totals(layers, config, gm.meta.get(MODEL_BYTES_META), parameter_bytes(gm))}


def layer_totals(layers: list[dict[str, Any]], config: QuantConfig, before: int | None, after: int | None
                 ) -> dict[str, Any]:
    """The totals of a per-layer report (layer_report's, or the streaming compile's layers of every unit)."""
    errors = [layer["output_rel_error"] for layer in layers if layer["output_rel_error"] is not None]
    weights_total = sum(layer["weight_elements"] for layer in layers)
    weights_four_bit = sum(layer["weight_elements"] for layer in layers if layer["four_bit_weight"])
    totals = {
        "preset": config.preset_name,
        "layers": len(layers),
        "quantized_layers": sum(1 for layer in layers if layer["output_rel_error"] is not None),
        "fallbacks": sum(1 for layer in layers if layer["fallback"]),
        "four_bit_weight_share": round(weights_four_bit / weights_total, 4) if weights_total else 0.0,
        "layer_bytes_before": sum(layer["bytes_before"] for layer in layers),
        "layer_bytes_after": sum(layer["bytes_after"] for layer in layers),
        "model_bytes_before": before,
        "model_bytes_after": after,
        "compression_ratio": round(before / after, 3) if before and after else None,
        "output_rel_error_mean": round(sum(errors) / len(errors), 5) if errors else None,
        "output_rel_error_max": round(max(errors), 5) if errors else None,
    }
    return totals


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def format_layers(report: dict[str, Any]) -> str:
    """A readable table of the per-layer report, then the totals."""
    rows = [("layer", "role", "scheme", "λ range", "rank", "before", "after", "rel err", "note")]
    for layer in report["layers"]:
        lam = layer["lambda_range"]
        note = layer["fallback"] or layer["skip_reason"] or layer.get("choice") or \
            (f"K padded +{layer['pad_k']}" if layer["pad_k"] else "")
        rows.append((layer["name"], layer["role"], layer["scheme"] or "-",
                     "-" if lam is None else f"{lam[0]:.3g}–{lam[1]:.3g}", str(layer["rank"] or "-"),
                     _size(layer["bytes_before"]), _size(layer["bytes_after"]),
                     "-" if layer["output_rel_error"] is None else f"{layer['output_rel_error']:.4f}", note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    totals = report["totals"]
    lines.append("")
    lines.append(f"preset {totals['preset']}: {totals['quantized_layers']}/{totals['layers']} layers quantized, "
                 f"{totals['fallbacks']} fallback(s), {totals['four_bit_weight_share']:.1%} of linear weights "
                 f"in 4 bits")
    ratio = "" if totals["compression_ratio"] is None else f" (compression {totals['compression_ratio']}x)"
    lines.append(f"model {_size(totals['model_bytes_before'])} → {_size(totals['model_bytes_after'])}{ratio}; "
                 f"mean relative output error {totals['output_rel_error_mean']}, max {totals['output_rel_error_max']}")
    return "\n".join(lines) + "\n"
