"""The shipped tiny FLUX: a diffusers `FluxTransformer2DModel` trained on Fashion-MNIST with rectified flow.

Pieces, all shipped under models/assets/tiny_flux/ and trained together by tools/train_tiny_flux.py:
- `transformer/`: the FLUX transformer (diffusers folder: config.json + diffusion_pytorch_model.safetensors), its
  weights stored in float16 and upcast to float32 on load: every computation runs in float32.
- `text_encoder/`: a tiny text embedding over a fixed word vocabulary (token embedding + a small transformer
  encoder) giving FLUX's two text inputs, `encoder_hidden_states` [B, L, joint_attention_dim] and
  `pooled_projections` [B, pooled_projection_dim].
- `sampler.json`: the defaults of the Euler flow-matching sampler (steps, guidance, sigma shift).

Images are 28×28 padded to 32×32 in [−1, 1]; a fixed 2×2 pixel-unshuffle gives a 4×16×16 "latent", and FLUX's 2×2
packing turns it into 64 tokens of 16 channels. Guidance is classifier-free: prompts were dropped to the empty
prompt 10% of the time in training, and the sampler runs the conditional and unconditional rows in one batch.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from svdq_compiler.errors import CheckpointError, InputError
from svdq_compiler.models import register_adapter, register_builtin
from svdq_compiler.models.base import factor_grid, low_cpu_mem_usage, model_dtype
from svdq_compiler.models.flux import FluxAdapter, image_ids
from svdq_compiler.models.fmnist import ASSETS_DIR, PADDED_SIZE, PROMPTS, to_unit_range

TINY_FLUX_DIR = ASSETS_DIR / "tiny_flux"
PIXEL_UNSHUFFLE = 2  # 1×32×32 image ↔ 4×16×16 latent
LATENT_CHANNELS = PIXEL_UNSHUFFLE ** 2
LATENT_SIZE = PADDED_SIZE // PIXEL_UNSHUFFLE
PACK = 2  # FLUX packs 2×2 latent patches into one token
PAD_TOKEN = "<pad>"
TOKEN_GRID = (LATENT_SIZE // PACK, LATENT_SIZE // PACK)  # the trained 8×8 grid of image tokens
# Set on transformers loaded from a tiny-flux folder: the adapter finds them by it, and their text encoder there.
FOLDER_ATTRIBUTE = "svdq_tiny_flux_folder"

# Halves the shipped file (5.1M parameters: 10 MB instead of 20); the samples it changes are measured when the
# weights are written (training.json "storage").
STORAGE_DTYPE = torch.float16

# The transformer the training tool builds: 6 heads of 32, two double-stream and four single-stream blocks.
TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": LATENT_CHANNELS * PACK * PACK,
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 6,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),
}


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab: tuple[str, ...]
    max_tokens: int = 8
    width: int = 64
    layers: int = 2
    heads: int = 4
    joint_attention_dim: int = 64
    pooled_projection_dim: int = 64

    @classmethod
    def for_prompts(cls, prompts: Sequence[str], **fields) -> "TextEncoderConfig":
        """A vocabulary of every word in `prompts`, in first-seen order, after the padding token."""
        vocab = [PAD_TOKEN]
        for prompt in prompts:
            vocab.extend(word for word in split_words(prompt) if word not in vocab)
        return cls(vocab=tuple(vocab), **fields)


@dataclass(frozen=True)
class SamplerConfig:
    num_steps: int = 20
    guidance_scale: float = 3.0
    shift: float = 1.0  # FLUX's sigma shift: σ' = shift·σ / (1 + (shift − 1)·σ)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes (text index, row, column) for a head width: a quarter for the text index (always 0 in FLUX, so a
    token-count-free share), the rest split evenly between rows and columns; every axis even, as rotary pairs
    need. A 32-wide head gets the first tiny-flux's (8, 12, 12)."""
    if head_dim % 8:
        raise InputError(f"a tiny FLUX head width must be a multiple of 8 for its RoPE axes, got {head_dim}")
    first = head_dim // 4
    rest = (head_dim - first) // 2
    return (first, rest, rest)


