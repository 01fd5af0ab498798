"""Model adapters: what the compiler needs to know about one model family.

An adapter builds example inputs and calibration inputs from a model's config, says which input dimensions may
change between calls (`DynDim`), and may add role hints for annotate_linears. One adapter per family lives in its
own module (flux, pixart, sd3, sana, unet); `GenericAdapter` takes any nn.Module with inputs the user gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from svdq_compiler.errors import InputError

# Default dynamic ranges. The upper bounds are generous limits, not sizes the capture is tuned for; a model whose
# code needs a tighter bound gets it narrowed at capture time (and the report says so).
MAX_BATCH = 64
MAX_TEXT_TOKENS = 4096
MAX_GRID = 256  # patches per side: 4096-pixel images at patch 2 and an 8× VAE


@dataclass(frozen=True)
class DynDim:
    """A dimension that may change between calls: its size is `multiple * n` for n in [min, max].

    Input dimensions that share a `name` are the same symbol and must be equal at run time (e.g. FLUX's
    `hidden_states` dim 1 and `img_ids` dim 0). `label` says what the dimension is, for reports and errors.
    """

    name: str
    min: int
    max: int
    multiple: int = 1
    label: str = ""
    why: str = ""  # how the dimension was found to vary, when it was inferred rather than declared

    def __post_init__(self):
        if not (1 <= self.min <= self.max) or self.multiple < 1:
            raise InputError(f"dynamic dimension {self.name!r} needs 1 <= min <= max and multiple >= 1, "
                             f"got min={self.min} max={self.max} multiple={self.multiple}")

    def describe(self) -> str:
        return self.label or self.name

    def allows(self, size: int) -> bool:
        return size % self.multiple == 0 and self.min <= size // self.multiple <= self.max

    def size_range(self) -> str:
        low, high = self.min * self.multiple, self.max * self.multiple
        step = f" in steps of {self.multiple}" if self.multiple > 1 else ""
        return f"[{low}, {high}]{step}"


def batch_dim(max_batch: int = MAX_BATCH) -> DynDim:
    """The batch dimension. An example batch of 1 leaves it static (torch.export specializes sizes 0 and 1):
    capture with batch >= 2, e.g. classifier-free guidance's pair, to serve any batch."""
    return DynDim("batch", 1, max_batch, label="batch")


def text_dim(max_tokens: int = MAX_TEXT_TOKENS) -> DynDim:
    return DynDim("text_tokens", 2, max_tokens, label="text tokens")


