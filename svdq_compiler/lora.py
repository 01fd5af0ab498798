"""LoRA on a compiled graph, without requantization.

A LoRA adds ΔW = s·(α/r)·B·A to a linear (A [r, K], B [N, r], strength s). In an SVDQuant linear the 16-bit
low-rank branch already computes (x/λ)·L2ᵀ·L1ᵀ; the LoRA joins it along the rank:

    L2' = [L2 ; A·diag(λ)]      (the branch reads x/λ, so the LoRA's down projection takes λ back out)
    L1' = [L1 | s·(α/r)·B]

so (x/λ)·L2'ᵀ·L1'ᵀ = (x/λ)·L2ᵀ·L1ᵀ + s·(α/r)·x·Aᵀ·Bᵀ exactly (up to the rounding of A·diag(λ) to the model
dtype): the 4-bit weights, scales and λ are untouched. The branch reads the unshifted input, so a post-GELU
layer's shift needs nothing. Linears that share L2 (q/k/v, or the groups whose down projections the fuse pass
concatenated into one kernel A) share the new rows: each LoRA factor gets its own rows, and each linear's L1'
has zeros in the columns of the others. The fused kernels' specs, the slices of a concatenated down projection
and the quantize-for-next-layer epilogues that compute a branch are updated to the new ranks.

A weight-only linear compiled with a branch (the policy keeps one where it pays, quantize_weights) takes the
LoRA rows in that branch the same way; its kernel W applies the grown L1 before its epilogue.

Layers without a branch: a 16-bit linear gets W + s·(α/r)·B·A; a weight-only linear gets a separate 16-bit
branch beside it, y + (x·Aᵀ)·(s·(α/r)·B)ᵀ — in the fused form inside its kernel W (the down projection x·Aᵀ
feeds the kernel's up projection, before the epilogue the kernel applies). A W4A4/W8A8 linear compiled with
rank 0 cannot take a LoRA without requantization (an error says so).

Several LoRAs compose (their rows and columns are concatenated in the order they were applied); the strength
of each can be changed and each can be removed: the graph keeps the tensors it had before the first LoRA and
rebuilds every touched layer from them, so removing all LoRAs restores it bit for bit.

A graph file keeps its LoRAs as LoRAs: `svdq_compiler.save` writes the graph as compiled (its LoRAs taken out
for the export and put back after) with each LoRA's factors as buffers of the program and their names,
strengths, scales and module names in the `svdq_loras.json` entry; `load` takes the factors out again and applies
the LoRAs in their order, so the loaded graph lists them, and can change or remove them, and computes what the
saved one did, bit for bit.

Every function here takes what `svdq_compiler.compile` or `load` returns (the GraphModule, or the drop-in
pipeline component wrapping it: `svdq_compiler.dropin.graph_module_of`).

Formats: diffusers / PEFT safetensors (`[transformer.|base_model.model.]<module>.lora_A.weight` and
`lora_B.weight`, also `.lora.down/.lora.up` and `.lora_down/.lora_up`, optional `<module>.alpha`), and the
kohya / Black Forest Labs FLUX formats through diffusers' converter. Module names are the diffusers names the
compiled graph keeps; a key that matches no layer is an error listing every such key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import operator
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.fx

from svdq_compiler.checks import non_finite
from svdq_compiler.dropin import graph_module_of
from svdq_compiler.errors import CheckpointError, InputError
from svdq_compiler.ir import ensure_vals, get_attr_value, infer_val, set_attr_value
from svdq_compiler.layers import Branch, Layers, branch_of, find_layers, is_call

aten = torch.ops.aten
STATE_ATTR = "_svdq_lora_state"
LORA_FILE = "svdq_loras.json"  # the graph file's entry describing its LoRAs
_FACTOR_BUFFER = "_svdq_lora_{lora}_{module}_{side}"  # a factor's buffer in a saved program
_PREFIXES = ("base_model.model.", "transformer.")
_FACTOR = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)"
                     r"(?:\.[A-Za-z_]\w*)?\.weight$")
_DOWN_KINDS = ("lora_A", "lora.down", "lora_down")
_FOREIGN_FORMATS = ("lora_unet_", "lora_transformer_", "diffusion_model.", "lora_te")
_PART = re.compile(r"^(?P<base>.+)\.part(?P<index>\d+)$")


class LoraError(CheckpointError):
    """A LoRA file cannot be applied to this graph (unmatched keys, mismatched shapes, unknown format)."""


# ---- reading LoRA files ---------------------------------------------------------------------------------------


@dataclass
class LoraModule:
    down: torch.Tensor  # A [r, K], fp32
    up: torch.Tensor  # B [N, r], fp32
    scale: float  # α/r (1 without an alpha)
    keys: list[str] = field(default_factory=list)  # the file's keys, for error messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class Lora:
    name: str
    modules: dict[str, LoraModule]  # diffusers module name → factors
    source: str


def read_lora(source: str | Path | Mapping[str, torch.Tensor], *, name: str | None = None,
              ignore: Sequence[str] = ()) -> Lora:
    """A LoRA from a safetensors file or a state dict. Keys matching a regular expression in `ignore` (e.g.
    "^text_encoder") are skipped; any other key that is not a LoRA factor or alpha is an error."""
    if isinstance(source, Mapping):
        state, label = dict(source), "state dict"
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError("no such LoRA file", where=str(path), fix="give a .safetensors LoRA")
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own types for damaged files
            raise LoraError(f"not a readable safetensors file: {exc}", where=str(path)) from exc
        label = str(path)
    state = {k: v for k, v in state.items() if not any(re.search(pattern, k) for pattern in ignore)}
    if any(key.startswith(_FOREIGN_FORMATS) for key in state):
        state = _from_diffusers_converter(state, label)
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, value in state.items():
        bare = _strip_prefix(key)
        match = _FACTOR.match(bare)
        if match:
            side = "down" if match["kind"] in _DOWN_KINDS else "up"
            factors.setdefault(match["module"], {})[side] = (key, value)
        elif bare.endswith(".alpha") and value.numel() == 1:
            alphas[bare[: -len(".alpha")]] = float(value)
        else:
            unknown.append(key)
    if unknown:
        raise LoraError(f"{len(unknown)} key(s) are not LoRA factors this reader knows: {_listing(unknown)}",
                        where=label, fix="give a diffusers/PEFT LoRA (lora_A/lora_B weights), or pass ignore= "
                                         "patterns for keys that are not for the transformer")
    modules = {}
    for module, sides in factors.items():
        if set(sides) != {"down", "up"}:
            missing = "up (lora_B)" if "up" not in sides else "down (lora_A)"
            raise LoraError(f"module {module!r} has no {missing} factor", where=label)
        (down_key, down), (up_key, up) = sides["down"], sides["up"]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0] or down.shape[0] == 0:
            raise LoraError(f"module {module!r}: A {list(down.shape)} and B {list(up.shape)} are not a rank-r pair "
                            f"[r, K] and [N, r]", where=label)
        for key, factor in ((down_key, down), (up_key, up)):
            found = non_finite(factor)
            if found:
                raise LoraError(f"LoRA factor {key} holds non-finite values ({found})", where=label,
                                fix="use an undamaged LoRA file")
        rank = down.shape[0]
        if module in alphas and not math.isfinite(alphas[module]):
            raise LoraError(f"the alpha of module {module!r} is {alphas[module]}", where=label,
                            fix="use an undamaged LoRA file")
        scale = alphas[module] / rank if module in alphas else 1.0
        modules[module] = LoraModule(down.float(), up.float(), scale, [down_key, up_key])
    if not modules:
        raise LoraError("the file holds no LoRA factors", where=label)
    default_name = Path(label).stem if label != "state dict" else f"lora{len(modules)}"
    return Lora(name or default_name, modules, label)


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _from_diffusers_converter(state: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """kohya / BFL / other community FLUX formats → diffusers names, with diffusers' own converter."""
    from diffusers.loaders import FluxLoraLoaderMixin

    try:
        converted = FluxLoraLoaderMixin.lora_state_dict(state)
    except Exception as exc:  # the converter raises plain ValueError/KeyError on formats it does not know
        raise LoraError(f"diffusers could not convert this LoRA format: {exc}", where=label) from exc
    return converted[0] if isinstance(converted, tuple) else converted


