"""load_model from disk: diffusers model and pipeline folders, single-file checkpoints (config beside, in the
metadata, or inferred for FLUX), dtypes, and clear errors. Nothing is downloaded."""

import json

import pytest
import torch
from safetensors.torch import save_file

from svdq_compiler.errors import CheckpointError, InputError
from svdq_compiler.models import adapter_for, load_model
from svdq_compiler.models.loading import write_single_file


def same_model(a, b):
    """Equal weights and equal outputs on the adapter's example inputs."""
    assert type(a) is type(b)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    inputs = adapter_for(a).example_inputs(a, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(a(**inputs)[0], b(**inputs)[0], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pixart():
    return load_model("random:pixart")


def test_model_folder_and_pipeline_folder(pixart, tmp_path):
    pixart.save_pretrained(tmp_path / "model")
    same_model(pixart, load_model(tmp_path / "model"))
    pipeline = tmp_path / "pipeline"
    pixart.save_pretrained(pipeline / "transformer")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    same_model(pixart, load_model(str(pipeline)))


def test_unet_pipeline_folder(tmp_path):
    unet = load_model("random:unet")
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    same_model(unet, load_model(tmp_path))


def test_single_file_with_config_in_metadata_or_beside(pixart, tmp_path):
    same_model(pixart, load_model(write_single_file(pixart, tmp_path / "meta" / "pixart.safetensors")))
    beside = tmp_path / "beside"
    beside.mkdir()
    save_file(pixart.state_dict(), str(beside / "pixart.safetensors"))
    (beside / "config.json").write_text(pixart.to_json_string())
    same_model(pixart, load_model(beside / "pixart.safetensors"))


def test_flux_single_file_config_is_inferred_from_shapes(tmp_path):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    # A head of 32 with FLUX.1's RoPE proportions (16, 56, 56)/128, as the inference assumes.
    flux = FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
                                  num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=32,
                                  guidance_embeds=True, axes_dims_rope=(4, 14, 14)).eval()
    save_file(flux.state_dict(), str(tmp_path / "flux.safetensors"))
    loaded = load_model(tmp_path / "flux.safetensors")
    for key in ["num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "in_channels"]:
        assert loaded.config[key] == flux.config[key], key
    assert loaded.out_channels == flux.out_channels
    assert tuple(loaded.config.axes_dims_rope) == (4, 14, 14)
    same_model(flux, loaded)


def test_checkpoint_dtype_is_kept_unless_converted(pixart, tmp_path):
    half = load_model("random:pixart", dtype=torch.bfloat16)
    path = write_single_file(half, tmp_path / "bf16.safetensors")
    assert next(load_model(path).parameters()).dtype == torch.bfloat16
    assert next(load_model(path, dtype=torch.float32).parameters()).dtype == torch.float32


def test_bad_paths_are_clear_errors(pixart, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither model_index.json nor config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(InputError, match="no transformer/ or unet/"):
        load_model(tmp_path / "pipe")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(InputError, match="'AutoencoderKL' is not a diffusers denoiser.*FluxTransformer2DModel"):
        load_model(tmp_path / "vae")
    (tmp_path / "nameless").mkdir()
    (tmp_path / "nameless" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no _class_name"):
        load_model(tmp_path / "nameless")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(InputError, match="cannot load a model from a .bin file"):
        load_model(tmp_path / "weights.bin")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "broken.safetensors")


def test_single_file_without_config_or_with_the_wrong_one(pixart, tmp_path):
    save_file(pixart.state_dict(), str(tmp_path / "pixart.safetensors"))
    with pytest.raises(CheckpointError, match="carries no model config.*config.json beside"):
        load_model(tmp_path / "pixart.safetensors")
    wrong = dict(json.loads(pixart.to_json_string()), num_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(CheckpointError, match="do not fit PixArtTransformer2DModel"):
        load_model(tmp_path / "pixart.safetensors")
