"""The tiny FLUX: packing, schedule, text encoder, the Euler sampler, and the shipped model."""

import numpy as np
import pytest
import torch

from svdq_compiler.errors import CheckpointError, InputError
from svdq_compiler.models import tiny_flux
from svdq_compiler.models.fmnist import PROMPTS
from svdq_compiler.models.tiny_flux import (SamplerConfig, TextEncoderConfig, TinyFluxPipeline, TinyTextEncoder,
                                            build_transformer, image_ids, images_to_tokens, pack_latents,
                                            shifted_sigmas, tokens_to_images, unpack_latents)

TINY_CONFIG = {**tiny_flux.TRANSFORMER_CONFIG, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
               "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
               "axes_dims_rope": (4, 6, 6)}


@pytest.fixture(scope="module")
def random_pipeline():
    """A randomly initialized tiny FLUX and text encoder: the real classes, small widths."""
    torch.manual_seed(0)
    transformer = build_transformer(TINY_CONFIG).eval()
    encoder = TinyTextEncoder(TextEncoderConfig.for_prompts(PROMPTS, width=32, layers=1, heads=2,
                                                            joint_attention_dim=32, pooled_projection_dim=32))
    return TinyFluxPipeline(transformer, encoder, SamplerConfig(num_steps=3, guidance_scale=2.0, shift=1.5))


@pytest.fixture(scope="module")
def shipped_pipeline():
    return tiny_flux.load_pipeline()


def test_packing_is_flux_2x2_packing():
    """Token (row r, column c) holds channel k·4 + dy·2 + dx = latent[k, 2r + dy, 2c + dx], as FluxPipeline packs."""
    latents = torch.randn(2, 4, 16, 16)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 64, 16)
    row, col, k, dy, dx = 3, 5, 2, 1, 0
    assert tokens[1, row * 8 + col, k * 4 + dy * 2 + dx] == latents[1, k, 2 * row + dy, 2 * col + dx]
    assert torch.equal(unpack_latents(tokens, 16, 16), latents)


def test_image_tokens_round_trip():
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    tokens = images_to_tokens(images)
    assert tokens.shape == (3, 64, 16)
    assert torch.equal(tokens_to_images(tokens), images)


@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0])
def test_sigma_schedule_matches_flux_scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6))
    torch.testing.assert_close(shifted_sigmas(6, shift), scheduler.sigmas.float())


def test_sigma_schedule_rejects_bad_arguments():
    with pytest.raises(InputError, match="num_steps"):
        shifted_sigmas(0, 1.0)
    with pytest.raises(InputError, match="shift"):
        shifted_sigmas(4, 0.0)


def test_tokenizer_is_a_fixed_word_vocabulary(random_pipeline):
    encoder = random_pipeline.text_encoder
    ids = encoder.tokenize(["an ankle boot", "A Sneaker.", ""])
    vocab = encoder.config.vocab
    assert [vocab[i] for i in ids[0, :3]] == ["an", "ankle", "boot"]
    assert [vocab[i] for i in ids[1, :2]] == ["a", "sneaker"]
    assert (ids[2] == 0).all() and (ids[0, 3:] == 0).all()
    with pytest.raises(InputError, match="vocabulary: hat.*sneaker"):
        encoder.tokenize(["a hat"])
    with pytest.raises(InputError, match="more than"):
        encoder.tokenize(["a " * 9])


def test_text_encoder_shapes(random_pipeline):
    hidden, pooled = random_pipeline.encode(["a bag", ""])
    assert hidden.shape == (2, 8, 32) and pooled.shape == (2, 32)
    assert not torch.allclose(hidden[0], hidden[1])


