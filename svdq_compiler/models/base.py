"""Model adapters: what the compiler needs to know about one model family.

An adapter builds example inputs and calibration inputs from a model's config and may add role hints for
annotate_linears. Which input dimensions may change between calls (`DynDim`) is found, not declared: the inputs
are rebuilt one size larger at a time and every dimension that moved follows that size (`infer_dims`); a family
only narrows the ranges it knows (`dim_limits`). One adapter per family lives in its own module (flux, pixart,
sd3, sana, unet); `DiffusersAdapter` (auto.py) takes any other diffusers denoiser and `GenericAdapter` any
nn.Module with inputs the user gives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch

from svdq_compiler.errors import InputError, first_line

# Default dynamic ranges. The upper bounds are generous limits, not sizes the capture is tuned for; a model whose
# code needs a tighter bound gets it narrowed at capture time (and the report says so).
MAX_BATCH = 64
MAX_TEXT_TOKENS = 4096
MAX_GRID = 256  # patches per side: 4096-pixel images at patch 2 and an 8× VAE
NATIVE_GRID = 8  # patches per side of a model whose config gives no sample_size
MAX_FRAMES = 64  # latent frames of a video model


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


@dataclass(frozen=True)
class Sizes:
    """The sizes example inputs are built at: batch, text tokens, and the latent grid in units (patches, or the
    total down-sampling of a U-Net) of rows, columns and frames."""

    batch: int
    text: int
    rows: int
    cols: int
    frames: int = 2

    def bumped(self, field: str) -> "Sizes":
        return dataclasses.replace(self, **{field: getattr(self, field) + 1})


# What a dimension that moves with one size (or with the product of several) is: (name, label, min, max units).
FOLLOWS: dict[tuple[str, ...], tuple[str, str, int, int]] = {
    ("batch",): ("batch", "batch", 1, MAX_BATCH),
    ("text",): ("text_tokens", "text tokens", 2, MAX_TEXT_TOKENS),
    ("rows",): ("height", "latent height", 2, MAX_GRID),
    ("cols",): ("width", "latent width", 2, MAX_GRID),
    ("frames",): ("frames", "latent frames", 1, MAX_FRAMES),
    ("cols", "rows"): ("image_tokens", "image tokens", 2, MAX_GRID * MAX_GRID),
    ("cols", "frames", "rows"): ("video_tokens", "video tokens", 2, MAX_FRAMES * MAX_GRID * MAX_GRID),
}
SIZE_FIELDS = ("batch", "text", "rows", "cols", "frames")
# the dimensions that follow the latent grid: what "another resolution" changes
GRID_DIMS = frozenset(name for follows, (name, *_) in FOLLOWS.items() if {"rows", "cols", "frames"} & set(follows))


def tensor_shapes(tree: Any, path: tuple = ()) -> dict[tuple, tuple[int, ...]]:
    """{path: shape} of every tensor in nested dicts of inputs."""
    if isinstance(tree, torch.Tensor):
        return {path: tuple(tree.shape)}
    if isinstance(tree, dict):
        return {found: shape for key, value in tree.items() for found, shape in tensor_shapes(value, path + (key,))
                .items()}
    return {}


def _holds_tensors(value: Any) -> bool:
    """A tensor, a dict (keyword arguments of a sub-call), or a list or tuple with a tensor in it."""
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(item) for item in value)
    return isinstance(value, (torch.Tensor, dict))


def ints_matching_sizes(inputs: dict[str, Any]) -> list[str]:
    """The inputs holding a Python int (a bool is not one) equal to a size, 2 or more, of one of the inputs'
    tensors: with inputs no adapter can rebuild at another size, the one sign that a value carries a size
    (Cosmos 3's `sequence_length`, the length of its `position_ids`)."""
    leaves = {name: torch.utils._pytree.tree_leaves(value) for name, value in inputs.items()}
    sizes = {size for values in leaves.values() for value in values if isinstance(value, torch.Tensor)
             for size in value.shape if size >= 2}
    return sorted(name for name, values in leaves.items()
                  if any(type(value) is int and value in sizes for value in values))


def leaf_name(path: Sequence[Any]) -> str:
    """The flat name of a nested input (keys and indices joined by "_", as an identifier's characters): how a
    torch.compile region names the leaves of nested call inputs, e.g. added_cond_kwargs_text_embeds."""
    return re.sub(r"\W+", "_", "_".join(map(str, path))).strip("_")


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{leaf_name(path): shape} of every tensor in nested dicts of inputs."""
    return {leaf_name(path): shape for path, shape in tensor_shapes(tree).items()}


def infer_dims(build: Callable[[Sizes], dict[str, Any]], sizes: Sizes,
               limits: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Dynamic shapes {input: {dim: DynDim}} (nested dicts mirrored) for every input dimension that moves when
    one size moves.

    The inputs are built at `sizes` and again with each size one larger. A dimension that moves with exactly
    the sizes of one FOLLOWS entry, by the same multiple of their product at both sizes, follows it and is
    declared with FOLLOWS' range (or `limits`' {name: (min, max)}); a dimension that moves any other way (an
    offset, unrelated sizes) stays static, and so does one that never moves.
    """
    inputs = build(sizes)
    base = tensor_shapes(inputs)
    moved = {field: tensor_shapes(build(sizes.bumped(field))) for field in SIZE_FIELDS}
    found: dict[tuple, dict[int, DynDim]] = {}
    for path, shape in base.items():
        for index, size in enumerate(shape):
            follows = tuple(sorted(field for field in SIZE_FIELDS if moved[field][path][index] != size))
            if follows not in FOLLOWS:
                continue
            multiple, remainder = divmod(size, math.prod(getattr(sizes, field) for field in follows))
            if remainder or any(moved[field][path][index] != multiple * math.prod(
                    getattr(sizes.bumped(field), f) for f in follows) for field in follows):
                continue
            name, label, low, high = FOLLOWS[follows]
            low, high = (limits or {}).get(name, (low, high))
            natural = [field for field in SIZE_FIELDS if field in follows]
            seen = " × ".join(f"{getattr(sizes, field)} {field}" for field in natural)
            why = (f"follows the {label}: {size} at {seen}, and it moved with {' and '.join(natural)} when the "
                   f"inputs were rebuilt one larger" + (f" (multiple {multiple})" if multiple > 1 else ""))
            found.setdefault(path, {})[index] = DynDim(name, low, high, multiple, label, why=why)

    def mirror(tree: Any, path: tuple) -> Any:
        if isinstance(tree, dict):
            return {key: mirror(value, path + (key,)) for key, value in tree.items()}
        return found.get(path) if isinstance(tree, torch.Tensor) else None

    return mirror(inputs, ())


@contextlib.contextmanager
def traced_for_shapes() -> Iterator[None]:
    """torch.compiler.is_compiling() is true within: a model that caches tensors it builds (diffusers'
    `lru_cache_unless_export`: LongCat-Audio's rotary tables) skips its cache while traced, so no fake tensor
    is left there for the real runs that follow."""
    flag = "_is_compiling_flag"  # what torch.compile itself sets for its session
    if not hasattr(torch.compiler, flag):
        yield
        return
    before = getattr(torch.compiler, flag)
    setattr(torch.compiler, flag, True)
    try:
        yield
    finally:
        setattr(torch.compiler, flag, before)


def holds_fake(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, (list, tuple)):
        return any(holds_fake(item) for item in value)
    return isinstance(value, FakeTensor)


@contextlib.contextmanager
def fake_caches_undone(model: torch.nn.Module) -> Iterator[None]:
    """Within: tensors a model caches in plain attributes on its first call (Bria-Fibo 2's rotary tables, kept by a
    helper object hung on the model) are built as fake tensors when that call is a probe; on exit each attribute
    left holding one gets its earlier value back, so the real runs that follow build real tables."""
    holders = [*model.modules()]
    holders += [value for module in model.modules() for value in vars(module).values()
                if hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, torch.Tensor, type))]
    before = [(holder, dict(vars(holder))) for holder in holders]
    try:
        yield
    finally:
        for holder, attributes in before:
            for name, value in list(vars(holder).items()):
                if holds_fake(value):
                    if name in attributes:
                        setattr(holder, name, attributes[name])
                    else:
                        delattr(holder, name)