def _listing(items: Sequence[str], shown: int = 12) -> str:
    text = ", ".join(items[:shown])
    return text + (f", … ({len(items) - shown} more)" if len(items) > shown else "")


# ---- the LoRA state kept on the graph ------------------------------------------------------------------------


@dataclass
class LoraState:
    layers: Layers
    loras: "OrderedDict[str, tuple[Lora, float]]" = field(default_factory=OrderedDict)
    base_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    base_args: dict[torch.fx.Node, tuple] = field(default_factory=dict)
    adapters: dict[str, list[torch.fx.Node]] = field(default_factory=dict)  # weight-only layer → inserted nodes
    grown: set[str] = field(default_factory=set)  # L2 attributes currently carrying LoRA rows


def _state(gm: torch.nn.Module) -> LoraState:
    gm = graph_module_of(gm)
    state = getattr(gm, STATE_ATTR, None)
    if state is None:
        ensure_vals(gm)  # a loaded graph: the layers' input widths and inserted nodes need fake values
        state = LoraState(find_layers(gm))
        object.__setattr__(gm, STATE_ATTR, state)
    return state


def apply_lora(gm: torch.nn.Module, lora: Lora | str | Path | Mapping[str, torch.Tensor], *,
               strength: float = 1.0, name: str | None = None, ignore: Sequence[str] = ()) -> str:
    """Add a LoRA to the compiled graph `gm` (in place); returns the name to change or remove it by."""
    gm = graph_module_of(gm)
    lora = lora if isinstance(lora, Lora) else read_lora(lora, name=name, ignore=ignore)
    if name is not None:
        lora = dataclasses.replace(lora, name=name)
    state = _state(gm)
    if lora.name in state.loras:
        raise InputError(f"a LoRA named {lora.name!r} is already applied", fix="pass another name= or remove it")
    _check_matches(state.layers, lora, gm)
    state.loras[lora.name] = (lora, float(strength))
    try:
        _rebuild(gm, state)
    except BaseException:
        state.loras.pop(lora.name)
        _rebuild(gm, state)
        raise
    return lora.name


