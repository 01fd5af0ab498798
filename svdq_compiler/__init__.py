"""svdq-compiler: SVDQuant W4A4 compilation of diffusion transformers.

Public API (stable): capture, compile, QuantConfig, save, load, export_onnx; load_model and register_builtin for models.

`import svdq_compiler` is cheap: torch and the compiler load on first use of one of these names (svdq_compiler/api.py),
so that `svdq-compile --help` answers at once. torch.compile finds the "svdquant" backend through the package's
torch_dynamo_backends entry point, and also once the API is loaded.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

__all__ = ["capture", "compile", "save", "load", "load_model", "register_builtin", "export_onnx", "DynDim", "QuantConfig",
           "Scheme", "PRESETS", "SvdqError", "__version__"]


def __getattr__(name: str) -> Any:
    """A name of the API (loading it on first use), else a submodule."""
    if name.startswith("__"):
        raise AttributeError(name)
    api = importlib.import_module("svdq_compiler.api")
    if hasattr(api, name):
        value = getattr(api, name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Loading the submodule svdq_compiler.capture binds it here; the package's `capture` is the function.
        if name == "capture" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
