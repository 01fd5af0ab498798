"""Tiny random-weight diffusers pipelines of the five families `calibration_set.collect` drives, built from code
(no downloads): the project's random denoisers (`ModelAdapter.random_config`) with tiny CLIP, T5 and Gemma text
encoders sized to them, tiny VAEs, and word-level tokenizers built from a vocabulary in code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from svdq_compiler.calibration_set import read_prompts

SPECIAL = ("<pad>", "<unk>", "<s>", "</s>")


def tokenizer(max_length: int):
    """A word-level fast tokenizer over the words of the shipped captions (lower-cased, punctuation split off);
    other words map to <unk>. It has the call convention the pipelines use (padding, truncation, tensors)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for prompt in read_prompts() for word in re.findall(r"\w+|[^\w\s]", prompt.lower())})
    vocab = {token: index for index, token in enumerate([*SPECIAL, *words])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=max_length)


def vocab_size() -> int:
    return len(tokenizer(8))


def clip(hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=projection or hidden, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5(width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size(), d_model=width, d_ff=2 * width, d_kv=16, num_layers=1,
                                   num_heads=2, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)).eval()


def vae_kl(latent_channels: int, **options):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=32, **options).eval()


def flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from svdq_compiler.models.flux import FluxAdapter

    transformer = FluxAdapter().random_model()
    config = transformer.config
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=clip(config.pooled_projection_dim),
                        tokenizer=tokenizer(77), text_encoder_2=t5(config.joint_attention_dim), tokenizer_2=tokenizer(16),
                        vae=vae_kl(config.in_channels // 4, use_quant_conv=False, use_post_quant_conv=False,
                                   shift_factor=0.1, scaling_factor=1.5),
                        transformer=transformer)


def sd3_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from svdq_compiler.models.sd3 import SD3Adapter

    transformer = SD3Adapter().random_model()
    config = transformer.config
    # The two CLIP encoders' hidden states are concatenated and padded to the T5 width (joint_attention_dim);
    # their pooled projections are concatenated into pooled_projection_dim.
    half = config.pooled_projection_dim // 2
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer,
        vae=vae_kl(config.in_channels, shift_factor=0.1, scaling_factor=1.5),
        text_encoder=clip(config.joint_attention_dim // 2, half), tokenizer=tokenizer(77),
        text_encoder_2=clip(config.joint_attention_dim // 2, half), tokenizer_2=tokenizer(77),
        text_encoder_3=t5(config.joint_attention_dim), tokenizer_3=tokenizer(16))


def pixart_pipeline():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    from svdq_compiler.models.pixart import PixArtAdapter

    transformer = PixArtAdapter().random_model()
    return PixArtSigmaPipeline(tokenizer=tokenizer(16), text_encoder=t5(transformer.config.caption_channels),
                               vae=vae_kl(transformer.config.in_channels), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())


def sana_pipeline():
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline
    from transformers import Gemma2Config, Gemma2Model

    from svdq_compiler.models.sana import SanaAdapter

    transformer = SanaAdapter().random_model()
    width = transformer.config.caption_channels
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=vocab_size(), hidden_size=width, intermediate_size=2 * width,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=width // 2, pad_token_id=0, bos_token_id=2,
                                            eos_token_id=3)).eval()
    vae = AutoencoderDC(in_channels=3, latent_channels=transformer.config.in_channels, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407).eval()
    return SanaPipeline(tokenizer=tokenizer(16), text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def sdxl_pipeline():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from svdq_compiler.models.unet import UNetAdapter

    unet = UNetAdapter().random_model()
    config = unet.config
    # The U-Net's cross-attention reads both CLIP encoders' hidden states side by side; its added embedding reads
    # the second encoder's pooled projection and six time ids.
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return StableDiffusionXLPipeline(
        vae=vae_kl(config.in_channels), text_encoder=clip(config.cross_attention_dim // 2), tokenizer=tokenizer(77),
        text_encoder_2=clip(config.cross_attention_dim // 2, pooled), tokenizer_2=tokenizer(77), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))


PIPELINES: dict[str, Callable] = {"flux": flux_pipeline, "sd3": sd3_pipeline, "pixart": pixart_pipeline,
                                  "sana": sana_pipeline, "unet": sdxl_pipeline}


def write_pipeline(family: str, folder: Path) -> Path:
    """The family's tiny pipeline saved as a diffusers pipeline folder (model_index.json and components)."""
    torch.manual_seed(0)
    pipe = PIPELINES[family]()
    pipe.save_pretrained(folder)
    return folder
