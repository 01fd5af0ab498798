"""Any diffusers denoiser without a family adapter: inputs from its forward signature and config; and tiny
configs of any class, for the coverage benchmark.

A model's inputs are synthesized from the names of its forward parameters (`hidden_states`, `sample`,
`encoder_hidden_states`, `timestep`, `pooled_projections`, `img_ids`, …) and the widths its config gives
(`in_channels`, `joint_attention_dim`, `cross_attention_dim`, `caption_channels`, …). Where a name leaves the
layout open (a latent as [B, C, H, W], [B, C, F, H, W] or packed tokens [B, N, C]; which config entry is the
text width; whether a mask is boolean) the candidates are tried on the model under fake tensors (no compute, no
memory) and the first that runs is kept, so nothing here is a per-class table.

The dynamic dimensions are then found as for every adapter (`base.infer_dims`): the inputs are built again with
one size changed at a time (batch, text length, latent rows, columns, frames), and every input dimension that
moved is declared dynamic with the size it follows, in multiples of the step it moved by; the rest stays static.
Capture still checks each against the model's code and falls back where the code pins one, and the capture
report says, per dimension, what it follows and how that was found.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import itertools
import math
import re
import sys
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from svdq_compiler.errors import InputError, first_line
from svdq_compiler.models.base import (MAX_GRID, NATIVE_GRID, ModelAdapter, Sizes, example_grid, factor_grid, flow_step,
                                       model_dtype, runs_on, tensor_shapes)

DENOISER_PACKAGES = ("diffusers.models.transformers.", "diffusers.models.unets.")


def denoiser_classes() -> dict[str, str]:
    """{class name: module} of every diffusers model class defined in its transformers and unets packages; a
    module that cannot be imported here (an optional dependency missing) is listed as `<import module>`."""
    import pkgutil

    import diffusers.models.transformers as transformers
    import diffusers.models.unets as unets
    from diffusers import ModelMixin

    found = {}
    for package in (transformers, unets):
        for info in pkgutil.iter_modules(package.__path__):
            name = f"{package.__name__}.{info.name}"
            try:
                module = importlib.import_module(name)
            except Exception as exc:  # any import failure: the class cannot be built on this machine
                found[f"<import {name}>"] = f"{name}: {type(exc).__name__}: {first_line(exc)}"
                continue
            for class_name, cls in inspect.getmembers(module, inspect.isclass):
                # a forward annotated to return None computes nothing (MotionAdapter: weights for another model)
                if issubclass(cls, ModelMixin) and cls.__module__ == name and \
                        inspect.signature(cls.forward).return_annotation not in (None, "None"):
                    found[class_name] = name
    return dict(sorted(found.items()))


# ---- what each forward parameter is ---------------------------------------------------------------------------

# (role, pattern on the parameter name). The first match wins; `latent` is also the first required parameter
# when no name says so.
ROLES: tuple[tuple[str, str], ...] = (
    # decoder_input_tokens: the continuous frames a decoder denoises (T5-FiLM's spectrogram); input_ids: the
    # codebook ids of a masked-token model's image (aMUSEd's UVit), the "ids" layout
    ("latent", r"hidden_states|sample|x|decoder_input_tokens|input_ids"),
    # _2 and the like: the mask of a second text encoder's tokens
    ("text_mask", r"encoder_attention_mask(_\d)?|encoder_mask|encoder_hidden_states_mask|"
                  r"text_embedding_mask(_[a-z0-9]+)?"),
    # _t5, _llama3: one per text encoder; _image is image conditioning (Wan's I2V), left at its default
    ("text", r"encoder_hidden_states(_(?!image)[a-z0-9]+)?|cap_feats|context|text_bth"),
    ("timestep", r"timesteps?|t"),
    # encoders' outputs with their masks, [(text [B, T, C], mask [B, T])], concatenated by the model (T5-FiLM)
    ("text_pairs", r"encodings_and_masks"),
    # a text encoder's hidden states, one layer per transformer block, each [B, T, C] (Bria-Fibo: each block
    # reads its own layer), C the width the config names after it (`text_encoder_dim`)
    ("text_per_block", r"text_encoder_layers"),
    ("pooled", r"pooled_projections|pooled_embeds|pooled_text_emb|clip_text_pooled|global_hidden_states"),
    # an image encoder's tokens [B, N, C] (HunyuanVideo 1.5: zeros for text-to-video), C from IMAGE_WIDTH_KEYS
    ("image_tokens", r"image_embeds"),
    # an image encoder's pooled embedding [B, C] in the cross-attention width (I2VGen-XL's CLIP image embedding)
    ("image_pooled", r"image_embeddings"),
    # one embedding per sample the model is conditioned on, [B, C] (the unCLIP prior's projected text embedding),
    # C the config's `<name>_dim` or `embedding_dim`
    ("embedding", r"\w+_embedding"),
    ("image_ids", r"img_ids"),
    # text and image token positions in one [T + N, axes] (Krea 2): FLUX's txt_ids then img_ids
    ("position_ids", r"position_ids"),
    # which sample of a packed batch each token belongs to, [B, rows·cols] (Ideogram 4): one sample per row, all 0
    ("segments", r"segment_ids"),
    # each token's kind, [B, rows·cols], as one of the module's constants the docstring names (Ideogram 4's
    # OUTPUT_IMAGE_INDICATOR): the image one, every token being a latent token; in a packed sequence, each row's
    # modality as its docstring numbers them (MiniMax H3's token_tags: "`0` video, `1` text, `2` audio")
    ("token_kind", r"indicator|token_tags"),
    # a packed sequence of several streams (MiniMax H3): per row, the index of its noise level among the distinct
    # timesteps given (one: every row at the same level), and per stream the positions of its rows, the stream being
    # the input whose docstring names these indices
    ("timestep_indices", r"timestep_indices"),
    ("packed_indices", r"[a-z]+_indices"),
    ("text_ids", r"txt_ids"),
    # a vision-language encoder's sequence marked where the image sits, [B, T + slots]: its T text tokens, then one
    # slot per side × side group of latent tokens, True at the slots (Qwen-Image 2.1's img_mask: 2 × 2 each)
    ("slot_mask", r"img_mask|image_mask"),
    # the positions along each axis of the patched latent grid, [arange(F), arange(H), arange(W)], and of the text
    # tokens, arange(T) (Kandinsky 5: its RoPE tables are indexed by them)
    ("grid_positions", r"visual_rope_pos"),
    # the position of each latent frame along the video, arange(F) (HunyuanVideo-Framepack's RoPE reads it; a
    # section of a longer video would start later)
    ("frame_indices", r"indices_latents|frame_indices"),
    # earlier frames of the video as latent streams beside the latent, each with its frame indices
    # (HunyuanVideo-Framepack's clean and 2×, 4× down-sampled history): given where the model does not run without
    ("history_latent", r"latents_\w+"),
    ("history_indices", r"indices_latents_\w+"),
    ("text_positions", r"text_rope_pos"),
    # an autoregressive prior's image token per latent token [B, rows·cols] (GLM-Image), and which samples drop
    # it [B] (none: the prior is kept)
    ("prior_tokens", r"prior_token_id"),
    ("prior_drop", r"prior_token_drop"),
    # rotary tables the pipeline builds from the latent grid and the model only applies (Lumina-Next, Sana-WM's
    # refiner); their form is probed (ROTARY_FORMS)
    ("rotary_table", r"\w*rotary_emb"),
    ("guidance", r"guidance"),
    ("size_pair", r"original_size|target_size|crop_coords"),
    # the original size, target size and crop corner in one [B, 6] (HunyuanDiT), and a style index [B]
    ("size_meta", r"image_meta_size"),
    ("style", r"style"),
    ("class_labels", r"class_labels"),
    # scalar conditions, each sinusoidally encoded and concatenated (SVD's fps / motion / noise augmentation,
    # aMUSEd's micro-conditions): [B, count], the count from the config (`condition_count`)
    ("conditions", r"added_time_ids|micro_conds"),
    ("per_sample", r"fps"),  # one value per sample, a micro-condition (I2VGen-XL)
    ("text_lengths", r"\w*text_lens|\w*txt_lens"),  # valid text tokens per sample
    # another latent stream of the latent's shape (I2VGen-XL's image_latents: the first frame, encoded); not
    # HunyuanVideo-Framepack's indices_latents, which numbers latent frames
    ("latent_like", r"(?!indices_)\w+_latents"),
    # a control video encoded beside the latent (Wan VACE): the latent's grid, CONTROL_CHANNEL_KEYS channels
    ("control_latent", r"control_hidden_states"),
    # a second modality denoised beside the latent (LTX-2's audio): its packed tokens [B, F, C], one per latent
    # frame, C the config's `<modality>_in_channels`; its text at the text width; its length as a Python int
    ("stream_text", r"[a-z]+_encoder_hidden_states"),
    ("stream_latent", r"[a-z]+_hidden_states"),
    ("stream_length", r"[a-z]+_num_frames"),
    # the latent frames split into chunks, as Python ints summing to F (AnyFlow-FAR): one chunk of them all
    ("frame_chunks", r"chunk_partition"),
    # per sample, the (frames, rows, cols) of its latent grid, as Python ints (Qwen-Image's RoPE reads them)
    ("grid_shapes", r"img_shapes|shape_list"),
    # the grid of a packed latent as Python ints (LTX-Video), given with packed latents only: an unpacked one
    # shows its grid
    ("grid_size", r"num_frames|height|width"),
)
TEXTS = ("text", "text_pairs", "stream_text")  # the roles holding text, at the text width
# Required parameters named like a timestep (`timestep_r`, `r_timestep`, `decoder_noise_time`) are timesteps too;
# optional ones are not (`timestep_cond` is an embedding).
REQUIRED_TIMESTEP = r"(\w+_)?timesteps?(_\w+)?|\w+_time"
# Optional parameters worth giving: the conditioning a pipeline always passes. Other optional ones (controlnet
# residuals, caches, extra image streams) are left at their defaults.
OPTIONAL_ROLES = {"text", "text_per_block", "text_mask", "timestep", "pooled", "image_ids", "text_ids", "conditions",
                  "grid_shapes", "grid_size", "image_tokens", "image_pooled", "control_latent", "stream_length",
                  "size_meta", "style", "history_latent", "history_indices"}
# (total, each) config widths of the scalar conditions' embedding: the count is total / each.
CONDITION_WIDTH_KEYS = (("projection_class_embeddings_input_dim", "addition_time_embed_dim"),
                        ("micro_cond_embed_dim", "micro_cond_encode_dim"))

# Config entries giving a width, in the order they are tried.
TEXT_WIDTH_KEYS = ("joint_attention_dim", "cross_attention_dim", "caption_channels", "text_embed_dim", "text_dim",
                   "cap_feat_dim", "context_in_dim", "encoder_hid_dim", "text_emb_dim", "text_hidden_dim",
                   "text_in_dim", "encoder_hidden_size", "embedding_dim")
IMAGE_WIDTH_KEYS = ("image_embed_dim", "image_proj_dim")
IMAGE_TOKENS = 4  # image encoder tokens given (a pipeline's count is its vision encoder's, not the model's)
POOLED_WIDTH_KEYS = ("pooled_projection_dim", "pooled_embed_dim", "global_states_input_dim", "text_emb_dim",
                     "projection_dim", "cond_embed_dim")
# Any other config width of a conditioning stream (Kandinsky 6's in_text_dim, StableAudio 3's cond_token_dim and
# global_cond_dim): candidates after the keys above, the probe picks.
CONDITIONING_WIDTH = re.compile(r"\w*(text|cond)\w*_(dim|channels)\d*")
# The model's own width: where a config leaves its text encoder's width None (AceStep's encoder_hidden_size), the
# constructor takes this one, so it is the text width tried when no conditioning width is given.
MODEL_WIDTH_KEYS = ("hidden_size", "inner_dim", "model_dim", "dim", "d_model")
# A text length the model fixes (CogVideoX adds a positional embedding over text and image tokens together; the
# unCLIP prior's positions cover its `num_embeddings` text tokens).
TEXT_LENGTH_KEYS = ("max_text_seq_length", "text_len", "num_embeddings")
CONTROL_CHANNEL_KEYS = ("vace_in_channels",)
HEAD_DIM_KEYS = ("attention_head_dim", "head_dim")
HEAD_COUNT_KEYS = ("num_attention_heads", "num_heads")
# Forms of a rotary table over the latent's tokens: a complex polar table over the patch grid [rows, cols, D/2]
# (Lumina-Next slices its grid from it), (cos, sin) per sample across all heads [B, tokens, heads·D] (LTX-2's
# interleaved RoPE), (cos, sin) per token [tokens, D] (FLUX's); D the head size.
ROTARY_FORMS = ("polar_grid", "cos_sin_per_sample", "cos_sin")
LATENT_CHANNEL_KEYS = ("in_channels", "in_chans", "latent_channels", "num_channels_latents", "in_visual_dim",
                       "io_channels", "latent_dim", "input_dims", "embedding_dim")
POSITION_AXES_KEYS = ("axes_dims_rope", "axes_dim_rope", "axes_dims", "rope_axes_dim")

# [B,C,H,W], [B,C,F,H,W], [B,F,C,H,W] (CogVideoX: frames first), [B,N,C], [B,F·N,C] (LTX-Video), [B,C,L],
# [B,F,H,W,C] (Kandinsky 5: channels last), [B,F·N,C,pt,ph,pw] (JoyImage: each patch whole, patch_size [pt,ph,pw]),
# [B,H,W] codebook ids (aMUSEd), [B,C] one vector per sample (the unCLIP prior's image embedding: no grid)
LAYOUTS = ("image", "video", "frames_first", "tokens", "video_tokens", "sequence", "channels_last", "patches", "ids",
           "vector")
PACKED = ("tokens", "video_tokens")
SEQUENCES = ("sequence", "tokens")  # the layouts of a 1-D model's latent
FRAMED = ("video", "frames_first", "channels_last")  # the layouts with a frame axis of their own
# The shape of a timestep past the batch, F the latent frames: one per sample, one per frame [B, F] (AnyFlow's
# causal video), or one per frame in a row [B, 1, F] (Sana-WM's, LTX style).
TIMESTEP_FORMS = {"sample": lambda frames: (), "frame": lambda frames: (frames,),
                  "frame_row": lambda frames: (1, frames)}
# Forms of position ids: FLUX-style ids per token and axis over the text then the image tokens [T + rows·cols, axes]
# (Krea 2); the image tokens' ids per sample [B, rows·cols, axes] (Ideogram 4); per-sample integers over the joint
# sequence [B, k + rows·cols], k tokens the model puts before the image tokens (OmniGen's time token, k = 1).
POSITION_FORMS = ("joint", "per_sample", "sequence")
MAX_PROBES = 96
MODEL_TOKENS = 2  # tokens of its own (time, register) a model may put before the image tokens, probed
PROBE_GRIDS = ((2, 3), (2, 2), (8, 12), (8, 8))  # (rows, cols) the layouts are probed at, in units


def role_of(name: str) -> str | None:
    return next((role for role, pattern in ROLES if re.fullmatch(pattern, name)), None)


def named_width(config: Any, name: str) -> list[int]:
    """The width the config gives an input by its name (StableCascade's `clip_text_pooled_in_channels` for
    `clip_text_pooled`)."""
    return config_value(config, tuple(f"{name}{suffix}" for suffix in ("_in_channels", "_dim", "_in_dim",
                                                                         "_channels")))


def conditioning_widths(config: Any, keys: tuple[str, ...]) -> list[int]:
    """Widths for a text or pooled input: `keys` first, then every other conditioning width of the config."""
    others = tuple(key for key in config if CONDITIONING_WIDTH.fullmatch(key))
    return config_value(config, keys + others)


def text_widths(model: torch.nn.Module) -> list[int]:
    """Widths for the text input; the model's own width only where the forward requires text (an optional text
    input the config gives no width for is left out: the model does without it)."""
    parameters = inspect.signature(model.forward).parameters.items()
    # the config entry the docstring names as the text's last axis (Ideogram 4's `llm_features_dim`)
    documented = [width for name, _ in parameters if role_of(name) in TEXTS
                  for entry in documented_shape(model, name)[-1:] if isinstance(entry, ast.Name)
                  for width in config_value(model.config, (entry.id,))]
    widths = list(dict.fromkeys(documented + conditioning_widths(model.config, TEXT_WIDTH_KEYS)))
    required = any(role_of(name) in TEXTS and parameter.default is inspect.Parameter.empty
                   for name, parameter in parameters)
    return widths or (config_value(model.config, MODEL_WIDTH_KEYS) if required else [])


def condition_count(config: Any) -> int | None:
    """How many scalar conditions the config's embedding takes (total width / width of one), or None."""
    for total, each in CONDITION_WIDTH_KEYS:
        widths = config_value(config, (total,)), config_value(config, (each,))
        if all(widths) and widths[0][0] % widths[1][0] == 0:
            return widths[0][0] // widths[1][0]
    return None


