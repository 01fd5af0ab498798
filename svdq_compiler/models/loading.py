"""Real weights from disk: a diffusers model folder, a pipeline folder, or a single-file safetensors checkpoint.

A single file gets its config from, in order: a `config.json` beside it; the `config` entry of the file's
safetensors metadata (a JSON object with `_class_name`, as `write_single_file` writes it); or, for FLUX only,
the tensor shapes (diffusers or original Black Forest Labs key names). Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from svdq_compiler.errors import CheckpointError, InputError, first_line
from svdq_compiler.files import atomic_path
from svdq_compiler.models.base import cast_module, low_cpu_mem_usage

log = logging.getLogger("svdq_compiler")

PIPELINE_COMPONENTS = ("transformer", "unet")  # the denoiser of a pipeline folder, in the order looked for
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
BFL_FLUX_PREFIX = "model.diffusion_model."


def load_from_path(path: Path, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    if path.is_dir():
        return load_folder(path, dtype=dtype)
    if path.suffix == ".safetensors":
        return load_single_file(path, dtype=dtype)
    raise InputError(f"cannot load a model from a {path.suffix or 'suffix-less'} file", where=str(path),
                     fix="give a diffusers folder (with model_index.json or config.json) or a .safetensors file")


# ---- folders ------------------------------------------------------------------------------------------------

def model_folder(path: Path) -> Path:
    """The folder holding the denoiser's config.json: `path` itself, or a pipeline's transformer/ or unet/."""
    if (path / "model_index.json").exists():
        for component in PIPELINE_COMPONENTS:
            if (path / component / "config.json").exists():
                return path / component
        raise InputError("the pipeline folder has no transformer/ or unet/ model with a config.json",
                         where=str(path), fix="point at the denoiser's folder, or complete the pipeline folder")
    if (path / "config.json").exists():
        return path
    raise InputError("not a diffusers folder: it has neither model_index.json nor config.json", where=str(path),
                     fix="give a diffusers model or pipeline folder, or a .safetensors file")


def load_folder(path: Path, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    from svdq_compiler.models import diffusers_class

    folder = model_folder(path)
    config = read_config(folder / "config.json")
    model_class = diffusers_class(class_name_of(config, folder / "config.json"))
    weights = sorted(folder.glob("*.safetensors"))
    if dtype is None and weights:
        dtype = checkpoint_dtype(weights)
    try:
        model = model_class.from_pretrained(folder, local_files_only=True, torch_dtype=dtype,
                                                      low_cpu_mem_usage=low_cpu_mem_usage())
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"diffusers could not load the model: {load_error_detail(exc)}", where=str(folder),
                              fix="check that the folder holds the config and weights diffusers saved") from exc
    return model.eval()


def load_error_detail(exc: BaseException) -> str:
    """The line of a state-dict loading error that names the tensor and both shapes ("size mismatch for
    x_embedder.weight: copying a param with shape [8, 16] from checkpoint, the shape in current model is
    [64, 16]"); torch's first line only says "Error(s) in loading state_dict"."""
    for line in str(exc).splitlines():
        if "size mismatch for" in line or "Missing key" in line or "Unexpected key" in line:
            return line.strip().rstrip(".")
    return first_line(exc)


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read the model config: {first_line(exc)}", where=str(path),
                              fix="restore the config.json diffusers saved") from exc
    if not isinstance(config, dict):
        raise CheckpointError("the model config is not a JSON object", where=str(path))
    return config


def class_name_of(config: dict[str, Any], where: str | Path) -> str:
    name = config.get("_class_name")
    if not isinstance(name, str):
        raise CheckpointError("the model config has no _class_name", where=str(where),
                              fix='add "_class_name" (e.g. "FluxTransformer2DModel") to the config')
    return name


# ---- single files -------------------------------------------------------------------------------------------

def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """(metadata, {tensor name: (shape, safetensors dtype)}) without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {}
            for key in handle.keys():
                piece = handle.get_slice(key)
                tensors[key] = (tuple(piece.get_shape()), piece.get_dtype())
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(f"not a readable safetensors file: {first_line(exc)}", where=str(path),
                              fix="re-download or re-save the checkpoint") from exc
    return metadata, tensors


def checkpoint_dtype(files: list[Path]) -> torch.dtype:
    """The floating dtype most of the checkpoint's parameters are stored in."""
    counts: Counter[torch.dtype] = Counter()
    for file in files:
        for shape, kind in read_header(file)[1].values():
            if kind in SAFETENSORS_DTYPES:
                counts[SAFETENSORS_DTYPES[kind]] += int(torch.Size(shape).numel())
    return counts.most_common(1)[0][0] if counts else torch.float32


def checkpoint_tensor_bytes(files: list[Path]) -> int:
    """The bytes of the tensors the safetensors `files` hold (from their headers)."""
    total = 0
    for file in files:
        for shape, kind in read_header(file)[1].values():
            element = torch.empty((), dtype=SAFETENSORS_DTYPES[kind]).element_size() if kind in SAFETENSORS_DTYPES \
                else 1
            total += int(torch.Size(shape).numel()) * element
    return total


