"""Refusing non-finite tensors where the user hands them in (weights, example inputs, LoRA factors), naming the
tensor: a NaN found later, deep in calibration or an SVD, would blame the wrong thing or crash."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.utils._pytree import tree_flatten_with_path, keystr

from svdq_compiler.errors import InputError


def non_finite(tensor: torch.Tensor) -> str | None:
    """'3 NaN, 1 Inf of 4096 values' when `tensor` holds any, else None (non-float tensors never do)."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.device.type == "meta":
        return None
    if bool(torch.isfinite(tensor).all()):
        return None
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    parts = [f"{nan} NaN"] * bool(nan) + [f"{inf} Inf"] * bool(inf)
    return f"{', '.join(parts)} of {tensor.numel()} values"


def check_finite_weight(name: str, tensor: torch.Tensor, where: str | None = None) -> None:
    found = non_finite(tensor)
    if found:
        raise InputError(f"weight {name} holds non-finite values ({found})", where=where,
                         fix="repair or re-download the checkpoint; quantizing NaN or Inf weights gives a broken "
                             "model")


def check_finite_weights(named: Iterable[tuple[str, torch.Tensor]], where: str | None = None) -> None:
    for name, tensor in named:
        check_finite_weight(name, tensor, where)


def check_finite_inputs(inputs: Any, what: str = "example input") -> None:
    """Every tensor leaf of `inputs` (a tuple, dict or nested tree) is finite."""
    leaves, _ = tree_flatten_with_path(inputs)
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            found = non_finite(leaf)
            if found:
                raise InputError(f"{what} {keystr(path).lstrip('.') or '(the input)'} holds non-finite values "
                                 f"({found})", fix=f"pass finite {what}s (the graph is captured and calibrated "
                                                   f"on them)")