def config_value(config: Any, keys: tuple[str, ...]) -> list[int]:
    """The positive int values of `keys` in the config, in order, without repeats."""
    found: list[int] = []
    for key in keys:
        value = config.get(key) if hasattr(config, "get") else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0 and value not in found:
            found.append(value)
    return found


def spatial_unit(config: Any) -> int:
    """The step latent height and width must move in: the patch size, or a U-Net's total down-sampling."""
    channels = config.get("block_out_channels")
    if isinstance(channels, (list, tuple)) and len(channels) > 1:
        return 2 ** (len(channels) - 1)
    patch = config.get("patch_size") or config.get("all_patch_size")
    if isinstance(patch, (list, tuple)):
        patch = patch[-1]
    return int(patch) if isinstance(patch, int) and patch > 0 else 1


def frame_unit(config: Any) -> int:
    patch = config.get("patch_size")
    if isinstance(patch, (list, tuple)) and len(patch) == 3:
        return int(patch[0])
    return int(config.get("patch_size_t") or 1)


@dataclass(frozen=True)
class Choice:
    """The open questions of an input layout, answered by probing the model."""

    layout: str
    text_width: int | None
    mask_dtype: torch.dtype
    # text inputs given as a stack of encoder layers [L, B, T, C] (a model reading the hidden states of several
    # layers of one text encoder), L from the config's list of layer indices
    stacked: tuple[str, ...] = ()
    # pooled inputs given with a sequence axis of one, [B, 1, C] (StableCascade's clip_text_pooled)
    pooled_sequence: bool = False
    pooled_width: int | None = None
    # text inputs carrying the config's `num_text_layers` encoder layers per token, [B, T, L, C] (Krea 2)
    layers_per_token: bool = False
    # text inputs given as bundles of tokens per sample, [B, L, T, C], L from the shape the forward's docstring gives
    # them (Bria-Fibo 2: `1 + len(injection_layer_ids)`, one for its resampler and one per injection block)
    bundled: bool = False
    # text inputs given once per latent frame, [B·F, T, C]: a video U-Net running its 2-D blocks on every frame
    # cross-attends to a text batch as large as its frame batch (AnimateDiff's UNetMotionModel)
    text_per_frame: bool = False
    # the latent's channels where a latent stream beside it takes the rest of the configured input channels, the
    # model concatenating the two on the channel axis (AceStep's context_latents: 128 of 192); None: both take
    # them all (I2VGen-XL's image_latents)
    latent_share: int | None = None
    rotary_form: str | None = None  # one of ROTARY_FORMS, where the forward takes a rotary table
    position_form: str = "joint"  # one of POSITION_FORMS, where the forward takes position ids
    positions_before: int = 0  # k of the "sequence" form
    timestep_form: str = "sample"  # one of TIMESTEP_FORMS
    # grid shapes given as a list per sample, of one (frames, rows, cols) each (JoyImage's shape_list: one entry per
    # image of the sample, the target first); else one tuple per sample (Qwen-Image's img_shapes)
    grids_per_sample: bool = False
    # text aligned with a sequence latent, one token per latent position (MiniMax-Music 3's frame-aligned
    # conditioning, concatenated with the latent on the channel axis)
    text_aligned: bool = False
    # option dicts (`cross_attention_kwargs`) given empty: a forward that unpacks its None default fails (Lumina-Next)
    empty_options: tuple[str, ...] = ()
    history: bool = False  # the optional history latents and their frame indices given
    slot_side: int = 1  # latent tokens per side of one slot of a `slot_mask`: packed grids in multiples of it