def test_sampler_is_deterministic_and_independent_of_the_batch(random_pipeline):
    images = random_pipeline(["a bag", "a coat", "a dress"], seeds=[5, 6, 7])
    assert images.shape == (3, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(random_pipeline(["a bag", "a coat", "a dress"], seeds=[5, 6, 7]), images)
    torch.testing.assert_close(random_pipeline(["a coat"], seeds=[6]), images[1:2], atol=1e-5, rtol=0)
    assert not torch.allclose(random_pipeline(["a coat"], seeds=[7]), images[1:2])


def test_sampler_steps_and_guidance(random_pipeline):
    calls = []
    random_pipeline(["a bag"], seeds=0, num_steps=4, on_step=lambda step, inputs: calls.append(inputs))
    assert len(calls) == 4
    torch.testing.assert_close(torch.stack([c["timestep"][0] for c in calls]),
                               shifted_sigmas(4, random_pipeline.sampler.shift)[:4])
    assert calls[0]["hidden_states"].shape == (2, 64, 16)  # conditional and unconditional rows together
    unguided = []
    random_pipeline(["a bag"], seeds=0, guidance_scale=1.0, on_step=lambda step, inputs: unguided.append(inputs))
    assert unguided[0]["hidden_states"].shape == (1, 64, 16)


def test_one_unguided_euler_step_lands_on_noise_minus_velocity(random_pipeline):
    """From σ = 1 to 0 in one step: x0 = ε − v(ε, σ=1)."""
    noise = tiny_flux.initial_noise([3])
    hidden, pooled = random_pipeline.encode(["a shirt"])
    with torch.no_grad():
        velocity = random_pipeline.transformer(hidden_states=noise, encoder_hidden_states=hidden,
                                               pooled_projections=pooled, timestep=torch.ones(1),
                                               img_ids=image_ids(8, 8), txt_ids=tiny_flux.text_ids(8)).sample
    expected = tiny_flux.to_unit_range(tokens_to_images(noise - velocity))
    image = random_pipeline(["a shirt"], seeds=[3], num_steps=1, guidance_scale=1.0)
    torch.testing.assert_close(image, expected)


def test_sampler_accepts_a_transformer_returning_a_diffusers_output(random_pipeline):
    model = random_pipeline.transformer
    as_output = random_pipeline.with_transformer(lambda **kwargs: model(**{**kwargs, "return_dict": True}))
    torch.testing.assert_close(as_output(["a bag"], seeds=1), random_pipeline(["a bag"], seeds=1))


def test_sampler_rejects_mismatched_seeds(random_pipeline):
    with pytest.raises(InputError, match="one seed per prompt"):
        random_pipeline(["a bag", "a coat"], seeds=[1])


def test_calibration_inputs_follow_sampler_trajectories(random_pipeline):
    inputs = tiny_flux.calib_inputs(random_pipeline.transformer, num_prompts=3, num_steps=2, seed=0,
                                    pipeline=random_pipeline)
    assert len(inputs) == 3 * 2  # prompts × steps, each call with its conditional and unconditional rows
    sigmas = shifted_sigmas(3, 1.5)
    assert [float(i["timestep"][0]) for i in inputs[:2]] == [float(sigmas[0]), float(sigmas[2])]
    first = inputs[0]
    assert first["hidden_states"].shape == (2, 64, 16) and first["encoder_hidden_states"].shape == (2, 8, 32)
    torch.testing.assert_close(first["hidden_states"][:1], tiny_flux.initial_noise([0]))
    with torch.no_grad():
        assert tiny_flux.transformer_output(random_pipeline.transformer(**first)).shape == (2, 64, 16)
    batched = tiny_flux.calib_inputs(random_pipeline.transformer, 3, 2, 0, batch=2, pipeline=random_pipeline)
    assert [b["hidden_states"].shape[0] for b in batched] == [4, 4, 2, 2]
    torch.testing.assert_close(batched[0]["hidden_states"][:1], first["hidden_states"][:1])
    with pytest.raises(InputError, match="at most 3"):
        tiny_flux.calib_inputs(random_pipeline.transformer, 2, 5, 0, pipeline=random_pipeline)


def test_example_inputs_are_guided_sampler_calls(random_pipeline):
    inputs = tiny_flux.example_inputs(random_pipeline.transformer, batch=2, tokens=16,
                                      text_encoder=random_pipeline.text_encoder)
    assert inputs["hidden_states"].shape == (4, 16, 16) and inputs["img_ids"].shape == (16, 3)
    torch.testing.assert_close(inputs["hidden_states"][:2], inputs["hidden_states"][2:])
    expected_hidden, _ = random_pipeline.encode(["a t-shirt", "a trouser", "", ""])
    torch.testing.assert_close(inputs["encoder_hidden_states"], expected_hidden)
    with torch.no_grad():
        assert random_pipeline.transformer(**inputs)[0].shape == (4, 16, 16)


def test_missing_assets_give_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="train_tiny_flux"):
        tiny_flux.load_pipeline(tmp_path)


