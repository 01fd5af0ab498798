"""Tiny hand-built networks with every structure the passes care about, and a capture helper."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import svdq_compiler
import svdq_compiler.passes  # noqa: F401  (registers the passes)
from svdq_compiler.ir import annotated_linears
from svdq_compiler.pipeline import PASS_REGISTRY, PassContext

from capture_cache import cached_capture


class Block(nn.Module):
    """A DiT block: AdaLN modulation from a conditioning vector, attention (fused SDPA or softmax · matmul,
    optionally cross-attention to a context), a GELU MLP."""

    def __init__(self, dim: int, cond: int, heads: int, *, manual_attention=False, context_dim: int | None = None):
        super().__init__()
        self.heads, self.manual_attention = heads, manual_attention
        self.ada = nn.Linear(cond, 4 * dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim, elementwise_affine=False), nn.LayerNorm(dim)
        self.q, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k = nn.Linear(context_dim or dim, dim)
        self.v = nn.Linear(context_dim or dim, dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def attention(self, q, k, v):
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        if self.manual_attention:
            weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            o = weights @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).flatten(2)

    def forward(self, h, c, context=None):
        shift1, scale1, shift2, scale2 = self.ada(F.silu(c)).chunk(4, dim=-1)
        n = self.norm1(h) * (1 + scale1[:, None]) + shift1[:, None]
        source = n if context is None else context
        h = h + self.out(self.attention(self.q(n), self.k(source), self.v(source)))
        n2 = self.norm2(h) * (1 + scale2[:, None]) + shift2[:, None]
        return h + self.down(F.gelu(self.up(n2)))


class TinyDiT(nn.Module):
    """Patch embedder, timestep MLP, blocks, final norm and projection: [B, T, C] tokens + [B, cond] vector."""

    def __init__(self, dim=64, cond=32, in_ch=16, heads=2, depth=1, **block_kwargs):
        super().__init__()
        self.embed = nn.Linear(in_ch, dim)
        self.cond1, self.cond2 = nn.Linear(cond, cond), nn.Linear(cond, cond)
        self.blocks = nn.ModuleList(Block(dim, cond, heads, **block_kwargs) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.final = nn.Linear(dim, in_ch)

    def forward(self, x, t, context=None):
        h = self.embed(x)
        c = self.cond2(F.silu(self.cond1(t)))
        for block in self.blocks:
            h = block(h, c, context)
        return self.final(self.norm(h))


def tiny_dit(seed=0, **kwargs) -> TinyDiT:
    torch.manual_seed(seed)
    return TinyDiT(**kwargs).eval().requires_grad_(False)


def dit_inputs(seed=0, batch=2, tokens=8, in_ch=16, cond=32, context_dim=None, context_tokens=6):
    g = torch.Generator().manual_seed(seed)
    inputs = (torch.randn(batch, tokens, in_ch, generator=g), torch.randn(batch, cond, generator=g))
    if context_dim:
        inputs += (torch.randn(batch, context_tokens, context_dim, generator=g),)
    return inputs


def run_pass(gm, name, ctx):
    result = PASS_REGISTRY[name](gm, ctx)
    if result.modified:
        result.gm.recompile()
    return result


def make_ctx(config="int4", example_inputs=(), calib_inputs=None, **overrides):
    config = svdq_compiler.QuantConfig.preset(config, **overrides) if isinstance(config, str) else config
    return PassContext(config=config, example_inputs=example_inputs, calib_inputs=calib_inputs)


def by_name(gm):
    return {info.name: info for _, info in annotated_linears(gm)}


def outlier_dit(seed=0, **kwargs) -> TinyDiT:
    """A TinyDiT whose attention and MLP inputs have a few channels 20-30× larger than the rest, as real
    diffusion transformers do (the case smoothing exists for)."""
    model = tiny_dit(seed, **kwargs)
    with torch.no_grad():
        for block in model.blocks:
            dim = block.q.in_features
            block.ada.bias[dim + 3] += 25.0  # scale1 of channel 3: q/k/v inputs
            block.ada.bias[dim + 17] += 20.0
            block.norm2.weight[5] = 30.0  # MLP input channel 5
    return model


def captured(model, inputs):
    """svdq_compiler.capture(model, inputs), from the session's capture cache (tests/capture_cache.py): the pass
    tests capture the same few tiny models dozens of times, and capture (torch.export) costs ~5× the passes that
    follow; each call gets its own deep copy."""
    return cached_capture(svdq_compiler.capture, model, inputs)


def prepared(model, inputs, calib, config="int4", passes=("annotate_linears", "calibrate"), **overrides):
    """Capture `model` (cached) and run `passes`; returns (gm, ctx, {pass: result})."""
    gm = captured(model, inputs)
    ctx = make_ctx(config, inputs, calib, **overrides)
    results = {}
    for name in passes:
        results[name] = run_pass(gm, name, ctx)
        gm = results[name].gm
    return gm, ctx, results