@dataclass
class InputPlan:
    """How to build one model's forward inputs at any `Sizes`."""

    parameters: dict[str, str]  # forward parameter → role, in signature order
    choice: Choice
    channels: int
    axes: int
    unit: int
    frame_unit: int
    timestep_value: float
    stack_depth: int | None = None
    text_layers: int | None = None  # L of a text input given per token ([B, T, L, C]), from `num_text_layers`
    text_bundles: int | None = None  # L of a text input given in bundles ([B, L, T, C]), from the docstring
    image_width: int | None = None  # C of image encoder tokens, from IMAGE_WIDTH_KEYS
    conditions: int | None = None
    return_dict: bool = True  # the forward takes return_dict
    text_length: int | None = None  # the one text length the model takes, where its config fixes it
    # a suffixed text encoder's width and length, where the config names them with its suffix: {suffix: size}
    encoder_widths: dict[str, int] = dataclasses.field(default_factory=dict)
    encoder_lengths: dict[str, int] = dataclasses.field(default_factory=dict)
    square: bool = False  # the model takes square latent grids only (found: no layout runs on a 2×3 grid)
    control_channels: int | None = None  # C of a control latent, from CONTROL_CHANNEL_KEYS
    stream_channels: dict[str, int] = dataclasses.field(default_factory=dict)  # C of each stream_latent input
    blocks: int = 0  # transformer blocks (the config's `num_*layers` summed): a text_per_block input has one each
    block_text_width: int | None = None  # the width of each of those text encoder layers
    codebook: int = 0  # the ids of an "ids" latent, from the config's codebook_size
    heads: int = 1  # attention heads and their size, for rotary tables
    head_dim: int = 0
    embedding_widths: dict[str, int] = dataclasses.field(default_factory=dict)  # C of each `embedding` input
    token_kinds: dict[str, int] = dataclasses.field(default_factory=dict)  # the value of each `token_kind` input
    # a packed sequence: {indices input: the stream input whose rows it places}, in the sequence's order, and the
    # kind of each stream's rows {indices input: kind}
    packed: dict[str, str] = dataclasses.field(default_factory=dict)
    packed_kinds: dict[str, int] = dataclasses.field(default_factory=dict)

    def build(self, sizes: Sizes, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(seed)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator).to(dtype)

        batch, text, unit = sizes.batch, self.text_length or sizes.text, self.unit
        height, width = sizes.rows * unit, sizes.cols * unit
        if self.choice.text_aligned:
            text = height if self.choice.layout == "sequence" else sizes.rows * sizes.cols
        inputs: dict[str, Any] = {}
        frames = sizes.frames * self.frame_unit

        def latent_shape(channels: int) -> tuple[int, ...]:
            return {"image": (batch, channels, height, width),
                    "video": (batch, channels, frames, height, width),
                    "frames_first": (batch, frames, channels, height, width),
                    "tokens": (batch, sizes.rows * sizes.cols * self.choice.slot_side ** 2, channels),
                    "video_tokens": (batch, sizes.frames * sizes.rows * sizes.cols, channels),
                    "sequence": (batch, channels, height),
                    "channels_last": (batch, frames, height, width, channels),
                    "patches": (batch, sizes.frames * sizes.rows * sizes.cols, channels, self.frame_unit, unit, unit),
                    "ids": (batch, height, width),
                    "vector": (batch, channels)}[self.choice.layout]

        for name, role in self.parameters.items():
            if role == "latent" and self.choice.layout == "ids":
                inputs[name] = torch.randint(self.codebook, latent_shape(0), generator=generator)
            elif role == "latent":
                inputs[name] = randn(*latent_shape(self.choice.latent_share or self.channels))
            elif role == "latent_like":
                inputs[name] = randn(*latent_shape(self.channels - (self.choice.latent_share or 0)))
            elif role == "control_latent":
                inputs[name] = randn(*latent_shape(self.control_channels))
            elif role == "stream_latent":
                inputs[name] = randn(batch, sizes.frames, self.stream_channels[name])
            elif role == "stream_length":
                inputs[name] = sizes.frames
            elif role == "stream_text":
                inputs[name] = randn(batch, text, self.choice.text_width)
            elif role == "text":
                stack = (self.stack_depth,) if name in self.choice.stacked else ()
                per_token = (self.text_layers,) if self.choice.layers_per_token else ()
                bundles = (self.text_bundles,) if self.choice.bundled else ()
                text_batch = batch * frames if self.choice.text_per_frame else batch
                suffix = encoder_suffix(name)
                inputs[name] = randn(*stack, text_batch, *bundles, self.encoder_lengths.get(suffix, text), *per_token,
                                     self.encoder_widths.get(suffix, self.choice.text_width))
            elif role == "text_per_block":
                inputs[name] = [randn(batch, text, self.block_text_width) for _ in range(self.blocks)]
            elif role == "text_pairs":
                inputs[name] = [(randn(batch, text, self.choice.text_width), torch.ones(batch, text, dtype=dtype))]
            elif role == "text_mask":
                mask_dtype = self.choice.mask_dtype if self.choice.mask_dtype is torch.bool else dtype
                inputs[name] = torch.ones(batch, self.encoder_lengths.get(encoder_suffix(name), text), dtype=mask_dtype)
            elif role == "timestep":
                inputs[name] = torch.full(self.timestep_shape(batch, sizes.frames), self.timestep_value, dtype=dtype)
            elif role == "embedding":
                inputs[name] = randn(batch, self.embedding_widths[name])
            elif role == "image_pooled":
                inputs[name] = randn(batch, self.choice.text_width)
            elif role == "image_tokens":
                inputs[name] = randn(batch, IMAGE_TOKENS, self.image_width)
            elif role == "pooled":
                inputs[name] = randn(batch, *(1,) * self.choice.pooled_sequence, self.choice.pooled_width)
            elif role == "conditions":
                inputs[name] = torch.rand(self.conditions, generator=generator).to(dtype).repeat(batch, 1)
            elif role == "per_sample":
                inputs[name] = torch.full((batch,), 8.0, dtype=dtype)
            elif role == "text_lengths":
                inputs[name] = torch.full((batch,), text, dtype=torch.long)
            elif role == "grid_size" and self.choice.layout in PACKED:
                inputs[name] = {"num_frames": sizes.frames, "height": sizes.rows, "width": sizes.cols}[name]
            elif role == "grid_shapes":
                grid = (sizes.frames if self.choice.layout in ("video", "patches") else 1,
                        sizes.rows * self.choice.slot_side, sizes.cols * self.choice.slot_side)
                inputs[name] = [[grid] if self.choice.grids_per_sample else grid] * batch
            elif role == "image_ids":
                side = self.choice.slot_side
                inputs[name] = grid_ids(sizes.rows * side, sizes.cols * side, self.axes, dtype)
            elif role == "slot_mask":
                slots = torch.cat([torch.zeros(text, dtype=torch.bool), torch.ones(sizes.rows * sizes.cols,
                                                                                   dtype=torch.bool)])
                inputs[name] = slots.repeat(batch, 1)
            elif role == "text_ids":
                inputs[name] = torch.zeros(text, self.axes, dtype=dtype)
            elif role == "grid_positions":
                inputs[name] = [torch.arange(size) for size in (sizes.frames, sizes.rows, sizes.cols)]
            elif role == "text_positions":
                inputs[name] = torch.arange(text)
            elif role == "frame_indices" or role == "history_indices" and self.choice.history:
                inputs[name] = torch.arange(sizes.frames)
            elif role == "history_latent" and self.choice.history:
                inputs[name] = randn(*latent_shape(self.channels))
            elif role == "frame_chunks":
                inputs[name] = [sizes.frames]
            elif role == "prior_tokens":
                inputs[name] = torch.zeros(batch, sizes.rows * sizes.cols, dtype=torch.long)
            elif role == "prior_drop":
                inputs[name] = torch.zeros(batch, dtype=torch.bool)
            elif role == "position_ids" and self.choice.position_form == "sequence":
                inputs[name] = torch.arange(self.choice.positions_before + sizes.rows * sizes.cols).repeat(batch, 1)
            elif role == "position_ids" and self.choice.position_form == "per_sample":
                inputs[name] = grid_ids(sizes.rows, sizes.cols, self.axes, dtype).repeat(batch, 1, 1)
            elif role == "segments":
                inputs[name] = torch.zeros(batch, sizes.rows * sizes.cols, dtype=torch.long)
            elif role == "token_kind" and not self.packed:
                inputs[name] = torch.full((batch, sizes.rows * sizes.cols), self.token_kinds[name], dtype=torch.long)
            elif role == "position_ids":
                inputs[name] = torch.cat([torch.zeros(text, self.axes, dtype=dtype),
                                          grid_ids(sizes.rows, sizes.cols, self.axes, dtype)])
            elif role == "none":
                inputs[name] = None
            elif role == "rotary_table":
                inputs[name] = self.rotary_table(sizes, randn)
            elif role == "guidance":
                inputs[name] = torch.full((batch,), 3.5, dtype=dtype)
            elif role == "size_pair":
                inputs[name] = torch.tensor([[height * 8, width * 8]] * batch, dtype=dtype)
            elif role == "size_meta":
                inputs[name] = torch.tensor([[height * 8, width * 8] * 2 + [0, 0]] * batch, dtype=dtype)
            elif role == "style":
                inputs[name] = torch.zeros(batch, dtype=torch.long)
            elif role == "class_labels":
                inputs[name] = torch.zeros(batch, dtype=torch.long)
        inputs.update({name: {} for name in self.choice.empty_options})
        if self.packed:
            inputs.update(self.packed_sequence(inputs, sizes, dtype))
        if self.return_dict:
            inputs["return_dict"] = False
        return inputs

    def packed_sequence(self, inputs: dict[str, Any], sizes: Sizes, dtype: torch.dtype) -> dict[str, Any]:
        """The inputs laying out a packed sequence of `inputs`' streams, one after another: each stream's row
        positions, each row's kind, timestep index (0: the one timestep) and position ids (the latent's rows at their
        grid positions, the other streams' at 0)."""
        lengths = {indices: inputs[stream].shape[1] for indices, stream in self.packed.items()}
        starts = dict(zip(lengths, itertools.accumulate([0, *lengths.values()])))
        total = sum(lengths.values())
        built: dict[str, Any] = {indices: torch.arange(starts[indices], starts[indices] + length)
                                 for indices, length in lengths.items()}
        latent_rows = next(built[indices] for indices, stream in self.packed.items() if stream == self.latent_name())
        positions = torch.zeros(total, self.axes, dtype=dtype)
        grid = grid_ids(sizes.rows, sizes.cols, self.axes, positions.dtype)
        positions[latent_rows] = grid[torch.arange(len(latent_rows)) % len(grid)]  # frame after frame
        for name, role in self.parameters.items():
            if role == "token_kind":
                built[name] = torch.cat([torch.full((length,), self.packed_kinds[indices], dtype=torch.long)
                                         for indices, length in lengths.items()])
            elif role == "timestep_indices":
                built[name] = torch.zeros(total, dtype=torch.long)
            elif role == "position_ids":
                built[name] = positions
        return built

    def codebook_ids(self, field: torch.Tensor) -> torch.Tensor:
        """Codebook ids read from a standard normal field through its CDF: uniform over the codebook, and a field
        moved by a flow step moves its ids."""
        uniform = 0.5 * (1 + torch.erf(field.float() / 2 ** 0.5))
        return (uniform * self.codebook).long().clamp_(0, self.codebook - 1)

    def timestep_shape(self, batch: int, frames: int) -> tuple[int, ...]:
        if "timestep_indices" in self.parameters.values():  # the distinct timesteps of a packed sequence: one
            return (1,)
        return (batch, *TIMESTEP_FORMS[self.choice.timestep_form](frames))

    def frames_of(self, latent: torch.Tensor) -> int:
        """The latent frames, in units of the frame patch, of a latent built by this plan (2 where it has none)."""
        layout = self.choice.layout
        return latent.shape[2 if layout == "video" else 1] // self.frame_unit if layout in FRAMED else 2

    def rotary_table(self, sizes: Sizes, randn: Any) -> Any:
        """A rotary table of random angles in `choice.rotary_form` over the latent's tokens: the model only
        applies it, so any angles serve."""
        frames = 1 if self.choice.layout in ("image", "tokens") else sizes.frames
        tokens, half = frames * sizes.rows * sizes.cols, self.head_dim // 2
        if self.choice.rotary_form == "polar_grid":
            angles = randn(sizes.rows, sizes.cols, half).float()
            return torch.polar(torch.ones_like(angles), angles)
        angles = randn(sizes.batch, tokens, self.heads * self.head_dim) \
            if self.choice.rotary_form == "cos_sin_per_sample" else randn(tokens, self.head_dim)
        return angles.cos(), angles.sin()

    def latent_name(self) -> str:
        return next(name for name, role in self.parameters.items() if role == "latent")


