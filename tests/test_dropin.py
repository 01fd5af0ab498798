"""svdq_compiler.load(...) as `pipe.transformer`: a diffusers FluxPipeline of small random components (tiny
CLIP and T5 text encoders and tokenizers built here, a tiny VAE; nothing downloaded) runs end to end on the
loaded int4 graph, close to the same pipeline on the original transformer."""

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

import svdq_compiler
from svdq_compiler.capture import model_config
from svdq_compiler.dropin import CompiledModel
from svdq_compiler.errors import InputError
from svdq_compiler.models import adapter_for, load_model

WORDS = ["[PAD]", "[UNK]", "a", "red", "shoe", "on", "white", "ground", "</s>"]


def tokenizer(max_length):
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   model_max_length=max_length)


def flux_pipeline(transformer):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = transformer.config
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=config.pooled_projection_dim,
                                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=16)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=config.joint_attention_dim, d_kv=16, d_ff=64,
                                 num_layers=1, num_heads=2)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=config.in_channels // 4, norm_num_groups=4, shift_factor=0.1,
                        scaling_factor=0.5).eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=tokenizer(8), text_encoder_2=t5, tokenizer_2=tokenizer(16), transformer=transformer)


def generate(pipe):
    return pipe(prompt="a red shoe", height=16, width=16, num_inference_steps=2, guidance_scale=3.5,
                max_sequence_length=8, output_type="pt", generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    model = load_model("random:flux").eval()
    adapter = adapter_for(model)
    config = svdq_compiler.QuantConfig.preset("int4", calib_prompts=1, calib_steps=2, calib_rows=64)
    with torch.no_grad():
        gm = svdq_compiler.compile(model, adapter.example_inputs(model, batch=1), config, adapter=adapter)
    path = svdq_compiler.save(gm, tmp_path_factory.mktemp("dropin") / "graph.pt")
    return model, svdq_compiler.load(path)


def test_a_flux_pipeline_runs_end_to_end_on_the_loaded_graph(loaded):
    model, compiled = loaded
    assert isinstance(compiled, CompiledModel)
    assert dict(compiled.config) == model_config(model) and compiled.config.in_channels == model.config.in_channels
    assert (compiled.dtype, compiled.device) == (model.dtype, model.device)
    pipe = flux_pipeline(model)
    with torch.no_grad():
        expected = generate(pipe)
        pipe.transformer = compiled
        assert pipe.transformer is compiled
        images = generate(pipe)
    assert images.shape == expected.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert (images - expected).norm() / expected.norm() < 0.1


def test_the_call_convention_of_a_diffusers_transformer(loaded):
    model, compiled = loaded
    inputs = adapter_for(model).example_inputs(model, batch=1, seed=3)
    inputs.pop("return_dict", None)
    with torch.no_grad():
        as_tuple = compiled(**inputs, return_dict=False, joint_attention_kwargs=None)
        as_output = compiled(**inputs, joint_attention_kwargs={})
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_output.sample, as_tuple[0], rtol=0, atol=0)
    with pytest.raises(InputError, match=r"joint_attention_kwargs=\{'scale': 0.5\} asks for something"):
        compiled(**inputs, joint_attention_kwargs={"scale": 0.5})
    with pytest.raises(InputError, match=r"does not take \['mask'\]"):
        compiled(**inputs, mask=torch.ones(1))


def test_the_wrapped_graph_saves_and_inspects_like_a_graph_module(loaded, tmp_path):
    model, compiled = loaded
    again = svdq_compiler.save(compiled, tmp_path / "again.pt")
    reloaded = svdq_compiler.load(again)
    inputs = adapter_for(model).example_inputs(model, batch=1, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs)[0], compiled(**inputs)[0], rtol=0, atol=0)
    assert any(n.op == "call_function" and "svdq" in str(n.target) for n in reloaded.graph.nodes)
