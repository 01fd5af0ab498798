"""Capture on the meta device: the graph of a model whose weights are not in memory (a 12B FLUX is 24 GB).

The model is built with `torch.device("meta")` (parameters have shapes and dtypes, no storage) and exported
with meta example inputs. Tracing bakes the device of the example into a few nodes (`arange(..., device=meta)`
for RoPE tables, `_assert_tensor_metadata(..., device=meta)` checks); `retarget_device` rewrites those to the
device the weights will live on, so the graph runs once real weights are attached; `retarget_vals` does the same
for the traced fake values, which passes combine with the fake values of the real tensors they add.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

from svdq_compiler.capture import CAPTURE_META, INPUTS_META, capture, split_inputs
from svdq_compiler.errors import InputError
from svdq_compiler.ir import RUN_DEVICE_META

META = torch.device("meta")


def meta_inputs(inputs: Any) -> Any:
    """The example inputs with every tensor replaced by an empty meta tensor of the same shape and dtype."""
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: torch.empty_like(t, device=META), inputs)


def retarget_device(graph: torch.fx.Graph, device: torch.device | str = "cpu",
                    source: torch.device = META) -> int:
    """Rewrite every device constant equal to `source` in the nodes' arguments to `device`; returns how many
    nodes changed."""
    device = torch.device(device)

    def swap(value):
        return device if isinstance(value, torch.device) and value == source else value

    changed = 0
    for node in graph.nodes:
        args = torch.fx.node.map_aggregate(node.args, swap)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed += 1
    return changed


def retarget_vals(graph: torch.fx.Graph, device: torch.device | str = "cpu", source: torch.device = META) -> None:
    """Point the fake values (`node.meta["val"]`) traced on `source` at `device`, so tensors the passes add
    (real CPU weights) and the activations they combine with agree on the device."""
    device = torch.device(device)
    for node in graph.nodes:
        for value in torch.utils._pytree.tree_leaves(node.meta.get("val")):
            if isinstance(value, FakeTensor) and value.fake_device == source:
                value.fake_device = device


def capture_on_meta(module: torch.nn.Module, example_inputs: tuple | dict, *, dynamic_shapes: Any = "auto",
                    adapter: Any = None, device: torch.device | str = "cpu") -> torch.fx.GraphModule:
    """`svdq_compiler.capture` of a meta-device module (the inputs are traced as meta tensors), retargeted to
    `device`. The GraphModule's parameters stay on the meta device: attach real tensors before running it. The
    example inputs kept for re-export (and written into graph.pt) are the ones given, on their own device."""
    stray = [name for name, t in list(module.named_parameters()) + list(module.named_buffers())
             if t.device != META]
    if stray:
        raise InputError(f"capture on the meta device needs a module built there; {stray[:4]} are not",
                         fix='build it inside `with torch.device("meta"):`')
    gm = capture(module, meta_inputs(example_inputs), dynamic_shapes=dynamic_shapes, adapter=adapter)
    retargeted = retarget_device(gm.graph, device)
    retarget_vals(gm.graph, device)
    gm.recompile()
    gm.meta[INPUTS_META] = example_inputs
    gm.meta[RUN_DEVICE_META] = str(torch.device(device))
    gm.meta[CAPTURE_META]["meta_device"] = {"retargeted_nodes": retargeted, "device": str(torch.device(device))}
    return gm


def export_on_meta(gm: torch.fx.GraphModule, example_inputs: tuple | dict, *, dynamic_shapes: Any = None,
                   device: torch.device | str = "cpu") -> torch.export.ExportedProgram:
    """Re-export a (meta-parameter) GraphModule captured by `capture_on_meta` without materializing anything.

    Tracing runs on the meta device, so the graph's `device` constants are pointed back at meta for the trace
    (their checks would fail otherwise) and at `device` again afterwards, in the GraphModule and in the
    program."""
    device = torch.device(device)
    args, kwargs = split_inputs(meta_inputs(example_inputs))
    retarget_device(gm.graph, META, source=device)
    gm.recompile()
    try:
        program = torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    finally:
        retarget_device(gm.graph, device)
        gm.recompile()
    retarget_device(program.graph, device)
    retarget_vals(program.graph, device)
    program.graph_module.recompile()
    if not any(isinstance(t, torch.Tensor) and t.device == META for t in torch.utils._pytree.tree_leaves(
            example_inputs)):
        program.example_inputs = split_inputs(example_inputs)
    return program