def output_batches(result: Any) -> list[tuple[int, list[int]]]:
    """The readings of a model output's batch, each with the shape it was read from: a tensor's leading dimension;
    for a list of tensors also its length (Z-Image returns one tensor per sample); in a tuple, list or dict the
    first element that has any. Empty without tensors."""
    if isinstance(result, torch.Tensor):
        return [(result.shape[0], list(result.shape))] if result.dim() else []
    values = list(result.values()) if isinstance(result, dict) else list(result) if isinstance(result, (tuple, list)) \
        else []
    per_sample = [(len(values), [len(values), *values[0].shape])] \
        if isinstance(result, list) and values and all(isinstance(item, torch.Tensor) for item in values) else []
    return per_sample + next((found for found in map(output_batches, values) if found), [])


def output_problem(result: Any, batch: int | None, shape: tuple[int, ...] | None) -> str | None:
    """Why an output is not what the probe expects: see `batch_problem`; and, given `shape`, a first output of
    another shape (a latent split between inputs in a way the model does not predict)."""
    readings = output_batches(result)  # the last is the first tensor's own (a list of samples' comes before)
    if shape is not None and readings and tuple(readings[-1][1]) != tuple(shape):
        return f"its output {readings[-1][1]} is not of the latent's shape {list(shape)}"
    return batch_problem(result, batch)


