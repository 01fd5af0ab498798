"""Calibration sets: the denoiser's keyword inputs recorded while a model's own pipeline samples real prompts.

`collect(pipe, prompts, …)` runs a pipeline (a diffusers FluxPipeline, StableDiffusion3Pipeline,
PixArtSigmaPipeline, SanaPipeline or StableDiffusionXLPipeline, or the shipped tiny-flux sampler) with its own
text encoders, scheduler and sampler, one prompt per call (with classifier-free guidance the denoiser sees the
conditional and unconditional rows together, as in generation). A forward pre-hook on `pipe.transformer` (or
`pipe.unet`) records the keyword inputs of `calib_steps` of the sampler's steps per prompt: one step drawn at
random from each of `calib_steps` equal strata of the schedule, with a generator seeded per prompt, so each
prompt contributes steps spread over the whole trajectory and the prompts together cover every noise level
(recording all 28–50 steps of every prompt would cost gigabytes for a real model at 1024²).

The result is a `CalibrationSet`: a sequence of keyword-input dicts (what `svdq_compiler.compile(...,
calib_inputs=…)` and `PassContext.calib_inputs` take) with its `Provenance` (pipeline and denoiser class, a
fingerprint of the denoiser's config, prompts, sampler steps and the steps kept, guidance, resolution, seed,
dtype). `save` writes it as safetensors (tensors plus JSON metadata, nothing pickled; a tensor the pipeline passes
unchanged to every step, like the prompt embeddings, is stored once per prompt); `load_calibration_set` reads it.

Before a compile uses a set, `conformed(model, example_inputs)` checks that it was recorded for this model (class
and config fingerprint) and returns the samples shaped like the example inputs: inputs the pipeline passes empty
(`joint_attention_kwargs={}`, `added_cond_kwargs` of Nones) are dropped when the captured signature lacks them, a
scalar timestep is expanded to the batch, floating tensors take the model's dtype. Anything else that differs
is an error naming the input.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from svdq_compiler.dropin import is_empty, pipeline_convention
from svdq_compiler.errors import CheckpointError, InputError

CALIBRATION_SET_FORMAT = "svdq-calibration-set"
FORMAT_VERSION = 1
# The pipeline classes `collect` drives (model_index.json `_class_name`), and where each keeps its denoiser.
PIPELINE_CLASSES = ("FluxPipeline", "StableDiffusion3Pipeline", "PixArtSigmaPipeline", "SanaPipeline",
                    "StableDiffusionXLPipeline")
PROMPTS_FILE = Path(__file__).parent / "models" / "assets" / "calibration_prompts.txt"


@dataclass(frozen=True)
class Provenance:
    """How a calibration set was recorded."""

    pipeline_class: str
    denoiser_class: str
    denoiser_config: str  # sha256 of the denoiser's structural config (config_fingerprint)
    prompts: tuple[str, ...]
    sampler_steps: int  # steps the sampler ran per prompt
    kept_steps: tuple[tuple[int, ...], ...]  # per prompt, the sampler steps recorded
    guidance_scale: float | None
    height: int  # pixels
    width: int
    seed: int  # prompt i is sampled with seed + i; its kept steps are drawn with seed + i too
    dtype: str

    def describe(self) -> str:
        kept = len(self.kept_steps[0]) if self.kept_steps else 0
        guidance = "" if self.guidance_scale is None else f", guidance {self.guidance_scale:g}"
        return (f"{self.pipeline_class} on {len(self.prompts)} prompts × {kept} of {self.sampler_steps} sampler "
                f"steps at {self.height}×{self.width}{guidance}, seed {self.seed}")


class CalibrationSet(Sequence):
    """Recorded denoiser inputs: iterating yields one keyword-argument dict per recorded denoiser call, in
    (prompt, step) order; `provenance` says how they were recorded; `source` is the one-line description the
    compile report shows."""

    def __init__(self, samples: list[dict[str, Any]], provenance: Provenance, path: Path | None = None):
        self.samples = samples
        self.provenance = provenance
        self.path = path  # the file it was loaded from or saved to, if any

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.samples)

    @property
    def source(self) -> str:
        where = f" ({self.path})" if self.path is not None else ""
        return f"calibration set{where}: {self.provenance.describe()}"

    def conformed(self, model: torch.nn.Module, example_inputs: dict[str, Any]) -> "CalibrationSet":
        """The set checked against `model` and shaped like its `example_inputs` (see the module docstring);
        InputError when it was recorded for another model."""
        check_recorded_for(self, model)
        samples = [conform_sample(sample, example_inputs, index) for index, sample in enumerate(self.samples)]
        return CalibrationSet(samples, self.provenance, self.path)

    def save(self, path: str | Path) -> Path:
        """Write the set as safetensors: the tensors, and JSON metadata holding the provenance and each sample's
        structure (tensors by name, other values inline)."""
        from safetensors.torch import save_file

        from svdq_compiler.files import atomic_path

        tensors: dict[str, torch.Tensor] = {}
        names: dict[int, str] = {}  # id(tensor) → stored name: a tensor shared between samples is stored once

        def encode(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                if id(value) not in names:
                    names[id(value)] = f"t{len(tensors)}"
                    tensors[names[id(value)]] = value.detach().cpu().contiguous()
                return {"tensor": names[id(value)]}
            if isinstance(value, dict):
                return {"dict": {key: encode(item) for key, item in value.items()}}
            if value is None or isinstance(value, (bool, int, float, str)):
                return {"value": value}
            raise InputError(f"cannot store a {type(value).__name__} denoiser input in a calibration set")

        structure = [{key: encode(value) for key, value in sample.items()} for sample in self.samples]
        metadata = {"format": CALIBRATION_SET_FORMAT, "version": str(FORMAT_VERSION),
                    "provenance": json.dumps(asdict(self.provenance)), "samples": json.dumps(structure)}
        with atomic_path(path, "calibration set") as temporary:
            save_file(tensors, str(temporary), metadata=metadata)
        self.path = Path(path)
        return self.path


def load_calibration_set(path: str | Path) -> CalibrationSet:
    """A set written by `CalibrationSet.save`; one clear error for a missing, foreign or damaged file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    fix = "record one with svdq-compile PIPELINE_FOLDER (it writes NAME.calibset.safetensors beside --out)"
    if not path.is_file():
        raise InputError("no such calibration set file", where=str(path), fix=fix)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != CALIBRATION_SET_FORMAT:
                raise InputError("not a calibration set (no svdq-calibration-set marker)", where=str(path),
                                 fix=fix + "; --save-calib statistics are reused with svdq_compiler.compile("
                                           "calib_stats=FILE)")
            if metadata.get("version") != str(FORMAT_VERSION):
                raise CheckpointError(f"calibration set format version {metadata.get('version')} is not the "
                                      f"{FORMAT_VERSION} this release reads", where=str(path), fix=fix)
            fields = json.loads(metadata["provenance"])
            provenance = Provenance(**{**fields, "prompts": tuple(fields["prompts"]),
                                       "kept_steps": tuple(tuple(steps) for steps in fields["kept_steps"])})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}

            def decode(entry: dict) -> Any:
                (kind, value), = entry.items()
                if kind == "tensor":
                    return tensors[value]
                if kind == "dict":
                    return {key: decode(item) for key, item in value.items()}
                if kind == "value":
                    return value
                raise ValueError(f"unknown entry kind {kind!r}")

            samples = [{key: decode(entry) for key, entry in sample.items()}
                       for sample in json.loads(metadata["samples"])]
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the calibration set is damaged ({type(exc).__name__}: {exc})", where=str(path),
                              fix=fix) from exc
    if not samples:
        raise CheckpointError("the calibration set holds no samples", where=str(path), fix=fix)
    return CalibrationSet(samples, provenance, path)