def grid_ids(rows: int, cols: int, axes: int, dtype: torch.dtype) -> torch.Tensor:
    """Position ids [rows·cols, axes] of a row-major latent grid: the last two axes are row and column."""
    ids = torch.zeros(rows, cols, axes, dtype=dtype)
    if axes >= 2:
        ids[..., axes - 2] = torch.arange(rows, dtype=dtype)[:, None]
        ids[..., axes - 1] = torch.arange(cols, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, axes)


def unused_stream(config: Any, name: str, role: str) -> bool:
    """An optional text input of a second encoder the config leaves out: EasyAnimate's `encoder_hidden_states_t5`
    with `text_embed_dim_t5` None (its projection is then not built)."""
    suffix = encoder_suffix(name)
    return role == "text" and suffix is not None and any(
        key.endswith(suffix) and value is None for key, value in config.items())


def encoder_suffix(name: str) -> str | None:
    """The suffix naming the text encoder of an input (`_t5` of `encoder_hidden_states_t5`), or None."""
    found = re.fullmatch(r"\w+(_(t5|llama\d*|clip|byt5|\d))", name)
    return found[1] if found else None


def encoder_sizes(config: Any, roles: dict[str, str], keys: tuple[str, ...]) -> dict[str, int]:
    """{suffix: size} the config gives a suffixed text encoder's inputs under `keys` with its suffix (HunyuanDiT's
    `cross_attention_dim_t5` and `text_len_t5` for `encoder_hidden_states_t5` and `text_embedding_mask_t5`)."""
    suffixes = {encoder_suffix(name) for name, role in roles.items() if role in ("text", "text_mask")} - {None}
    return {suffix: size for suffix in sorted(suffixes)
            for size in config_value(config, tuple(f"{key}{suffix}" for key in keys))[:1]}


def takes_return_dict(model: torch.nn.Module) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return "return_dict" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def forward_roles(model: torch.nn.Module, unknown_as_none: bool = False) -> dict[str, str]:
    """{forward parameter: role} for the parameters inputs are built for; refuses a required one with no role, or
    with `unknown_as_none` gives it the role "none" (given None: OmniGen's input_ids and input image latents, the
    conditioning its code skips when they are None)."""
    signature = inspect.signature(model.forward)
    roles: dict[str, str] = {}
    unknown = []
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or name == "return_dict":
            continue
        required = parameter.default is inspect.Parameter.empty
        role = role_of(name)
        if role is None and required and re.fullmatch(REQUIRED_TIMESTEP, name):
            role = "timestep"
        if role is None and required and not roles:
            role = "latent"  # the first parameter is the latent whatever it is called
        if role == "guidance" and not (required or model.config.get("guidance_embeds")):
            continue
        if role == "class_labels" and not (required or model.config.get("num_embeds_ada_norm")
                                           or model.config.get("num_class_embeds")):
            continue
        if role is None or (not required and role not in OPTIONAL_ROLES | {"guidance", "class_labels"}):
            if required:
                unknown.append(name)
            continue
        if role == "latent" and "latent" in roles.values():
            if required:
                unknown.append(name)
            continue
        roles[name] = role
    if unknown and unknown_as_none:
        roles = {name: roles.get(name, "none") for name in signature.parameters if name in roles or name in unknown}
    elif unknown:
        raise InputError(f"{type(model).__name__}.forward requires inputs whose layout cannot be inferred from "
                         f"their names and the config: {', '.join(unknown)}",
                         fix="pass your own example_inputs (and dynamic_shapes) to svdq_compiler.compile")
    if "latent" not in roles.values():
        raise InputError(f"{type(model).__name__}.forward has no latent input (hidden_states, sample, x)",
                         fix="pass your own example_inputs to svdq_compiler.compile")
    return roles


