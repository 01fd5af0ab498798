"""One capture per model for the whole test session.

Capture (torch.export) costs several times the passes that follow it on the tiny models, and the suite compiles
the same models again and again (each preset, each test of a file). `cached_capture` keys a capture by what
decides the graph: the classes of the model and of its submodules (by identity, the class objects kept alive
so a class defined inside a test is never confused with another of the same name), their plain attributes (a
flag such as `manual_attention` changes the graph), the parameters and buffers (names, dtypes, shapes, bytes),
the inputs, the dynamic shapes and the adapter. Each call gets its own deep copy, so a pass that edits the graph
cannot leak into another test. `install` routes `svdq_compiler.compile`'s capture through it for the session
(tests/conftest.py).

Not cached, captured afresh as before: a module holding a GraphModule (the torch.compile backend's Dynamo
region: its graph, not its weights, decides the capture, and its fake tensors belong to Dynamo's fake mode —
"Mixing fake modes" otherwise), a module with hooks or an instance-level `forward`, and tensors not on the CPU.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Callable

import torch
import torch.fx
import torch.utils._pytree as pytree

import svdq_compiler.api

_CAPTURES: dict[str, tuple[torch.fx.GraphModule, list[Any]]] = {}
_PLAIN = (str, int, float, bool, type(None))
_MODULE_INTERNALS = {"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _hash_tensor(digest, name: str, tensor: torch.Tensor) -> bool:
    if tensor.device.type != "cpu":
        return False
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return True


def capture_key(module: torch.nn.Module, inputs: Any, dynamic_shapes: Any, adapter: Any
                ) -> tuple[str, list[Any]] | None:
    """The cache key of a capture and the objects whose identity it uses; None when it must not be cached."""
    digest, identities = hashlib.sha256(), []
    for name, sub in module.named_modules():
        if isinstance(sub, torch.fx.GraphModule) or "forward" in vars(sub) or any(
                getattr(sub, hooks) for hooks in ("_forward_hooks", "_forward_pre_hooks")):
            return None
        identities.append(type(sub))
        attrs = sorted((k, v) for k, v in vars(sub).items()
                       if k not in _MODULE_INTERNALS and not k.endswith("hooks") and _plain(v))
        digest.update(f"{name}:{id(type(sub))}:{sub.training}:{attrs!r}".encode())
    for name, tensor in module.state_dict(keep_vars=True).items():
        if not _hash_tensor(digest, f"state {name}", tensor):
            return None
    digest.update(repr(sorted(n for n, _ in module.named_buffers())).encode())
    leaves, spec = pytree.tree_flatten_with_path(inputs)
    digest.update(repr(spec).encode())
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if not _hash_tensor(digest, f"input {path}", leaf):
                return None
        elif _plain(leaf):
            digest.update(f"input {path}={leaf!r}".encode())
        else:
            return None
    identities.append(type(adapter))
    digest.update(f"dynamic {dynamic_shapes!r} adapter {id(type(adapter))}".encode())
    return digest.hexdigest(), identities


def cached_capture(capture: Callable[..., torch.fx.GraphModule], module: torch.nn.Module, inputs: Any,
                   **kwargs: Any) -> torch.fx.GraphModule:
    """`capture(module, inputs, **kwargs)`, from the session's cache when the same capture was made before."""
    key = capture_key(module, inputs, kwargs.get("dynamic_shapes", "auto"), kwargs.get("adapter"))
    if key is None:
        return capture(module, inputs, **kwargs)
    digest, identities = key
    if digest not in _CAPTURES:
        _CAPTURES[digest] = copy.deepcopy(capture(module, inputs, **kwargs)), identities
    return copy.deepcopy(_CAPTURES[digest][0])


def install() -> Callable[[], None]:
    """Route `svdq_compiler.compile`'s capture through the cache; returns the function that undoes it.

    compile tries `capture_replicated` (None for a model without long repeated block lists) then `capture`; the
    cached function does both, so a cache hit skips both."""
    api = svdq_compiler.api
    replicated, plain = api.capture_replicated, api.capture

    def either(module, inputs, **kwargs):
        return replicated(module, inputs, **kwargs) or plain(module, inputs, **kwargs)

    api.capture_replicated = lambda module, inputs, **kwargs: cached_capture(either, module, inputs, **kwargs)

    def undo() -> None:
        api.capture_replicated = replicated

    return undo