def set_lora_strength(gm: torch.nn.Module, name: str, strength: float) -> None:
    gm = graph_module_of(gm)
    state = _state(gm)
    if name not in state.loras:
        raise InputError(f"no LoRA named {name!r} is applied", fix=f"applied: {list(state.loras) or 'none'}")
    state.loras[name] = (state.loras[name][0], float(strength))
    _rebuild(gm, state)


def remove_lora(gm: torch.nn.Module, name: str) -> None:
    gm = graph_module_of(gm)
    state = _state(gm)
    if name not in state.loras:
        raise InputError(f"no LoRA named {name!r} is applied", fix=f"applied: {list(state.loras) or 'none'}")
    del state.loras[name]
    _rebuild(gm, state)


def applied_loras(gm: torch.nn.Module) -> dict[str, float]:
    """{name: strength} of the LoRAs applied to `gm`, in order."""
    state = getattr(graph_module_of(gm), STATE_ATTR, None)
    return {} if state is None else {name: strength for name, (_, strength) in state.loras.items()}


# ---- LoRAs in a graph file -----------------------------------------------------------------------------------


@contextlib.contextmanager
def saved_form(gm: torch.fx.GraphModule) -> Iterator[dict[str, str]]:
    """While `svdq_compiler.save` exports `gm`: the graph as compiled, with each applied LoRA's factors as
    buffers; yields the graph file's extra entry describing them ({} without LoRAs). The LoRAs are back on
    exit, whatever happened."""
    state = getattr(gm, STATE_ATTR, None)
    if state is None or not state.loras:
        yield {}
        return
    loras = OrderedDict(state.loras)
    state.loras.clear()
    _rebuild(gm, state)
    buffers: list[str] = []
    try:
        described = []
        for index, (lora, strength) in enumerate(loras.values()):
            modules = {}
            for number, (module, factors) in enumerate(lora.modules.items()):
                sides = {}
                for side, tensor in (("down", factors.down), ("up", factors.up)):
                    target = _FACTOR_BUFFER.format(lora=index, module=number, side=side)
                    set_attr_value(gm, target, tensor, as_buffer=True)
                    buffers.append(target)
                    sides[side] = target
                modules[module] = {**sides, "scale": factors.scale, "keys": factors.keys}
            described.append({"name": lora.name, "source": lora.source, "strength": strength, "modules": modules})
        yield {LORA_FILE: json.dumps({"loras": described})}
    finally:
        for target in buffers:
            delattr(gm, target)
        state.loras.update(loras)
        _rebuild(gm, state)


