"""A loaded graph as a diffusers pipeline component: `pipe.transformer = svdq_compiler.load("graph.pt")`.

`load` returns a `CompiledModel` for graphs captured from a diffusers model (the capture report keeps its
config). It behaves as the model did where a pipeline looks: `config` (attribute access, as diffusers'
FrozenDict), `dtype`, `device`, `.to()`, `cache_context()`, and the call convention — keyword inputs,
`return_dict` (an output dataclass, or a tuple), and the per-call kwargs pipelines pass as None
(`joint_attention_kwargs`, `attention_kwargs`, ControlNet residuals). A non-empty one of those asks for
something the compiled graph cannot do (a LoRA scale, ControlNet) and is an error naming it. Inputs the graph
took as constants (`return_dict=False` at capture) are filled in.

It is also the graph: `graph`, `meta`, `code` and `graph_module` reach the GraphModule, so `save`, inspection
and the passes' helpers take it as they take a GraphModule.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.fx

from svdq_compiler.capture import CAPTURE_META, INPUTS_META
from svdq_compiler.errors import InputError

# Per-call options pipelines pass (usually None) that a compiled graph has no use for.
PIPELINE_OPTIONS = ("joint_attention_kwargs", "attention_kwargs", "cross_attention_kwargs",
                    "controlnet_block_samples", "controlnet_single_block_samples", "controlnet_blocks_repeat",
                    "down_block_additional_residuals", "mid_block_additional_residual",
                    "down_intrablock_additional_residuals", "added_cond_kwargs_extra")


class CompiledModel(torch.nn.Module):
    """A compiled graph with a diffusers model's interface (module docstring)."""

    def __init__(self, graph_module: torch.fx.GraphModule):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.graph_module = graph_module
        capture = graph_module.meta[CAPTURE_META]
        self.model_class = capture["module_class"]
        self.config = FrozenDict(capture.get("model_config") or {})
        examples = graph_module.meta.get(INPUTS_META)
        self._examples = dict(examples) if isinstance(examples, dict) else {}
        self._positional = [entry["path"] for entry in capture["inputs"]]

    # ---- what the graph is -----------------------------------------------------------------------------------

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    @property
    def meta(self) -> dict[str, Any]:
        return self.graph_module.meta

    @property
    def code(self) -> str:
        return self.graph_module.code

    # ---- what a pipeline reads -------------------------------------------------------------------------------

    def _first_float(self) -> torch.Tensor:
        tensors = [*self.graph_module.parameters(), *self.graph_module.buffers()]
        return next((t for t in tensors if t.is_floating_point()), tensors[0] if tensors else torch.empty(0))

    @property
    def dtype(self) -> torch.dtype:
        return self._first_float().dtype

    @property
    def device(self) -> torch.device:
        return self._first_float().device

    @property
    def add_embedding(self) -> Any:
        """What SDXL's pipeline reads of a U-Net's added text/time embedding: the width it takes
        (`add_embedding.linear_1.in_features`), to check its time ids against; the graph takes the same width."""
        from types import SimpleNamespace

        width = self.config.get("projection_class_embeddings_input_dim")
        if width is None:
            raise AttributeError(f"the compiled {self.model_class} has no added text/time embedding")
        return SimpleNamespace(linear_1=SimpleNamespace(in_features=width))

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        """diffusers' CacheMixin hook around each branch of a guided step: nothing to cache here."""
        yield

    def forward(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        if len(args) > len(self._positional):
            raise InputError(f"{len(args)} positional inputs; the graph takes {self._positional}",
                             where=f"compiled {self.model_class}", fix="pass the inputs by keyword")
        inputs = dict(zip(self._positional, args))
        for name, value in kwargs.items():
            if name not in self._examples and (name in PIPELINE_OPTIONS or is_empty(value)):
                if not is_empty(value):
                    raise InputError(f"{name}={_short(value)} asks for something the compiled graph cannot do",
                                     where=f"compiled {self.model_class}",
                                     fix="fuse LoRA scales into the weights before compiling; ControlNet residuals "
                                         "need a graph captured with them")
                continue  # an option the pipeline passes unused (None, {}, PixArt's {"resolution": None, …})
            inputs[name] = value
        batch = next((value.shape[0] for value in inputs.values() if isinstance(value, torch.Tensor) and value.dim()),
                     None)
        inputs = {name: pipeline_convention(value, self._examples.get(name), batch) for name, value in inputs.items()}
        unknown = sorted(set(inputs) - set(self._examples)) if self._examples else []
        if unknown:
            raise InputError(f"the compiled graph does not take {unknown}", where=f"compiled {self.model_class}",
                             fix=f"it takes {sorted(self._examples)}")
        for name, value in self._examples.items():
            if not isinstance(value, torch.Tensor) and name not in inputs:
                inputs[name] = value  # a constant of the capture, e.g. return_dict=False
        output = self.graph_module(**inputs)
        sample = output[0] if isinstance(output, (tuple, list)) else output
        if not return_dict:
            return (sample,)
        return _output_class(self.model_class)(sample=sample)


def is_empty(value: Any) -> bool:
    """None, or a dict of nothing but empty values: what a pipeline passes for an option it does not use."""
    return value is None or (isinstance(value, dict) and all(is_empty(item) for item in value.values()))


def pipeline_convention(value: Any, captured: Any, batch: int | None) -> Any:
    """`value` as the graph took it at capture where pipelines pass it in another form that means the same:
    one timestep for the whole batch (a number or a 0-dim tensor; SDXL's U-Net call) becomes one per row, and an
    integer attention mask (Sana) becomes the floating dtype it was captured with."""
    if not isinstance(captured, torch.Tensor):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = torch.tensor(value, dtype=captured.dtype)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and captured.dim() == 1 and batch is not None:
        value = value.expand(batch).clone()
    if isinstance(value, torch.Tensor) and captured.is_floating_point() and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = value.to(captured.dtype)
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _output_class(model_class: str):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    if "UNet" in model_class:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput
    return Transformer2DModelOutput


def as_pipeline_component(gm: torch.fx.GraphModule) -> torch.nn.Module:
    """`gm` wrapped as a CompiledModel when it was captured from a diffusers model, else `gm` itself."""
    if gm.meta.get(CAPTURE_META, {}).get("model_config") is None:
        return gm
    return CompiledModel(gm)


def graph_module_of(model: torch.nn.Module) -> torch.fx.GraphModule:
    """The GraphModule behind `model` (a CompiledModel or a GraphModule). A model the eager path compiled has
    none: what needs the whole model's graph (LoRA, ONNX export) stops here with one line."""
    from svdq_compiler.eager import is_eager

    if is_eager(model):
        raise InputError(f"{type(model).__name__} was compiled by the eager path (module swap): it has no "
                         "whole-model graph for LoRA or ONNX export",
                         fix="fuse LoRAs into the weights before compiling; ONNX export needs a model torch.export "
                             "can capture (path='graph')")
    return model.graph_module if isinstance(model, CompiledModel) else model
