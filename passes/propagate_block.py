"""propagate_block: under quantized propagation (`config.calib_propagation = "quantized"`), run the unit just
compiled on its calibration inputs and hand its outputs to the next blocks' calibration.

Requires: lowered. Ensures: the block runner (`ctx.block_runner`, `svdq_compiler.blockwise`) holds, for every
calibration input, the compiled unit's outputs as the next segments' inputs, so the next block is calibrated on
what the quantized model feeds it. Runs while the unit's weights are still in memory (before the streaming
compile writes them out). With fp propagation nothing is pending and the pass does nothing. The graph is not
changed.
"""

from __future__ import annotations

import torch.fx

from svdq_compiler.errors import InputError
from svdq_compiler.pipeline import PassContext, PassResult, register_pass


@register_pass("propagate_block", requires=("lowered",),
               summary="the block runner holds the compiled unit's outputs as the next blocks' inputs")
def propagate_block(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Run the compiled unit on its kept inputs (module doc)."""
    if ctx.block_runner is None:
        raise InputError("propagate_block needs ctx.block_runner, which the streaming compile sets",
                         fix="use it in a streamed compile calibrated block by block")
    return PassResult(gm, False, {"nodes_run": ctx.block_runner.propagate()})
