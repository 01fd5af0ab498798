"""LoRA on a compiled FLUX graph without requantization: formats, matching, the branch concatenation, strength,
composition, removal, and the check that matters — the quantized model with a LoRA stays as close to the fp
model with that LoRA merged as the quantized model is to the fp model."""

from __future__ import annotations

import copy

import pytest
import torch

import svdq_compiler
from svdq_compiler.dropin import graph_module_of
from svdq_compiler.ir import get_attr_value
from svdq_compiler.lora import (LoraError, applied_loras, apply_lora, find_layers, read_lora, remove_lora,
                                set_lora_strength)
from svdq_compiler.models import adapter_for, load_model

# One linear of every kind a FLUX LoRA touches: q/k (sharing L2 with v, which gets none), an out projection, a
# post-GELU fc2 (shifted uint4 input), a single block's split proj_out and its proj_mlp (whose down projection
# fuse concatenated with q/k/v's), an AdaLN modulation (weight-only), and 16-bit embedder / final layers.
MODULES = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_out.0",
           "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_out",
           "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.attn.to_v",
           "transformer_blocks.0.norm1.linear", "x_embedder", "proj_out"]


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """Fused ops run their reference path here (the kernels have their own tests under the interpreter)."""
    monkeypatch.setenv("SVDQ_KERNELS", "reference")


@pytest.fixture(scope="module")
def compiled():
    fp = load_model("random:flux")
    adapter = adapter_for(fp)
    config = svdq_compiler.QuantConfig.preset("int4", smooth_grid=4, calib_rows=64)
    gm = svdq_compiler.compile(fp, adapter.example_inputs(fp, batch=2), config,
                               calib_inputs=adapter.calib_inputs(fp, 1, 2, seed=0, batch=2))
    inputs = adapter.calib_inputs(fp, 1, 2, seed=99, batch=2)
    return fp, gm, inputs


@pytest.fixture(scope="module")
def lowered(compiled):
    """The same model compiled without fuse: the reference svdq ops and the branch as aten.linear nodes."""
    fp, _, inputs = compiled
    adapter = adapter_for(fp)
    config = svdq_compiler.QuantConfig.preset("int4", smooth_grid=4, calib_rows=64)
    steps = [name for name, _ in svdq_compiler.pipeline.SVDQUANT_STEPS if name != "fuse"]
    gm = svdq_compiler.compile(fp, adapter.example_inputs(fp, batch=2), config, passes=steps,
                               calib_inputs=adapter.calib_inputs(fp, 1, 2, seed=0, batch=2))
    return fp, gm, inputs