def batch_leading_shapes(inputs: dict[str, Any], special: dict[str, dict[int, DynDim]],
                         batch: DynDim) -> dict[str, Any]:
    """Dynamic shapes for `inputs`: the `special` entries as given, and every other tensor (nested dicts
    included) with only its leading batch dimension dynamic."""
    def leading(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {0: batch} if value.dim() else None
        if isinstance(value, dict):
            return {key: leading(item) for key, item in value.items()}
        return None

    return {key: special[key] if key in special else leading(value) for key, value in inputs.items()}


def tensor_dims(**dims: DynDim | None) -> dict[int, DynDim]:
    """{dim index: DynDim} from keyword arguments `d0=…, d1=…`, leaving out the static (None) ones."""
    return {int(key.removeprefix("d")): dim for key, dim in dims.items() if dim is not None}


def factor_grid(tokens: int | tuple[int, int], multiple: int = 1, *, what: str = "tokens") -> tuple[int, int]:
    """A (rows, cols) grid: a given pair is checked; an int is split into the most square pair of multiples."""
    if isinstance(tokens, (tuple, list)):
        rows, cols = (int(v) for v in tokens)
        if rows < 1 or cols < 1 or rows % multiple or cols % multiple:
            raise InputError(f"{what} grid {rows}x{cols} must be positive multiples of {multiple}")
        return rows, cols
    count = int(tokens)
    units = count // (multiple * multiple)
    if count < 1 or units * multiple * multiple != count:
        raise InputError(f"{what}={count} cannot be split into a grid of multiples of {multiple}",
                         fix=f"give a multiple of {multiple * multiple}, or a (rows, cols) pair")
    rows = max(d for d in range(1, math.isqrt(units) + 1) if units % d == 0)
    return rows * multiple, (units // rows) * multiple


class ModelAdapter:
    """Everything the compiler knows about one model family; subclasses fill in the family's details."""

    name: ClassVar[str] = ""
    class_names: ClassVar[tuple[str, ...]] = ()  # the diffusers classes this adapter matches
    # (block list attribute, config key of its length) of block lists whose blocks are identical: capture
    # traces three of each and replicates them (svdq_compiler.meta_capture)
    repeated_blocks: ClassVar[tuple[tuple[str, str], ...]] = ()

    # ---- identity and construction ----------------------------------------------------------------------

    def matches(self, model: torch.nn.Module) -> bool:
        return type(model).__name__ in self.class_names

    def model_class(self) -> type[torch.nn.Module]:
        import diffusers

        return getattr(diffusers, self.class_names[0])

    def random_config(self) -> dict[str, Any]:
        """A tiny config with every structural feature of the family (for tests and coverage demos)."""
        raise NotImplementedError(f"{type(self).__name__} has no random config")

    def random_model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.model_class()(**self.random_config()).eval()

    # ---- inputs -----------------------------------------------------------------------------------------

    def example_inputs(self, model: torch.nn.Module, batch: int = 1, tokens: int | tuple[int, int] | None = None,
                       seed: int = 0) -> dict[str, Any]:
        """Keyword arguments for one forward call. `tokens` is the image token count or a (rows, cols) grid."""
        raise NotImplementedError

    def dynamic_shapes(self, model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """{input name: {dim index: DynDim}} mirroring `inputs` (nested dicts included); None = all static."""
        return None

    def tokens_of(self, model: torch.nn.Module, inputs: dict[str, Any]) -> int | tuple[int, int]:
        """The `tokens` argument of example_inputs that reproduces the image size of `inputs`."""
        raise NotImplementedError

    def calib_inputs(self, model: torch.nn.Module, num_prompts: int, num_steps: int, seed: int = 0, *,
                     batch: int = 1, tokens: int | tuple[int, int] | None = None) -> list[dict[str, Any]]:
        """Calibration inputs spanning prompts × denoising steps (and so timesteps): num_prompts * num_steps dicts.

        Each prompt gets its own text conditioning and latent trajectory; each step sees the latent at that
        step's noise level of the family's schedule. Random-weight and headless models have no text encoder,
        so the conditioning is drawn at random; real prompts go through the family's pipeline instead.
        """
        if num_prompts < 1 or num_steps < 1:
            raise InputError("calibration needs at least one prompt and one step",
                             fix="set num_prompts >= 1 and num_steps >= 1")
        samples = []
        for prompt in range(num_prompts):
            conditioning = self.example_inputs(model, batch=batch, tokens=tokens, seed=seed * 1000 + prompt)
            generator = torch.Generator().manual_seed(seed * 1000 + prompt)
            clean = self._clean_latent(conditioning, generator)
            noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype)
            for step in range(num_steps):
                sample = dict(conditioning)
                sample.update(self.noisy_step(model, clean, noise, step, num_steps, batch))
                samples.append(sample)
        return samples

    latent_key: ClassVar[str] = "hidden_states"

    def _clean_latent(self, inputs: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        latent = inputs[self.latent_key]
        return torch.randn(latent.shape, generator=generator, dtype=latent.dtype)

    def noisy_step(self, model: torch.nn.Module, clean: torch.Tensor, noise: torch.Tensor, step: int,
                   num_steps: int, batch: int) -> dict[str, Any]:
        """The latent and timestep inputs of denoising step `step` of `num_steps`."""
        raise NotImplementedError

    # ---- capture and passes -----------------------------------------------------------------------------

    def guard_relaxation(self, model: torch.nn.Module, inputs: dict[str, Any]) -> str | None:
        """Why torch.export's recorded size guards can be dropped for these inputs, or None to keep them.

        Only an adapter whose family was checked at many sizes returns a reason; the declared dynamic
        dimensions (ranges, multiples, equalities) are still enforced at run time.
        """
        return None

    def role_hints(self, model: torch.nn.Module) -> dict[str, str]:
        """{regular expression on qualified linear name: role}: family knowledge for annotate_linears."""
        return {}

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.class_names) or 'any nn.Module'})"


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module.to(dtype)`, without the warning diffusers' ModelMixin.to prints on every dtype cast: it warns about
    "modules that should be kept in float32" even when the model lists none (then the cast is torch's own)."""
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(dtype)
    return torch.nn.Module.to(module, dtype)


def low_cpu_mem_usage() -> bool:
    """diffusers' from_pretrained(low_cpu_mem_usage=...): only with accelerate installed; asked for without it,
    diffusers warns and falls back."""
    from diffusers.utils import is_accelerate_available

    return is_accelerate_available()


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def randn(generator: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(dtype)


def flow_sigma(step: int, num_steps: int) -> float:
    """Noise level of a flow-matching sampler's step: from 1 (pure noise) down to 1/num_steps."""
    return 1.0 - step / num_steps


def ddpm_alpha_bar(timestep: int, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                   beta_end: float = 0.012) -> float:
    """ᾱ_t of the scaled-linear schedule that SD/SDXL and PixArt are trained with."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return float(torch.cumprod(1.0 - betas, 0)[timestep])


def ddpm_timestep(step: int, num_steps: int, num_train_timesteps: int = 1000) -> int:
    """The training timestep a `num_steps` sampler visits at `step` (evenly spaced, from the noisiest)."""
    return round((num_train_timesteps - 1) * (1.0 - step / num_steps))


def flow_step(clean: torch.Tensor, noise: torch.Tensor, step: int, num_steps: int) -> tuple[torch.Tensor, float]:
    sigma = flow_sigma(step, num_steps)
    return (1.0 - sigma) * clean + sigma * noise, sigma


def ddpm_step(clean: torch.Tensor, noise: torch.Tensor, step: int, num_steps: int) -> tuple[torch.Tensor, int]:
    timestep = ddpm_timestep(step, num_steps)
    alpha_bar = ddpm_alpha_bar(timestep)
    return alpha_bar ** 0.5 * clean + (1.0 - alpha_bar) ** 0.5 * noise, timestep


def spatial_dims(multiple: int, max_units: int, min_units: int = 2) -> tuple[DynDim, DynDim]:
    """Latent height and width, each a multiple of the patch (or down-sampling) factor."""
    return (DynDim("height", min_units, max_units, multiple=multiple, label="latent height"),
            DynDim("width", min_units, max_units, multiple=multiple, label="latent width"))


def example_grid(tokens: int | tuple[int, int] | None, native: int, max_units: int) -> tuple[int, int]:
    """The (rows, cols) patch grid of example inputs.

    The default is deliberately off the native size on both axes and not square: torch.export specializes a
    dimension the model compares with its native size, and ties symbols whose example values meet in the
    model's shape logic (a square example can make width a copy of height).
    """
    if tokens is not None:
        return factor_grid(tokens, what="image tokens")
    rows = min(max_units - 1, max(2, native + max(1, native // 4)))
    cols = min(max_units, rows + max(1, rows // 2))
    return rows, cols


class PatchifiedAdapter(ModelAdapter):
    """DiTs over a [batch, channels, height, width] latent cut into patch × patch tokens (PixArt, SD3, Sana).

    Height and width are dynamic in multiples of the patch size; the text sequence is dynamic; every other
    input leads with the batch.
    """

    text_channels: ClassVar[str] = "caption_channels"  # the config entry giving the text embedding width
    example_text_tokens = 8

    def max_grid(self, model: torch.nn.Module) -> int:
        return MAX_GRID

    def example_inputs(self, model, batch=1, tokens=None, seed=0):
        config = model.config
        patch = config.patch_size
        rows, cols = example_grid(tokens, config.sample_size // patch, self.max_grid(model))
        generator = torch.Generator().manual_seed(seed)
        dtype = model_dtype(model)
        inputs = dict(
            hidden_states=randn(generator, batch, config.in_channels, rows * patch, cols * patch, dtype=dtype),
            encoder_hidden_states=randn(generator, batch, self.example_text_tokens, config[self.text_channels],
                                        dtype=dtype))
        inputs.update(self.conditioning(model, batch, generator, dtype, rows * patch, cols * patch))
        inputs["return_dict"] = False
        return inputs

    def tokens_of(self, model, inputs):
        patch = model.config.patch_size
        return inputs["hidden_states"].shape[2] // patch, inputs["hidden_states"].shape[3] // patch

    def conditioning(self, model: torch.nn.Module, batch: int, generator: torch.Generator, dtype: torch.dtype,
                     height: int, width: int) -> dict[str, Any]:
        """The family's inputs besides the latent and the text: timestep, masks, pooled text, guidance …"""
        raise NotImplementedError

    def dynamic_shapes(self, model, inputs):
        batch, text = batch_dim(), text_dim()
        height, width = spatial_dims(model.config.patch_size, self.max_grid(model))
        return batch_leading_shapes(inputs, {
            "hidden_states": tensor_dims(d0=batch, d2=height, d3=width),
            "encoder_hidden_states": tensor_dims(d0=batch, d1=text),
            "encoder_attention_mask": tensor_dims(d0=batch, d1=text)}, batch)

    def noisy_step(self, model, clean, noise, step, num_steps, batch):
        # Flow matching, with the timestep in the scheduler's units (σ·1000) as SD3 and Sana take it.
        latent, sigma = flow_step(clean, noise, step, num_steps)
        return dict(hidden_states=latent, timestep=torch.full((batch,), sigma * 1000.0, dtype=latent.dtype))
