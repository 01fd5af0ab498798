"""The IR: an ATen-level torch.fx GraphModule plus what the passes learn, kept in `node.meta["svdq"]`.

A pass reads and writes only that key, the graph, and the GraphModule's parameters and buffers. Each node kind
that passes annotate has one dataclass here. `format_ir` prints the graph's code with the annotations as comments.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.fx
from torch._dispatch.python import enable_python_dispatcher

from svdq_compiler.config import Scheme
from svdq_compiler.errors import CaptureError

if TYPE_CHECKING:  # codegen sits above ir in the import layers: the specs are only named here
    from svdq_compiler.codegen.spec import ActQuant, KernelSpec

# Keys of what the compiler keeps in node.meta and gm.meta; every module reads them from here.
META_KEY = "svdq"  # node.meta: the node's LinearInfo or QuantOpInfo
CAPTURE_META = "svdq_capture"  # gm.meta: the capture report (JSON-able)
INPUTS_META = "svdq_capture_inputs"  # gm.meta: the example inputs, kept for re-export when saving
MODEL_BYTES_META = "svdq_model_bytes_before"  # gm.meta: parameter bytes of the captured model (annotate_linears)
LAYERS_META = "svdq_layers"  # gm.meta: the per-layer report (lower; svdq_compiler.report)
REPORT_META = "svdq_report"  # gm.meta: the compile report (svdq_compiler.compile)
IR_META = "svdq_ir"  # gm.meta of a loaded graph: the saved IR text, zlib-deflated UTF-8 (saving it again reads it)
MANIFEST_META = "svdq_manifest"  # gm.meta of a loaded graph: the archive's manifest
EAGER_META = "svdq_eager"  # gm.meta of an eager path's stub graph: how to rebuild the model around it (eager.py)
# Set by the streaming compile (svdq_compiler.meta_capture): the device a graph whose attributes are meta-device
# stand-ins runs on. Their fake values claim that device, as the traced activations' do.
RUN_DEVICE_META = "svdq_run_device"
OPS_NAMESPACE = "svdq"  # torch.ops.svdq.*: the reference ops (svdq_compiler.ops) and fused kernels (codegen)


class Role(str, enum.Enum):
    """What a linear does in the network, inferred from graph structure."""

    QKV = "qkv"  # siblings that read the same (normalized) input and feed attention
    CROSS_KV = "cross_kv"  # K/V of cross-attention: read the text stream
    OUT = "out"  # attention output projection
    MLP_UP = "mlp_up"
    MLP_DOWN = "mlp_down"  # input comes from GELU/SiLU
    ADALN = "adaln"  # input is SiLU(conditioning embedding): modulation
    EMBED = "embed"  # fed by a graph input (patch, text, time embedders)
    FINAL = "final"  # feeds a graph output
    CONV = "conv"  # a k×k convolution (U-Net resnets)
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


@dataclass
class LinearInfo:
    """Everything the passes know about one linear (aten.linear, addmm/mm with a weight, or a 1×1 conv)."""

    name: str  # qualified module name, e.g. "transformer_blocks.0.attn.to_q"
    weight: str  # get_attr target of the (original) weight
    bias: str | None
    in_features: int
    out_features: int
    kind: str = "linear"  # "linear" | "conv1x1" | "conv"
    role: Role = Role.OTHER
    role_reason: str = ""  # the structural rule that gave the role
    group: str | None = None  # smoothing group: the linears that read the same tensor share one λ
    scheme: Scheme | None = None
    skip_reason: str | None = None  # why the layer stays 16-bit (or weight-only), for the report
    shift: float = 0.0  # constant added to the input before unsigned quantization (post-GELU)
    smooth: str | None = None  # get_attr target of λ (length K)
    smooth_alpha: float | None = None
    smooth_beta: float | None = None
    rank: int = 0
    lora_down: str | None = None  # L2 [rank, K] target (shared within a q/k/v group)
    lora_up: str | None = None  # L1 [N, rank] target
    qweight: str | None = None  # packed residual codes
    wscales: str | None = None
    wtscale: str | None = None  # per-tensor scale (nvfp4)
    pad_k: int = 0  # zero columns appended so K divides the group size
    errors: dict[str, float] = field(default_factory=dict)  # e.g. output_rel, smooth_ratio
    bytes_before: int = 0
    bytes_after: int = 0
    fallback: str | None = None  # sensitivity fallback taken, with the reason
    choice: str | None = None  # the per-layer choice (quantize_weights): the form kept and every error measured

    def note_error(self, name: str, value: float) -> None:
        # Four significant digits: the last bits of a measured error follow the thread count's summation order,
        # and the graph file must not (the same compile gives the same bytes at any thread count).
        self.errors[name] = float(f"{value:.4g}")

    def summary(self) -> str:
        parts = [f"{self.name}", f"role={self.role}"]
        if self.group:
            parts.append(f"group={self.group}")
        if self.scheme is not None:
            parts.append(f"scheme={self.scheme.describe()}")
        if self.skip_reason:
            parts.append(f"skip={self.skip_reason}")
        if self.smooth_alpha is not None:
            parts.append(f"α={self.smooth_alpha:g} β={self.smooth_beta:g}")
        if self.rank:
            parts.append(f"rank={self.rank}")
        if self.pad_k:
            parts.append(f"pad_k={self.pad_k}")
        if self.fallback:
            parts.append(f"fallback={self.fallback}")
        if self.choice:
            parts.append(f"choice=[{self.choice}]")
        parts += [f"{k}={v:.3g}" for k, v in self.errors.items()]
        return " ".join(parts)


class OpTag(str, enum.Enum):
    """What a node the passes insert does for the linears it serves (QuantOpInfo.op)."""

    SMOOTH_DIV = "smooth_div"  # x / λ, shared by a smoothing group (smooth)
    LORA_DOWN = "lora_down"  # x·L2ᵀ, shared by the linears that read the same input (lowrank)
    LORA_UP = "lora_up"  # ·L1ᵀ (lowrank)
    LORA_ADD = "lora_add"  # residual GEMM + branch (lowrank, lower)
    QUANTIZE_ACT = "svdq.quantize_act"  # lower
    GEMM = "svdq.gemm"
    FUSED_GEMM = "svdq.fused_gemm"  # fuse: kernel B
    FUSED_WEIGHT_ONLY_LINEAR = "svdq.fused_weight_only_linear"  # fuse: kernel W
    FUSED_QUANTIZE_LORA_DOWN = "svdq.fused_quantize_lora_down"  # fuse: kernel A

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


@dataclass
class QuantOpInfo:
    """A node inserted by lower/fuse that implements (part of) one or more linears."""

    op: OpTag
    linears: list[str]  # qualified names of the linears it serves
    # What it computes, frozen: a fused op's kernel spec (the one its string argument holds) or a quantize_act's
    # ActQuant; None for the plain ATen nodes (smooth_div, lora_*).
    spec: KernelSpec | ActQuant | None = None

    def summary(self) -> str:
        epilogue = getattr(self.spec, "epilogue", ())  # kernels B and W end in one
        text = f"{self.op} for {', '.join(self.linears)}"
        # each step as a field dict: the text format_ir printed when the spec was kept as a dict
        return text + (f" epilogue={tuple(dataclasses.asdict(step) for step in epilogue)}" if epilogue else "")


@dataclass(frozen=True)
class SetAside:
    """A linear's annotation while a driver works on other linears (the streaming compile's units): passes see no
    LinearInfo, while the IR still prints it and contracts still find the node annotated."""

    info: LinearInfo

    def summary(self) -> str:
        return f"(set aside) {self.info.summary()}"


def info(node: torch.fx.Node) -> Any:
    return node.meta.get(META_KEY)


def linear_info(node: torch.fx.Node) -> LinearInfo | None:
    value = node.meta.get(META_KEY)
    return value if isinstance(value, LinearInfo) else None


def set_info(node: torch.fx.Node, value: Any) -> None:
    node.meta[META_KEY] = value


def annotated_linears(gm: torch.fx.GraphModule) -> Iterator[tuple[torch.fx.Node, LinearInfo]]:
    for node in gm.graph.nodes:
        li = linear_info(node)
        if li is not None:
            yield node, li


def module_path(node: torch.fx.Node) -> str:
    """Qualified name of the innermost module that produced `node`, from torch.export's nn_module_stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    # torch.export names submodules like "L['self'].blocks[0].attn" in strict mode and "blocks.0.attn" otherwise.
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path)


