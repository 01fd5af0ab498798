"""Model adapters, built-in model names, and `load_model`.

`load_model(spec)` takes a built-in name (`random:flux`, `random:pixart`, `random:sd3`, `random:sana`,
`random:unet`, and whatever else is registered with `register_builtin`), a local diffusers folder, or a
single-file safetensors checkpoint. Nothing is downloaded. `adapter_for(model)` finds the family adapter
(`GenericAdapter` for any other module).

A module that ships a built-in model registers it at import time with `register_builtin(name, factory)` and is
imported at the end of this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from svdq_compiler.errors import InputError
from svdq_compiler.models.auto import DiffusersAdapter
from svdq_compiler.models.base import DynDim, ModelAdapter, cast_module
from svdq_compiler.models.flux import FluxAdapter
from svdq_compiler.models.generic import GenericAdapter
from svdq_compiler.models.pixart import PixArtAdapter
from svdq_compiler.models.sana import SanaAdapter
from svdq_compiler.models.sd3 import SD3Adapter
from svdq_compiler.models.unet import UNetAdapter

__all__ = ["ADAPTERS", "DiffusersAdapter", "DynDim", "GenericAdapter", "ModelAdapter", "adapter_for", "adapter_named", "builtin_names",
           "load_model", "register_adapter", "register_builtin"]

ADAPTERS: list[ModelAdapter] = [FluxAdapter(), PixArtAdapter(), SD3Adapter(), SanaAdapter(), UNetAdapter()]
AUTO = DiffusersAdapter()  # any other diffusers model
GENERIC = GenericAdapter()  # any other nn.Module
FALLBACKS = (AUTO, GENERIC)


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Add a family adapter; it takes precedence over the ones registered before it."""
    ADAPTERS.insert(0, adapter)
    return adapter


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    """The adapter of the model's family; else the auto one for a diffusers model, the generic one otherwise."""
    return next(adapter for adapter in [*ADAPTERS, *FALLBACKS] if adapter.matches(model))


def adapter_named(name: str) -> ModelAdapter:
    for adapter in [*ADAPTERS, *FALLBACKS]:
        if adapter.name == name:
            return adapter
    raise InputError(f"unknown model adapter {name!r}",
                     fix=f"choose one of: {', '.join(a.name for a in [*ADAPTERS, *FALLBACKS])}")


def adapter_for_class(class_name: str) -> ModelAdapter:
    """The family adapter of a diffusers class name (the paths that need family knowledge, e.g. streaming)."""
    for adapter in ADAPTERS:
        if class_name in adapter.class_names:
            return adapter
    supported = sorted(name for adapter in ADAPTERS for name in adapter.class_names)
    raise InputError(f"model class {class_name!r} has no family adapter",
                     fix=f"family adapters: {', '.join(supported)}; other diffusers classes compile through the "
                         f"auto adapter without streaming")


def diffusers_class(class_name: str) -> type[torch.nn.Module]:
    """The diffusers denoiser class a config's `_class_name` names: any transformer or U-Net class diffusers
    exports (those without a family adapter go through the auto adapter)."""
    import diffusers

    from svdq_compiler.models.auto import DENOISER_PACKAGES

    found = getattr(diffusers, class_name, None) if class_name.isidentifier() else None
    if not (isinstance(found, type) and found.__module__.startswith(DENOISER_PACKAGES)):
        raise InputError(f"model class {class_name!r} is not a diffusers denoiser (a class of "
                         f"{' or '.join(DENOISER_PACKAGES)} in diffusers {diffusers.__version__})",
                         fix="point at the denoiser: a transformer or U-Net folder such as FluxTransformer2DModel's; "
                             "other modules go through svdq_compiler.compile(module, example_inputs) directly")
    return found


@dataclass(frozen=True)
class Builtin:
    name: str
    factory: Callable[[], torch.nn.Module]
    description: str
    checkpoint: Path | None = None  # the folder of safetensors the factory reads (None: generated weights)


BUILTINS: dict[str, Builtin] = {}


def register_builtin(name: str, factory: Callable[[], torch.nn.Module], description: str = "",
                     checkpoint: Path | None = None) -> None:
    """Make `name` loadable with load_model / `svdq-compile NAME`. `factory()` returns the model in eval mode;
    `checkpoint` is the folder of safetensors it reads, if any (the compile report compares sizes with it)."""
    if not name or "/" in name or Path(name).suffix:
        raise InputError(f"built-in model name {name!r} would read as a path", fix="use a plain name like 'tiny-flux'")
    BUILTINS[name] = Builtin(name, factory, description, checkpoint)


def checkpoint_files(spec: str | Path) -> list[Path]:
    """The safetensors files a model spec (built-in name, diffusers folder, single file) reads its weights from;
    empty for generated weights."""
    name = str(spec)
    folder = BUILTINS[name].checkpoint if name in BUILTINS else Path(name).expanduser()
    if folder is None:
        return []
    if folder.is_file():
        return [folder]
    for place in (folder, folder / "transformer", folder / "unet"):
        found = sorted(place.glob("*.safetensors")) if place.is_dir() else []
        if found:
            return found
    return []


def builtin_names() -> list[str]:
    return sorted(BUILTINS)


def load_model(spec: str | Path, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A model from a built-in name, a diffusers folder, or a single-file checkpoint, in eval mode.

    `dtype` converts the weights; None keeps a checkpoint's own dtype (built-ins are float32).
    """
    name = str(spec)
    if name in BUILTINS:
        model = BUILTINS[name].factory().eval()
        return cast_module(model, dtype) if dtype is not None else model
    path = Path(name).expanduser()
    if not path.exists():
        looks_like_a_name = name.startswith("random:") or ("/" not in name and not path.suffix)
        if looks_like_a_name:
            raise InputError(f"unknown model name {name!r}",
                             fix=f"valid built-in names: {', '.join(builtin_names())}; or give a path to a "
                                 f"diffusers folder or a .safetensors file")
        raise InputError("no such file or folder", where=name,
                         fix="give an existing diffusers folder or .safetensors file, or a built-in name "
                             f"({', '.join(builtin_names())})")
    from svdq_compiler.models.loading import load_from_path

    return load_from_path(path, dtype=dtype)


for _adapter in ADAPTERS:
    register_builtin(f"random:{_adapter.name}", _adapter.random_model,
                     f"tiny random-weight {_adapter.class_names[0]} with every structural feature")

# Built-in models shipped with the package register themselves on import.
from svdq_compiler.models import tiny_flux  # noqa: E402,F401
