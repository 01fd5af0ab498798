"""Compile generated source into a kernel, cached in memory and on disk by the spec's hash.

The source is written to `<cache dir>/<kernel name>-<target>.py` (temporary name, then rename, so concurrent
processes and interrupted runs never leave half a file) and imported from there: Triton's JIT reads a kernel's
source through `inspect`, so it must live in a real file. Triton then caches the compiled binary itself.

The cache dir is `$SVDQ_KERNEL_CACHE`, else `$XDG_CACHE_HOME/svdq_compiler/kernels`, else
`~/.cache/svdq_compiler/kernels`. Whether a kernel is compiled or interpreted is Triton's process-wide setting
(TRITON_INTERPRET, read when triton is imported and when a kernel is decorated); the target is part of the key.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from svdq_compiler.codegen.generate import Target, generate
from svdq_compiler.codegen.spec import KernelSpec
from svdq_compiler.errors import SvdqError


class KernelCacheError(SvdqError):
    """A generated kernel could not be written to or loaded from the kernel cache."""


_LOCK = threading.Lock()
_KERNELS: dict[tuple[str, Target], Any] = {}


def cache_dir() -> Path:
    explicit = os.environ.get("SVDQ_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "svdq_compiler" / "kernels"


def _target_tag(target: Target) -> str:
    if target.backend == "interpreter":
        return "interp"
    return f"sm{target.capability[0]}{target.capability[1]}" + ("" if target.fp4_mma else "-nofp4mma")


def _write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.read_text() == text:
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise KernelCacheError(f"cannot write the generated kernel: {exc.strerror}", where=str(path),
                               fix="set SVDQ_KERNEL_CACHE to a writable folder") from exc


def kernel_path(spec: KernelSpec, target: Target) -> Path:
    return cache_dir() / f"{spec.name}-{_target_tag(target)}.py"


def load_kernel(spec: KernelSpec, target: Target) -> Any:
    """The @triton.jit kernel for `spec` on `target`: generated, written, and imported once per process."""
    key = (spec.hash, target)
    kernel = _KERNELS.get(key)
    if kernel is not None:
        return kernel
    with _LOCK:
        kernel = _KERNELS.get(key)
        if kernel is not None:
            return kernel
        path = kernel_path(spec, target)
        _write_atomically(path, generate(spec, target))
        module_name = f"svdq_generated.{path.stem.replace('-', '_')}"
        import_spec = importlib.util.spec_from_file_location(module_name, path)
        if import_spec is None or import_spec.loader is None:
            raise KernelCacheError("cannot import the generated kernel", where=str(path))
        module = importlib.util.module_from_spec(import_spec)
        sys.modules[module_name] = module
        try:
            import_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise KernelCacheError(f"generated kernel {spec.name} does not load: {exc}", where=str(path),
                                   fix="this is a code generator bug; the file shows the generated text") from exc
        kernel = getattr(module, spec.name)
        _KERNELS[key] = kernel
        return kernel


def clear_memory_cache() -> None:
    """Forget loaded kernels (the files stay); the next call regenerates and re-imports them."""
    with _LOCK:
        _KERNELS.clear()