def get_attr_value(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr_value(gm: torch.fx.GraphModule, target: str, value: torch.Tensor, *, as_buffer: bool = False) -> None:
    """Create or replace a parameter/buffer at a dotted path (creating intermediate modules as needed).

    The tensor is stored contiguous: a saved graph loads its tensors contiguous, and an ATen op (a BLAS linear)
    may sum in another order for a strided operand, so a strided tensor here would make the loaded graph's
    output differ from the compiled one's."""
    value = value.contiguous()
    *parents, leaf = target.split(".")
    owner: torch.nn.Module = gm
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if hasattr(owner, leaf):
        delattr(owner, leaf)
    if as_buffer or not value.is_floating_point():
        owner.register_buffer(leaf, value)
    else:
        owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


_ASSIGN = re.compile(r"^(\s*)(\w+) = ")


def format_ir(gm: torch.fx.GraphModule) -> str:
    """The GraphModule's Python code, with each annotated node's svdq meta as a comment above its line."""
    by_name = {node.name: node for node in gm.graph.nodes}
    lines = []
    for line in gm.code.splitlines():
        match = _ASSIGN.match(line)
        if match:
            node = by_name.get(match.group(2))
            meta = node.meta.get(META_KEY) if node is not None else None
            if meta is not None:
                summary = meta.summary() if hasattr(meta, "summary") else repr(meta)
                lines.append(f"{match.group(1)}# svdq: {summary}")
        lines.append(line)
    return "\n".join(lines) + "\n"


def split_inputs(example_inputs: tuple | list | dict | torch.Tensor) -> tuple[tuple, dict]:
    """`example_inputs` is a tuple of positional arguments or a dict of keyword arguments."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise CaptureError(f"example_inputs must be a tuple of positional args or a dict of kwargs, "
                       f"got {type(example_inputs).__name__}")


def fake_mode_of(gm: torch.fx.GraphModule):
    """The FakeTensorMode (with the symbolic shape environment) that capture left on the graph's nodes."""
    from torch._guards import detect_fake_mode

    # Every node's value comes from that one mode: the first is enough (passes ask once per inserted node, and
    # scanning the whole graph each time made inserting nodes quadratic).
    first = next((n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)), None)
    return detect_fake_mode([] if first is None else [first])


