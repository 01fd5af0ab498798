"""calibrate: per-channel ranges equal to what the eager model sees, a bounded uniform row sample, input checks."""

import pytest
import torch
from tiny_models import captured, dit_inputs, make_ctx, run_pass, tiny_dit

import svdq_compiler
from svdq_compiler.errors import CalibrationError
from svdq_compiler.ir import annotated_linears

BLOCK = "blocks.0."


def calibrated(dit, calib_inputs, **overrides):
    model, inputs, gm = dit
    ctx = make_ctx("int4", inputs, calib_inputs, **overrides)
    run_pass(gm, "annotate_linears", ctx)
    result = run_pass(gm, "calibrate", ctx)
    return ctx.calibration, result, gm


def eager_inputs(model, calib_inputs):
    """The rows each linear of the eager model reads, per calibration input."""
    seen = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(
        args[0].reshape(-1, args[0].shape[-1]))) for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        for sample in calib_inputs:
            model(*sample)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(rows) for name, rows in seen.items()}


def test_ranges_and_samples_match_the_eager_activations(dit):
    model = dit[0]
    calib = [dit_inputs(seed=s) for s in range(5)]
    calibration, result, gm = calibrated(dit, calib, calib_rows=24)
    assert not result.modified
    rows = eager_inputs(model, calib)
    sites = {stats.readers[0]: stats for stats in calibration.sites.values()}
    # One site per tensor read by quantized linears: q/k/v share one; 16-bit layers have none.
    assert sorted(sites) == [BLOCK + n for n in ("ada", "down", "out", "q", "up")]
    assert sites[BLOCK + "q"].readers == [BLOCK + "q", BLOCK + "k", BLOCK + "v"]
    for name, stats in sites.items():
        expected = rows[name]
        torch.testing.assert_close(stats.maximum, expected.amax(0))
        torch.testing.assert_close(stats.minimum, expected.amin(0))
        torch.testing.assert_close(stats.absmax(0.5), (expected + 0.5).abs().amax(0))
        assert stats.rows_seen == expected.shape[0]
        kept = stats.rows.shape[0]
        assert kept == min(24, expected.shape[0])
        # Every kept row is a real row, and no row is kept twice.
        distance = torch.cdist(stats.rows, expected, compute_mode="donot_use_mm_for_euclid_dist")
        assert (distance.min(1).values < 1e-5).all()
        assert len({int(i) for i in distance.argmin(1)}) == kept
    assert result.stats["inputs"] == 5 and result.stats["source"] == "calib_inputs"
    assert result.stats["rows_kept"] == 24 * 4 + 5 * 2  # the conditioning site has only 2 rows per input


def test_sample_is_uniform_over_inputs_and_memory_is_bounded(dit):
    # 40 inputs of 16 rows each; a kept row is traced back to its input by nearest match.
    tagged = [dit_inputs(seed=index) for index in range(40)]
    calibration, result, _ = calibrated(dit, iter(tagged), calib_rows=40)  # a one-shot iterator streams
    stats = next(s for s in calibration.sites.values() if s.readers[0] == BLOCK + "q")
    assert stats.rows_seen == 40 * 2 * 8 and stats.rows.shape[0] == 40
    model = dit[0]
    origin = []
    for index, sample in enumerate(tagged):
        origin += [index] * 16
    all_rows = eager_inputs(model, tagged)[BLOCK + "q"]
    sources = torch.tensor(origin)[torch.cdist(stats.rows, all_rows, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)]
    halves = (sources < 20).sum().item()
    assert 10 <= halves <= 30, "the sample must come from early and late inputs alike"
    assert result.stats["sample_bytes"] <= 5 * 40 * 128 * 4


def test_example_inputs_and_adapter_are_the_fallback_sources(dit):
    model, inputs, gm = dit
    ctx = make_ctx("int4", inputs)
    run_pass(gm, "annotate_linears", ctx)
    assert "example_inputs" in run_pass(gm, "calibrate", ctx).stats["source"]
    assert ctx.calibration.inputs == 1

    class Adapter:
        name = "toy"

        def calib_inputs(self, model, num_prompts, num_steps, seed=0):
            return [dit_inputs(seed=seed + i) for i in range(num_prompts * num_steps)]

    ctx = make_ctx("int4", inputs, calib_prompts=3, calib_steps=2)
    ctx.adapter, ctx.model = Adapter(), model
    result = run_pass(gm, "calibrate", ctx)
    assert result.stats["inputs"] == 6 and result.stats["source"].startswith("adapter toy (3 prompts x 2 steps)")