# ---- checking a set against the model it calibrates -------------------------------------------------------

def config_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the denoiser's structural config: the same architecture and sizes give the same value.

    diffusers' private entries (`_class_name`, `_name_or_path`, `_diffusers_version`, …) say where a model was
    loaded from, not what it is: a model built from its config (the streaming compile's meta model, or one made
    in Python) lacks them, and must still match the same model loaded from its folder."""
    config = getattr(model, "config", None)
    fields = {key: value for key, value in dict(config or {}).items() if not key.startswith("_")}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(f"{type(model).__name__}:{text}".encode()).hexdigest()


def check_recorded_for(calibration_set: CalibrationSet, model: torch.nn.Module) -> None:
    provenance, where = calibration_set.provenance, str(calibration_set.path or "the calibration set")
    fix = "record a set with this model's own pipeline, or compile the model the set was recorded for"
    if provenance.denoiser_class != type(model).__name__:
        raise InputError(f"the calibration set was recorded for a {provenance.denoiser_class}, not this "
                         f"{type(model).__name__}", where=where, fix=fix)
    if provenance.denoiser_config != config_fingerprint(model):
        raise InputError(f"the calibration set was recorded for a {provenance.denoiser_class} with another config "
                         f"(sizes or structure differ from this model's)", where=where, fix=fix)


def conform_sample(sample: dict[str, Any], example: dict[str, Any], index: int) -> dict[str, Any]:
    """One recorded call shaped like the example inputs the graph is captured with."""
    where = f"calibration set sample #{index}"
    fix = "record the set with the pipeline of the model being compiled"
    extra = [key for key, value in sample.items() if key not in example and not is_empty(value)]
    if extra:
        raise InputError(f"the recorded denoiser inputs {sorted(extra)} are not inputs of the captured model",
                         where=where, fix=fix)
    missing = [key for key, value in example.items() if key not in sample and value is not None]
    if missing:
        raise InputError(f"the set lacks the inputs {sorted(missing)} the captured model takes", where=where, fix=fix)
    return {key: conform_value(sample[key], example[key], key, sample, where) for key in example if key in sample}


def conform_value(value: Any, expected: Any, key: str, sample: dict[str, Any], where: str) -> Any:
    if isinstance(expected, dict) and isinstance(value, dict):
        return conform_sample(value, expected, 0) if value.keys() != expected.keys() else \
            {name: conform_value(value[name], expected[name], f"{key}.{name}", sample, where) for name in expected}
    if not isinstance(expected, torch.Tensor):
        return value
    value = pipeline_convention(value, expected, batch_of(sample))
    if not isinstance(value, torch.Tensor):
        raise InputError(f"input {key!r} was recorded as {type(value).__name__}, the model takes a tensor",
                         where=where)
    # Static sizes are checked against the captured graph by the calibrate pass.
    if value.dim() != expected.dim():
        raise InputError(f"input {key!r} was recorded with shape {tuple(value.shape)}, the model takes "
                         f"{expected.dim()} dims", where=where,
                         fix="record the set with the pipeline of the model being compiled")
    return value.to(expected.dtype)  # a set recorded in float32 calibrates a bfloat16 compile, as its pipeline would


def batch_of(sample: dict[str, Any]) -> int:
    for key in ("hidden_states", "sample"):
        value = sample.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise InputError("a recorded sample has no hidden_states or sample input to take the batch from")


# ---- prompts ----------------------------------------------------------------------------------------------

def read_prompts(path: str | Path | None = None) -> list[str]:
    """The prompts of a text file, one per line (blank lines and lines starting with # skipped); None: the
    shipped list of captions (models/assets/calibration_prompts.txt)."""
    path = Path(path) if path is not None else PROMPTS_FILE
    if not path.is_file():
        raise InputError("no such prompts file", where=str(path), fix="give a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the prompts file: {exc}", where=str(path),
                         fix="give a UTF-8 text file with one prompt per line") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputError("the prompts file holds no prompts", where=str(path),
                         fix="write one prompt per line (lines starting with # are comments)")
    return prompts


# ---- pipelines --------------------------------------------------------------------------------------------

def pipeline_problem(folder: str | Path) -> str | None:
    """Why the diffusers folder cannot be run as a pipeline to collect a set (None: it can)."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return "it is a model folder, not a pipeline folder (no model_index.json)"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"its model_index.json cannot be read ({exc})"
    name = index.get("_class_name")
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return "the transformers package that runs its text encoders is not installed (pip install transformers)"
    if name not in PIPELINE_CLASSES:
        return f"its pipeline class {name!r} is not one of {', '.join(PIPELINE_CLASSES)}"
    import diffusers

    parameters = inspect.signature(getattr(diffusers, name).__init__).parameters
    optional = set(getattr(getattr(diffusers, name), "_optional_components", []))
    needed = [key for key, parameter in parameters.items()
              if key != "self" and parameter.default is inspect.Parameter.empty and key not in optional]
    missing = [key for key in needed
               if not (isinstance(index.get(key), list) and index[key][0] and (folder / key).is_dir())]
    if missing:
        return f"the pipeline folder lacks {', '.join(missing)}"
    return None


def load_pipeline(folder: str | Path, denoiser: torch.nn.Module | None = None, dtype: torch.dtype | None = None):
    """The diffusers pipeline of `folder` on the CPU, with `denoiser` (already loaded) in place of its own."""
    import diffusers

    from svdq_compiler.errors import first_line
    from svdq_compiler.models.base import low_cpu_mem_usage, model_dtype

    folder = Path(folder)
    problem = pipeline_problem(folder)
    if problem is not None:
        raise InputError(f"cannot collect calibration inputs through this folder's pipeline: {problem}",
                         where=str(folder), fix="give a complete diffusers pipeline folder, or leave out "
                                                "--calib-prompts-file to calibrate on random conditioning")
    name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    dtype = dtype or (model_dtype(denoiser) if denoiser is not None else torch.float32)
    given = {denoiser_attribute(folder): denoiser} if denoiser is not None else {}
    try:
        with quiet_loading():
            pipe = getattr(diffusers, name).from_pretrained(folder, local_files_only=True, torch_dtype=dtype,
                                                            low_cpu_mem_usage=low_cpu_mem_usage(), **given)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"diffusers could not load the pipeline: {first_line(exc)}", where=str(folder),
                              fix="check that the folder holds the pipeline diffusers saved") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' per-component loading bars off while a pipeline loads (the compile shows its
    own steps)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    shown = [(module, module.is_progress_bar_enabled()) for module in (diffusers_logging, transformers_logging)]
    for module, _ in shown:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in shown:
            if enabled:
                module.enable_progress_bar()


