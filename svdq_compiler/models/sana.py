"""Sana (diffusers SanaTransformer2DModel): linear self-attention, cross-attention, GLUMBConv feed-forward.

The feed-forward is convolutional (1×1 expand, 3×3 depthwise, 1×1 project), so its 1×1 convolutions are the
linears there. Height and width are dynamic in multiples of the patch size.
"""

from __future__ import annotations

import torch

from svdq_compiler.models.base import PatchifiedAdapter
from svdq_compiler.models.pixart import sincos_guard_relaxation


class SanaAdapter(PatchifiedAdapter):
    name = "sana"
    class_names = ("SanaTransformer2DModel",)

    def random_config(self):
        return dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
                    num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
                    caption_channels=48, mlp_ratio=2.5, sample_size=16, patch_size=1)

    def conditioning(self, model, batch, text, generator, dtype, height, width):
        inputs = dict(timestep=torch.full((batch,), 500.0, dtype=dtype),
                      encoder_attention_mask=torch.ones(batch, text, dtype=dtype))
        if model.config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 4.5, dtype=dtype)
        return inputs

    def guard_relaxation(self, model, inputs):
        return sincos_guard_relaxation(model.patch_embed, inputs["hidden_states"])

    def role_hints(self, model):
        return {
            r"^patch_embed\.proj$": "embed",
            r"^(caption_projection|time_embed\.emb)\.": "embed",
            r"^time_embed\.linear$": "adaln",
            r"\.attn2\.to_(k|v)$": "cross_kv",
            r"\.ff\.conv_depth$": "conv",
            r"^proj_out$": "final",
        }
