"""SDXL-style U-Net (diffusers UNet2DConditionModel): resnets, self/cross-attention transformers, added
time/text embeddings.

Height and width are dynamic in multiples of the total down-sampling factor (2 per down block but the last).
"""

from __future__ import annotations

import torch

from svdq_compiler.models.base import NATIVE_GRID, ModelAdapter, ddpm_step, example_grid, factor_grid, model_dtype, randn

MAX_LATENT = 512  # latent pixels per side: 4096-pixel images with an 8× VAE
# diffusers' up-sampler takes a different branch (an extra .contiguous()) from batch 64 on.
MAX_UNET_BATCH = 63


class UNetAdapter(ModelAdapter):
    name = "unet"
    class_names = ("UNet2DConditionModel",)
    latent_key = "sample"

    def random_config(self):
        # Two levels (a plain and a cross-attention down block, mirrored up), 1×1-conv attention projections,
        # and SDXL's added text/time embedding.
        return dict(sample_size=16, in_channels=4, out_channels=4,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64),
                    layers_per_block=1, transformer_layers_per_block=(1, 1), cross_attention_dim=64,
                    attention_head_dim=(2, 2), norm_num_groups=8, addition_embed_type="text_time",
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                    use_linear_projection=False)

    def downsampling(self, model) -> int:
        return 2 ** (len(model.config.block_out_channels) - 1)

    def example_inputs(self, model, batch=1, tokens=None, seed=0, text_tokens=None):
        config = model.config
        factor = self.downsampling(model)
        if tokens is None:
            native = config.sample_size // factor if config.sample_size else NATIVE_GRID
            rows, cols = (units * factor for units in example_grid(None, native, MAX_LATENT // factor))
        else:
            rows, cols = factor_grid(tokens, factor, what="latent positions")
        generator = torch.Generator().manual_seed(seed)
        dtype = model_dtype(model)
        inputs = dict(
            sample=randn(generator, batch, config.in_channels, rows, cols, dtype=dtype),
            timestep=torch.full((batch,), 500.0, dtype=dtype),
            encoder_hidden_states=randn(generator, batch, text_tokens or self.example_text_tokens,
                                        config.cross_attention_dim, dtype=dtype),
        )
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            height, width = rows * 8, cols * 8  # pixels, with an 8× VAE
            time_ids = torch.tensor([[height, width, 0, 0, height, width]] * batch, dtype=dtype)
            inputs["added_cond_kwargs"] = dict(text_embeds=randn(generator, batch, pooled, dtype=dtype),
                                               time_ids=time_ids)
        inputs["return_dict"] = False
        return inputs

    def grid_unit(self, model):
        return self.downsampling(model)

    def dim_limits(self, model):
        factor = self.downsampling(model)
        spatial = (1 if factor > 1 else 2, MAX_LATENT // factor)
        return {"batch": (1, MAX_UNET_BATCH), "height": spatial, "width": spatial}

    def tokens_of(self, model, inputs):
        return inputs["sample"].shape[2], inputs["sample"].shape[3]

    def noisy_step(self, model, clean, noise, step, num_steps, batch):
        latent, timestep = ddpm_step(clean, noise, step, num_steps)
        return dict(sample=latent, timestep=torch.full((batch,), float(timestep), dtype=latent.dtype))

    def role_hints(self, model):
        return {
            r"^(time_embedding|add_embedding)\.": "embed",
            r"\.time_emb_proj$": "adaln",
            r"\.attn2\.to_(k|v)$": "cross_kv",
            r"^conv_in$": "embed",
            r"^conv_out$": "final",
        }

