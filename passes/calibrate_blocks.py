"""calibrate_blocks: the statistics of the visible unit's calibration sites, gathered block by block.

Requires: linears. Ensures: `ctx.calibration` holds a complete `SiteStats` for every input of a quantized linear
of the unit the streaming compile has made visible (`svdq_compiler.streaming.VisibleUnit`), as the calibrate
pass would record them running the whole graph on the same inputs: `ctx.block_runner`
(`svdq_compiler.blockwise.BlockRunner`) runs the calibration inputs through the segments up to this unit's
last one, from the block inputs it kept, and merges the statistics of every process under torch.distributed.
The graph is not changed.
"""

from __future__ import annotations

import torch.fx

from svdq_compiler.blockwise import spill_summary, unit_of
from svdq_compiler.calibration import Calibration
from svdq_compiler.errors import InputError
from svdq_compiler.ir import annotated_linears
from svdq_compiler.recording import every_quantized_input_has_a_site
from svdq_compiler.pipeline import PassContext, PassResult, register_pass


@register_pass("calibrate_blocks", requires=("linears",), produces=("calibration",),
               ensures=every_quantized_input_has_a_site,
               summary="ctx.calibration holds the visible unit's sites, gathered block by block")
def calibrate_blocks(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Hand the visible unit's statistics from the block runner to the passes (module doc)."""
    runner = ctx.block_runner
    if runner is None:
        raise InputError("calibrate_blocks needs ctx.block_runner, which the streaming compile sets",
                         fix="use calibrate outside a streamed compile")
    units = {unit_of(info.weight) for _, info in annotated_linears(gm)}
    if len(units) > 1:
        raise InputError(f"calibrate_blocks runs on one visible unit, the graph shows {sorted(units)}",
                         fix="run it through svdq_compiler.streaming, which makes one unit visible at a time")
    # a unit without linears has no sites: its segments run when a later unit needs their outputs
    ctx.calibration = runner.calibration(units.pop()) if units else Calibration(inputs=runner.inputs)
    sites = ctx.calibration.sites.values()
    return PassResult(gm, False, {"sites": len(sites), "rows_kept": sum(s.rows.shape[0] for s in sites),
                                  "rows_seen": sum(s.rows_seen for s in sites), **spill_summary(runner)})
