"""Shared helpers of the scale tests: a tiny FLUX.1 architecture, checkpoints of it, and its inputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch.export import Dim

ROOT = Path(__file__).resolve().parents[1]
# Every structural feature of FLUX.1 (double and single blocks, RoPE, AdaLN), at a size tests can afford.
TINY_FLUX = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32,
                 joint_attention_dim=64, pooled_projection_dim=32, in_channels=16, axes_dims_rope=[8, 12, 12])


def tool(name: str):
    """A script of tools/ as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass of the script looks its module up there
    spec.loader.exec_module(module)
    return module


def checkpoint_tool():
    return tool("make_flux_checkpoint")


def write_tiny_flux(folder: Path, config: dict = TINY_FLUX, dtype: str = "float32", **options) -> Path:
    args = ["--out", str(folder), "--config", json.dumps(config), "--dtype", dtype, "--quiet"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    assert checkpoint_tool().main(args) == 0
    return folder


def flux_inputs(config: dict = TINY_FLUX, tokens: int = 16, text: int = 4, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> dict:
    generator = torch.Generator().manual_seed(seed)
    side = int(tokens ** 0.5)
    ids = torch.zeros(side, tokens // side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(tokens // side)[None, :]
    return dict(hidden_states=torch.randn(1, tokens, config["in_channels"], generator=generator).to(dtype),
                encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=generator).to(dtype),
                pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=generator).to(dtype),
                timestep=torch.full((1,), 0.5, dtype=dtype), img_ids=ids.reshape(-1, 3).to(dtype),
                txt_ids=torch.zeros(text, 3, dtype=dtype), return_dict=False)


def flux_dynamic_shapes() -> dict:
    image, text = Dim("image_tokens", min=2, max=4096), Dim("text_tokens", min=2, max=512)
    return dict(hidden_states={1: image}, encoder_hidden_states={1: text}, pooled_projections=None, timestep=None,
                img_ids={0: image}, txt_ids={0: text}, return_dict=None)