def restore_loras(gm: torch.fx.GraphModule, entry: str, where: str) -> None:
    """Apply the LoRAs a graph file's `svdq_loras.json` entry describes, taking their factors' buffers off the
    loaded graph (`saved_form` in reverse)."""
    if not entry:
        return
    try:
        loras = json.loads(entry)["loras"]
        for described in loras:
            modules = {module: LoraModule(_take_buffer(gm, factors["down"]), _take_buffer(gm, factors["up"]),
                                          float(factors["scale"]), [str(key) for key in factors["keys"]])
                       for module, factors in described["modules"].items()}
            lora = Lora(str(described["name"]), modules, str(described["source"]))
            apply_lora(gm, lora, strength=float(described["strength"]))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"the graph file's LoRA entry {LORA_FILE} is damaged ({exc!r})", where=where,
                              fix="write the graph again with svdq_compiler.save") from exc


def _take_buffer(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    """A factor's buffer, off the graph: the attribute and the unused read of it that unlifting left behind."""
    if not re.fullmatch(r"_svdq_lora_\d+_\d+_(down|up)", target):
        raise ValueError(f"{target!r} is not a LoRA factor's buffer")
    value = gm.get_buffer(target)
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]:
        if node.users:
            raise ValueError(f"the graph reads the LoRA factor {target!r}")
        gm.graph.erase_node(node)
    delattr(gm, target)
    return value.float()


def _targets(layers: Layers, module: str) -> list[str]:
    """The graph layers a LoRA module name reaches: the layer itself, or — for a linear that annotate_linears
    split at a concatenation — its parts, in input-column order."""
    if module in layers.names():
        return [module]
    parts = sorted((int(m["index"]), name) for name in layers.names()
                   if (m := _PART.match(name)) and m["base"] == module)
    return [name for _, name in parts]


def _layer_shape(gm: torch.fx.GraphModule, layers: Layers, layer: str) -> tuple[int, int]:
    """(N, K) of a layer."""
    if layer in layers.branched:
        branch, _, consumer = layers.branched[layer]
        return get_attr_value(gm, consumer.up).shape[0], get_attr_value(gm, branch.down).shape[1]
    if layer in layers.dense:
        return tuple(get_attr_value(gm, layers.dense[layer]).shape)
    weight = layers.weight_only.get(layer) or layers.quantized[layer]
    return get_attr_value(gm, weight.qweight).shape[0], weight.k


def _resolved(gm: torch.fx.GraphModule, layers: Layers, module: str) -> list[tuple[str, int, int]]:
    """(layer, first input column, K) per graph layer a LoRA module reaches."""
    resolved, offset = [], 0
    for layer in _targets(layers, module):
        k = _layer_shape(gm, layers, layer)[1]
        resolved.append((layer, offset, k))
        offset += max(k, 0)
    return resolved


