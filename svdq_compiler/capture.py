"""Capture: torch.export (non-strict) → ATen-level GraphModule with parameters as attributes."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from svdq_compiler.errors import CaptureError


def split_inputs(example_inputs: tuple | list | dict) -> tuple[tuple, dict]:
    """`example_inputs` is a tuple of positional arguments or a dict of keyword arguments."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise CaptureError(f"example_inputs must be a tuple of positional args or a dict of kwargs, "
                       f"got {type(example_inputs).__name__}")


def capture(module: torch.nn.Module, example_inputs: tuple | dict, *,
            dynamic_shapes: Any = None) -> torch.fx.GraphModule:
    """Export `module` on `example_inputs` and return the ATen-level GraphModule (parameters as attributes)."""
    args, kwargs = split_inputs(example_inputs)
    module = module.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch.export raises many types; the user needs the first line and a way forward
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"torch.export could not capture {type(module).__name__}: {first_line}",
                           fix="check that the example inputs match forward(), or pass dynamic_shapes=None "
                               "to capture at a static size") from exc
    program = program.run_decompositions({})
    gm = program.module()
    gm.meta["svdq_capture"] = {"dynamic_shapes": dynamic_shapes, "module_class": type(module).__name__}
    return gm
