"""PixArt-α/Σ (diffusers PixArtTransformer2DModel): self- and cross-attention blocks with AdaLN-single.

Height and width are dynamic in multiples of the patch size. The sincos position embedding is rebuilt in Python
from the patch grid, which makes torch.export record size guards that do not change the traced graph (see
`sincos_guard_relaxation`).
"""

from __future__ import annotations

import torch

from svdq_compiler.models.base import PatchifiedAdapter, ddpm_step


class PixArtAdapter(PatchifiedAdapter):
    name = "pixart"
    class_names = ("PixArtTransformer2DModel",)

    def random_config(self):
        # PixArt-Σ's structure: AdaLN-single, cross-attention to a caption projection, learned sigma (8 output
        # channels for 4 latent channels), no resolution/aspect-ratio conditions.
        return dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=1,
                    cross_attention_dim=64, caption_channels=48, sample_size=8, patch_size=2,
                    norm_type="ada_norm_single", use_additional_conditions=False, interpolation_scale=1,
                    attention_type="default")

    def conditioning(self, model, batch, text, generator, dtype, height, width):
        inputs = dict(encoder_attention_mask=torch.ones(batch, text, dtype=dtype),
                      timestep=torch.full((batch,), 500, dtype=torch.long))
        if model.use_additional_conditions:
            # Pixel size of the image the latent decodes to (8× VAE), and its aspect ratio.
            inputs["added_cond_kwargs"] = dict(
                resolution=torch.tensor([[height * 8, width * 8]] * batch, dtype=dtype),
                aspect_ratio=torch.tensor([[height / width]] * batch, dtype=dtype))
        return inputs

    def noisy_step(self, model, clean, noise, step, num_steps, batch):
        latent, timestep = ddpm_step(clean, noise, step, num_steps)
        return dict(hidden_states=latent, timestep=torch.full((batch,), timestep, dtype=torch.long))

    def guard_relaxation(self, model, inputs):
        return sincos_guard_relaxation(model.pos_embed, inputs["hidden_states"])

    def role_hints(self, model):
        return {
            r"^pos_embed\.proj$": "embed",
            r"^(caption_projection|adaln_single\.emb)\.": "embed",
            r"^adaln_single\.linear$": "adaln",
            r"\.attn2\.to_(k|v)$": "cross_kv",
            r"^proj_out$": "final",
        }


def sincos_guard_relaxation(patch_embed, latent: torch.Tensor) -> str | None:
    """Why the size guards of a graph traced through diffusers' sincos PatchEmbed can be dropped, or None.

    Off the native grid, PatchEmbed rebuilds the position embedding with `get_2d_sincos_pos_embed`, whose
    reshapes make torch.export guard the grid (height ≠ width, width not dividing height, not the native size):
    bookkeeping for strides, not a different graph. At the native grid it reads a stored buffer instead, a
    genuinely different graph, so an example on the native grid keeps its guards. The rebuilt embedding equals
    the buffer there, so the relaxed graph serves the native size too (tests/test_models.py checks square,
    non-square and native sizes against eager).
    """
    if patch_embed is None or getattr(patch_embed, "pos_embed", None) is None or patch_embed.pos_embed_max_size:
        return None
    rows, cols = latent.shape[-2] // patch_embed.patch_size, latent.shape[-1] // patch_embed.patch_size
    if (rows, cols) == (patch_embed.height, patch_embed.width):
        return None
    return ("the sincos position embedding is rebuilt from the patch grid; torch.export's guards on the grid "
            "come from reshape stride bookkeeping and do not change the graph")