def denoiser_attribute(folder_or_pipe: Any) -> str:
    if isinstance(folder_or_pipe, (str, Path)):
        return "transformer" if (Path(folder_or_pipe) / "transformer").is_dir() else "unet"
    return "transformer" if getattr(folder_or_pipe, "transformer", None) is not None else "unet"


def kept_steps(sampler_steps: int, calib_steps: int, generator: torch.Generator) -> tuple[int, ...]:
    """One step drawn from each of `calib_steps` equal strata of the sampler's steps (all when they are fewer)."""
    if calib_steps >= sampler_steps:
        return tuple(range(sampler_steps))
    bounds = [round(i * sampler_steps / calib_steps) for i in range(calib_steps + 1)]
    return tuple(low + int(torch.randint(high - low, (1,), generator=generator)) for low, high in
                 zip(bounds, bounds[1:]))


def call_defaults(pipe: Any) -> dict[str, Any]:
    """The pipeline's own defaults: sampler steps, guidance and image size."""
    from svdq_compiler.models.tiny_flux import TinyFluxPipeline

    if isinstance(pipe, TinyFluxPipeline):
        from svdq_compiler.models.fmnist import PADDED_SIZE

        return {"num_inference_steps": pipe.sampler.num_steps, "guidance_scale": pipe.sampler.guidance_scale,
                "height": PADDED_SIZE, "width": PADDED_SIZE}
    parameters = inspect.signature(pipe.__call__).parameters
    size = getattr(pipe, "default_sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", 8)
    if size is None:  # PixArt, Sana and SDXL take their default size from the denoiser's config
        size = getattr(pipe, denoiser_attribute(pipe)).config.sample_size
    return {"num_inference_steps": parameters["num_inference_steps"].default,
            "guidance_scale": parameters["guidance_scale"].default, "height": size * scale, "width": size * scale}


