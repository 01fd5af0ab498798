"""The generated source of a graph's fused nodes, for `svdq-inspect --kernels` and IR dumps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from svdq_compiler.codegen.generate import Target, generate
from svdq_compiler.codegen.spec import KernelSpec, parse_spec

FUSED_OPS = ("fused_quantize_lora_down", "fused_gemm", "fused_weight_only_linear")


@dataclass(frozen=True)
class KernelSource:
    node: str  # the graph node that launches the kernel
    spec: KernelSpec
    source: str  # the complete generated module


def default_target() -> Target:
    """The GPU of this process when there is one, else Hopper (sm_90), the main target."""
    if torch.cuda.is_available():
        return Target("cuda", tuple(torch.cuda.get_device_capability()))
    return Target("cuda", (9, 0))


def fused_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The nodes of `gm` that launch a generated kernel, in graph order."""
    return [node for node in gm.graph.nodes if node.op == "call_function"
            and getattr(node.target, "namespace", None) == "svdq" and getattr(node.target, "_opname", None) in FUSED_OPS]


def kernel_sources(gm: torch.fx.GraphModule, target: Target | None = None,
                   nodes: list[torch.fx.Node] | None = None) -> list[KernelSource]:
    """One entry per fused node of `gm` (or per node of `nodes`), in graph order; identical specs are generated
    once and shared."""
    target = target or default_target()
    by_spec: dict[str, str] = {}
    found = []
    for node in fused_nodes(gm) if nodes is None else nodes:
        text = node.args[-1]
        if text not in by_spec:
            by_spec[text] = generate(parse_spec(text), target)
        found.append(KernelSource(node.name, parse_spec(text), by_spec[text]))
    return found