@pytest.mark.parametrize("bad, message", [
    (lambda x, t: (x,), "1 positional argument"),
    (lambda x, t: (x.double(), t), "input 'x' is a float64 tensor"),
    (lambda x, t: (x, t[:, :16]), r"input 't' is a float32 tensor of shape \(2, 16\).*dim 1 = 32"),
])
def test_inputs_that_do_not_match_the_signature_are_refused(dit, bad, message):
    with pytest.raises(CalibrationError, match=message) as error:
        calibrated(dit, [dit_inputs(), bad(*dit_inputs(seed=1))])
    assert "calibration input #1" in str(error.value)


def test_nan_names_the_layer_it_reaches(dit):
    x, t = dit_inputs()
    x[0, 3, 5] = float("nan")
    with pytest.raises(CalibrationError, match=r"NaN in the activation entering layer blocks\.0\.q \(and 2 more\); "
                                               r"it is produced by node \w+ in module 'blocks.0'"):
        calibrated(dit, [dit_inputs(), (x, t)])
    x, t = dit_inputs()
    t[1, 0] = float("inf")
    with pytest.raises(CalibrationError, match="(NaN|Inf) in the activation entering layer blocks.0.ada"):
        calibrated(dit, [(x, t)])


def test_every_linear_reading_a_site_is_listed_once():
    model = tiny_dit(depth=2)
    inputs = dit_inputs()
    gm = svdq_compiler.capture(model, inputs)
    ctx = make_ctx("int4", inputs, [inputs])
    run_pass(gm, "annotate_linears", ctx)
    run_pass(gm, "calibrate", ctx)
    readers = [r for s in ctx.calibration.sites.values() for r in s.readers]
    quantized = [i.name for _, i in annotated_linears(gm) if i.scheme.kind != "fp"]
    assert sorted(readers) == sorted(quantized)


def test_calibrate_alone_on_a_hand_annotated_graph():
    """Before: a, b read x and c reads their sum, annotated by hand. Expected: the graph unchanged (format_ir
    byte for byte) and one site per tensor read, holding the exact ranges and every row of the two inputs."""
    from hand_built import W4A4, SharedInput, before, context, run_one

    from svdq_compiler.ir import format_ir

    torch.manual_seed(0)
    model, inputs = SharedInput(), [(torch.randn(4, 64),), (torch.randn(4, 64),)]
    gm = before(model, inputs[0][0], {"a": W4A4, "b": W4A4, "c": W4A4}, groups={"b": "a"})
    text = format_ir(gm)
    ctx = context(calib_inputs=inputs)
    gm = run_one(gm, ctx, "calibrate")
    assert format_ir(gm) == text
    sites = ctx.calibration.sites
    assert sorted(sites) == ["add", "x"] and sites["x"].readers == ["a", "b"] and sites["add"].readers == ["c"]
    with torch.no_grad():
        seen = {"x": torch.cat([x for x, in inputs]), "add": torch.cat([model.a(x) + model.b(x) for x, in inputs])}
    for name, rows in seen.items():
        torch.testing.assert_close(sites[name].minimum, rows.amin(0))
        torch.testing.assert_close(sites[name].maximum, rows.amax(0))
        assert sites[name].rows_seen == 8 and sites[name].rows.shape == (8, rows.shape[1])