def single_file_config(path: Path, metadata: dict[str, str],
                       shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, Any], str]:
    """The model config of a single-file checkpoint and where it came from."""
    beside = path.parent / "config.json"
    if beside.exists():
        return read_config(beside), str(beside)
    if "config" in metadata:
        try:
            config = json.loads(metadata["config"])
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"the config in the file's metadata is not JSON: {exc}", where=str(path)) from exc
        return config, "the file's metadata"
    if is_flux_state(shapes):
        return infer_flux_config(shapes), "the tensor shapes (FLUX)"
    raise CheckpointError("the checkpoint carries no model config", where=str(path),
                          fix="put the model's config.json beside the file (or save it with a 'config' metadata "
                              "entry); only FLUX configs can be inferred from tensor shapes")


def load_single_file(path: Path, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    from safetensors.torch import load_file

    from svdq_compiler.models import diffusers_class

    metadata, header = read_header(path)
    shapes = {key: shape for key, (shape, _) in header.items()}
    if any(key.startswith(BFL_FLUX_PREFIX) or key.startswith("double_blocks.") for key in shapes):
        state = convert_bfl_flux(load_file(str(path)), path)
        shapes = {key: tuple(value.shape) for key, value in state.items()}
    else:
        state = None
    config, source = single_file_config(path, metadata, shapes)
    model_class = diffusers_class(class_name_of(config, source))
    log.info("loading %s from %s with the config from %s", model_class.__name__, path, source)
    with parameters_on_meta():
        model = model_class.from_config(config)
    state = state if state is not None else load_file(str(path))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights do not fit {model_class.__name__} with the config from {source}: "
                              f"{load_error_detail(exc)}", where=str(path),
                              fix="give the matching config.json beside the file") from exc
    target = dtype or checkpoint_dtype([path])
    if any(p.dtype != target for p in model.parameters() if p.is_floating_point()):
        model = cast_module(model, target)
    return model.eval()


def write_single_file(model: torch.nn.Module, path: str | Path) -> Path:
    """Save a diffusers model as one safetensors file with its config in the metadata (load_model reads it)."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().contiguous()
        # safetensors refuses tensors that share memory (tied weights): store each one on its own.
        state[key] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    metadata = {"config": model.to_json_string()} if hasattr(model, "to_json_string") else {}
    with atomic_path(path, "checkpoint") as temporary:
        save_file(state, str(temporary), metadata=metadata)
    return Path(path)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build a module with its parameters on the meta device (no memory, no init cost); buffers stay real,
    since some (position embeddings) are computed at construction and are not in checkpoints."""
    original = torch.nn.Module.register_parameter

    def register_on_meta(module, name, parameter):
        original(module, name, parameter)
        if parameter is not None:
            module._parameters[name] = torch.nn.Parameter(parameter.to("meta"),
                                                          requires_grad=parameter.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


# ---- FLUX configs from tensor shapes ------------------------------------------------------------------------

def is_flux_state(shapes: dict[str, tuple[int, ...]]) -> bool:
    return "x_embedder.weight" in shapes and any(key.startswith("single_transformer_blocks.") for key in shapes)


def convert_bfl_flux(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Original (Black Forest Labs) FLUX key names → diffusers names, with diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    try:
        return convert_flux_transformer_checkpoint_to_diffusers(state)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot convert the original-format FLUX checkpoint: {first_line(exc)}",
                              where=str(path), fix="give a diffusers-format checkpoint or folder instead") from exc


def block_count(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    return len({key.split(".")[1] for key in shapes if key.startswith(prefix + ".")})


def flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX.1 splits its 128 head channels into RoPE axes (16, 56, 56); other head sizes keep the proportions."""
    axes = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
    if sum(axes) != head_dim or any(a % 2 for a in axes):
        raise CheckpointError(f"cannot infer FLUX RoPE axes for head dim {head_dim}",
                              fix="put the model's config.json beside the checkpoint")
    return axes


def infer_flux_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    inner, in_channels = shapes["x_embedder.weight"]
    norm_key = next((key for key in shapes if key.endswith("attn.norm_q.weight")), None)
    if norm_key is None:
        raise CheckpointError("cannot infer the FLUX head size: no attention norm_q weights",
                              fix="put the model's config.json beside the checkpoint")
    head_dim = shapes[norm_key][0]
    config = dict(
        _class_name="FluxTransformer2DModel", patch_size=1, in_channels=in_channels,
        out_channels=shapes["proj_out.weight"][0], num_layers=block_count(shapes, "transformer_blocks"),
        num_single_layers=block_count(shapes, "single_transformer_blocks"), attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim, joint_attention_dim=shapes["context_embedder.weight"][1],
        pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        guidance_embeds=any(key.startswith("time_text_embed.guidance_embedder.") for key in shapes),
        axes_dims_rope=flux_rope_axes(head_dim))
    log.warning("FLUX config inferred from tensor shapes (RoPE axes %s assumed): %s", config["axes_dims_rope"],
                {k: v for k, v in config.items() if k != "_class_name"})
    return config

