"""Session-wide test settings."""

import os

import torch

# `make test` runs two pytest workers on a 2-core machine: one intra-op thread each avoids oversubscription,
# which makes small LAPACK calls (QR, SVD) up to 100× slower.
torch.set_num_threads(1)

# Without a GPU the generated Triton kernels run under the interpreter, which Triton only honours when the
# variable is set before it is imported (`make test` sets it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---- capture cache ---------------------------------------------------------------------------------------------
# Whole-model tests compile the same tiny models again and again, and torch.export dominates each compile. In
# the modules that use the `capture_cache` fixture, the capture `svdquant_compiler.compile` runs is memoized for
# the session, keyed by everything the capture reads (the module's class, config, parameters and buffers, the
# example inputs, the dynamic shapes and the adapter's class); each hit is a deep copy, so no test sees another's
# graph. Tests of capture itself are left alone.
import copy  # noqa: E402
import hashlib  # noqa: E402

import pytest  # noqa: E402

_CAPTURES: dict[str, object] = {}


def _digest(value, h) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _digest(item, h)
    else:
        h.update(repr(value).encode())


def capture_key(module, example_inputs, kwargs) -> str:
    h = hashlib.sha256(type(module).__qualname__.encode())
    _digest(dict(getattr(module, "config", {}) or {}), h)
    _digest({**dict(module.named_parameters()), **dict(module.named_buffers())}, h)
    _digest(example_inputs, h)
    _digest({k: v for k, v in kwargs.items() if k != "adapter"}, h)
    h.update(type(kwargs.get("adapter")).__name__.encode())
    return h.hexdigest()


@pytest.fixture
def capture_cache(monkeypatch):
    import svdq_compiler
    import svdq_compiler.api as api

    svdq_compiler.capture  # noqa: B018  (binds the package's own capture before compile's is wrapped)

    def memoized(real):
        def capture(module, example_inputs, **kwargs):
            key = f"{real.__name__}:{capture_key(module, example_inputs, kwargs)}"
            if key not in _CAPTURES:
                _CAPTURES[key] = real(module, example_inputs, **kwargs)
            return copy.deepcopy(_CAPTURES[key])
        return capture

    monkeypatch.setattr(api, "capture_replicated", memoized(api.capture_replicated))
    monkeypatch.setattr(api, "capture", memoized(api.capture))
    return _CAPTURES
