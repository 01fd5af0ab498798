"""Stable Diffusion 3 / 3.5 (diffusers SD3Transformer2DModel): joint (MM-DiT) attention over image and text.

Height and width are dynamic in multiples of the patch size, up to the cropped position embedding's size
(`pos_embed_max_size` patches per side).
"""

from __future__ import annotations

import torch

from svdq_compiler.models.base import PatchifiedAdapter, randn


class SD3Adapter(PatchifiedAdapter):
    name = "sd3"
    class_names = ("SD3Transformer2DModel",)
    text_channels = "joint_attention_dim"

    def random_config(self):
        # Two blocks: the first with SD3.5's second (dual) attention, the last context-pre-only; RMS QK-norm.
        return dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32,
                    num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=64,
                    pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0,),
                    qk_norm="rms_norm")

    def max_grid(self, model):
        return model.config.pos_embed_max_size

    def conditioning(self, model, batch, text, generator, dtype, height, width):
        return dict(pooled_projections=randn(generator, batch, model.config.pooled_projection_dim, dtype=dtype),
                    timestep=torch.full((batch,), 500.0, dtype=dtype))

    def role_hints(self, model):
        return {
            r"^pos_embed\.proj$": "embed",
            r"^(context_embedder|time_text_embed\..*)$": "embed",
            r"(^|\.)(norm1|norm1_context|norm_out)\.linear$": "adaln",
            r"^proj_out$": "final",
        }