def make_lora(fp, modules=MODULES, rank=4, seed=0, prefix="transformer.", scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    named = dict(fp.named_modules())
    state = {}
    for module in modules:
        linear = named[module]
        state[f"{prefix}{module}.lora_A.weight"] = scale * torch.randn(rank, linear.in_features, generator=generator)
        state[f"{prefix}{module}.lora_B.weight"] = scale * torch.randn(linear.out_features, rank, generator=generator)
    return state


def merged(fp, *loras):
    """The fp model with each (state, strength) LoRA added to its weights."""
    model = copy.deepcopy(fp)
    named = dict(model.named_modules())
    with torch.no_grad():
        for state, strength in loras:
            for key, down in state.items():
                if ".lora_A." in key:
                    module = key.removeprefix("transformer.").split(".lora_A.")[0]
                    up = state[key.replace(".lora_A.", ".lora_B.")]
                    named[module].weight += (strength * up @ down).to(named[module].weight.dtype)
    return model


def outputs(model, inputs):
    with torch.no_grad():
        return torch.cat([model(**x)[0].float() for x in inputs])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def tapped(gm, layer):
    """A copy of `gm` that records the input of `layer`'s weight-only op and the output of the node that sums its
    branch (kernel W itself in the fused form) on every run, for `layer_io`."""
    gm = copy.deepcopy(gm)
    layers = find_layers(gm)
    op = layers.weight_only[layer].node
    consumer = layers.branched[layer][2].node
    output = consumer if consumer is op else next(user for user in consumer.users if op in user.all_input_nodes)
    for key, node in (("x", op.args[0]), ("y", output)):
        with gm.graph.inserting_after(node):
            gm.graph.call_function(_tap, (key, node))
    gm.recompile()
    return gm


def layer_io(gm, inputs):
    """(input, output) of the layer `gm` taps (`tapped`) over `inputs`, rows flattened."""
    _TAPPED.clear()
    outputs(gm, inputs)
    return tuple(torch.cat([t.float().flatten(0, -2) for t in _TAPPED[key]]) for key in ("x", "y"))


_TAPPED: dict[str, list[torch.Tensor]] = {}


def _tap(key: str, value: torch.Tensor) -> None:
    _TAPPED.setdefault(key, []).append(value.detach().clone())


def test_find_layers_sees_every_kind_of_linear(compiled):
    _, gm, _ = compiled
    layers = find_layers(gm)
    q = layers.branched["transformer_blocks.0.attn.to_q"]
    assert q[0] is layers.branched["transformer_blocks.0.attn.to_v"][0]  # q/k/v share one down projection
    mlp, qkv = (layers.branched[f"single_transformer_blocks.0.{m}"] for m in ("proj_mlp", "attn.to_q"))
    assert mlp[1] is not qkv[1]
    if any("fused" in str(node.target) for node in gm.graph.nodes):  # fuse concatenated their L2, sliced after
        assert mlp[0] is qkv[0] and mlp[1].slices and qkv[1].slices
    assert {"single_transformer_blocks.0.proj_out.part0", "single_transformer_blocks.0.proj_out.part1"} <= \
        set(layers.branched)
    assert "transformer_blocks.0.norm1.linear" in layers.weight_only
    assert {"x_embedder", "proj_out"} <= set(layers.dense)
    assert not layers.unbranched()


def test_quantized_with_lora_stays_within_the_quantized_models_own_error(compiled):
    fp, compiled_gm, inputs = compiled
    gm = copy.deepcopy(compiled_gm)
    state = make_lora(fp)
    reference, reference_lora = outputs(fp, inputs), outputs(merged(fp, (state, 1.0)), inputs)
    own_error = rel(outputs(gm, inputs), reference)
    lora_effect = rel(reference_lora, reference)
    apply_lora(gm, state, name="style")
    with_lora = rel(outputs(gm, inputs), reference_lora)
    print(f"own error {own_error:.4f}, LoRA effect {lora_effect:.4f}, quantized+LoRA vs fp+LoRA {with_lora:.4f}")
    assert lora_effect > 5 * own_error  # the LoRA changes the output far more than quantization does
    assert with_lora < 1.15 * own_error
    # the 4-bit weights and λ did not change; the branch grew by the LoRA ranks
    layers = find_layers(compiled_gm)
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2"):
        assert torch.equal(get_attr_value(gm, f"{name}.qweight"), get_attr_value(compiled_gm, f"{name}.qweight"))
    branch, _, consumer = layers.branched["transformer_blocks.0.attn.to_q"]
    base_rank = get_attr_value(compiled_gm, branch.down).shape[0]
    assert get_attr_value(gm, branch.down).shape[0] == base_rank + 2 * 4  # q's and k's rows; v has none
    assert get_attr_value(gm, consumer.up).shape[1] == base_rank + 8


def test_fused_specs_follow_the_new_ranks(compiled):
    parse_spec = pytest.importorskip("svdq_compiler.codegen.spec").parse_spec
    fp, compiled_gm, _ = compiled
    gm = copy.deepcopy(compiled_gm)
    apply_lora(gm, make_lora(fp), name="style")
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.args[-1] if node.args else None, str):
            continue
        spec = parse_spec(node.args[-1])
        if spec.kind == "quantize_lora_down" and spec.rank:
            assert get_attr_value(gm, node.args[2].target).shape[0] == spec.rank
        elif spec.kind == "gemm":
            if spec.rank:
                assert get_attr_value(gm, node.args[6].target).shape[1] == spec.rank
            if spec.quantize_next is not None and spec.quantize_next.rank:
                assert get_attr_value(gm, node.args[10].target).shape[0] == spec.quantize_next.rank