def _check_matches(layers: Layers, lora: Lora, gm: torch.fx.GraphModule) -> None:
    unmatched, mismatched, unbranched = [], [], []
    without_branch = layers.unbranched()
    for module, factors in lora.modules.items():
        targets = _resolved(gm, layers, module)
        if not targets:
            unmatched += factors.keys
            continue
        if any(layer in without_branch for layer, _, _ in targets):
            unbranched.append(module)
            continue
        n = {_layer_shape(gm, layers, layer)[0] for layer, _, _ in targets}
        k = sum(width for _, _, width in targets)
        if n != {factors.up.shape[0]} or k != factors.down.shape[1]:
            mismatched.append(f"{module}: LoRA A {list(factors.down.shape)}, B {list(factors.up.shape)}; the layer "
                              f"is {sorted(n)[0]}×{k} (out×in)")
    if unmatched:
        raise LoraError(f"{len(unmatched)} LoRA key(s) match no layer of the graph: {_listing(unmatched)}",
                        where=lora.source, fix="the LoRA is for another model (or names layers with another "
                                               "convention); pass ignore= patterns for keys that are not for "
                                               "the transformer")
    if mismatched:
        raise LoraError(f"{len(mismatched)} LoRA module(s) do not fit their layer: {_listing(mismatched)}",
                        where=lora.source, fix="the LoRA was trained for a model with other dimensions")
    if unbranched:
        raise LoraError(f"{len(unbranched)} layer(s) are quantized without a low-rank branch, so a LoRA cannot "
                        f"join one: {_listing(unbranched)}", where=lora.source,
                        fix="compile with rank > 0 (the int4/nvfp4 presets) to apply LoRAs without requantizing")


# ---- rebuilding the touched layers from their base tensors ---------------------------------------------------


def _save_base(gm: torch.fx.GraphModule, state: LoraState, target: str) -> torch.Tensor:
    if target not in state.base_tensors:
        state.base_tensors[target] = get_attr_value(gm, target)
    return state.base_tensors[target]


def _set(gm: torch.fx.GraphModule, target: str, value: torch.Tensor, buffers: set[str]) -> None:
    """Replace an attribute, keeping it a buffer if it is one (`buffers`: the graph's buffer names)."""
    set_attr_value(gm, target, value, as_buffer=target in buffers)


def _rebuild(gm: torch.fx.GraphModule, state: LoraState) -> None:
    layers = state.layers
    _drop_adapters(gm, state)
    buffers = {name for name, _ in gm.named_buffers(remove_duplicate=False)}  # _set keeps each kind: read once
    for target, tensor in state.base_tensors.items():
        _set(gm, target, tensor, buffers)
    for node, args in state.base_args.items():
        node.args = args
    for down_target in state.grown:
        _refresh_vals(gm, branch_of(layers, down_target))
    state.grown.clear()
    branch_rows: dict[str, dict[int, list[tuple[str, torch.Tensor, torch.Tensor]]]] = {}
    dense: dict[str, torch.Tensor] = {}
    adapters: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for lora, strength in state.loras.values():
        for module, factors in lora.modules.items():
            for layer, offset, k in _resolved(gm, layers, module):
                down = factors.down[:, offset:offset + k]
                up = factors.up * (strength * factors.scale)
                if layer in layers.branched:
                    branch, segment, _ = layers.branched[layer]
                    segments = branch_rows.setdefault(branch.down, {})
                    segments.setdefault(id(segment), []).append((layer, down, up))
                elif layer in layers.dense:
                    dense[layer] = dense.get(layer, 0) + up @ down
                else:
                    adapters.setdefault(layer, []).append((down, up))
    for layer, delta in dense.items():
        target = layers.dense[layer]
        base = _save_base(gm, state, target)
        _set(gm, target, (base.float() + delta).to(base.dtype), buffers)
    for down_target, segments in branch_rows.items():
        _grow_branch(gm, state, down_target, segments, buffers)
        state.grown.add(down_target)
    for layer, pairs in adapters.items():
        _add_adapter(gm, state, layer, pairs)
    gm.recompile()