def split_words(prompt: str) -> list[str]:
    return prompt.lower().replace(",", " ").replace(".", " ").split()


class TinyTextEncoder(nn.Module):
    """Prompt → (`encoder_hidden_states` [B, L, joint_dim], `pooled_projections` [B, pooled_dim]).

    The tokenizer is a fixed word vocabulary: lower-cased words, one token each, padded to `max_tokens`; the
    empty prompt is all padding (the unconditional input for guidance).
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.word_ids = {word: index for index, word in enumerate(config.vocab)}
        self.token_embedding = nn.Embedding(len(config.vocab), config.width)
        self.position_embedding = nn.Parameter(torch.randn(config.max_tokens, config.width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(config.width, config.heads, 2 * config.width, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.width)
        self.hidden_projection = nn.Linear(config.width, config.joint_attention_dim)
        self.pooled_projection = nn.Linear(config.width, config.pooled_projection_dim)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            words = split_words(prompt)
            unknown = [w for w in words if w not in self.word_ids]
            if unknown:
                known = ", ".join(w for w in self.config.vocab if w != PAD_TOKEN)
                raise InputError(f"prompt {prompt!r} has words outside the tiny text encoder's vocabulary: "
                                 f"{', '.join(unknown)}", fix=f"use only these words: {known}")
            if len(words) > self.config.max_tokens:
                raise InputError(f"prompt {prompt!r} has {len(words)} words, more than the tiny text encoder's "
                                 f"{self.config.max_tokens}", fix="shorten it")
            ids = [self.word_ids[w] for w in words]
            rows.append(ids + [self.word_ids[PAD_TOKEN]] * (self.config.max_tokens - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def encode_ids(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.token_embedding(token_ids) + self.position_embedding
        for block in self.blocks:
            hidden = block(hidden)
        hidden = self.final_norm(hidden)
        return self.hidden_projection(hidden), self.pooled_projection(hidden.mean(dim=1))

    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_ids(self.tokenize(prompts).to(self.token_embedding.weight.device))


def build_transformer(config: dict | None = None):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**(config or TRANSFORMER_CONFIG))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)·(W/2), 4C], FLUX's 2×2 packing (row-major tokens, channels c·4 + dy·2 + dx)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a [height, width] latent."""
    b, _, channels = tokens.shape
    c = channels // (PACK * PACK)
    patches = tokens.reshape(b, height // PACK, width // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def images_to_tokens(images: torch.Tensor) -> torch.Tensor:
    """Model-range images [B, 1, 32, 32] → the transformer's `hidden_states` [B, 64, 16]."""
    return pack_latents(F.pixel_unshuffle(images, PIXEL_UNSHUFFLE))


def tokens_to_images(tokens: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(unpack_latents(tokens, LATENT_SIZE, LATENT_SIZE), PIXEL_UNSHUFFLE)


def text_ids(num_tokens: int) -> torch.Tensor:
    return torch.zeros(num_tokens, 3)


def shifted_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """num_steps + 1 noise levels from 1 to 0: evenly spaced, then shifted toward noise as FLUX does."""
    if num_steps < 1:
        raise InputError(f"num_steps must be at least 1, got {num_steps}")
    if shift <= 0:
        raise InputError(f"the sigma shift must be positive, got {shift}")
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * sigmas / (1 + (shift - 1) * sigmas)).float()


def transformer_output(output) -> torch.Tensor:
    """The velocity tensor of a transformer call: eager diffusers returns an output object, a graph may not."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputError(f"the transformer returned {type(output).__name__}, not a tensor or a diffusers output",
                     fix="pass a FLUX transformer or a graph compiled from one")


def initial_noise(seeds: Sequence[int]) -> torch.Tensor:
    """Starting latents [B, 64, 16]: each row from its own seed, so a (prompt, seed) pair gives one image
    whatever else is in the batch."""
    rows = [torch.randn(1, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(s))
            for s in seeds]
    return pack_latents(torch.cat(rows))


class TinyFluxPipeline:
    """Euler flow-matching sampler with classifier-free guidance over a shifted sigma schedule.

    `transformer` may be the eager diffusers model or any callable taking the same keyword arguments (a compiled
    GraphModule); `with_transformer` swaps it while keeping the text encoder and sampler defaults.
    """

    def __init__(self, transformer: Callable, text_encoder: TinyTextEncoder, sampler: SamplerConfig = SamplerConfig()):
        self.transformer = transformer
        self.text_encoder = text_encoder.eval()
        self.sampler = sampler

    def with_transformer(self, transformer: Callable) -> "TinyFluxPipeline":
        return TinyFluxPipeline(transformer, self.text_encoder, self.sampler)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoder(list(prompts))

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seeds: Sequence[int] | int = 0, *, num_steps: int | None = None,
                 guidance_scale: float | None = None, shift: float | None = None,
                 on_step: Callable[[int, dict], None] | None = None) -> torch.Tensor:
        """Images [B, 1, 28, 28] in [0, 1] for `prompts`, one per prompt.

        `seeds` is one seed per prompt, or a single int s giving seeds s, s+1, …. `on_step(step, inputs)` sees the
        keyword arguments of every transformer call (the calibration inputs are recorded this way).
        """
        prompts = list(prompts)
        if isinstance(seeds, int):
            seeds = [seeds + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise InputError(f"got {len(prompts)} prompts and {len(seeds)} seeds", fix="give one seed per prompt")
        num_steps = self.sampler.num_steps if num_steps is None else num_steps
        guidance = self.sampler.guidance_scale if guidance_scale is None else guidance_scale
        sigmas = shifted_sigmas(num_steps, self.sampler.shift if shift is None else shift)
        guided = guidance != 1.0
        hidden, pooled = self.encode(prompts + [""] * len(prompts) if guided else prompts)
        latents = initial_noise(seeds)  # the trajectory stays float32; each call gets the transformer's dtype
        transformer_dtype = getattr(self.transformer, "dtype", None)
        img_ids, txt_ids = image_ids(*TOKEN_GRID), text_ids(hidden.shape[1])
        for step in range(num_steps):
            model_input = torch.cat([latents, latents]) if guided else latents
            inputs = floats_as({"hidden_states": model_input, "encoder_hidden_states": hidden,
                                "pooled_projections": pooled, "timestep": sigmas[step].expand(model_input.shape[0]).clone(),
                                "img_ids": img_ids, "txt_ids": txt_ids, "return_dict": False}, transformer_dtype)
            if on_step is not None:
                on_step(step, inputs)
            velocity = transformer_output(self.transformer(**inputs)).float()
            if guided:
                conditional, unconditional = velocity.chunk(2)
                velocity = unconditional + guidance * (conditional - unconditional)
            latents = latents + (sigmas[step + 1] - sigmas[step]) * velocity
        return to_unit_range(tokens_to_images(latents))


def floats_as(inputs: dict, dtype: torch.dtype | None) -> dict:
    """`inputs` with each floating-point tensor in `dtype` (None: unchanged): a float16 or bfloat16 transformer
    takes its inputs in its own dtype, as a diffusers pipeline feeds it."""
    if dtype is None:
        return inputs
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def _require_files(folder: Path, names: Sequence[str]) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"the tiny FLUX folder lacks {', '.join(missing)}", where=str(folder),
                              fix="restore models/assets/tiny_flux from the repository, or retrain it with "
                                  "`python tools/train_tiny_flux.py`")


def load_transformer(folder: str | Path | None = None):
    from diffusers import FluxTransformer2DModel

    folder = Path(folder) if folder is not None else TINY_FLUX_DIR
    _require_files(folder / "transformer", ["config.json", "diffusion_pytorch_model.safetensors"])
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32,
                                                         low_cpu_mem_usage=low_cpu_mem_usage()).eval()
    setattr(transformer, FOLDER_ATTRIBUTE, str(folder))
    return transformer


def load_text_encoder(folder: str | Path | None = None) -> TinyTextEncoder:
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else TINY_FLUX_DIR
    _require_files(folder / "text_encoder", ["config.json", "model.safetensors"])
    fields = json.loads((folder / "text_encoder" / "config.json").read_text())
    encoder = TinyTextEncoder(TextEncoderConfig(**{**fields, "vocab": tuple(fields["vocab"])}))
    encoder.load_state_dict(load_file(str(folder / "text_encoder" / "model.safetensors")))
    return encoder.eval()


def load_sampler_config(folder: str | Path | None = None) -> SamplerConfig:
    folder = Path(folder) if folder is not None else TINY_FLUX_DIR
    _require_files(folder, ["sampler.json"])
    return SamplerConfig(**json.loads((folder / "sampler.json").read_text()))


def load_pipeline(folder: str | Path | None = None, transformer: Callable | None = None) -> TinyFluxPipeline:
    """The shipped pipeline (or the one saved in `folder`); `transformer` replaces the shipped transformer."""
    return TinyFluxPipeline(transformer if transformer is not None else load_transformer(folder),
                            load_text_encoder(folder), load_sampler_config(folder))


def save_transformer(transformer, folder: Path) -> None:
    """Write `transformer` as folder/transformer in STORAGE_DTYPE, replacing any earlier one whole."""
    from safetensors.torch import save_file

    staging = folder / "transformer.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    transformer.save_config(staging)
    config = json.loads((staging / "config.json").read_text())
    config.pop("_name_or_path", None)  # the folder it was loaded from, if any: not part of the model
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({name: tensor.to(STORAGE_DTYPE).contiguous() for name, tensor in transformer.state_dict().items()},
              str(staging / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(folder / "transformer", ignore_errors=True)
    staging.rename(folder / "transformer")


def save_text_encoder(encoder: TinyTextEncoder, folder: Path) -> None:
    from safetensors.torch import save_file

    target = folder / "text_encoder"
    target.mkdir(parents=True, exist_ok=True)
    weights_tmp, config_tmp = target / "model.safetensors.tmp", target / "config.json.tmp"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(weights_tmp))
    config_tmp.write_text(json.dumps(asdict(encoder.config), indent=2) + "\n")
    weights_tmp.replace(target / "model.safetensors")
    config_tmp.replace(target / "config.json")


def save_sampler_config(sampler: SamplerConfig, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "sampler.json.tmp"
    tmp.write_text(json.dumps(asdict(sampler), indent=2) + "\n")
    tmp.replace(folder / "sampler.json")


# ---- the model adapter -----------------------------------------------------------------------------------------

def folder_of(model) -> Path | None:
    folder = getattr(model, FOLDER_ATTRIBUTE, None)
    return Path(folder) if folder is not None else None


def example_inputs(model=None, batch: int = 1, tokens: int | tuple[int, int] | None = None, seed: int = 0,
                   text_encoder: TinyTextEncoder | None = None) -> dict:
    """Keyword arguments of one transformer call as the sampler makes it, at a mid noise level.

    `batch` prompts (the class prompts from `seed` on), each as a conditional and an unconditional (empty prompt)
    row, so 2·batch rows: a guided sampler's call, and a batch dimension that capture can keep dynamic.
    `tokens` is the image token count or a (rows, cols) grid; the default is the trained 8×8.
    """
    rows, cols = factor_grid(tokens or TOKEN_GRID, what="image tokens")
    encoder = text_encoder if text_encoder is not None else load_text_encoder(folder_of(model))
    prompts = [PROMPTS[(seed + i) % len(PROMPTS)] for i in range(batch)]
    with torch.no_grad():
        hidden, pooled = encoder(prompts + [""] * batch)
    channels = model.config.in_channels if model is not None else TRANSFORMER_CONFIG["in_channels"]
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, rows * cols, channels, generator=generator)
    return floats_as({"hidden_states": torch.cat([latents, latents]), "encoder_hidden_states": hidden,
                      "pooled_projections": pooled, "timestep": torch.full((2 * batch,), 0.5),
                      "img_ids": image_ids(rows, cols), "txt_ids": text_ids(hidden.shape[1]), "return_dict": False},
                     model_dtype(model) if model is not None else None)


def calib_inputs(model, num_prompts: int = 10, num_steps: int = 4, seed: int = 0, *, batch: int = 1,
                 pipeline: TinyFluxPipeline | None = None) -> list[dict]:
    """Transformer inputs recorded along real sampler trajectories: prompts × steps.

    The class prompts in turn (seeds `seed`, `seed`+1, …) are sampled with the shipped defaults through `model`,
    `batch` prompts at a time; the calls of `num_steps` steps, spread evenly from the noisiest to the last, are
    kept as the sampler made them (with guidance, each holds the conditional and the unconditional rows).
    """
    if num_prompts < 1 or num_steps < 1:
        raise InputError(f"calibration needs at least one prompt and one step, got {num_prompts} × {num_steps}")
    if pipeline is None:
        pipeline = load_pipeline(folder_of(model), transformer=model)
    elif model is not None:
        pipeline = pipeline.with_transformer(model)
    total_steps = pipeline.sampler.num_steps
    if num_steps > total_steps:
        raise InputError(f"asked for {num_steps} calibration steps of a {total_steps}-step sampler",
                         fix=f"use at most {total_steps}")
    kept_steps = {round(i * (total_steps - 1) / max(num_steps - 1, 1)) for i in range(num_steps)}
    recorded: list[dict] = []

    def record(step: int, inputs: dict) -> None:
        if step in kept_steps:
            recorded.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_prompts)]
    for start in range(0, num_prompts, batch):
        chunk = prompts[start:start + batch]
        pipeline(chunk, [seed + start + i for i in range(len(chunk))], on_step=record)
    return recorded


class TinyFluxAdapter(FluxAdapter):
    """The FLUX adapter for tiny-flux transformers: inputs from the shipped text encoder and sampler.

    Example inputs carry real prompt encodings; calibration inputs are the sampler's own calls along real
    trajectories (prompts × steps), instead of the generic adapter's random conditioning.
    """

    name = "tiny-flux"
    # Chosen by `matches` (the shipped model's folder), never by class name: every other FluxTransformer2DModel
    # (a diffusers folder, a 12B checkpoint) keeps the FLUX adapter.
    class_names = ()

    def matches(self, model) -> bool:
        return folder_of(model) is not None

    def example_inputs(self, model, batch=1, tokens=None, seed=0, text_tokens=None):
        if text_tokens is not None:
            raise InputError("tiny-flux's text length is its text encoder's", fix="leave text_tokens unset")
        return example_inputs(model, batch, tokens, seed)

    def inputs_at(self, model, sizes):
        # `batch` here counts prompts (two rows each) and the text length is the encoder's: the FLUX adapter's
        # random inputs have the same shapes at any row count and text length
        return FluxAdapter.example_inputs(self, model, batch=sizes.batch, tokens=(sizes.rows, sizes.cols),
                                          text_tokens=sizes.text)

    def calib_inputs(self, model, num_prompts, num_steps, seed=0, *, batch=1, tokens=None):
        if tokens is not None and factor_grid(tokens, what="image tokens") != TOKEN_GRID:
            raise InputError(f"tiny-flux calibration samples at its trained {TOKEN_GRID[0]}×{TOKEN_GRID[1]} token "
                             f"grid, not {tokens}", fix="leave tokens unset")
        return calib_inputs(model, num_prompts, num_steps, seed, batch=batch)


register_adapter(TinyFluxAdapter())
register_builtin("tiny-flux", load_transformer,
                 "FLUX transformer (5.1M parameters) trained on Fashion-MNIST, shipped with the project",
                 checkpoint=TINY_FLUX_DIR / "transformer")