def test_strength_composition_and_removal(compiled):
    fp, compiled_gm, inputs = compiled
    gm = copy.deepcopy(compiled_gm)
    base = outputs(gm, inputs)
    first, second = make_lora(fp, seed=1), make_lora(fp, MODULES[::2], rank=8, seed=2)
    own = rel(base, outputs(fp, inputs))
    apply_lora(gm, first, name="a")
    apply_lora(gm, second, name="b", strength=0.5)
    assert applied_loras(gm) == {"a": 1.0, "b": 0.5}
    assert rel(outputs(gm, inputs), outputs(merged(fp, (first, 1.0), (second, 0.5)), inputs)) < 1.15 * own
    set_lora_strength(gm, "a", -0.7)
    assert rel(outputs(gm, inputs), outputs(merged(fp, (first, -0.7), (second, 0.5)), inputs)) < 1.15 * own
    remove_lora(gm, "a")
    assert rel(outputs(gm, inputs), outputs(merged(fp, (second, 0.5)), inputs)) < 1.15 * own
    remove_lora(gm, "b")
    assert applied_loras(gm) == {}
    assert torch.equal(outputs(gm, inputs), base)  # the graph is back to its tensors, bit for bit
    for name, tensor in compiled_gm.state_dict().items():
        assert torch.equal(gm.state_dict()[name], tensor), name


def test_lora_formats_and_alpha(compiled):
    fp, _, _ = compiled
    state = make_lora(fp, MODULES[:2], rank=4)
    peft = {key.replace("transformer.", "base_model.model."): value for key, value in state.items()}
    old = {key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): value
           for key, value in state.items()}
    for variant in (state, peft, old):
        lora = read_lora(variant)
        assert set(lora.modules) == set(MODULES[:2])
        assert all(module.scale == 1.0 for module in lora.modules.values())
    with_alpha = dict(state)
    with_alpha[f"transformer.{MODULES[0]}.alpha"] = torch.tensor(2.0)
    assert read_lora(with_alpha).modules[MODULES[0]].scale == 0.5


def test_keys_matching_no_layer_are_listed(compiled):
    fp, compiled_gm, _ = compiled
    gm = copy.deepcopy(compiled_gm)
    state = make_lora(fp, MODULES[:1])
    state["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"] = torch.zeros(4, 64)
    state["transformer.transformer_blocks.7.attn.to_q.lora_B.weight"] = torch.zeros(64, 4)
    with pytest.raises(LoraError, match=r"2 LoRA key\(s\) match no layer.*transformer_blocks\.7\.attn\.to_q\.lora_A"):
        apply_lora(gm, state)
    assert applied_loras(gm) == {}
    text_encoder = {"text_encoder.layer.0.lora_A.weight": torch.zeros(2, 8),
                    "text_encoder.layer.0.lora_B.weight": torch.zeros(8, 2)}
    with pytest.raises(LoraError, match=r"match no layer.*text_encoder\.layer\.0\.lora_A\.weight"):
        apply_lora(gm, {**make_lora(fp, MODULES[:1]), **text_encoder})
    apply_lora(gm, {**make_lora(fp, MODULES[:1]), **text_encoder}, ignore=["^text_encoder"])
    assert list(applied_loras(gm)) == ["lora1"]
    with pytest.raises(LoraError, match="not LoRA factors.*mystery"):
        read_lora({**state, "transformer.mystery.weight": torch.zeros(2)})


def test_shape_mismatch_is_an_error(compiled):
    fp, compiled_gm, _ = compiled
    gm = copy.deepcopy(compiled_gm)
    state = make_lora(fp, MODULES[:1])
    state[f"transformer.{MODULES[0]}.lora_A.weight"] = torch.zeros(4, 32)
    with pytest.raises(LoraError, match="do not fit their layer"):
        apply_lora(gm, state)


WEIGHT_ONLY = "transformer_blocks.0.norm1.linear"  # AdaLN: W4A16, with the rank-32 branch the policy kept


