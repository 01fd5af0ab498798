"""Capture on the meta device and the PT2 archive written weight by weight."""

from __future__ import annotations

import errno
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

from scale_fixtures import TINY_FLUX, flux_dynamic_shapes, flux_inputs, write_tiny_flux
from svdq_compiler.archive import StreamingArchive
from svdq_compiler.errors import CheckpointError, InputError
from svdq_compiler.ir import set_attr_value
from svdq_compiler.meta_capture import capture_on_meta, program_from_graph, retarget_device
from svdq_compiler.sharded import ShardedCheckpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_tiny_flux(tmp_path_factory.mktemp("flux"))
    model = FluxTransformer2DModel.from_pretrained(folder).eval()
    with torch.device("meta"):
        meta_model = FluxTransformer2DModel(**TINY_FLUX).eval()
    gm = capture_on_meta(meta_model, flux_inputs(), dynamic_shapes=flux_dynamic_shapes())
    return folder, model, gm


def eager(model, **inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def test_meta_capture_has_no_storage_and_no_meta_device_left(tiny):
    _, _, gm = tiny
    assert all(p.device.type == "meta" for p in gm.parameters())
    leftovers = [n for n in gm.graph.nodes
                 if any(isinstance(v, torch.device) and v.type == "meta"
                        for v in list(n.args) + list(n.kwargs.values()))]
    assert leftovers == []
    assert gm.meta["svdq_capture"]["meta_device"]["retargeted_nodes"] > 0
    vals = [v for n in gm.graph.nodes for v in torch.utils._pytree.tree_leaves(n.meta.get("val"))
            if isinstance(v, torch.Tensor)]
    assert vals and {v.device.type for v in vals} == {"cpu"}


def test_meta_captured_graph_with_real_weights_equals_eager(tiny):
    folder, model, gm = tiny
    checkpoint = ShardedCheckpoint.open(folder)
    real = torch.fx.GraphModule(gm, gm.graph)  # a copy that shares the graph, with its own attributes
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        set_attr_value(real, name, checkpoint.read(name))
    for tokens in (16, 36):  # captured at 16 image tokens; the token count is dynamic
        inputs = flux_inputs(tokens=tokens, seed=tokens)
        assert torch.equal(real(**inputs)[0], eager(model, **inputs))


def test_capture_on_meta_refuses_a_real_module():
    with pytest.raises(InputError, match="meta device"):
        capture_on_meta(torch.nn.Linear(4, 4), (torch.randn(2, 4),))


def test_retarget_device_rewrites_nested_arguments():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(torch.ops.aten.arange.start, (0, 4), {"device": torch.device("meta")})
    graph.call_function(torch.ops.aten._to_copy.default, (x,), {"device": torch.device("cuda")})
    assert retarget_device(graph, "cpu") == 1
    devices = [n.kwargs.get("device") for n in graph.nodes if n.op == "call_function"]
    assert devices == [torch.device("cpu"), torch.device("cuda")]


@pytest.fixture(scope="module")
def program(tiny):
    return program_from_graph(tiny[2])


def stream(program, checkpoint, path, extra=None):
    with StreamingArchive(path) as archive:
        for name in program.state_dict:
            archive.add(name, checkpoint.read(name))
        return archive.finish(program, extra)


def test_streamed_archive_loads_with_torch_export_load_and_matches_eager(tiny, program, tmp_path):
    folder, model, _ = tiny
    path = stream(program, ShardedCheckpoint.open(folder), tmp_path / "graph.pt2", {"marker": "svdq"})
    assert [p.name for p in tmp_path.iterdir()] == ["graph.pt2"]
    loaded = torch.export.load(path)
    assert loaded.module().graph is not None
    for tokens in (16, 64):
        inputs = flux_inputs(tokens=tokens, seed=tokens)
        with torch.no_grad():
            assert torch.equal(loaded.module()(**inputs)[0], eager(model, **inputs))
    args, kwargs = loaded.example_inputs  # the real example inputs, not the meta copies traced
    assert not args and kwargs["hidden_states"].device.type == "cpu"
    assert torch.equal(kwargs["hidden_states"], flux_inputs()["hidden_states"])
    extra = {"marker": ""}
    torch.export.load(path, extra_files=extra)
    assert extra["marker"] == "svdq"


def test_streamed_weights_must_match_the_program(tiny, program, tmp_path):
    folder = tiny[0]
    checkpoint = ShardedCheckpoint.open(folder)
    names = list(program.state_dict)
    with pytest.raises(CheckpointError, match="missing"):
        with StreamingArchive(tmp_path / "g.pt2") as archive:
            archive.add(names[0], checkpoint.read(names[0]))
            archive.finish(program)
    with pytest.raises(CheckpointError, match="written as"):
        with StreamingArchive(tmp_path / "g.pt2") as archive:
            for name in names:
                tensor = checkpoint.read(name)
                archive.add(name, tensor[:1] if name == "proj_out.weight" else tensor)
            archive.finish(program)
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_stream_leaves_no_file(tiny, program, tmp_path, monkeypatch):
    folder = tiny[0]
    checkpoint = ShardedCheckpoint.open(folder)
    archive = StreamingArchive(tmp_path / "graph.pt2")
    real_write = archive._zip.writestr
    calls = []

    def write_until_full(info, data):
        calls.append(info)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(info, data)

    monkeypatch.setattr(archive._zip, "writestr", write_until_full)
    with pytest.raises(OSError, match="No space"), archive:
        for name in program.state_dict:
            archive.add(name, checkpoint.read(name))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_filesystem(tmp_path):
    """A 256 KiB tmpfs (needs mount rights; skipped without them)."""
    mount = tmp_path / f"quota-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_real_disk_full_leaves_no_partial_output(tiny, program, small_filesystem):
    folder = tiny[0]
    assert sum(t.numel() * t.element_size() for t in program.state_dict.values()) > 256 << 10
    with pytest.raises((OSError, RuntimeError)):
        stream(program, ShardedCheckpoint.open(folder), small_filesystem / "graph.pt2")
    assert list(Path(small_filesystem).iterdir()) == []


def test_repeated_blocks_are_traced_three_times_and_replicated(tmp_path):
    """A FLUX with 4 double and 5 single blocks: three of each are traced, the rest copied. With real weights the
    graph computes what the eager model does (to float rounding: a full capture differs from eager by the same
    1.7e-6 and from the replicated graph by 0, measured), at the captured and at another token count; the program
    built from it without a second trace saves, loads and runs the same."""
    config = {**TINY_FLUX, "num_layers": 4, "num_single_layers": 5}
    folder = write_tiny_flux(tmp_path / "deep", config)
    model = FluxTransformer2DModel.from_pretrained(folder).eval()
    with torch.device("meta"):
        meta_model = FluxTransformer2DModel(**config).eval()
    gm = capture_on_meta(meta_model, flux_inputs(config), dynamic_shapes=flux_dynamic_shapes())
    assert gm.meta["svdq_capture"]["replicated_blocks"] == {"transformer_blocks": 4, "single_transformer_blocks": 5}
    assert gm.meta["svdq_capture"]["model_config"]["num_single_layers"] == 5
    checkpoint = ShardedCheckpoint.open(folder)
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        set_attr_value(gm, name, checkpoint.read(name))
    loaded = torch.export.load(stream(program_from_graph(gm), checkpoint, tmp_path / "graph.pt2")).module()
    for tokens in (16, 36):
        inputs = flux_inputs(config, tokens=tokens, seed=tokens)
        expected = eager(model, **inputs)
        torch.testing.assert_close(gm(**inputs)[0], expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            assert torch.equal(loaded(**inputs)[0], gm(**inputs)[0])


def test_blocks_that_differ_are_refused():
    """The copy is checked: two traced blocks that do not line up node for node are refused (capture_on_meta then
    traces every block)."""
    from svdq_compiler.errors import CaptureError
    from svdq_compiler.meta_capture import replicate_blocks

    graph = torch.fx.Graph()
    value = graph.placeholder("x")
    for index, op in enumerate((torch.ops.aten.relu.default, torch.ops.aten.gelu.default, torch.ops.aten.relu.default)):
        value = graph.call_function(op, (value,))
        value.meta.update(val=torch.empty(2), nn_module_stack={f"b{index}": (f"blocks.{index}", "Block")})
    graph.output(value)
    with pytest.raises(CaptureError, match="blocks.0 and .1 differ"):
        replicate_blocks(torch.fx.GraphModule(torch.nn.Module(), graph), "blocks", 6)
