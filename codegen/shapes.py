"""Shapes and dtypes of the packed activations a fused kernel reads or writes, from `codegen.layout`'s rules
(no Triton needed: the fake kernels use them too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from svdq_compiler.codegen.layout import code_columns, effective_group, packed_code_dtype, round_up, scale_dtype
from svdq_compiler.codegen.spec import ActQuant


@dataclass(frozen=True)
class PackedAct:
    codes_shape: tuple
    codes_dtype: torch.dtype
    scales_shape: tuple
    scales_dtype: torch.dtype
    groups: int  # scales per row (K_pad/G; 1 for per-token int8)


def packed_act(quant: ActQuant, lead: Sequence, k: int, dtype: torch.dtype) -> PackedAct:
    """What `svdq.quantize_act` returns for x [*lead, K] of `dtype`."""
    group = effective_group(quant.group_size, k)
    k_pad = round_up(k, group)
    return PackedAct((*lead, code_columns(quant.fmt, k_pad)), packed_code_dtype(quant.fmt),
                     (*lead, k_pad // group), scale_dtype(quant.fmt, dtype), k_pad // group)


def model_dtype(name: str) -> torch.dtype:
    """The torch dtype of a spec's dtype name ("bfloat16", "float16", "float32")."""
    return getattr(torch, name)