@pytest.mark.parametrize("gelu", ["tanh", "none"])
def test_data_free_rows_follow_the_graphs_own_gelu(gelu):
    """calib_source="weights": a post-GELU input that the layer shifts (unsigned INT4) gets the GELU the graph
    computes, tanh or erf (the calibrate pass once used erf and the streaming compile tanh, for every model);
    every other input keeps standard normal rows. Ranges are the rows'."""
    from hand_built import ProjectedMlp, context, run_one

    torch.manual_seed(0)
    model, x = ProjectedMlp(gelu), torch.randn(8, 64)
    gm = svdq_compiler.capture(model.eval(), (x,), dynamic_shapes=None)
    ctx = context(available=(), config=svdq_compiler.QuantConfig.preset("int4", calib_source="weights",
                                                                         calib_rows=16))
    for name in ("annotate_linears", "calibrate"):
        gm = run_one(gm, ctx, name)
    sites = ctx.calibration.sites
    assert sorted(sites) == ["gelu", "layer_norm"] and ctx.calibration.data_free
    generator = torch.Generator().manual_seed(ctx.config.calib_seed)
    plain = torch.randn(16, 64, generator=generator)  # fc1's input, drawn first (graph order)
    torch.rand(16, generator=generator)  # its reservoir keys
    shifted = torch.nn.functional.gelu(torch.randn(16, 128, generator=generator), approximate=gelu)
    assert torch.equal(sites["layer_norm"].rows, plain) and torch.equal(sites["gelu"].rows, shifted)
    assert torch.equal(sites["gelu"].minimum, shifted.amin(0)) and sites["gelu"].rows_seen == 16


MATRIX_CASES = [
    (torch.ops.aten.linear.default, lambda g: (torch.randn(6, 64, generator=g), torch.randn(32, 64, generator=g),
                                               torch.randn(32, generator=g))),
    (torch.ops.aten.bmm.default, lambda g: (torch.randn(2, 6, 64, generator=g), torch.randn(2, 64, 8, generator=g))),
    (torch.ops.aten.scaled_dot_product_attention.default,
     lambda g: tuple(torch.randn(1, 2, 6, 16, generator=g) for _ in range(3))),
]


@pytest.mark.parametrize("op, make", MATRIX_CASES, ids=["linear", "bmm", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_products_run_in_float32_rounded_once(op, make, dtype, monkeypatch):
    from svdq_compiler import recording

    monkeypatch.setattr(recording, "_native_16bit_matmul", lambda dtype: False)
    args = tuple(a.to(dtype) for a in make(torch.Generator().manual_seed(0)))
    result = recording.matmul_in_float32(op, args, {})
    assert result.dtype == dtype
    assert torch.equal(result, op(*(a.float() for a in args)).to(dtype))
    # the 16-bit kernels accumulate in float32 too (attention rounds its probabilities to 16 bits as well): the
    # same up to about the last bit of the largest 16-bit value
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    torch.testing.assert_close(result, op(*args), rtol=ulp, atol=ulp * float(result.abs().max()))


def test_other_ops_and_native_16bit_cpus_run_as_they_are(monkeypatch):
    from svdq_compiler import recording

    x, w = torch.randn(4, 8).bfloat16(), torch.randn(3, 8).bfloat16()
    monkeypatch.setattr(recording, "_native_16bit_matmul", lambda dtype: False)
    assert torch.equal(recording.matmul_in_float32(torch.ops.aten.add.Tensor, (x, x), {}), x + x)
    calls = []
    monkeypatch.setattr(recording, "_native_16bit_matmul", lambda dtype: calls.append(dtype) or True)
    native = recording.matmul_in_float32(torch.ops.aten.linear.default, (x, w), {})
    assert calls == [torch.bfloat16] and torch.equal(native, torch.nn.functional.linear(x, w))


def test_a_bf16_graph_calibrates_as_with_its_16bit_kernels(monkeypatch):
    """Float32 products change the recorded statistics by 16-bit rounding at most (the stated tolerance)."""
    from svdq_compiler import recording

    model = tiny_dit().to(torch.bfloat16).eval()
    inputs = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in dit_inputs())
    calib = [tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in dit_inputs(seed=s)) for s in (1, 2)]
    runs = {}
    for native in (True, False):
        monkeypatch.setattr(recording, "_native_16bit_matmul", lambda dtype, native=native: native)
        runs[native] = calibrated((model, inputs, captured(model, inputs)), calib)[0]
    assert runs[True].sites.keys() == runs[False].sites.keys()
    differ = 0
    for name, site in runs[False].sites.items():
        native = runs[True].sites[name]
        torch.testing.assert_close(site.maximum, native.maximum, rtol=2 ** -7, atol=1e-2)
        torch.testing.assert_close(site.minimum, native.minimum, rtol=2 ** -7, atol=1e-2)
        torch.testing.assert_close(site.rows.float(), native.rows.float(), rtol=2 ** -6, atol=2e-2)
        differ += not torch.equal(site.rows, native.rows)
    assert differ  # the float32 path did run: some rows differ in their last bit