def candidate_choices(model: torch.nn.Module, roles: dict[str, str], channels: int) -> list[Choice]:
    config = model.config
    name = type(model).__name__
    if roles.get("input_ids") == "latent":  # codebook ids: their layout is their name's
        layouts = ("ids",)
    elif "packed_indices" in roles.values():  # the rows of a packed sequence are tokens
        layouts = PACKED
    elif re.search(r"3D(?![a-z])", name):  # Transformer3DModel, not StableAudio3DiT
        layouts = ("video", "frames_first", "tokens", "video_tokens", "image", "channels_last", "patches")
    elif re.search(r"1D(?![a-z])", name):
        layouts = ("sequence", "tokens")
    elif {"image_ids", "position_ids"} & set(roles.values()) or config.get("axes_dims_rope"):
        layouts = ("tokens", "image", "video")  # position ids come with packed latents
    else:
        layouts = ("image", "tokens", "video", "frames_first", "sequence", "vector")
    widths: list[int | None] = text_widths(model) if set(TEXTS) & set(roles.values()) else [None]
    pooled = [*(width for name, role in roles.items() if role == "pooled" for width in named_width(config, name))]
    pooled_widths: list[int | None] = list(dict.fromkeys(pooled + conditioning_widths(config, POOLED_WIDTH_KEYS))) \
        if "pooled" in roles.values() else [None]
    masks = (torch.bool, torch.float32) if "text_mask" in roles.values() else (torch.bool,)
    texts = [name for name, role in roles.items() if role == "text"]
    # the text input named after the encoder of the layer list (`llama_layers`: `encoder_hidden_states_llama3`),
    # stacked first: unstacked, [B, T, C] can pass by accident where the model indexes layers (batch ≥ depth)
    encoder = layer_stack(config)[0]
    stacks = [*((name,) for name in texts if encoder and encoder in name), ()]
    pooled_sequences = (False, True) if "pooled" in roles.values() else (False,)
    per_token = (True, False) if texts and config_value(config, ("num_text_layers",)) else (False,)
    bundled = (True, False) if texts and documented_bundles(model, texts[0]) else (False,)
    # the latent's share of the input channels, tried among the config's widths: the probe keeps the one whose
    # output has the latent's shape
    shares = [None, *(width for width in config_value(config, tuple(key for key in config if WIDTH.fullmatch(key)
                                                                    and not NOT_WIDTHS.fullmatch(key)))
                      if width < channels)] if "latent_like" in roles.values() else [None]
    option_dicts = tuple(name for name, parameter in inspect.signature(model.forward).parameters.items()
                         if name.endswith("_kwargs") and parameter.default is None)
    candidates = {  # each question's answers, the usual first; the product varies the last question fastest
        "latent_share": shares,
        "text_aligned": (False, True) if texts else (False,),
        "text_per_frame": (False, True) if texts else (False,),
        "timestep_form": tuple(TIMESTEP_FORMS),
        "grids_per_sample": (False, True) if "grid_shapes" in roles.values() else (False,),
        "rotary_form": ROTARY_FORMS if "rotary_table" in roles.values() else (None,),
        "position_form": POSITION_FORMS if "position_ids" in roles.values() else ("joint",),
        "positions_before": range(MODEL_TOKENS + 1) if "position_ids" in roles.values() else (0,),
        "layout": layouts,
        "pooled_sequence": pooled_sequences,
        "stacked": stacks,
        "layers_per_token": per_token,
        "bundled": bundled,
        "text_width": widths or [None],
        "pooled_width": pooled_widths,
        "mask_dtype": masks,
        "history": (False, True) if "history_latent" in roles.values() else (False,),
        "slot_side": (1, 2) if "slot_mask" in roles.values() else (1,),
        # last: a forward that fails on None options fails on every layout, and the probes stop at MAX_PROBES
        "empty_options": list(dict.fromkeys(((), option_dicts))),
    }
    choices = [Choice(**dict(zip(candidates, answers))) for answers in itertools.product(*candidates.values())]
    # per-frame text and timesteps need a frame axis; text aligned with the latent, a sequence
    return [choice for choice in choices
            if (choice.layout in FRAMED or not choice.text_per_frame and choice.timestep_form == "sample")
            and (choice.layout in SEQUENCES or not choice.text_aligned)
            and (choice.position_form == "sequence" or not choice.positions_before)]


def layer_stack(config: Any) -> tuple[str | None, int | None]:
    """(encoder, depth) of a config list of text encoder layer indices (`llama_layers`: "llama", one past its
    largest index): the layers a stacked text input holds; (None, None) when the config has none."""
    for key, value in config.items():
        if re.fullmatch(r"\w+_layers", key) and isinstance(value, (list, tuple)) and value \
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return key.removesuffix("_layers"), max(value) + 1
    return None, None


def plan_failure(model: torch.nn.Module, plan: InputPlan, sizes: Sizes) -> str | None:
    """Why the model does not run on `plan`'s inputs at `sizes`, or None."""
    inputs = plan.build(sizes, model_dtype(model))
    latent = inputs[plan.latent_name()]
    return runs_on(model, inputs, sizes.batch, tuple(latent.shape) if plan.choice.latent_share else None)


def odd_grid_unit(model: torch.nn.Module, plan: InputPlan) -> InputPlan:
    """`plan` with its grid unit doubled (up to three times) where only that lets the model run at an odd count of
    units: a down-sampling the config's levels do not count (UNet1D's mid block halves the sequence once more), or
    attention over blocks of 8 × 8 tokens (Kandinsky 6 SR's NABLA). A plan found square gets non-square grids
    back where the larger unit is what a non-square probe lacked. Unchanged where it runs at odd counts already, or
    where doubling does not help."""
    for step in (1, 2, 4, 8):
        for square in dict.fromkeys((False, plan.square)):
            doubled = dataclasses.replace(plan, unit=plan.unit * step, square=square)
            if plan_failure(model, doubled, Sizes(batch=2, text=4, rows=3, cols=3 if square else 5)) is None:
                return doubled
    return plan