def _grow_branch(gm: torch.fx.GraphModule, state: LoraState, down_target: str,
                 extra: dict[int, list[tuple[str, torch.Tensor, torch.Tensor]]], buffers: set[str]) -> None:
    """Rebuild one L2 with each segment's LoRA rows after its own, and the L1s, slices and specs that go with it."""
    branch = branch_of(state.layers, down_target)
    base_down = _save_base(gm, state, down_target)
    dtype = base_down.dtype
    smooth = get_attr_value(gm, branch.smooth).float() if branch.smooth else None
    blocks, cursor = [], 0
    for segment in branch.segments:
        rows = extra.get(id(segment), [])
        extra_rows = [down * smooth if smooth is not None else down for _, down, _ in rows]
        blocks.append(base_down[segment.start:segment.stop])
        blocks += [r.to(dtype) for r in extra_rows]
        added = sum(r.shape[0] for r in extra_rows)
        new_start, new_stop = cursor, cursor + (segment.stop - segment.start) + added
        for cut in segment.slices:
            state.base_args.setdefault(cut, cut.args)
            cut.args = (cut.args[0], cut.args[1], new_start, new_stop)
        cursor = new_stop
        for consumer in segment.consumers:
            base_up = _save_base(gm, state, consumer.up)
            columns = [base_up.float()]
            for layer, down, up in rows:
                columns.append(up if layer == consumer.layer else up.new_zeros(up.shape[0], down.shape[0]))
            new_up = torch.cat(columns, dim=1).to(base_up.dtype)
            _set(gm, consumer.up, new_up, buffers)
            _set_rank(state, consumer.node, new_up.shape[1], "gemm")
    new_down = torch.cat(blocks, dim=0).contiguous()
    _set(gm, down_target, new_down, buffers)
    for node in branch.rank_nodes:
        _set_rank(state, node, new_down.shape[0], "down")
    _refresh_vals(gm, branch)


def _set_rank(state: LoraState, node: torch.fx.Node, rank: int, role: str) -> None:
    """Update the rank in a fused node's spec: kernel A's own rank, kernel B's up-projection rank ("gemm"), or
    the rank of the next layer's down projection computed in kernel B's epilogue ("down")."""
    if node.op != "call_function" or not isinstance(node.args[-1], str):
        return  # the lowered form has no spec: the attribute's shape is all there is
    from svdq_compiler.codegen.spec import GemmSpec, parse_spec

    state.base_args.setdefault(node, node.args)
    spec = parse_spec(node.args[-1])
    if isinstance(spec, GemmSpec):
        spec = dataclasses.replace(spec, quantize_next=dataclasses.replace(spec.quantize_next, rank=rank)) \
            if role == "down" else dataclasses.replace(spec, rank=rank)
    else:
        spec = dataclasses.replace(spec, rank=rank)
    node.args = (*node.args[:-1], spec.to_string())


def _refresh_vals(gm: torch.fx.GraphModule, branch: Branch) -> None:
    """Keep node values (shapes) right after a rank change, for later passes, verify and re-export."""
    # the down projection's readers: kernel A, or aten.linear(x/λ, L2) in the lowered form and before kernel W
    touched = set(branch.rank_nodes) | {user for node in gm.graph.nodes if node.op == "get_attr"
                                        and node.target == branch.down for user in node.users}
    for segment in branch.segments:
        touched.update(segment.slices)
        touched.update(consumer.node for consumer in segment.consumers)
    for node in gm.graph.nodes:  # graph order, so inputs are refreshed first
        if node in touched or (is_call(node, operator.getitem) and node.args[0] in touched):
            for arg in node.all_input_nodes:
                if arg.op == "get_attr":
                    arg.meta.pop("val", None)
            try:
                infer_val(gm, node)
            except Exception:  # a graph without fake values (hand-built) still runs; only its shapes are stale
                return