def test_transformer_is_stored_in_half_and_loaded_in_float32(tmp_path, random_pipeline):
    from safetensors import safe_open

    transformer = random_pipeline.transformer
    tiny_flux.save_transformer(transformer, tmp_path)
    with safe_open(str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as stored:
        assert {stored.get_slice(name).get_dtype() for name in stored.keys()} == {"F16"}
    loaded = tiny_flux.load_transformer(tmp_path)
    assert not (tmp_path / "transformer.tmp").exists()
    for (name, want), got in zip(transformer.state_dict().items(), loaded.state_dict().values()):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, want.half().float(), atol=0, rtol=0)


def test_shipped_model_samples_deterministically(shipped_pipeline):
    assert sum(p.numel() for p in shipped_pipeline.transformer.parameters()) > 5_000_000
    assert {p.dtype for p in shipped_pipeline.transformer.parameters()} == {torch.float32}
    first = shipped_pipeline(["a trouser"], seeds=[0], num_steps=2)
    assert first.shape == (1, 1, 28, 28)
    torch.testing.assert_close(shipped_pipeline(["a trouser"], seeds=[0], num_steps=2), first, atol=0, rtol=0)


def test_shipped_assets_are_small():
    files = [p for p in tiny_flux.TINY_FLUX_DIR.rglob("*") if p.is_file()]
    assert {"samples.png", "README.md", "sampler.json", "training.json"} <= {p.name for p in files}
    assert sum(p.stat().st_size for p in files if p.suffix == ".safetensors") <= 20 * 2 ** 20


def test_shipped_calibration_inputs(shipped_pipeline):
    inputs = tiny_flux.calib_inputs(shipped_pipeline.transformer, num_prompts=1, num_steps=2, seed=0)
    assert len(inputs) == 2
    assert inputs[0]["hidden_states"].shape == (2, 64, 16)  # the shipped sampler is guided
    assert float(inputs[0]["timestep"][0]) == 1.0 and float(inputs[1]["timestep"][0]) < 0.1


def test_builtin_name_and_adapter():
    from svdq_compiler.models import adapter_for, load_model

    model = load_model("tiny-flux")
    adapter = adapter_for(model)
    assert isinstance(adapter, tiny_flux.TinyFluxAdapter)
    assert adapter_for(build_transformer(TINY_CONFIG)).name == "flux"  # a plain FLUX keeps the generic FLUX path
    inputs = adapter.example_inputs(model)
    assert inputs["hidden_states"].shape == (2, 64, 16) and inputs["return_dict"] is False
    with pytest.raises(InputError, match="trained 8×8"):
        adapter.calib_inputs(model, 1, 1, tokens=256)


@pytest.mark.slow
def test_shipped_model_captures_with_a_dynamic_batch(shipped_pipeline):
    """Captured on the adapter's example (one guided prompt), the graph serves the sampler at other batch sizes."""
    import svdq_compiler
    from svdq_compiler.models import adapter_for

    model = shipped_pipeline.transformer
    gm = svdq_compiler.capture(model, adapter_for(model).example_inputs(model))
    eager = shipped_pipeline(["a bag", "a sandal", "a coat"], seeds=[0, 1, 2], num_steps=2)
    torch.testing.assert_close(shipped_pipeline.with_transformer(gm)(["a bag", "a sandal", "a coat"], seeds=[0, 1, 2],
                                                                      num_steps=2), eager, atol=1e-4, rtol=0)
