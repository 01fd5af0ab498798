"""Sharded safetensors checkpoints: streaming writes, validation before any work, exact reads."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from svdq_compiler.errors import CheckpointError, InputError
from svdq_compiler.sharded import INDEX_NAME, ShardedCheckpoint, plan_shards, write_sharded
from scale_fixtures import TINY_FLUX, checkpoint_tool

SPECS = {f"layer{i}.weight": ((8, 4 + i), torch.bfloat16) for i in range(5)} | {"norm.weight": ((8,), torch.float32)}


def produce(name: str) -> torch.Tensor:
    shape, dtype = SPECS[name]
    generator = torch.Generator().manual_seed(len(name) + shape[-1])
    return torch.randn(shape, generator=generator).to(dtype)


def write(folder: Path, max_bytes: int = 200) -> list[Path]:
    return write_sharded(folder, {"_class_name": "Toy"}, SPECS, produce, max_shard_bytes=max_bytes)


def test_plan_shards_respects_the_limit_and_keeps_order():
    shards = plan_shards(SPECS, 200)
    assert [name for shard in shards for name in shard] == list(SPECS)
    for shard in shards:
        size = sum(torch.Size(SPECS[n][0]).numel() * SPECS[n][1].itemsize for n in shard)
        assert size <= 200 or len(shard) == 1


def test_write_then_read_every_tensor_exactly(tmp_path):
    files = write(tmp_path)
    assert (tmp_path / INDEX_NAME).exists() and len([f for f in files if f.suffix == ".safetensors"]) > 1
    checkpoint = ShardedCheckpoint.open(tmp_path, SPECS)
    assert checkpoint.names() == list(SPECS)
    for name in SPECS:
        assert torch.equal(checkpoint.read(name), produce(name))
    assert checkpoint.read("norm.weight", torch.bfloat16).dtype == torch.bfloat16
    assert not list(tmp_path.glob(".*.tmp"))


def test_single_file_without_index(tmp_path):
    write(tmp_path, max_bytes=1 << 20)
    assert not (tmp_path / INDEX_NAME).exists()
    checkpoint = ShardedCheckpoint.open(tmp_path, SPECS)
    assert torch.equal(checkpoint.read("layer3.weight"), produce("layer3.weight"))


def test_missing_shard_is_named_before_any_read(tmp_path):
    write(tmp_path)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"missing: {victim}"):
        ShardedCheckpoint.open(tmp_path, SPECS)


def test_shape_mismatch_lists_the_tensor_and_both_shapes(tmp_path):
    write(tmp_path)
    wrong = dict(SPECS) | {"layer2.weight": ((8, 7), torch.bfloat16)}
    with pytest.raises(CheckpointError, match=r"layer2.weight: \[8, 6\] in .*needs \[8, 7\]"):
        ShardedCheckpoint.open(tmp_path, wrong)


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    write(tmp_path)
    expected = {k: v for k, v in SPECS.items() if k != "layer0.weight"} | {"extra.bias": ((3,), torch.float32)}
    with pytest.raises(CheckpointError) as caught:
        ShardedCheckpoint.open(tmp_path, expected)
    message = str(caught.value)
    assert "1 tensor(s) missing: extra.bias" in message and "1 unexpected tensor(s): layer0.weight" in message


def test_truncated_shard_is_detected_from_its_header(tmp_path):
    write(tmp_path)
    shard = sorted(tmp_path.glob("*-of-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        ShardedCheckpoint.open(tmp_path, SPECS)


def test_index_pointing_at_the_wrong_shard(tmp_path):
    write(tmp_path)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["layer0.weight"] = shards[-1]
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not in their shard: layer0.weight"):
        ShardedCheckpoint.open(tmp_path, SPECS)


def test_not_a_folder_and_no_weights(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        ShardedCheckpoint.open(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="neither"):
        ShardedCheckpoint.open(tmp_path)


def test_disk_full_mid_write_leaves_nothing(tmp_path):
    calls = []

    def failing(name):
        calls.append(name)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return produce(name)

    with pytest.raises(OSError, match="No space"):
        write_sharded(tmp_path, {}, SPECS, failing, max_shard_bytes=200)
    assert list(tmp_path.iterdir()) == []


def test_tool_writes_a_checkpoint_diffusers_loads(tmp_path):
    from diffusers import FluxTransformer2DModel

    tool = checkpoint_tool()
    assert tool.main(["--out", str(tmp_path), "--config", json.dumps(TINY_FLUX), "--max-shard-gb", "0.00005",
                      "--quiet"]) == 0
    model = FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    config, specs = tool.flux_specs(TINY_FLUX, torch.bfloat16)
    checkpoint = ShardedCheckpoint.open(tmp_path, specs)
    for name, tensor in model.state_dict().items():
        assert torch.equal(checkpoint.read(name), tensor), name
    weight = checkpoint.read("transformer_blocks.0.ff.net.2.weight").float()
    assert weight.std().item() == pytest.approx(weight.shape[1] ** -0.5, rel=0.2)
    # the same command writes the same bytes
    again = tmp_path / "again"
    tool.main(["--out", str(again), "--config", json.dumps(TINY_FLUX), "--quiet"])
    assert torch.equal(ShardedCheckpoint.open(again).read("proj_out.weight"), checkpoint.read("proj_out.weight"))
