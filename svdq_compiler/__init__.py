"""svdq-compiler: SVDQuant W4A4 compilation of diffusion transformers.

Public API (stable): capture, compile, QuantConfig, save, load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.fx

from svdq_compiler.capture import capture
from svdq_compiler.config import PRESETS, QuantConfig, Scheme
from svdq_compiler.errors import InputError, SvdqError
from svdq_compiler.pipeline import PassContext, run_passes, svdquant_pipeline
from svdq_compiler import ops  # noqa: F401  (registers torch.ops.svdq.*)
from svdq_compiler.codegen import fused_ops  # noqa: F401  (registers torch.ops.svdq.fused_*)

__version__ = "0.1.0"

__all__ = ["capture", "compile", "QuantConfig", "Scheme", "PRESETS", "SvdqError", "__version__"]


def resolve_config(config: str | QuantConfig | dict) -> QuantConfig:
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return QuantConfig.preset(config)
    if isinstance(config, dict):
        return QuantConfig.from_dict(config)
    raise InputError(f"config must be a preset name, a QuantConfig or a dict, got {type(config).__name__}")


def compile(module: torch.nn.Module, example_inputs: tuple | dict, config: str | QuantConfig = "int4",
            calib_inputs: Iterable[tuple | dict] | None = None, dump_ir: str | Path | None = None, *,
            passes: Sequence[str] | None = None, dynamic_shapes: Any = "auto", verify: bool = False,
            print_ir_after_change: bool = False, progress: bool = False) -> torch.fx.GraphModule:
    """Capture `module` and run the SVDQuant pipeline on it; returns the compiled GraphModule."""
    quant_config = resolve_config(config)
    gm = capture(module, example_inputs, dynamic_shapes=dynamic_shapes)
    ctx = PassContext(config=quant_config, example_inputs=example_inputs, calib_inputs=calib_inputs,
                      dump_dir=Path(dump_ir) if dump_ir is not None else None,
                      print_ir_after_change=print_ir_after_change, verify_each=verify, show_progress=progress)
    gm = run_passes(gm, ctx, svdquant_pipeline(passes))
    gm.meta["svdq_report"] = {"config": quant_config.to_dict(), "passes": ctx.records}
    return gm
