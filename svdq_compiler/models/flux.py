"""FLUX.1 (diffusers FluxTransformer2DModel): double-stream and single-stream blocks, RoPE from position ids.

The image sequence is a graph input of its own length (packed 2×2 latent patches) and positions come in as
`img_ids`, so the image token count is dynamic with no relation to a height or width.
"""

from __future__ import annotations

from typing import Any

import torch

from svdq_compiler.models.base import ModelAdapter, factor_grid, flow_step, model_dtype, randn


class FluxAdapter(ModelAdapter):
    name = "flux"
    class_names = ("FluxTransformer2DModel",)
    repeated_blocks = (("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers"))
    default_tokens = 256

    def random_config(self) -> dict[str, Any]:
        # Two heads of 32 (inner dim 64, one int4 group); one block of each kind; guidance embedding as in
        # FLUX.1-dev; RoPE axes that sum to the head dim.
        return dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
                    num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=32, guidance_embeds=True,
                    axes_dims_rope=(8, 12, 12))

    def example_inputs(self, model, batch=1, tokens=None, seed=0, text_tokens=None):
        config = model.config
        rows, cols = factor_grid(tokens or self.default_tokens, what="image tokens")
        generator = torch.Generator().manual_seed(seed)
        dtype = model_dtype(model)
        text = text_tokens or self.example_text_tokens
        inputs: dict[str, Any] = dict(
            hidden_states=randn(generator, batch, rows * cols, config.in_channels, dtype=dtype),
            encoder_hidden_states=randn(generator, batch, text, config.joint_attention_dim, dtype=dtype),
            pooled_projections=randn(generator, batch, config.pooled_projection_dim, dtype=dtype),
            timestep=torch.full((batch,), 0.5, dtype=dtype),
            img_ids=image_ids(rows, cols, dtype),
            txt_ids=torch.zeros(text, 3, dtype=dtype),
        )
        if config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5, dtype=dtype)
        inputs["return_dict"] = False
        return inputs

    def tokens_of(self, model, inputs):
        return inputs["hidden_states"].shape[1]

    def noisy_step(self, model, clean, noise, step, num_steps, batch):
        latent, sigma = flow_step(clean, noise, step, num_steps)
        # The FLUX pipeline passes t/1000 = σ; the model scales it back by 1000.
        return dict(hidden_states=latent, timestep=torch.full((batch,), sigma, dtype=latent.dtype))

    def role_hints(self, model):
        return {
            r"^(x_embedder|context_embedder)$": "embed",
            r"^time_text_embed\.": "embed",
            r"(^|\.)(norm1|norm1_context|norm|norm_out)\.linear$": "adaln",
            r"^proj_out$": "final",
        }


def image_ids(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FLUX image position ids [rows·cols, 3]: (0, row, col) per packed latent, row-major."""
    ids = torch.zeros(rows, cols, 3, dtype=dtype)
    ids[..., 1] = torch.arange(rows, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)
