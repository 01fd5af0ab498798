"""Tiny random configs of the two diffusers classes torch.export cannot capture (issue 19), with their inputs;
and a diffusers model with an input no name rule of the auto adapter knows."""

import torch
from diffusers import ConfigMixin, HiDreamImageTransformer2DModel, Lumina2Transformer2DModel, ModelMixin
from diffusers.configuration_utils import register_to_config

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


class Wobbly(ModelMixin, ConfigMixin):
    """A diffusers model whose `wobble` input no name rule of the auto adapter knows."""

    @register_to_config
    def __init__(self, width: int = 64):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(2))
        self.out = torch.nn.Linear(width, width)

    def forward(self, hidden_states, wobble):
        h = self.proj(hidden_states * wobble)
        for block in self.blocks:
            h = h + block(torch.nn.functional.gelu(h))
        return self.out(h)


def wobbly_inputs(tokens=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, tokens, 64, generator=g), "wobble": torch.randn(2, tokens, 1, generator=g)}


class NativeGridModel(ModelMixin, ConfigMixin):
    """A diffusers-style model whose code branches on its latent height against a native size: torch.export's
    guard pins the height, while the model itself runs at any size."""

    @register_to_config
    def __init__(self, in_channels: int = 4, cross_attention_dim: int = 64, native: int = 20):
        super().__init__()
        self.proj_in = torch.nn.Linear(in_channels, 64)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(2))
        self.proj_out = torch.nn.Linear(64, in_channels)

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=True):
        batch, channels, height, width = hidden_states.shape
        h = self.proj_in(hidden_states.flatten(2).transpose(1, 2)) + encoder_hidden_states.mean(1, keepdim=True)
        if height != self.config.native:  # the native grid gets no scaling
            h = h * (height / self.config.native)
        for block in self.blocks:
            h = h + block(torch.nn.functional.gelu(h))
        out = self.proj_out(h).transpose(1, 2).reshape(batch, channels, height, width)
        return (out,)
