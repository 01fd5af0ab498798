"""svdq-compiler: SVDQuant W4A4 compilation of diffusion transformers.

Public API (stable): capture, compile, QuantConfig, save, load, export_onnx; load_model and register_builtin for models.

`import svdq_compiler` is cheap: torch and the compiler load on first use of one of these names (svdq_compiler/api.py),
so that `svdq-compile --help` answers at once. torch.compile finds the "svdquant" backend through the package's
torch_dynamo_backends entry point, and also once the API is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
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
    # A submodule is imported on its own: `from svdq_compiler import quant` inside a module that api.py imports
    # must not start loading api.py (a circular import). `capture` is both, and the API's name wins.
    if name not in __all__ and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        api = importlib.import_module("svdq_compiler.api")
        if not hasattr(api, name):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(api, name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Loading the submodule svdq_compiler.capture binds it here; the package's `capture` is the function.
        if name == "capture" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
