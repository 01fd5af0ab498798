"""Tiny random configs of the two diffusers classes torch.export cannot capture (issue 19), with their inputs."""

import torch
from diffusers import HiDreamImageTransformer2DModel, Lumina2Transformer2DModel

HIDREAM = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
               attention_head_dim=32, num_attention_heads=2, caption_channels=[64, 64], text_emb_dim=64,
               num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(8, 12, 12), max_resolution=(32, 32),
               llama_layers=[0, 1])
LUMINA2 = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_layers=1, num_refiner_layers=1,
               num_attention_heads=2, num_kv_heads=1, multiple_of=64, norm_eps=1e-5, axes_dim_rope=(8, 12, 12),
               axes_lens=(64, 32, 32), cap_feat_dim=64)


def hidream(seed=0):
    torch.manual_seed(seed)
    return HiDreamImageTransformer2DModel(**HIDREAM).eval()


def lumina2(seed=0):
    torch.manual_seed(seed)
    return Lumina2Transformer2DModel(**LUMINA2).eval()


def hidream_inputs(size=8, text=4, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, size, size, generator=g), timesteps=torch.tensor([500] * batch),
                encoder_hidden_states_t5=torch.randn(batch, text, 64, generator=g),
                encoder_hidden_states_llama3=torch.randn(2, batch, text, 64, generator=g),
                pooled_embeds=torch.randn(batch, 64, generator=g), return_dict=False)


def lumina2_inputs(size=8, text=4, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text, dtype=torch.bool)
    return dict(hidden_states=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor([0.5] * batch),
                encoder_hidden_states=torch.randn(batch, text, 64, generator=g), encoder_attention_mask=mask,
                return_dict=False)
