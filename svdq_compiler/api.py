"""The public API behind `svdq_compiler` (which imports this module on first use of any of its names):
compile, the report, and the names re-exported from the submodules. Importing it registers the svdq ops and the
torch.compile backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.fx

from svdq_compiler import ops  # noqa: F401  (registers torch.ops.svdq.*)
from svdq_compiler.capture import CAPTURE_META, capture, install_shape_check, opaque_inputs
from svdq_compiler.checks import check_finite_inputs, check_finite_weights
from svdq_compiler.config import PRESETS, QuantConfig, Scheme
from svdq_compiler.eager import COMPILE_PATHS, compile_eager, data_dependent_failure
from svdq_compiler.errors import CaptureError, InputError, SvdqError
from svdq_compiler.ir import LAYERS_META, annotated_linears, to_jsonable
from svdq_compiler.meta_capture import capture_replicated
from svdq_compiler.models import DynDim, ModelAdapter, adapter_for, load_model, register_builtin
from svdq_compiler.models.base import GRID_DIMS
from svdq_compiler.pipeline import PassContext, run_passes, svdquant_pipeline
from svdq_compiler.serialize import REPORT_META, load, save
from svdq_compiler.onnx_export import export_onnx
from svdq_compiler.codegen import fused_ops  # noqa: F401  (registers torch.ops.svdq.fused_*)

from svdq_compiler import backend as _backend  # noqa: E402  (torch.compile(backend="svdquant"))

_backend.register()

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
            print_ir_after_change: bool = False, progress: bool = False,
            adapter: ModelAdapter | None = None, calib_stats: Any = None,
            save_calib: str | Path | None = None, path: str = "auto") -> torch.fx.GraphModule | torch.nn.Module:
    """Capture `module` and run the SVDQuant pipeline on it; returns the compiled GraphModule.

    `path`: "graph" captures with torch.export; "eager" quantizes the model in place by module swap
    (svdq_compiler/eager.py) and returns it; "auto" (the default) takes the graph path and falls back to the
    eager one when torch.export fails on data-dependent code in the model, when non-tensor inputs carry sizes
    (the adapter's `sizes_in_values`), or when the graph pins the latent grid where the model itself runs at
    another. `report["path"]` and `report["path_reason"]` say which was taken and why.

    `example_inputs` is a tuple of positional args or a dict of kwargs. `dynamic_shapes="auto"` makes the
    dimensions the model's adapter declares dynamic (token counts, latent height/width, batch); pass None for a
    static graph, or a tree of {dim: DynDim} mirroring the inputs. The compile report (config, capture, passes
    with statistics, per-linear annotations) is in `gm.meta["svdq_report"]`.

    Calibration: `calib_inputs`, else `calib_stats` (a file `save_calib` wrote, or a `Calibration`), else the
    adapter's own inputs; `config.calib_source="weights"` needs no data at all (passes/calibrate.py).
    """
    quant_config = resolve_config(config)
    check_finite_weights([*module.named_parameters(), *module.named_buffers()])
    check_finite_inputs(example_inputs)
    adapter = adapter or adapter_for(module)
    if path not in COMPILE_PATHS:
        raise InputError(f"path={path!r} is not a compile path", fix=f"choose from {', '.join(COMPILE_PATHS)}")
    eager_options = dict(adapter=adapter, passes=passes, verify=verify, dump_ir=dump_ir,
                         print_ir_after_change=print_ir_after_change, progress=progress, save_calib=save_calib)
    if path == "eager":
        return compile_eager(module, example_inputs, quant_config, calib_inputs, calib_stats=calib_stats,
                             reason="the eager path was asked for", **eager_options)
    opaque = opaque_inputs(example_inputs) if path == "auto" else []
    if opaque:
        return compile_eager(module, example_inputs, quant_config, calib_inputs, calib_stats=calib_stats,
                             reason=f"{', '.join(opaque)}: an object torch.export cannot take as a graph input; "
                                    "eager module swap",
                             **eager_options)
    in_values = adapter.sizes_in_values(module, example_inputs) \
        if path == "auto" and dynamic_shapes == "auto" and isinstance(example_inputs, dict) else []
    if in_values:
        return compile_eager(module, example_inputs, quant_config, calib_inputs, calib_stats=calib_stats,
                             reason=f"{', '.join(in_values)} carry sizes as Python values, which a captured graph "
                                    "would hold constant; eager module swap", **eager_options)
    try:
        # FLUX-like models trace three blocks of each kind and replicate them (the same graph, a fraction of the
        # time)
        gm = capture_replicated(module, example_inputs, dynamic_shapes=dynamic_shapes, adapter=adapter) or \
            capture(module, example_inputs, dynamic_shapes=dynamic_shapes, adapter=adapter)
    except CaptureError as exc:
        reason = data_dependent_failure(exc) if path == "auto" else None
        if reason is None:
            raise
        return compile_eager(module, example_inputs, quant_config, calib_inputs, calib_stats=calib_stats,
                             reason=f"torch.export failed: {reason}; eager module swap", **eager_options)
    pinned = [dim for dim in gm.meta[CAPTURE_META]["dims"] if dim["status"] == "static" and dim["reason"]
              and dim["name"] in GRID_DIMS] \
        if path == "auto" and dynamic_shapes == "auto" and isinstance(example_inputs, dict) else []
    if pinned and adapter.runs_at_another_grid(module, example_inputs):
        # the graph would run at this resolution only, the model's own code at others (Mochi's RoPE grid)
        first = pinned[0]
        return compile_eager(module, example_inputs, quant_config, calib_inputs, calib_stats=calib_stats,
                             reason=f"the captured graph pins {first['input']} dim {first['index']} ({first['label']}): "
                                    f"{first['reason']}; the model runs at other sizes, so eager module swap",
                             **eager_options)
    if isinstance(calib_stats, (str, Path)):
        from svdq_compiler.calibration import load_calibration

        calib_stats = load_calibration(calib_stats)
    ctx = PassContext(config=quant_config, example_inputs=example_inputs, calib_inputs=calib_inputs,
                      calib_stats=None if calib_inputs is not None else calib_stats, adapter=adapter,
                      model=module, dump_dir=Path(dump_ir) if dump_ir is not None else None,
                      print_ir_after_change=print_ir_after_change, verify_each=verify, show_progress=progress)
    gm = run_passes(gm, ctx, svdquant_pipeline(passes))
    if save_calib is not None:
        if ctx.calibration is None:
            raise InputError("no calibration ran, so there are no statistics to save", where=str(save_calib),
                             fix="run the calibrate pass (leave it in --passes)")
        from svdq_compiler.calibration import save_calibration

        save_calibration(ctx.calibration, save_calib)
    install_shape_check(gm)
    gm.meta[REPORT_META] = compile_report(gm, quant_config, ctx.records)
    gm.meta[REPORT_META].update(path="graph", path_reason="torch.export captured the model" if path == "auto"
                                else "the graph path was asked for")
    return gm


def compile_report(gm: torch.fx.GraphModule, config: QuantConfig, records: list[dict]) -> dict[str, Any]:
    """What a compile did, in JSON-able form: it travels in graph.pt, where node annotations do not."""
    linears = [to_jsonable(info) for _, info in annotated_linears(gm)]
    return {
        "config": config.to_dict(),
        "capture": gm.meta[CAPTURE_META],
        "passes": records,
        "linears": linears,
        "layers": gm.meta.get(LAYERS_META),  # the per-layer report of `lower` (svdq_compiler/report.py)
        "totals": {"nodes": len(gm.graph.nodes), "linears_annotated": len(linears),
                   "parameter_bytes": parameter_bytes(gm)},
    }


def parameter_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