def run_sampler(pipe: Any, prompt: str, seed: int, steps: int, guidance: float | None, height: int,
                width: int) -> None:
    """One sampling run of `prompt` to the final latent (the VAE decoder is not needed)."""
    from svdq_compiler.models.tiny_flux import TinyFluxPipeline

    if isinstance(pipe, TinyFluxPipeline):
        pipe([prompt], [seed], num_steps=steps, guidance_scale=guidance)
        return
    options: dict[str, Any] = dict(prompt=prompt, num_inference_steps=steps, height=height, width=width,
                                   generator=torch.Generator().manual_seed(seed), output_type="latent")
    if guidance is not None:
        options["guidance_scale"] = guidance
    if "use_resolution_binning" in inspect.signature(pipe.__call__).parameters:
        options["use_resolution_binning"] = False  # sample at exactly the size asked for
    try:
        with torch.no_grad():
            pipe(**options)
    except ValueError as exc:  # the pipeline's own checks of its arguments (sizes, steps)
        from svdq_compiler.errors import first_line

        raise InputError(f"{type(pipe).__name__} refused the calibration settings: {first_line(exc)}",
                         fix="change --calib-size / --calib-sampler-steps") from exc


def collect(pipe: Any, prompts: Sequence[str], calib_steps: int = 4, *, sampler_steps: int | None = None,
            guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
            seed: int = 0, progress: bool = False) -> CalibrationSet:
    """Sample each prompt through `pipe` and record its denoiser's inputs at `calib_steps` of the sampler's steps
    (see the module docstring). `sampler_steps`, `guidance_scale`, `height` and `width` default to the
    pipeline's own."""
    if not prompts:
        raise InputError("collecting a calibration set needs at least one prompt")
    if calib_steps < 1 or (sampler_steps is not None and sampler_steps < 1):
        raise InputError("collecting a calibration set needs at least one step",
                         fix="give positive --calib-steps and --calib-sampler-steps")
    defaults = call_defaults(pipe)
    steps = sampler_steps or defaults["num_inference_steps"]
    guidance = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    height, width = height or defaults["height"], width or defaults["width"]
    denoiser = getattr(pipe, denoiser_attribute(pipe))
    forward = inspect.signature(denoiser.forward)
    samples: list[dict[str, Any]] = []
    kept_per_prompt: list[tuple[int, ...]] = []
    state: dict[str, Any] = {}

    def record(module, args, kwargs):
        step = state["call"]
        state["call"] += 1
        if step in state["keep"]:
            bound = forward.bind_partial(*args, **kwargs).arguments  # the U-Net takes its latent positionally
            samples.append({key: stored(value, state["seen"]) for key, value in bound.items()})

    from tqdm import tqdm

    handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for index, prompt in enumerate(tqdm(prompts, desc="calibration prompts", disable=not progress,
                                            leave=False)):
            generator = torch.Generator().manual_seed(seed + index)
            state.update(call=0, keep=set(kept_steps(steps, calib_steps, generator)), seen={})
            run_sampler(pipe, prompt, seed + index, steps, guidance, height, width)
            if state["call"] != steps:
                raise InputError(f"the pipeline called its denoiser {state['call']} times for {steps} steps",
                                 fix="collect with a pipeline whose sampler calls the denoiser once per step")
            kept_per_prompt.append(tuple(sorted(state["keep"])))
    finally:
        handle.remove()
    provenance = Provenance(
        pipeline_class=type(pipe).__name__, denoiser_class=type(denoiser).__name__,
        denoiser_config=config_fingerprint(denoiser), prompts=tuple(prompts), sampler_steps=steps,
        kept_steps=tuple(kept_per_prompt), guidance_scale=None if guidance is None else float(guidance),
        height=int(height), width=int(width), seed=seed, dtype=str(next(denoiser.parameters()).dtype).removeprefix(
            "torch."))
    return CalibrationSet(samples, provenance)


def stored(value: Any, seen: dict[int, torch.Tensor]) -> Any:
    """A recorded input, detached from the pipeline's buffers. A tensor object the pipeline passes again at a
    later step (prompt embeddings, position ids) is recorded once, so the set stores it once."""
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            seen[id(value)] = (value, value.detach().clone())  # the original keeps its id from being reused
        return seen[id(value)][1]
    if isinstance(value, dict):
        return {key: stored(item, seen) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not value:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InputError(f"the denoiser was called with a {type(value).__name__} input, which a calibration set "
                     f"cannot record", fix="collect with one of the supported pipelines: " + ", ".join(PIPELINE_CLASSES))

