"""calibrate_blocks / BlockRunner: statistics gathered one block at a time, from block inputs kept between blocks
(spilled to disk past the memory budget), equal to those of the calibrate pass running the whole graph."""

import pytest
import torch
from tiny_models import captured, dit_inputs, make_ctx, run_pass, tiny_dit

from svdq_compiler.blockwise import REST_UNIT, BlockInputs, BlockRunner, plan_segments
from svdq_compiler.errors import InputError
from svdq_compiler.ir import format_ir
from svdq_compiler.streaming import VisibleUnit

DEPTH = 3
UNITS = [f"blocks.{i}" for i in range(DEPTH)] + [REST_UNIT]


@pytest.fixture
def deep():
    model = tiny_dit(depth=DEPTH)
    inputs = dit_inputs()
    ctx = make_ctx("int4", inputs, [dit_inputs(seed=s) for s in range(5)], calib_rows=24)
    gm = captured(model, inputs)
    run_pass(gm, "annotate_linears", ctx)
    return gm, ctx


def assert_same_sites(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, stats in expected.items():
        got = actual[name]
        assert got.readers == stats.readers and got.rows_seen == stats.rows_seen, name
        for field in ("minimum", "maximum", "rows", "priorities"):
            assert torch.equal(getattr(got, field), getattr(stats, field)), (name, field)


def test_segments_follow_the_blocks_in_order(deep):
    gm, _ = deep
    units = [segment.unit for segment in plan_segments(gm.graph)]
    # embeddings and conditioning, each block, then the final norm and projection
    assert units == [REST_UNIT] + UNITS[:DEPTH] + [REST_UNIT]
    block_inputs = plan_segments(gm.graph)[1].live_after
    assert len(block_inputs) == 2  # the hidden states and the conditioning vector, nothing else


@pytest.mark.parametrize("memory_budget", [1 << 30, 0], ids=["in-memory", "spilled"])
def test_block_by_block_equals_the_whole_graph(deep, memory_budget):
    gm, ctx = deep
    run_pass(gm, "calibrate", ctx)
    whole = ctx.calibration.sites
    runner = BlockRunner(gm, ctx.config, ctx.calib_inputs, memory_budget=memory_budget)
    gathered = {}
    try:
        for unit in UNITS:
            calibration = runner.calibration(unit)
            assert calibration.inputs == 5
            assert all(unit == REST_UNIT or reader.startswith(unit + ".") for stats in calibration.sites.values()
                       for reader in stats.readers)
            gathered.update(calibration.sites)
        folder = runner.store.folder
    finally:
        runner.close()
    assert_same_sites(gathered, whole)
    if memory_budget == 0:
        assert runner.store.spilled_bytes > 0 and runner.store.peak_memory_bytes == 0
        assert not folder.exists()  # the spilled block inputs are removed
    else:
        assert runner.store.spilled_bytes == 0 and folder is None


def test_the_pass_hands_the_visible_unit_its_sites(deep):
    gm, ctx = deep
    run_pass(gm, "calibrate", ctx)
    whole = ctx.calibration.sites
    ctx.calibration = None
    ctx.block_runner = BlockRunner(gm, ctx.config, ctx.calib_inputs)
    before = format_ir(gm)
    try:
        with VisibleUnit(gm, "blocks.1"):
            result = run_pass(gm, "calibrate_blocks", ctx)
    finally:
        ctx.block_runner.close()
    assert format_ir(gm) == before  # Expected: the graph unchanged, the unit's sites recorded
    expected = {name: stats for name, stats in whole.items() if stats.readers[0].startswith("blocks.1.")}
    assert expected
    assert_same_sites(ctx.calibration.sites, expected)
    assert not result.modified and result.stats["sites"] == len(expected) and result.stats["inputs"] == 5
    assert result.stats["segments"] == DEPTH + 2


def test_the_pass_needs_a_block_runner(deep):
    gm, ctx = deep
    with pytest.raises(InputError, match="block_runner"):
        run_pass(gm, "calibrate_blocks", ctx)


def test_inputs_past_the_budget_spill_and_come_back_unchanged():
    values = [{"hidden": torch.randn(4, 8, generator=torch.Generator().manual_seed(i))} for i in range(3)]
    store = BlockInputs(memory_budget=2 * 4 * 8 * 4)  # room for two inputs
    try:
        for index, value in enumerate(values):
            store.put(index, value)
        assert sorted(store.in_memory) == [0, 1] and store.spilled == {2} and (store.folder / "2.pt").exists()
        assert store.peak_memory_bytes == store.memory_budget and store.spilled_bytes == 4 * 8 * 4
        for index in (2, 0, 1):
            assert torch.equal(store.take(index)["hidden"], values[index]["hidden"])
        assert store.memory_bytes == 0 and not store.spilled and not (store.folder / "2.pt").exists()
        folder = store.folder
    finally:
        store.close()
    assert not folder.exists()