def _add_adapter(gm: torch.fx.GraphModule, state: LoraState, layer: str,
                 pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """y = weight_only_linear(x) + (x·Aᵀ)·Bᵀ with the LoRAs' factors concatenated along the rank."""
    weight = state.layers.weight_only[layer]
    node = weight.node
    value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    # the branch runs in the activation dtype (the weight scales may be kept in float32)
    dtype = value.dtype if isinstance(value, torch.Tensor) else get_attr_value(gm, weight.wscales).dtype
    down = torch.cat([d for d, _ in pairs]).to(dtype)
    up = torch.cat([u for _, u in pairs], dim=1).to(dtype)
    down_target, up_target = f"{layer}.lora_adapter_down", f"{layer}.lora_adapter_up"
    set_attr_value(gm, down_target, down, as_buffer=True)
    set_attr_value(gm, up_target, up, as_buffer=True)
    graph = gm.graph
    if is_call(node, torch.ops.svdq.fused_weight_only_linear.default):
        _add_adapter_to_kernel(gm, state, layer, node, down_target, up_target)
        return
    with graph.inserting_after(node):
        down_attr = graph.get_attr(down_target)
    with graph.inserting_after(down_attr):
        projected = graph.call_function(aten.linear.default, (node.args[0], down_attr))
    with graph.inserting_after(projected):
        up_attr = graph.get_attr(up_target)
    with graph.inserting_after(up_attr):
        branch = graph.call_function(aten.linear.default, (projected, up_attr))
    with graph.inserting_after(branch):
        total = graph.call_function(aten.add.Tensor, (node, branch))
    node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
    state.adapters[layer] = [down_attr, projected, up_attr, branch, total]


def _add_adapter_to_kernel(gm: torch.fx.GraphModule, state: LoraState, layer: str, node: torch.fx.Node,
                           down_target: str, up_target: str) -> None:
    """A fused weight-only linear takes the branch as its kernel's up projection: its epilogue (a GELU, a gate)
    then applies to the sum, as it did to the unfused linear's output."""
    from svdq_compiler.codegen.spec import parse_spec

    spec = parse_spec(node.args[-1])  # rank 0: a kernel W with a branch of its own takes the rows there
    graph = gm.graph
    with graph.inserting_before(node):
        down_attr = graph.get_attr(down_target)
        projected = graph.call_function(aten.linear.default, (node.args[0], down_attr))
        up_attr = graph.get_attr(up_target)
    for inserted in (down_attr, projected, up_attr):
        infer_val(gm, inserted)
    state.base_args.setdefault(node, node.args)
    rank = get_attr_value(gm, up_target).shape[1]
    node.args = (*node.args[:3], projected, up_attr, *node.args[5:-1],
                 dataclasses.replace(spec, rank=rank).to_string())
    state.adapters[layer] = [down_attr, projected, up_attr]


def _drop_adapters(gm: torch.fx.GraphModule, state: LoraState) -> None:
    for layer, nodes in state.adapters.items():
        if len(nodes) == 3:  # inside a fused kernel: its arguments go back to the ones it was compiled with
            fused = state.layers.weight_only[layer].node
            fused.args = state.base_args.pop(fused)
            erased = reversed(nodes)
        else:
            down_attr, projected, up_attr, branch, total = nodes
            total.replace_all_uses_with(state.layers.weight_only[layer].node)
            erased = (total, branch, up_attr, projected, down_attr)
        for node in erased:
            gm.graph.erase_node(node)
        for target in (f"{layer}.lora_adapter_down", f"{layer}.lora_adapter_up"):
            owner, leaf = target.rsplit(".", 1)
            delattr(gm.get_submodule(owner), leaf)
    state.adapters.clear()
