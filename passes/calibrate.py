"""calibrate: run the captured FP graph on calibration inputs and record, per input tensor of a quantized linear,
the per-channel range and a bounded random sample of rows.

Requires: linears. Ensures: `ctx.calibration` is a `Calibration` with one `SiteStats` per tensor
that a non-16-bit linear reads (keyed by the node's name): per-channel min and max over every row of every
input, rows seen, and a uniform random sample of at most `config.calib_rows` rows (reservoir sampling; each row's key
depends on `config.calib_seed`, the site and the input's index only, so the sample does not depend on the order
the graph is run in), so memory is bounded however many inputs there are. A quantized k×k convolution has its
own site: the im2col patches of its input in the tap-major layout of `svdq_compiler.conv` (one row per output
pixel), keyed "<tensor>><conv>". The graph is not changed.

Inputs come from `ctx.calib_inputs`, else the model adapter (`calib_prompts` × `calib_steps` denoising steps),
else the example inputs (the stats say which). Under torch.distributed each process runs its share of the
inputs and the statistics are merged exactly (`svdq_compiler.distributed`). Each input is checked against the captured signature, and a
NaN or Inf reaching a linear stops calibration with an error naming that layer and the node producing it.

Two sources need no inputs:
- `ctx.calib_stats`, statistics an earlier compile saved (`save_calibration`, `svdq-compile --save-calib`):
  each site is matched by the qualified names of the linears reading it, which do not depend on how the model
  was captured (torch.export here, a torch.compile region there), not by node name;
- `config.calib_source = "weights"`: `calib_rows` isotropic Gaussian rows per site
  (`calibration.isotropic_calibration`, shared with the streaming compile), so the searches minimise
  E‖ΔW·x‖² = ‖ΔW‖_F², the weight-space error.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx

from svdq_compiler import distributed
from svdq_compiler.calibration import Calibration, isotropic_calibration
from svdq_compiler.errors import CalibrationError
from svdq_compiler.pipeline import PassContext, PassResult, register_pass
from svdq_compiler.recording import Recorder, calibration_sites, every_quantized_input_has_a_site, flatten_inputs


def _calibration_inputs(ctx: PassContext) -> tuple[Iterable, str]:
    if ctx.calib_inputs is not None:
        # A calibration set (svdq_compiler/calibration_set.py) says where its inputs came from.
        return ctx.calib_inputs, getattr(ctx.calib_inputs, "source", "calib_inputs")
    from svdq_compiler.models import GenericAdapter

    model = ctx.model
    if ctx.adapter is not None and model is not None and not isinstance(ctx.adapter, GenericAdapter):
        config = ctx.config
        inputs = ctx.adapter.calib_inputs(model, config.calib_prompts, config.calib_steps, seed=config.calib_seed)
        return inputs, f"adapter {getattr(ctx.adapter, 'name', type(ctx.adapter).__name__)} " \
                       f"({config.calib_prompts} prompts x {config.calib_steps} steps)"
    return [ctx.example_inputs], "example_inputs (no calibration inputs and no adapter: one sample only)"


@register_pass("calibrate", requires=("linears",), produces=("calibration",),
               ensures=every_quantized_input_has_a_site,
               summary="ctx.calibration holds per-input channel ranges and bounded row samples")
@torch.no_grad()
def calibrate(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Run the FP graph on the calibration inputs and record per-site statistics (module doc)."""
    config, here = ctx.config, None  # here: the inputs this process ran
    if ctx.calib_stats is None and config.calib_source == "weights":
        calibration = isotropic_calibration(gm, config.calib_rows, config.calib_seed)
        calibration.source = f"weights ({config.calib_rows} isotropic Gaussian rows per site: weight-space error)"
    else:
        sites, recorded = calibration_sites(gm)
        calibration = Calibration(sites=sites)
        if ctx.calib_stats is not None:
            _reuse(calibration, ctx.calib_stats)
        else:
            inputs, calibration.source = _calibration_inputs(ctx)
            recorder = Recorder(gm, recorded, config.calib_rows, config.calib_seed)
            for index, sample in distributed.share(enumerate(ctx.progress(inputs, "calibrate"))):
                flat = flatten_inputs(gm, sample, index)
                recorder.input_index = index
                recorder.run(*flat, enable_io_processing=False)
                calibration.inputs += 1
            here, calibration.inputs = calibration.inputs, distributed.total(calibration.inputs)
            if calibration.inputs == 0:
                raise CalibrationError("no calibration inputs were given", fix="pass at least one calibration input")
            distributed.merge_sites(sites, config.calib_rows)
    sites = calibration.sites
    ctx.calibration = calibration
    kept = sum(s.rows.shape[0] for s in sites.values())
    stats = {
        "source": calibration.source,
        "inputs": calibration.inputs,
        "sites": len(sites),
        "rows_seen": sum(s.rows_seen for s in sites.values()),
        "rows_kept": kept,
        "sample_bytes": sum(s.rows.numel() * s.rows.element_size() for s in sites.values()),
    }
    if here is not None and distributed.active():
        stats.update(processes=distributed.world_size(), inputs_this_process=here)
    return PassResult(gm, False, stats)


def _reuse(calibration: Calibration, saved: "Calibration") -> None:
    """Fill `calibration`'s sites from `saved`, matching each by the linears that read it."""
    by_readers = {tuple(sorted(stats.readers)): stats for stats in saved.sites.values()}
    for stats in calibration.sites.values():
        found = by_readers.get(tuple(sorted(stats.readers)))
        if found is None or found.minimum.shape != stats.minimum.shape:
            raise CalibrationError(
                f"the saved calibration statistics have no site read by {sorted(stats.readers)} with "
                f"{stats.minimum.shape[0]} channels", where="calib_stats",
                fix="save the statistics from a compile of the same model and config (svdq-compile --save-calib)")
        device = stats.rows.device  # the saved file holds CPU tensors; the sites live beside the activations
        stats.minimum, stats.maximum = found.minimum.to(device), found.maximum.to(device)
        stats.rows, stats.priorities = found.rows.to(device, stats.rows.dtype), found.priorities.to(device)
        stats.rows_seen = found.rows_seen
    calibration.source = f"saved statistics ({saved.source})"
    calibration.inputs = saved.inputs
