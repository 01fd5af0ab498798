"""propagate_block: with quantized propagation the next block is calibrated on the outputs of the compiled
block — exactly what the calibrate pass records running the partly compiled graph whole."""

import pytest
import torch
from tiny_models import captured, dit_inputs, make_ctx, run_pass, tiny_dit

from svdq_compiler.blockwise import BlockRunner
from svdq_compiler.errors import CalibrationError, InputError
from svdq_compiler.pipeline import PASS_REGISTRY, run_passes
from svdq_compiler.streaming import UnitRecord, VisibleUnit, run_unit, unit_passes


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("SVDQ_KERNELS", "reference")  # the fused ops' reference path (kernels: tests/codegen)


def annotated(propagation):
    model, inputs = tiny_dit(depth=3), dit_inputs()
    ctx = make_ctx("int4", inputs, [dit_inputs(seed=s) for s in range(4)], calib_rows=24,
                   calib_propagation=propagation)
    gm = run_passes(captured(model, inputs), ctx, [PASS_REGISTRY["annotate_linears"]])
    ctx.block_runner = BlockRunner(gm, ctx.config, ctx.calib_inputs)
    return gm, ctx


def compile_unit(gm, ctx, unit):
    with VisibleUnit(gm, unit):
        run_unit(gm, ctx, unit_passes("activations", ctx.config.calib_propagation), UnitRecord(unit), {}, 0)


def sites_of(calibration, unit):
    return {tuple(s.readers): s for s in calibration.sites.values() if s.readers[0].startswith(unit + ".")}


def test_the_next_block_sees_the_compiled_blocks_outputs():
    gm, ctx = annotated("quantized")
    compile_unit(gm, ctx, "blocks.0")
    assert ctx.block_runner.pending is None  # propagate_block ran the compiled block
    propagated = ctx.block_runner.calibration("blocks.1")
    ctx.block_runner.close()
    # the oracle: the calibrate pass on the whole graph, blocks.0 compiled and the rest fp
    whole = make_ctx("int4", ctx.example_inputs, ctx.calib_inputs, calib_rows=24)
    run_pass(gm, "calibrate", whole)
    expected = sites_of(whole.calibration, "blocks.1")
    assert expected and sites_of(propagated, "blocks.1").keys() == expected.keys()
    for readers, stats in sites_of(propagated, "blocks.1").items():
        for field in ("minimum", "maximum", "rows"):
            assert torch.equal(getattr(stats, field), getattr(expected[readers], field)), (readers, field)
    # and not what fp propagation gives: the quantization error of blocks.0 reaches blocks.1
    fp_gm, fp_ctx = annotated("fp")
    compile_unit(fp_gm, fp_ctx, "blocks.0")
    fp_sites = sites_of(fp_ctx.block_runner.calibration("blocks.1"), "blocks.1")
    fp_ctx.block_runner.close()
    assert any(not torch.equal(stats.maximum, fp_sites[readers].maximum)
               for readers, stats in sites_of(propagated, "blocks.1").items())


def test_a_block_left_unpropagated_is_refused():
    gm, ctx = annotated("quantized")
    with VisibleUnit(gm, "blocks.0"):
        run_unit(gm, ctx, unit_passes("activations", "fp"), UnitRecord("blocks.0"), {}, 0)  # no propagate_block
    with pytest.raises(CalibrationError, match="never propagated"):
        ctx.block_runner.calibration("blocks.1")
    ctx.block_runner.close()


def test_the_pass_needs_a_block_runner():
    gm, ctx = annotated("fp")
    ctx.block_runner.close()
    ctx.block_runner = None
    with pytest.raises(InputError, match="block_runner"):
        run_pass(gm, "propagate_block", ctx)
