"""Shapes and dtypes of the tensors the fused kernels read and write (no Triton needed: fake kernels use them)."""

from __future__ import annotations

from typing import Sequence

import torch

from svdq_compiler.codegen.spec import ActQuant

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def group_count(k: int, group_size: int) -> int:
    return -(-k // group_size)


def code_columns(quant: ActQuant, k: int) -> int:
    """Columns of the codes tensor for K channels: K_pad/2 bytes (4-bit) or K (int8)."""
    return group_count(k, quant.group_size) * quant.group_size // 2 if quant.packed else k


def scale_shape(quant: ActQuant, lead: Sequence[int], k: int) -> tuple[int, ...]:
    """Activation scales: [..., K_pad/G], or [..., 1] for per-token int8."""
    if quant.fmt == "int8":
        return (*lead, 1)
    return (*lead, group_count(k, quant.group_size))


def scale_dtype(quant: ActQuant, dtype: torch.dtype) -> torch.dtype:
    """nvfp4 scales are FP8-E4M3 bit patterns in uint8 (codegen.layout); int8 scales are fp32."""
    return {"nvfp4": torch.uint8, "int8": torch.float32}.get(quant.fmt, dtype)


def code_dtype(quant: ActQuant) -> torch.dtype:
    return torch.int8 if quant.fmt == "int8" else torch.uint8