def batch_problem(result: Any, batch: int | None) -> str | None:
    """Why an output does not lead with the inputs' batch (None when it does, or when no batch is expected): a
    model that derives the latent grid from the token count (DiT's height = width = √tokens) runs on a grid it
    cannot take by folding the rest into the batch."""
    readings = output_batches(result)
    if batch is None or not readings or any(found == batch for found, _ in readings):
        return None
    return f"its output {readings[0][1]} does not lead with the batch {batch} of its inputs"


def runs_on(model: torch.nn.Module, inputs: dict[str, Any], batch: int | None = None,
            shape: tuple[int, ...] | None = None) -> str | None:
    """None when the model runs on `inputs` (and, given `batch`, its output leads with it; given `shape`, its first
    output has it), else why not.

    The model is traced under fake tensors (shapes only: no compute, no memory, cheap on a large model); code
    that reads tensor values (`mask.sum().tolist()`, `.numpy()`, `bincount`) cannot run there, so it then runs for real on
    the small probe sizes.
    """
    from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                               FakeTensorMode)
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    fake_log = logging.getLogger("torch._subclasses.fake_tensor")  # logs each failing op: expected while probing
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with torch.no_grad(), fake_caches_undone(model), FakeTensorMode(allow_non_fake_inputs=True), \
                traced_for_shapes():
            return output_problem(model(**inputs), batch, shape)
    except (DataDependentOutputException, DynamicOutputShapeException, GuardOnDataDependentSymNode):
        pass  # an output shape or a branch that depends on tensor values (bincount in MoE routing)
    except Exception as exc:  # any failure of the model's code on these shapes means: not this layout
        return first_line(exc)
    finally:
        fake_log.setLevel(level)
    try:
        with torch.no_grad():
            return output_problem(model(**inputs), batch, shape)
    except Exception as exc:  # as above, on real tensors
        return first_line(exc)


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
                       seed: int = 0, text_tokens: int | None = None) -> dict[str, Any]:
        """Keyword arguments for one forward call. `tokens` is the image token count or a (rows, cols) grid;
        `text_tokens` the text length (default: `example_text_tokens`)."""
        raise NotImplementedError

    example_text_tokens: ClassVar[int] = 8
    # Inputs this adapter cannot rebuild (the user's own) are captured with torch.export's automatic dimensions
    # (capture.export_automatic) rather than all static.
    automatic_dims_for_own_inputs: ClassVar[bool] = True
    text_key: ClassVar[str] = "encoder_hidden_states"

    def dynamic_shapes(self, model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """{input name: {dim index: DynDim}} mirroring `inputs` (nested dicts included); None = all static.

        Found, not declared: the inputs are rebuilt one batch, text token, grid row and column larger, and each
        dimension that moved follows that size (`infer_dims`). Inputs this adapter cannot rebuild (the user's
        own) give None: capture then lets torch.export find their dimensions (`automatic_dims_for_own_inputs`).
        """
        sizes = self.sizes_of(model, inputs)
        return None if sizes is None else infer_dims(lambda at: self.inputs_at(model, at), sizes,
                                                     self.dim_limits(model))

    def sizes_in_values(self, model: torch.nn.Module, inputs: dict[str, Any]) -> list[str]:
        """The inputs that are not tensors yet change with a size (Qwen-Image's `img_shapes`: the latent grid as
        Python ints): a captured graph holds them as constants, so it runs at one size only. Found as the
        dimensions are: the inputs rebuilt one size larger. Tensors, and containers of them (Kandinsky 5's list
        of per-axis positions), are inputs the graph takes at any size its dimensions allow."""
        sizes = self.sizes_of(model, inputs)
        if sizes is None:
            return ints_matching_sizes(inputs) if self.automatic_dims_for_own_inputs else []
        base = self.inputs_at(model, sizes)
        moved = {name for field in SIZE_FIELDS for name, value in self.inputs_at(model, sizes.bumped(field)).items()
                 if not _holds_tensors(value) and value != base.get(name)}
        return sorted(moved)

    def runs_at_another_grid(self, model: torch.nn.Module, inputs: dict[str, Any]) -> bool:
        """Whether the model's own code runs on the inputs rebuilt one row and one column larger (traced under
        fake tensors): where a captured graph pinned the grid, this says whether the model itself is what fixes
        it."""
        sizes = self.sizes_of(model, inputs)
        if sizes is None:
            return False
        larger = dataclasses.replace(sizes, rows=sizes.rows + 1, cols=sizes.cols + 1)
        return runs_on(model, self.inputs_at(model, larger), sizes.batch) is None

    def square_grid(self, model: torch.nn.Module) -> bool:
        """Whether the model takes square latent grids only (DiT: height = width = √tokens)."""
        return False

    def grid_unit(self, model: torch.nn.Module) -> int:
        """The step of the grid that `tokens` gives (1: patches or packed tokens; a U-Net's down-sampling)."""
        return 1

    def dim_limits(self, model: torch.nn.Module) -> dict[str, tuple[int, int]]:
        """{dimension name: (min, max) in units} where the family's range differs from FOLLOWS' default."""
        return {}

    def inputs_at(self, model: torch.nn.Module, sizes: Sizes) -> dict[str, Any]:
        """Inputs at `sizes`, for dimension inference (only their shapes are read)."""
        unit = self.grid_unit(model)
        return self.example_inputs(model, batch=sizes.batch, tokens=(sizes.rows * unit, sizes.cols * unit),
                                   text_tokens=sizes.text)

    def sizes_of(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Sizes | None:
        """The Sizes whose `inputs_at` has the shapes of `inputs`, or None."""
        latent, text = inputs.get(self.latent_key), inputs.get(self.text_key)
        if not isinstance(latent, torch.Tensor) or latent.dim() == 0:
            return None
        try:
            grid = self.tokens_of(model, inputs)
            rows, cols = factor_grid(grid, what="image tokens") if isinstance(grid, int) else grid
        except (KeyError, IndexError, InputError):
            return None
        unit = self.grid_unit(model)
        text_tokens = text.shape[1] if isinstance(text, torch.Tensor) and text.dim() > 1 else self.example_text_tokens
        sizes = Sizes(batch=int(latent.shape[0]), text=int(text_tokens), rows=int(rows) // unit,
                      cols=int(cols) // unit)
        # Compared by flattened name: a torch.compile region passes nested inputs as flat leaves
        # (added_cond_kwargs_text_embeds), the call itself as nested dicts.
        return sizes if flat_shapes(self.inputs_at(model, sizes)) == flat_shapes(inputs) else None

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

    def max_grid(self, model: torch.nn.Module) -> int:
        return MAX_GRID

    def example_inputs(self, model, batch=1, tokens=None, seed=0, text_tokens=None):
        config = model.config
        patch = config.patch_size
        rows, cols = example_grid(tokens, config.sample_size // patch, self.max_grid(model))
        generator = torch.Generator().manual_seed(seed)
        dtype = model_dtype(model)
        text = text_tokens or self.example_text_tokens
        inputs = dict(
            hidden_states=randn(generator, batch, config.in_channels, rows * patch, cols * patch, dtype=dtype),
            encoder_hidden_states=randn(generator, batch, text, config[self.text_channels], dtype=dtype))
        inputs.update(self.conditioning(model, batch, text, generator, dtype, rows * patch, cols * patch))
        inputs["return_dict"] = False
        return inputs

    def tokens_of(self, model, inputs):
        patch = model.config.patch_size
        return inputs["hidden_states"].shape[2] // patch, inputs["hidden_states"].shape[3] // patch

    def conditioning(self, model: torch.nn.Module, batch: int, text: int, generator: torch.Generator,
                     dtype: torch.dtype, height: int, width: int) -> dict[str, Any]:
        """The family's inputs besides the latent and the text: timestep, masks, pooled text, guidance …"""
        raise NotImplementedError

    def dim_limits(self, model):
        return {"height": (2, self.max_grid(model)), "width": (2, self.max_grid(model))}

    def noisy_step(self, model, clean, noise, step, num_steps, batch):
        # Flow matching, with the timestep in the scheduler's units (σ·1000) as SD3 and Sana take it.
        latent, sigma = flow_step(clean, noise, step, num_steps)
        return dict(hidden_states=latent, timestep=torch.full((batch,), sigma * 1000.0, dtype=latent.dtype))