def config_arithmetic(node: ast.AST, config: Any) -> int | None:
    """The value of an expression of ints, config ints, lengths and products of config lists
    (`len(injection_layer_ids)`, `prod(patch_size)`), +, - and *; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name):
        return next(iter(config_value(config, (node.id,))), None)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("len", "prod") \
            and len(node.args) == 1 and isinstance(node.args[0], ast.Name):
        listed = config.get(node.args[0].id)
        if not isinstance(listed, (list, tuple)) or not all(isinstance(v, int) for v in listed):
            return None
        return len(listed) if node.func.id == "len" else math.prod(listed)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
        left, right = config_arithmetic(node.left, config), config_arithmetic(node.right, config)
        if left is None or right is None:
            return None
        return left + right if isinstance(node.op, ast.Add) else left - right if isinstance(node.op, ast.Sub) \
            else left * right
    return None


def documented_shape(model: torch.nn.Module, name: str) -> list[ast.expr | None]:
    """The entries of the shape the forward's docstring gives input `name` (`name (`torch.Tensor` of shape
    `(batch_size, 1 + len(ids), text_len, dim)`)`), parsed (None for an entry that is no expression); [] where it
    gives none."""
    documented = re.search(rf"^\s*{re.escape(name)} \(`[^`]*` of shape `\(([^`]*)\)`",
                           inspect.getdoc(model.forward) or "", re.MULTILINE)
    if documented is None:
        return []
    entries: list[ast.expr | None] = []
    for entry in documented.group(1).split(","):
        try:
            entries.append(ast.parse(entry.strip(), mode="eval").body)
        except SyntaxError:
            entries.append(None)
    return entries


def documented_entry(model: torch.nn.Module, name: str) -> str:
    """Input `name`'s entry in the forward's docstring (its line and the lines indented under it), or ""."""
    entry = re.search(rf"^(\s*){re.escape(name)} \(.*?(?=^\1\w+ \(|\Z)", inspect.getdoc(model.forward) or "",
                      re.MULTILINE | re.DOTALL)
    return entry.group(0) if entry else ""


def documented_constant(model: torch.nn.Module, name: str, kind: str) -> int | None:
    """The int constant of the forward's module that input `name`'s docstring entry names in backquotes with `kind`
    in its name (`OUTPUT_IMAGE_INDICATOR` for "IMAGE"), or None."""
    module = vars(sys.modules[type(model).forward.__module__])
    named = re.findall(r"`([A-Z][A-Z0-9_]*)`", documented_entry(model, name))
    return next((module[constant] for constant in named if kind in constant
                 and isinstance(module.get(constant), int) and not isinstance(module[constant], bool)), None)


def documented_channels(model: torch.nn.Module, latent_name: str) -> list[int]:
    """The latent's channel count where the forward's docstring gives its shape with one entry computed from the
    config (`2 * in_visual_dim + 1`: Kandinsky 6 SR's noisy latent, anchor latent and anchor mask in one); a bare
    config key adds nothing to LATENT_CHANNEL_KEYS, so only arithmetic counts."""
    values = (config_arithmetic(entry, model.config) if isinstance(entry, ast.BinOp) else None
              for entry in documented_shape(model, latent_name))
    return [value for value in values if value is not None and value > 0]


def documented_bundles(model: torch.nn.Module, text_name: str) -> int | None:
    """L of a text input the docstring shapes [B, L, T, C] with L computed from the config (Bria-Fibo 2's
    `(batch_size, 1 + len(injection_layer_ids), text_len, cap_feat_dim)`), else None."""
    shape = documented_shape(model, text_name)
    if len(shape) != 4 or shape[1] is None:
        return None
    bundles = config_arithmetic(shape[1], model.config)
    return bundles if bundles is not None and bundles > 0 else None


def plan_inputs(model: torch.nn.Module) -> InputPlan:
    """The input plan of `model`: roles from its forward signature, widths from its config, the layout the
    model accepts (probed). Required inputs no rule explains are given None where the model runs without them;
    where it does not, the error names them."""
    cached = getattr(model, "_svdq_input_plan", None)
    if cached is not None:
        return cached
    try:
        roles = forward_roles(model)
    except InputError as unexplained:
        try:
            plan = plan_for_roles(model, forward_roles(model, unknown_as_none=True))
        except InputError:
            raise unexplained from None
    else:
        plan = plan_for_roles(model, roles)
    model._svdq_input_plan = plan
    return plan


def plan_for_roles(model: torch.nn.Module, roles: dict[str, str]) -> InputPlan:
    config = model.config
    channels = config_value(config, LATENT_CHANNEL_KEYS)
    if not channels and roles.get("input_ids") == "latent" and config_value(config, ("codebook_size",)):
        channels = [1]  # ids have no channels
    if not channels and "inputs_embeds" in roles:  # embeddings a transformer decodes: at its own width
        channels = config_value(config, MODEL_WIDTH_KEYS)
    if not channels:
        raise InputError(f"{type(model).__name__}'s config gives no latent channel count "
                         f"({', '.join(LATENT_CHANNEL_KEYS)})",
                         fix="pass your own example_inputs to svdq_compiler.compile")
    if config.get("visual_cond"):  # Kandinsky 5/6: the conditioning frames and their mask ride in the latent
        channels = [2 * channels[0] + 1]
    latent_name = next(name for name, role in roles.items() if role == "latent")
    channels = documented_channels(model, latent_name) + channels
    conditions = condition_count(config)
    stream_channels = {name: width for name, role in roles.items() if role == "stream_latent"
                       for width in config_value(config, (f"{name.removesuffix('_hidden_states')}_in_channels",))}
    embedding_widths = {name: widths[0] for name, role in roles.items() if role == "embedding"
                        for widths in [named_width(config, name) + config_value(config, ("embedding_dim",))]
                        if widths}
    packed = {indices: stream for indices, role in roles.items() if role == "packed_indices"
              for stream in roles if f"`{indices}`" in documented_entry(model, stream)}
    packed_kinds = {indices: int(kind) for name, role in roles.items() if role == "token_kind"
                    for kind, modality in re.findall(r"`(\d+)` (\w+)", documented_entry(model, name))
                    for indices in packed if indices == f"{modality}_indices"}
    token_kinds = {name: kind for name, role in roles.items() if role == "token_kind"
                   for kind in [documented_constant(model, name, "IMAGE")] if kind is not None}
    unknown = [name for name, role in roles.items()
               if role == "stream_latent" and name not in stream_channels
               or role == "embedding" and name not in embedding_widths
               or role == "token_kind" and name not in token_kinds
               and (not packed or packed_kinds.keys() != packed.keys())
               or role == "packed_indices" and name not in packed]
    if unknown:
        raise InputError(f"{type(model).__name__}.forward requires inputs whose layout cannot be inferred from "
                         f"their names and the config: {', '.join(unknown)} (no <name>_in_channels, <name>_dim or "
                         f"embedding_dim in the config, no image constant in its docstring)",
                         fix="pass your own example_inputs (and dynamic_shapes) to svdq_compiler.compile")
    block_text_width = next((width for name, role in roles.items() if role == "text_per_block"
                             for width in named_width(config, name.removesuffix("_layers"))), None)
    image_width = next(iter(config_value(config, IMAGE_WIDTH_KEYS)), None)
    control_channels = next(iter(config_value(config, CONTROL_CHANNEL_KEYS)), None)
    # conditioning the config gives no width for is left out (an optional input the model then does without)
    absent = ({"pooled"} if not conditioning_widths(config, POOLED_WIDTH_KEYS) else set()) | \
        ({"conditions"} if conditions is None else set()) | \
        ({*TEXTS, "text_mask", "text_ids", "image_pooled"} if not text_widths(model) else set()) | \
        ({"image_tokens"} if image_width is None else set()) | \
        ({"control_latent"} if control_channels is None else set()) | \
        ({"text_per_block"} if block_text_width is None else set()) | \
        ({"stream_length"} if not stream_channels else set())
    roles = {name: role for name, role in roles.items() if role not in absent and not unused_stream(config, name, role)}
    axes = next((len(config[key]) for key in POSITION_AXES_KEYS if isinstance(config.get(key), (list, tuple))), 3)
    heads = next(iter(config_value(config, HEAD_COUNT_KEYS)), 1)
    head_dim = next(iter(config_value(config, HEAD_DIM_KEYS) or
                         [width // heads for width in config_value(config, MODEL_WIDTH_KEYS)]), 0)
    base = dict(parameters=roles, channels=channels[0], axes=axes,
                unit=spatial_unit(config), frame_unit=frame_unit(config), timestep_value=500.0,
                stack_depth=layer_stack(config)[1], conditions=conditions,
                text_layers=next(iter(config_value(config, ("num_text_layers",))), None),
                text_bundles=next((documented_bundles(model, name) for name, role in roles.items() if role == "text"),
                                  None),
                image_width=image_width, control_channels=control_channels, heads=heads, head_dim=head_dim,
                blocks=sum(value for key, value in config.items() if re.fullmatch(r"num_(\w+_)?layers", key)
                           and isinstance(value, int) and not isinstance(value, bool)),
                block_text_width=block_text_width, stream_channels=stream_channels, embedding_widths=embedding_widths,
                token_kinds=token_kinds, packed=packed, packed_kinds=packed_kinds,
                codebook=next(iter(config_value(config, ("codebook_size",))), 0),
                return_dict=takes_return_dict(model),
                text_length=next(iter(config_value(config, TEXT_LENGTH_KEYS)), None),
                encoder_widths=encoder_sizes(config, roles, TEXT_WIDTH_KEYS),
                encoder_lengths=encoder_sizes(config, roles, TEXT_LENGTH_KEYS))
    failures = []
    choices = candidate_choices(model, roles, channels[0])[:MAX_PROBES]
    # a 2×3 grid first, so a model that takes any grid is not mistaken for one that takes square grids only; then
    # larger grids, for a model whose convolutions pad past a small one (UNet1D's cubic down-sampling pads by 3)
    probes = [(Sizes(batch=2, text=4, rows=rows, cols=cols), rows == cols) for rows, cols in PROBE_GRIDS]
    for sizes, square in probes:
        for choice in choices:
            plan = InputPlan(choice=choice, square=square, **base)
            why = plan_failure(model, plan, sizes)
            if why is None:
                return odd_grid_unit(model, plan)
            if not square:
                failures.append(f"{choice.layout} latent, text width {choice.text_width}: {why}")
    raise InputError(f"no input layout built from {type(model).__name__}'s forward signature and config runs "
                     f"({len(failures)} tried; first: {failures[0] if failures else 'none'})",
                     fix="pass your own example_inputs (and dynamic_shapes) to svdq_compiler.compile")


class DiffusersAdapter(ModelAdapter):
    """Any diffusers model no family adapter knows: inputs synthesized, dynamic dimensions inferred."""

    name = "auto"
    class_names = ()
    # Flow-matching models take σ in [0, 1] (FLUX-like, ×1000 inside) or σ·1000; diffusion ones t in [0, 1000):
    # calibration uses the scale of 1000 most diffusers denoisers take.
    timestep_scale: ClassVar[float] = 1000.0

    def matches(self, model):
        # a diffusers model's class is loaded only once diffusers' modeling module is: without it, no model is
        # one, and importing diffusers to say so cost a MiniLM compile about a second
        modeling = sys.modules.get("diffusers.models.modeling_utils")
        return modeling is not None and isinstance(model, modeling.ModelMixin)

    def example_sizes(self, model: torch.nn.Module, batch: int, tokens: int | tuple[int, int] | None,
                      text_tokens: int | None = None) -> Sizes:
        plan = plan_inputs(model)
        if tokens is not None:
            rows, cols = factor_grid(tokens, what="latent grid")
            if plan.square and rows != cols:
                raise InputError(f"{type(model).__name__} takes square latent grids only, not {rows}x{cols}",
                                 fix="give --tokens as a square count or an NxN grid")
        else:
            sample = model.config.get("sample_size")
            native = sample // plan.unit if isinstance(sample, int) and sample >= 2 * plan.unit else NATIVE_GRID
            # a model whose positions are a table of max_position_embeddings rows takes no more tokens than that
            limit = next(iter(config_value(model.config, ("max_position_embeddings",))), None)
            grids = [example_grid(None, size, MAX_GRID) for size in range(native, 1, -1)]
            rows, cols = next((grid for grid in grids if limit is None or grid[0] * grid[1] <= limit), grids[-1])
            cols = rows if plan.square else cols
        return Sizes(batch=batch, text=text_tokens or self.example_text_tokens, rows=rows, cols=cols)

    def square_grid(self, model: torch.nn.Module) -> bool:
        return plan_inputs(model).square

    def example_inputs(self, model, batch=1, tokens=None, seed=0, text_tokens=None):
        return plan_inputs(model).build(self.example_sizes(model, batch, tokens, text_tokens), model_dtype(model),
                                        seed)

    def inputs_at(self, model, sizes):
        return plan_inputs(model).build(sizes, model_dtype(model))

    def sizes_of(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Sizes | None:
        """The Sizes that rebuild `inputs` (same names and shapes), or None."""
        try:
            plan = plan_inputs(model)
        except InputError:  # no layout the auto adapter builds runs on this model: the user's inputs stay static
            return None
        latent = inputs.get(plan.latent_name())
        texts = [value for name, value in inputs.items() if plan.parameters.get(name) == "text"]
        if not isinstance(latent, torch.Tensor):
            return None
        text_axis = -3 if plan.choice.layers_per_token else -2
        batch, text = latent.shape[0], texts[0].shape[text_axis] if texts else self.example_text_tokens
        layout = plan.choice.layout
        frames = plan.frames_of(latent)
        told = {name: value for name, value in inputs.items()
                if plan.parameters.get(name) == "grid_size" and isinstance(value, int)}
        if layout in PACKED and {"height", "width"} <= told.keys():  # the grid the model is told it was packed from
            frames, rows, cols = told.get("num_frames", frames), told["height"], told["width"]
        elif layout in PACKED:  # any factorization of the count rebuilds the same shapes
            frames = 1 if layout == "video_tokens" else frames
            rows, cols = factor_grid(int(latent.shape[1]) // plan.choice.slot_side ** 2, what="image tokens")
        elif layout == "sequence":
            rows, cols = latent.shape[-1] // plan.unit, 1
        elif layout == "vector":  # no grid: any rebuilds the same shapes
            rows, cols = 1, 1
        elif layout == "channels_last":
            rows, cols = latent.shape[2] // plan.unit, latent.shape[3] // plan.unit
        elif layout == "patches":  # the grid the model is told the patches come from
            shapes = next(value for name, value in inputs.items() if plan.parameters.get(name) == "grid_shapes")
            frames, rows, cols = shapes[0][0] if plan.choice.grids_per_sample else shapes[0]
        else:
            rows, cols = latent.shape[-2] // plan.unit, latent.shape[-1] // plan.unit
        sizes = Sizes(batch=int(batch), text=int(text), rows=int(rows), cols=int(cols), frames=int(frames))
        return sizes if tensor_shapes(self.inputs_at(model, sizes)) == tensor_shapes(inputs) else None

    def sizes_in_values(self, model: torch.nn.Module, inputs: dict[str, Any]) -> list[str]:
        """Also the inputs laying out a packed sequence (MiniMax H3's row positions per stream): their values are
        offsets summing the streams' lengths, and their length is that sum, which no dimension of a captured graph
        follows."""
        found = super().sizes_in_values(model, inputs)
        plan = plan_inputs(model) if self.sizes_of(model, inputs) is not None else None
        if plan is None or not plan.packed:
            return found
        layout = {name for name, role in plan.parameters.items()
                  if role in ("packed_indices", "token_kind", "timestep_indices", "position_ids")}
        return sorted(set(found) | (layout & inputs.keys()))

    def tokens_of(self, model, inputs):
        sizes = self.sizes_of(model, inputs)
        if sizes is None:
            raise InputError("these inputs were not built by the auto adapter", fix="give tokens explicitly")
        return sizes.rows, sizes.cols

    def noisy_step(self, model, clean, noise, step, num_steps, batch):
        plan = plan_inputs(model)
        latent, sigma = flow_step(clean, noise, step, num_steps)
        values = {plan.latent_name(): plan.codebook_ids(latent) if plan.choice.layout == "ids" else latent}
        for name, role in plan.parameters.items():
            if role == "timestep":
                values[name] = torch.full(plan.timestep_shape(batch, plan.frames_of(latent)),
                                          sigma * self.timestep_scale, dtype=latent.dtype)
        return values

    def _clean_latent(self, inputs, generator):
        latent = next(value for value in inputs.values() if isinstance(value, torch.Tensor))  # signature order
        # codebook ids: a Gaussian field, which noisy_step's flow steps move and then read as ids
        dtype = latent.dtype if latent.is_floating_point() else torch.float32
        return torch.randn(latent.shape, generator=generator, dtype=dtype)

    def describe(self) -> str:
        return "auto (any diffusers model: inputs from its forward signature and config, dynamic dims inferred)"



# ---- tiny configs of any class ---------------------------------------------------------------------------------

TINY_WIDTH = 64  # every width a config names: 2 heads of 32, text and pooled widths, feed-forward sizes
TINY_HEADS = 2
# Widths tried in turn until the model builds: a class can fix a head size its config does not name (Kandinsky 6
# divides its width by the sum of its RoPE axes, 128; PRX's default axes sum to 64).
TINY_WIDTHS = (TINY_WIDTH, 128, 256)
DEPTH = re.compile(r"(n_|num_)?\w*(layers|blocks)|depth|layers_per_block|transformer_layers_per_block")
HEADS = re.compile(r"\w*heads")
FRAMES = re.compile(r"(num_|sample_)?frames|video_length")
HEAD_DIM = re.compile(r"\w*head_dim")
WIDTH = re.compile(r"\w*(_dim|_channels|_size|hidden_size|^dim)")
NOT_WIDTHS = re.compile(r"in_channels|out_channels|latent_channels|patch_size\w*|sample_size|\w*max\w*|\w*axes\w*|"
                        r"\w*rope\w*|\w*len\w*|\w*vocab\w*|\w*num_\w*|\w*group\w*|\w*kernel\w*|\w*stride\w*")
PER_LEVEL = ("block_out_channels", "down_block_types", "up_block_types")
# Sizes whose default None leaves the constructor nothing to build (continuous latent input, patching,
# grouped-query heads). caption_channels: None builds no caption projection, which every released checkpoint of
# these classes has. out_channels: None is in_channels (given below).
NEEDED_WHEN_NONE = {"in_channels": 16, "patch_size": 2, "caption_channels": TINY_WIDTH, "num_kv_heads": TINY_HEADS}
# What a tiny config gives up, one at a time and then together, where the one that builds does not run: the
# optional parts a `has_*` flag leaves out (HunyuanVideo-Framepack's forward calls its image projection whatever
# the flag), a zero `extra_*` width (UNet1D concatenates its timestep embedding onto the latent's channels, which
# its first block takes only with `extra_in_channels` set), the U-Net levels past two (Kandinsky 3 pairs its levels
# with per-level settings of its own, four of them), one block of each kind (Kandinsky 3's up blocks reach their
# output width only in their second block).
RELAXATIONS = ("flags", "extra", "levels", "depth")
OPTIONAL_PART = re.compile(r"has_\w+")
EXTRA_WIDTH = re.compile(r"extra_\w*(channels|dim)")


def tiny_config(model_class: type[torch.nn.Module], given: dict[str, Any] | None = None) -> dict[str, Any]:
    """A tiny config of any diffusers model class, from its constructor's defaults: one block of each kind, two
    heads, every width 64, two U-Net levels of 32 and 64 channels, RoPE axes scaled to the head size. `given`:
    values the defaults cannot supply (what a released checkpoint's config holds), kept as they are.

    Structure (block kinds, norms, embeddings) stays the class's own; only sizes shrink. The constructor is the
    judge of what builds: each candidate (widths 64, 128, 256; with and without filling a None patch size, which
    also selects a continuous-input variant) is built on the meta device (no memory, no weights) and the first
    that builds is kept; when none does, an InputError says where the first candidate's build failed. The model's
    example inputs are the judge of what runs: where the kept candidate does not run on them, it is rebuilt with
    RELAXATIONS, fewest first, and the first that builds and runs is returned (else the kept one, whose inputs
    stage then says why it does not run).
    """
    failures = []
    filled: dict[str, Any] = {}
    for width, fill in itertools.product(TINY_WIDTHS, (True, False)):
        config = shrunk_config(model_class, width, fill, given=given)
        failure = build_failure(model_class, config)
        while failure is not None and set(keys_read := none_dicts_read(model_class, failure)) - set(filled):
            filled.update(keys_read)
            failure = build_failure(model_class, {**config, **filled})
        if failure is None:
            config = {**config, **filled}
            break
        failures.append(failure)
    else:
        why = constructor_failure(model_class, failures[0])
        raise InputError(f"no tiny config of {model_class.__name__} builds: {why}",
                         fix="build it from a released checkpoint's config")
    if runs_at_example(model_class, config):
        return config
    # a relaxation that changes nothing in this class's config is not tried
    changing = [name for name in RELAXATIONS
                if {**shrunk_config(model_class, width, fill, frozenset({name}), given), **filled} != config]
    for count in range(1, len(changing) + 1):
        for relaxed in itertools.combinations(changing, count):
            variant = {**shrunk_config(model_class, width, fill, frozenset(relaxed), given), **filled}
            if build_failure(model_class, variant) is None and runs_at_example(model_class, variant):
                return variant
    return config


def build_failure(model_class: type[torch.nn.Module], config: dict[str, Any]) -> Exception | None:
    """Why `model_class(**config)` does not build on the meta device (no memory, no weights), or None."""
    try:
        with torch.device("meta"):
            model_class(**config)
    except Exception as exc:  # any constructor error means: not this config
        return exc
    return None


def runs_at_example(model_class: type[torch.nn.Module], config: dict[str, Any]) -> bool:
    """Whether a model built from `config` runs on its adapter's example inputs (shapes only, under fake tensors)."""
    from svdq_compiler.models import adapter_for

    with torch.random.fork_rng():  # building draws random weights: the caller's seed stays its own
        model = model_class(**config).eval()
    try:
        inputs = adapter_for(model).example_inputs(model, batch=2)
    except Exception:  # no inputs built (an input the adapter cannot lay out): not running
        return False
    return runs_on(model, inputs, 2) is None


def none_dicts_read(model_class: type[torch.nn.Module], exc: Exception) -> dict[str, dict[str, float]]:
    """{parameter: {key: 1.0, …}} for each constructor parameter None by default that the line where the build
    failed subscripts (OmniGen's `rope_scaling["short_factor"]`): every string key the failing function reads from
    it, at 1.0, a factor that scales nothing; {} for any other failure. The constructor judges the result."""
    if not isinstance(exc, TypeError) or "not subscriptable" not in str(exc):
        return {}
    *_, last = traceback.walk_tb(exc.__traceback__)
    frame = last[0]
    try:
        source = inspect.getsource(frame.f_code)
    except (OSError, TypeError):  # no source to read
        return {}
    line = (traceback.extract_tb(exc.__traceback__)[-1].line or "")
    found = {}
    for name, parameter in inspect.signature(model_class.__init__).parameters.items():
        if parameter.default is None and re.search(rf"\b{name}\[", line):
            keys = re.findall(rf"\b{name}\[\s*[\"'](\w+)[\"']\s*\]", source)
            if keys:
                found[name] = dict.fromkeys(keys, 1.0)
    return found


def constructor_failure(model_class: type[torch.nn.Module], exc: Exception) -> str:
    """Where a constructor failed, and the parameters it leaves None by default that the failing line reads
    (OmniGen indexes its `rope_scaling`, None unless a checkpoint's config gives it)."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    line = frame.line or ""
    unset = [name for name, parameter in inspect.signature(model_class.__init__).parameters.items()
             if parameter.default is None and re.search(rf"\b{name}\b", line)]
    return (f"{type(exc).__name__}: {first_line(exc)} at {Path(frame.filename).name}:{frame.lineno} "
            f"(`{line}`)" + (f", {', '.join(unset)} None by default" if unset else ""))


def flags_needing_missing_modules(model_class: type[torch.nn.Module]) -> dict[str, bool]:
    """{flag: False} for each config flag, True by default, whose branch in the forward reads a module-level name
    its module left undefined: one imported only where an optional dependency is installed (Cosmos's
    `concat_padding_mask` resizes the padding mask with torchvision's `transforms`). Off, the model runs without
    that dependency; on, every input layout fails with a NameError."""
    import builtins

    try:
        source = inspect.getsource(model_class.forward)
    except (OSError, TypeError):  # no source to read (a compiled or generated forward)
        return {}
    module = vars(sys.modules[model_class.forward.__module__])
    function = ast.parse(textwrap.dedent(source)).body[0]
    local = {node.id for node in ast.walk(function) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    local |= {argument.arg for argument in ast.walk(function) if isinstance(argument, ast.arg)}
    defaults = {name: parameter.default
                for name, parameter in inspect.signature(model_class.__init__).parameters.items()}
    found = {}
    for branch in ast.walk(function):
        test = getattr(branch, "test", None) if isinstance(branch, ast.If) else None
        flag = test.attr if isinstance(test, ast.Attribute) else None
        if flag is None or defaults.get(flag) is not True:
            continue
        read = {node.id for statement in branch.body for node in ast.walk(statement)
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        if any(name not in module and name not in local and not hasattr(builtins, name) for name in read):
            found[flag] = False
    return found


def layer_indices(value: Any) -> bool:
    """A list of layer indices (WanVACE's `vace_layers` [0, 5, 10, …]): increasing from 0, not counts."""
    return isinstance(value, (list, tuple)) and len(value) > 1 and value[0] == 0 \
        and all(isinstance(v, int) for v in value) and list(value) == sorted(set(value))


def shrunk_config(model_class: type[torch.nn.Module], width: int, fill: bool,
                  relaxed: frozenset[str] = frozenset(), given: dict[str, Any] | None = None) -> dict[str, Any]:
    """One candidate of `tiny_config`: every width `width`, heads of width / 2; `fill`: the None entries of
    NEEDED_WHEN_NONE given (in_channels always); `relaxed`: the RELAXATIONS given up; `given` over all."""
    head_size = width // TINY_HEADS
    parameters = inspect.signature(model_class.__init__).parameters.items()
    defaults = {name: parameter.default for name, parameter in parameters
                if name != "self" and parameter.default is not inspect.Parameter.empty}
    config: dict[str, Any] = {}
    head_dim = next((value for name, value in defaults.items() if HEAD_DIM.fullmatch(name)
                     and isinstance(value, int)), None)
    heads = next((value for name, value in defaults.items() if HEADS.fullmatch(name) and isinstance(value, int)),
                 None)
    model_width = defaults.get("hidden_size", defaults.get("dim"))
    if head_dim is None and isinstance(model_width, int) and heads:
        head_dim = model_width // heads  # a model that gives its width and head count, not the head size
    levels = defaults.get("block_out_channels")
    level_count = len(levels) if isinstance(levels, (list, tuple)) else 0
    kept_levels = level_count if "levels" in relaxed else min(level_count, 2)
    depth = 2 if "depth" in relaxed else 1
    for name, value in defaults.items():
        if "flags" in relaxed and value is False and OPTIONAL_PART.fullmatch(name):
            config[name] = True
            continue
        if "extra" in relaxed and value == 0 and not isinstance(value, bool) and EXTRA_WIDTH.fullmatch(name):
            config[name] = width
            continue
        if value is None and name in NEEDED_WHEN_NONE and (fill or name == "in_channels"):
            config[name] = NEEDED_WHEN_NONE[name]  # a default the constructor cannot build with
            continue
        if value is None and name == "out_channels" and "in_channels" in defaults:
            config[name] = config.get("in_channels", defaults["in_channels"])
            continue
        if isinstance(value, bool) or value is None:
            continue
        if kept_levels == 2 < level_count and isinstance(value, (list, tuple)) and len(value) == level_count:
            value = type(value)([value[0], value[-1]])  # the outer levels, mirrored in the up path
        if name == "block_out_channels" and level_count:
            config[name] = (32, *(64,) * (kept_levels - 1))
        elif isinstance(value, int) and DEPTH.fullmatch(name) and value > depth:
            config[name] = depth
        elif DEPTH.fullmatch(name) and layer_indices(value):
            config[name] = type(value)(value[:depth])  # the first of the layers, which the blocks kept still have
        elif isinstance(value, (list, tuple)) and DEPTH.fullmatch(name) and all(isinstance(v, int) for v in value):
            config[name] = type(value)(min(v, depth) for v in value)
        elif isinstance(value, int) and HEADS.fullmatch(name) and value > TINY_HEADS:
            config[name] = TINY_HEADS
        elif isinstance(value, (list, tuple)) and HEADS.fullmatch(name) and all(isinstance(v, int) for v in value):
            config[name] = type(value)(min(v, TINY_HEADS) for v in value)  # per level: the channels divide
        elif isinstance(value, int) and HEAD_DIM.fullmatch(name) and value > head_size:
            config[name] = head_size
        elif isinstance(value, (list, tuple)) and re.search(r"axes|rope", name) and head_dim \
                and all(isinstance(v, int) for v in value) and head_dim % sum(value) == 0 and head_dim > head_size:
            # the axes cover the head or a fraction of it (Ideogram 4's MRoPE sections: a quarter); they still do
            total = sum(value) * head_size // head_dim
            scaled = [max(2, 2 * round(v * total / sum(value) / 2)) for v in value[:-1]]
            config[name] = type(value)([*scaled, total - sum(scaled)])
        elif isinstance(value, int) and re.fullmatch(r"\w*rope\w*_dim", name) and head_dim and head_dim > head_size \
                and value * head_size % head_dim == 0:
            config[name] = value * head_size // head_dim  # the share of each head RoPE rotates (MiniMax H3's 3/4)
        elif isinstance(value, int) and name.endswith("groups") and value > 8:
            config[name] = 8
        elif isinstance(value, int) and name == "sample_size" and value > 16:
            config[name] = 16
        elif isinstance(value, int) and name.removesuffix(encoder_suffix(name) or "") in TEXT_LENGTH_KEYS \
                and value > 8:
            config[name] = 8  # the example's text length
        elif isinstance(value, int) and FRAMES.fullmatch(name) and value > 2:
            config[name] = 2  # a frame count some models fix (Latte's temporal embedding): the example's 2 frames
        elif isinstance(value, int) and WIDTH.fullmatch(name) and not NOT_WIDTHS.fullmatch(name) \
                and value > width:
            config[name] = width
        elif level_count > 2 and isinstance(value, (list, tuple)) and len(value) == 2 and name in PER_LEVEL:
            config[name] = value
        elif level_count > 2 and isinstance(defaults[name], (list, tuple)) and len(defaults[name]) == level_count:
            config[name] = value
    return {**config, **flags_needing_missing_modules(model_class), **(given or {})}
