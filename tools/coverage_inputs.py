"""Inputs for the denoiser classes whose forward the auto adapter cannot lay out, built as each class's diffusers
pipeline passes them: what a user of such a class hands to `svdq_compiler.compile` (its pipeline's call).

tools/bench_coverage.py uses them only after the adapter has failed (the entry records that failure), so the
benchmark still measures the inference where it works and the compile path everywhere. `grid` is each model's
size in two numbers (the latent grid, or for a protein the residue count rows·cols); `batch` is 2 except where
the model takes one sample per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class GivenInputs:
    build: Callable[[torch.nn.Module, int, tuple[int, int], int], dict[str, Any]]  # (model, batch, grid, seed)
    grids: tuple[tuple[int, int], tuple[int, int]]  # the example's and the second size's
    batch: int = 2
    why: str = ""  # what the pipeline does that the signature does not say


def wan_animate(model, batch: int, grid: tuple[int, int], seed: int) -> dict[str, Any]:
    """One denoising step of WanAnimatePipeline's first segment ("animate"): the noisy latent joined with the
    reference latents (4 i2v mask channels first: the reference frame given, the previous segment's T frames
    not), the pose latents (T frames, one fewer than hidden_states), and the face video in pixels at the motion
    encoder's size (its stride-2 convolutions turn F = 4k + 1 frames into T)."""
    config, generator = model.config, torch.Generator().manual_seed(seed)
    rows, cols = grid
    channels, pixel_frames = config.latent_channels or (config.in_channels - 4) // 2, 5
    frames = (pixel_frames - 1) // 4 + 1

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    latents = randn(batch, channels, frames + 1, rows, cols)
    reference = torch.cat([torch.cat([torch.ones(batch, 4, 1, rows, cols), randn(batch, channels, 1, rows, cols)], 1),
                           torch.cat([torch.zeros(batch, 4, frames, rows, cols),
                                      randn(batch, channels, frames, rows, cols)], 1)], 2)
    size = config.motion_encoder_size
    return {"hidden_states": torch.cat([latents, reference], 1),
            "timestep": torch.randint(1, 1000, (1,), generator=generator).expand(batch).contiguous(),
            "encoder_hidden_states": randn(batch, 8, config.text_dim),
            "encoder_hidden_states_image": randn(batch, 4, config.image_dim),
            "pose_hidden_states": randn(batch, channels, frames, rows, cols),
            "face_pixel_values": torch.rand(batch, 3, pixel_frames, size, size, generator=generator) * 2 - 1}


