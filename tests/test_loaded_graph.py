"""What `svdq_compiler.load` returns is a graph everywhere: LoRA, Nunchaku export, ONNX export, inspection and
torch.compile take the loaded FLUX graph (a drop-in pipeline component) as they take the GraphModule; and LoRAs
survive save and load as LoRAs: listed, adjustable, removable, computing what they did before saving."""

import json
import zipfile

import pytest
import torch
import torch._dynamo
from safetensors.torch import save_file

import svdq_compiler
from svdq_compiler.codegen.sources import kernel_sources
from svdq_compiler.dropin import CompiledModel, graph_module_of
from svdq_compiler.errors import CheckpointError
from svdq_compiler.interop.nunchaku import NUNCHAKU_COMPATIBLE, export_nunchaku
from svdq_compiler.ir import format_ir
from svdq_compiler.lora import LORA_FILE, applied_loras, apply_lora, remove_lora, restore_loras, set_lora_strength
from svdq_compiler.models import adapter_for, load_model
from test_lora import make_lora

# A LoRA on a q projection (its branch shares L2 with k and v), a single block's proj_mlp (its down projection
# is concatenated with q/k/v's in kernel A), an AdaLN modulation (weight-only: a separate branch) and the
# 16-bit x_embedder (merged into the weight): each way a LoRA joins a layer.
LORA_MODULES = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp",
                "transformer_blocks.0.norm1.linear", "x_embedder"]


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """Fused ops run their reference path here (the kernels have their own tests under the interpreter)."""
    monkeypatch.setenv("SVDQ_KERNELS", "reference")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(fp model, path of its int4 graph, inputs): bf16, the dtype Nunchaku checkpoints hold."""
    model = load_model("random:flux", dtype=torch.bfloat16)
    adapter = adapter_for(model)
    config = svdq_compiler.QuantConfig.preset("int4", smooth_grid=2, calib_rows=32, iterations=1,
                                              skip=[r"^norm_out\.linear$"], **NUNCHAKU_COMPATIBLE)
    with torch.no_grad():
        gm = svdq_compiler.compile(model, adapter.example_inputs(model, batch=1), config,
                                   calib_inputs=adapter.calib_inputs(model, 1, 1))
    path = svdq_compiler.save(gm, tmp_path_factory.mktemp("loaded") / "graph.pt")
    return model, path, adapter.example_inputs(model, batch=1, seed=7)


def run(graph, inputs):
    with torch.no_grad():
        return graph(**inputs)[0]


def test_every_consumer_takes_the_loaded_graph(saved, tmp_path):
    model, path, inputs = saved
    loaded, plain = svdq_compiler.load(path), graph_module_of(svdq_compiler.load(path))
    assert isinstance(loaded, CompiledModel) and not isinstance(plain, CompiledModel)
    ours, theirs = export_nunchaku(loaded, tmp_path / "nunchaku.safetensors"), export_nunchaku(plain)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert format_ir(loaded) == format_ir(plain)
    assert [k.source for k in kernel_sources(loaded)] == [k.source for k in kernel_sources(plain)]
    name = apply_lora(loaded, make_lora(model, LORA_MODULES), name="style")
    assert applied_loras(loaded) == {name: 1.0} and applied_loras(graph_module_of(loaded)) == {name: 1.0}
    assert not torch.equal(run(loaded, inputs), run(plain, inputs))
    remove_lora(loaded, name)
    torch.testing.assert_close(run(loaded, inputs), run(plain, inputs), rtol=0, atol=0)

    # torch.compile: the quantized graph is compiled as it is (not quantized again), at any token count
    torch._dynamo.reset()
    compiled = torch.compile(loaded, backend="svdquant", dynamic=True, options={"inductor": False})
    other = adapter_for(model).example_inputs(model, batch=1, tokens=(4, 6), seed=8)
    with pytest.warns(UserWarning, match="quantized already"):
        torch.testing.assert_close(run(compiled, inputs), run(plain, inputs), rtol=0, atol=0)
        torch.testing.assert_close(run(compiled, other), run(plain, other), rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.slow
def test_onnx_export_takes_the_loaded_graph(saved, tmp_path):
    _, path, _ = saved
    loaded = svdq_compiler.load(path)
    assert svdq_compiler.export_onnx(loaded, tmp_path / "model.onnx", form="custom").stat().st_size > 0


def test_loras_survive_save_and_load_as_loras(saved, tmp_path):
    model, path, inputs = saved
    graph = svdq_compiler.load(path)
    base = run(graph, inputs)
    lora_file = tmp_path / "style.safetensors"
    save_file(make_lora(model, LORA_MODULES), str(lora_file))
    apply_lora(graph, lora_file, strength=0.8)
    apply_lora(graph, make_lora(model, LORA_MODULES[:2], seed=1), name="detail", strength=1.5)
    expected = run(graph, inputs)
    with_loras = svdq_compiler.save(graph, tmp_path / "with-loras.pt")
    assert applied_loras(graph) == {"style": 0.8, "detail": 1.5}, "saving left the LoRAs on the graph"
    torch.testing.assert_close(run(graph, inputs), expected, rtol=0, atol=0)

    loaded = svdq_compiler.load(with_loras)
    assert applied_loras(loaded) == {"style": 0.8, "detail": 1.5}
    torch.testing.assert_close(run(loaded, inputs), expected, rtol=0, atol=0)
    set_lora_strength(graph, "style", 0.3)
    set_lora_strength(loaded, "style", 0.3)
    torch.testing.assert_close(run(loaded, inputs), run(graph, inputs), rtol=0, atol=0)
    remove_lora(loaded, "style")
    remove_lora(loaded, "detail")
    assert applied_loras(loaded) == {}
    torch.testing.assert_close(run(loaded, inputs), base, rtol=0, atol=0)
    assert not any("_svdq_lora_" in name for name, _ in graph_module_of(loaded).named_buffers())
    # the graph without LoRAs saves without the entry, and loads as it was
    plain = svdq_compiler.load(svdq_compiler.save(loaded, tmp_path / "plain.pt"))
    assert applied_loras(plain) == {}
    with zipfile.ZipFile(tmp_path / "plain.pt") as archive:
        assert not any(n.endswith(LORA_FILE) for n in archive.namelist())


def test_a_lora_entry_naming_a_tensor_that_is_not_a_lora_factor_is_a_clear_error(saved):
    # (a file damaged after it was written fails its digest first; this is one written wrong)
    _, path, _ = saved
    graph = graph_module_of(svdq_compiler.load(path))
    entry = {"loras": [{"name": "style", "source": "x", "strength": 1.0, "modules": {
        "transformer_blocks.0.attn.to_q": {"down": "transformer_blocks.0.attn.to_q.weight", "up": "x",
                                           "scale": 1.0, "keys": []}}}]}
    with pytest.raises(CheckpointError, match=r"LoRA entry svdq_loras.json is damaged .*not a LoRA factor"):
        restore_loras(graph, json.dumps(entry), str(path))
    assert applied_loras(graph) == {}