@pytest.mark.parametrize("form", ["compiled", "lowered"])
def test_a_weight_only_layer_with_a_branch_takes_the_lora_in_that_branch(form, request):
    fp, compiled_gm, inputs = request.getfixturevalue(form)
    layers = find_layers(compiled_gm)
    assert WEIGHT_ONLY in layers.weight_only and WEIGHT_ONLY in layers.branched
    branch, _, consumer = layers.branched[WEIGHT_ONLY]
    base_rank = get_attr_value(compiled_gm, consumer.up).shape[1]
    gm = tapped(compiled_gm, WEIGHT_ONLY)  # (a graph with LoRAs applied cannot be deep-copied)
    base, reference = outputs(gm, inputs), outputs(fp, inputs)
    own = rel(base, reference)
    x, y = layer_io(gm, inputs)
    state = make_lora(fp, [WEIGHT_ONLY], rank=4, scale=0.1)
    down, up = (state[f"transformer.{WEIGHT_ONLY}.lora_{side}.weight"] for side in "AB")
    apply_lora(gm, state, name="style")
    # the layer adds exactly the dense LoRA x·Aᵀ·Bᵀ to what it computed (the branch reads x/λ where it smooths)
    x_lora, y_lora = layer_io(gm, inputs)
    assert torch.equal(x_lora, x)
    assert rel(y_lora - y, x @ down.T @ up.T) < 1e-4
    assert rel(outputs(gm, inputs), outputs(merged(fp, (state, 1.0)), inputs)) < 1.15 * own
    # the rows joined the layer's own branch (no second branch beside it); the weight-only kernel's spec follows
    assert get_attr_value(gm, branch.down).shape[0] == get_attr_value(compiled_gm, branch.down).shape[0] + 4
    assert get_attr_value(gm, consumer.up).shape[1] == base_rank + 4
    assert torch.equal(get_attr_value(gm, f"{WEIGHT_ONLY}.qweight"),
                       get_attr_value(compiled_gm, f"{WEIGHT_ONLY}.qweight"))
    kernel_w = find_layers(gm).weight_only[WEIGHT_ONLY].node
    if form == "compiled":
        parse_spec = pytest.importorskip("svdq_compiler.codegen.spec").parse_spec
        assert parse_spec(kernel_w.args[-1]).rank == base_rank + 4
        assert kernel_w.meta["val"].shape == compiled_gm.graph.find_nodes(
            op="call_function", target=kernel_w.target)[0].meta["val"].shape
    set_lora_strength(gm, "style", -0.5)
    assert rel(layer_io(gm, inputs)[1] - y, -0.5 * x @ down.T @ up.T) < 1e-4
    remove_lora(gm, "style")
    assert torch.equal(outputs(gm, inputs), base)
    for name, tensor in compiled_gm.state_dict().items():
        assert torch.equal(gm.state_dict()[name], tensor), name


@pytest.mark.slow
def test_lora_survives_save_and_load_and_runs_the_kernels(compiled, tmp_path):
    fp, compiled_gm, inputs = compiled
    gm = svdq_compiler.load(svdq_compiler.save(compiled_gm, tmp_path / "g.pt"))
    state = make_lora(fp)
    apply_lora(gm, state, name="style")
    expected = outputs(gm, inputs)
    reloaded = svdq_compiler.load(svdq_compiler.save(gm, tmp_path / "with-lora.pt"))
    assert torch.equal(outputs(reloaded, inputs), expected)
    assert applied_loras(reloaded) == {"style": 1.0}
    # the weight-only layer's own branch carries its LoRA rows again after loading
    rank = get_attr_value(compiled_gm, find_layers(compiled_gm).branched[WEIGHT_ONLY][2].up).shape[1]
    loaded_gm = graph_module_of(reloaded)
    assert get_attr_value(loaded_gm, find_layers(loaded_gm).branched[WEIGHT_ONLY][2].up).shape[1] == rank + 4
    kernel_backend = pytest.importorskip("svdq_compiler.codegen.fused_ops").kernel_backend
    with torch.no_grad(), kernel_backend("triton"):  # the generated kernels at the new ranks (interpreter on CPU)
        kernels = torch.cat([gm(**x)[0].float() for x in inputs[:1]])
    assert rel(kernels, expected[: kernels.shape[0]]) < 1e-2