def wan_animate_2(model, batch: int, grid: tuple[int, int], seed: int) -> dict[str, Any]:
    """The reference-extraction call of the Wan-Animate-2 modular pipeline (kv_cache_mode "extract", a fresh
    WanAnimate2KVCache that the call fills): per-sample lists of latents, of condition latents (an all-ones i2v
    mask and the latents) and of zero-padded prompt embeddings, the CLIP context (1280 wide, fixed by the model),
    seq_len = the tokens per sample and one offset grid row per sample. The forward has no mode without a cache."""
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    config, generator = model.config, torch.Generator().manual_seed(seed)
    rows, cols = grid
    p_t, p_h, p_w = config.patch_size
    frames, channels = 2, (config.in_dim - 4) // 2
    latents = [torch.randn(channels, frames, rows, cols, generator=generator) for _ in range(batch)]
    prompts = []
    for _ in range(batch):
        length = int(torch.randint(max(1, config.text_len // 2), config.text_len + 1, (1,), generator=generator))
        embeds = torch.zeros(config.text_len, config.text_dim)
        embeds[:length] = torch.randn(length, config.text_dim, generator=generator)
        prompts.append(embeds)
    return {"hidden_states": latents,
            "timestep": torch.full((batch,), float(torch.randint(900, 1000, (1,), generator=generator))),
            "encoder_hidden_states": prompts,
            "condition_latents": [torch.cat([torch.ones(4, frames, rows, cols), u]) for u in latents],
            "kv_cache": WanAnimate2KVCache(config.num_layers), "kv_cache_mode": "extract",
            "seq_len": frames * (rows // p_h) * (cols // p_w) // p_t,
            "encoder_hidden_states_image": torch.randn(batch, 4, 1280, generator=generator),
            "offset_grid_sizes": torch.tensor([[frames // p_t, rows // p_h, cols // p_w]] * batch)}


def cosmos3_omni(model, batch: int, grid: tuple[int, int], seed: int) -> dict[str, Any]:
    """Cosmos3OmniPipeline's text-to-video call: one packed sequence (no batch axis; guidance is two calls) of
    und_len text tokens then T·rows·cols vision tokens, mRoPE positions [3, sequence] (text: arange on all three
    axes; vision: (t, h, w), t offset past the text and fps-scaled), the VAE latent as vision_tokens, every frame
    noisy (so the loss indexes are the sequence indexes) at one scheduler timestep."""
    if batch != 1:
        raise ValueError("Cosmos3OmniTransformer takes one packed sequence per call")
    config, generator = model.config, torch.Generator().manual_seed(seed)
    rows, cols = grid
    frames, text, fps, compression = 2, 8, 24.0, 4
    offset = text + config.unified_3d_mrope_temporal_modality_margin
    float_positions = bool(config.enable_fps_modulation)
    if float_positions:
        t_index = torch.arange(frames, dtype=torch.float32) / (fps / compression) * (config.base_fps / compression)
        t_index = t_index + offset
    else:
        t_index = torch.arange(frames) + int(offset)
    t_index = t_index.view(-1, 1).expand(-1, rows * cols).flatten()
    h_index = torch.arange(rows).view(1, -1, 1).expand(frames, -1, cols).flatten()
    w_index = torch.arange(cols).view(1, 1, -1).expand(frames, rows, -1).flatten()
    if not config.unified_3d_mrope_reset_spatial_ids:
        h_index, w_index = h_index + int(offset), w_index + int(offset)
    text_positions = torch.arange(text, dtype=torch.float32 if float_positions else torch.long).expand(3, -1)
    vision = frames * rows * cols
    vision_indexes = torch.arange(text, text + vision)
    patch = config.latent_patch_size
    return {"input_ids": torch.randint(0, config.vocab_size, (text,), generator=generator),
            "text_indexes": torch.arange(text),
            "position_ids": torch.cat([text_positions, torch.stack([t_index, h_index.to(t_index.dtype),
                                                                    w_index.to(t_index.dtype)])], 1),
            "und_len": text, "sequence_length": text + vision,
            "vision_tokens": [torch.randn(1, config.latent_channel, frames, rows * patch, cols * patch,
                                          generator=generator)],
            "vision_token_shapes": [(frames, rows, cols)],
            "vision_sequence_indexes": vision_indexes, "vision_mse_loss_indexes": vision_indexes.clone(),
            "vision_timesteps": torch.full((vision,), float(torch.rand((), generator=generator)) * 1000.0),
            "vision_noisy_frame_indexes": [torch.arange(frames)], "return_dict": False}


def rfd4_proteina(model, batch: int, grid: tuple[int, int], seed: int) -> dict[str, Any]:
    """One RFD4ProteinaPipeline step of unconditional single-chain design: rows·cols residues (the second design
    one shorter, padded), backbone atoms present in atom37, the conditioning keys the default config requires
    (interaction annotations unset, the bond path |i − j| of one chain), and x_t = t·x1 + (1 − t)·noise for the CA
    trace (nm, zero centre of mass) and the local latents, at one schedule time t for the batch."""
    generator = torch.Generator().manual_seed(seed)
    length = grid[0] * grid[1]
    lengths = torch.tensor([max(1, length - (b % 2)) for b in range(batch)])
    padding = torch.arange(length)[None, :] < lengths[:, None]
    atom37 = torch.zeros(batch, length, 37, dtype=torch.bool)
    atom37[..., :5] = True  # N, CA, C, CB, O
    positions = torch.arange(length)
    zeros = torch.zeros(batch, length, dtype=torch.long)
    conditioning = {"condition_sequence_1_residue": zeros, "molecule_iid": zeros, "molecule_entity_id": zeros,
                    "condition_index-group_1_token": zeros,
                    "token_bond_path_length": (positions[:, None] - positions[None, :]).abs().expand(batch, -1, -1)
                    .clone(),
                    **{f"condition_{name}_1_atom": torch.zeros(batch, length, 37, dtype=torch.long)
                       for name in ("hbond", "pistack", "pication", "saltbridge", "hydrophobic", "metal-coord")},
                    "is_in_context_conditioning": torch.zeros(batch, length, dtype=torch.bool),
                    "supports_local_latent": padding.clone()}
    mask = padding[..., None]
    count = padding.sum(1, keepdim=True).clamp(min=1)[..., None]
    steps = torch.randn(batch, length, 3, generator=generator)
    walk = torch.cumsum(steps / steps.norm(dim=-1, keepdim=True) * 0.38, 1)
    clean = (walk - (walk * mask).sum(1, keepdim=True) / count) * mask
    noise = torch.randn(batch, length, 3, generator=generator) * mask
    noise = (noise - noise.sum(1, keepdim=True) / count) * mask
    latent_dim = model.config.latent_dim
    latents = (torch.randn(batch, length, latent_dim, generator=generator),
               torch.randn(batch, length, latent_dim, generator=generator))
    t = float(1e-3 + (1 - 1e-3) * torch.rand((), generator=generator))
    return {"bb_ca": (t * clean + (1 - t) * noise) * mask,
            "local_latents": (t * latents[0] + (1 - t) * latents[1]) * mask,
            "bb_ca_time": torch.full((batch,), t), "local_latents_time": torch.full((batch,), t),
            "padding_mask": padding, "token_type": zeros.clone(), "atom37_mask": atom37 & mask,
            "conditioning": conditioning, "recycle_depth": 1, "return_dict": False}


GIVEN_INPUTS = {
    "WanAnimateTransformer3DModel": GivenInputs(wan_animate, ((4, 4), (6, 8)),
                                                why="pose and face inputs are Optional in the signature but read; "
                                                    "the face video's size is the motion encoder's"),
    "WanAnimate2Transformer3DModel": GivenInputs(wan_animate_2, ((4, 4), (6, 8)),
                                                 why="a key-value cache object and its mode are required"),
    "Cosmos3OmniTransformer": GivenInputs(cosmos3_omni, ((2, 3), (5, 2)), batch=1,
                                          why="one packed text-and-vision sequence laid out by the pipeline"),
    "RFD4ProteinaTransformer": GivenInputs(rfd4_proteina, ((2, 4), (5, 2)),
                                           why="protein features and a conditioning dict the config requires"),
}
