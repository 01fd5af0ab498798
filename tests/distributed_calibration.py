"""One process of the distributed calibration test (tests/test_distributed.py), started by torchrun:

    torchrun --standalone --nproc-per-node 2 tests/distributed_calibration.py OUT_PREFIX

Every process captures the same tiny DiT, calibrates its share of the inputs with the calibrate pass and with
the block runner (svdq_compiler.distributed merges the statistics), and writes what it ends with to
OUT_PREFIX-{calibrate,blocks}-rank<r>.safetensors.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "passes"))

from tiny_models import captured, dit_inputs, make_ctx, run_pass, tiny_dit  # noqa: E402

from svdq_compiler import distributed  # noqa: E402
from svdq_compiler.blockwise import REST_UNIT, BlockRunner  # noqa: E402
from svdq_compiler.calibration import Calibration, save_calibration  # noqa: E402

DEPTH, INPUTS, ROWS = 2, 5, 24


def calibrations():
    """(calibrate pass, block runner) statistics of this process — merged when under torchrun."""
    model, inputs = tiny_dit(depth=DEPTH), dit_inputs()
    ctx = make_ctx("int4", inputs, [dit_inputs(seed=s) for s in range(INPUTS)], calib_rows=ROWS)
    gm = captured(model, inputs)
    run_pass(gm, "annotate_linears", ctx)
    run_pass(gm, "calibrate", ctx)
    runner = BlockRunner(gm, ctx.config, ctx.calib_inputs, memory_budget=0)
    blocks = Calibration(inputs=INPUTS)
    try:
        for unit in [f"blocks.{i}" for i in range(DEPTH)] + [REST_UNIT]:
            blocks.sites.update(runner.calibration(unit).sites)
    finally:
        runner.close()
    return ctx.calibration, blocks


if __name__ == "__main__":
    assert distributed.init_from_environment(), "run me under torchrun with more than one process"
    whole, blocks = calibrations()
    for name, calibration in (("calibrate", whole), ("blocks", blocks)):
        save_calibration(calibration, f"{sys.argv[1]}-{name}-rank{distributed.rank()}.safetensors")