def ensure_vals(gm: torch.fx.GraphModule) -> None:
    """Fake values for a graph that has none (one `load` rebuilt: its record keeps no per-node values), from
    its example inputs at their captured sizes; what passes that insert nodes into it later (LoRA) read."""
    if fake_mode_of(gm) is not None or INPUTS_META not in gm.meta:
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    tree = split_inputs(gm.meta[INPUTS_META])
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*torch.utils._pytree.tree_leaves(tree))


def attribute_val(gm: torch.fx.GraphModule, target: str, mode=None):
    """The fake value of a parameter or buffer (of a meta-device stand-in: on the graph's run device)."""
    mode = mode or fake_mode_of(gm)
    tensor = get_attr_value(gm, target)
    value = mode.from_tensor(tensor, static_shapes=True)
    if tensor.is_meta and RUN_DEVICE_META in gm.meta:
        value.fake_device = torch.device(gm.meta[RUN_DEVICE_META])
    return value


def infer_val(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Set node.meta["val"] by running its target on the fake values of its inputs.

    Passes call this for every node they insert, so later passes, verify and re-export see shapes (symbolic
    token counts included).
    """
    mode = fake_mode_of(gm)

    def fake(arg):
        if isinstance(arg, torch.fx.Node):
            if arg.op == "get_attr" and "val" not in arg.meta:
                arg.meta["val"] = attribute_val(gm, arg.target, mode)
            return arg.meta["val"]
        return arg

    args = torch.fx.node.map_aggregate(node.args, fake)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, fake)
    # The Python dispatcher runs composite ops (aten.linear → matmul) through their symbolic-size-aware Python
    # decompositions, as torch.export does; torch < 2.12's C++ ones call numel() on symbolic token counts.
    with mode, enable_python_dispatcher():
        if node.op == "get_attr":
            node.meta["val"] = attribute_val(gm, node.target, mode)
        else:
            node.meta["val"] = node.target(*args, **kwargs)
