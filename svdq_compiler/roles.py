"""Structural roles of linears: what each linear does in the network, read from the graph around it
(annotate_linears records the role and the rule that gave it; the scheme policy keys on it).

Roles (first rule that matches; user skip patterns and adapter hints aside):
0. qkv / cross_kv: the output reaches the query, key or value of an attention (through views, norms, RoPE,
   concatenation); key/value linears whose input-sharing siblings feed no query of that attention read
   another stream: cross_kv;
1. embed: the input is computed from graph inputs through no layer (no linear, conv, norm or attention), or
   through one such embedder only (the second linear of an embedding MLP);
2. final: the output reaches a graph output through views and parameter-only elementwise ops;
3. on the conditioning path (fewer rows than the largest linear input, and a lower rank than the token stream,
   which is what the attention queries read, or one token: [B, 1, C] beside [B, S, C]): adaln if the output
   modulates the token stream (broadcast multiply/add), final if what it modulates feeds only final linears,
   else embed;
4. out: the input is an attention output; 5. mlp_down: the input is an activation (plain GELU: shifted
   unsigned under INT4; gated products: signed); 6. mlp_up: the output feeds an activation; 7. other.
An adapter's `role_hints` (name pattern → role) override the structure; the reason keeps what it said.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx

from svdq_compiler.fx_utils import (ACTIVATION_OPS, ATTENTION_OPS, CONV_OPS, MATMUL_OPS, NORM_OPS, SOFTMAX_OPS,
                                    aten, ancestors, is_linear, is_op, is_view, packet, rank_of, readers, rows_of,
                                    tensor_val, through_views, walk_forward)
from svdq_compiler.ir import Role
from svdq_compiler.svdquant import layer_name

_WALK_DEPTH = 48  # q/k/v reach attention through views, norms, RoPE and concatenation: a few dozen nodes at most


def is_layer(node: torch.fx.Node) -> bool:
    """A node that computes a layer (linear, convolution, attention, matmul, softmax, norm): role walks stop there."""
    return is_linear(node) or is_op(node, CONV_OPS | ATTENTION_OPS | MATMUL_OPS | SOFTMAX_OPS | NORM_OPS)


@dataclass
class Attention:
    """Where attentions read their operands and which nodes are their outputs."""

    operands: dict[tuple[torch.fx.Node, int], tuple[str, str]] = field(default_factory=dict)  # (op, arg) → (site, q|k|v)
    outputs: set[torch.fx.Node] = field(default_factory=set)


def find_attention(gm: torch.fx.GraphModule) -> Attention:
    """Every attention's q/k/v operands and output: fused SDPA ops, and decomposed softmax(q·kᵀ)·v chains."""
    found = Attention()
    for node in gm.graph.nodes:
        if is_op(node, ATTENTION_OPS):
            for index, role in enumerate("qkv"):
                found.operands[(node, index)] = (node.name, role)
            found.outputs.add(node)
        elif is_op(node, SOFTMAX_OPS):
            # Decomposed attention: softmax(f(q·kᵀ)) · v.
            score = next((n for n, _ in zip(ancestors(node, is_layer), range(8)) if is_op(n, MATMUL_OPS)), None)
            value = None
            frontier = [node]
            for _ in range(6):
                following = []
                for current in frontier:
                    for user in readers(current):
                        if is_op(user, MATMUL_OPS) and user.args[0] is current:
                            value = user
                        elif is_view(user) or packet(user) in (aten._to_copy, aten.clone):
                            following.append(user)
                frontier = following
                if value is not None or not frontier:
                    break
            if score is not None and value is not None:
                found.operands[(score, 0)] = (node.name, "q")
                found.operands[(score, 1)] = (node.name, "k")
                found.operands[(value, 1)] = (node.name, "v")
                found.outputs.add(value)
    return found


def _attention_hits(linear: torch.fx.Node, attention: Attention) -> set[tuple[str, str]]:
    hits: set[tuple[str, str]] = set()

    def visit(user: torch.fx.Node, source: torch.fx.Node) -> bool:
        for index, arg in enumerate(user.args[:3]):
            if arg is source and (user, index) in attention.operands:
                hits.add(attention.operands[(user, index)])
        # q/k normalization sits between the projections and attention: walk through norms, not other layers.
        return not (is_layer(user) and not is_op(user, NORM_OPS))

    walk_forward(linear, visit, _WALK_DEPTH)
    return hits


def source_kind(node, attention: Attention) -> str:
    source = through_views(node)
    if source in attention.outputs:
        return "attention"
    if is_op(source, ACTIVATION_OPS):
        return f"activation:{packet(source).__name__}"
    return "other"


def graph_inputs_feeding(x: torch.fx.Node, embedders: set[torch.fx.Node]) -> list[str] | None:
    """What `x` is computed from when no layer other than `embedders` lies in between, else None: the graph
    inputs it reads, or the embedders (an embedding MLP's second linear reads its first one)."""
    if is_layer(x) and x not in embedders:
        return None
    def label(node: torch.fx.Node) -> str:
        return layer_name(node.args[1].target) if node in embedders else node.name

    sources = [label(x)] if x.op == "placeholder" or x in embedders else []
    for node in ancestors(x, lambda n: is_layer(n) or n in embedders):
        if node in embedders:
            sources.append(label(node))
        elif is_layer(node):
            return None
        elif node.op == "placeholder":
            sources.append(node.name)
    return sources or None


def feeds_output(linear: torch.fx.Node) -> bool:
    found = False

    def visit(user: torch.fx.Node, source: torch.fx.Node) -> bool:
        nonlocal found
        if user.op == "output":
            found = True
            return False
        if is_layer(user) or user.op != "call_function":
            return False
        others = [n for n in user.all_input_nodes if n is not source]
        return is_view(user) or all(n.op == "get_attr" for n in others)

    walk_forward(linear, visit, _WALK_DEPTH)
    return found


def _modulated(linear: torch.fx.Node) -> list[torch.fx.Node]:
    """The elementwise nodes where this (conditioning-path) linear's output is broadcast over the token stream."""
    hits: list[torch.fx.Node] = []

    def visit(user: torch.fx.Node, source: torch.fx.Node) -> bool:
        if is_view(user):
            return True
        if user.op != "call_function" or is_layer(user) or is_op(user, ACTIVATION_OPS):
            return False
        out, src = tensor_val(user), tensor_val(source)
        if out is None or src is None:
            return False
        if len(user.all_input_nodes) > 1 and out.numel() > src.numel():
            hits.append(user)
            return False
        return True

    walk_forward(linear, visit, 16)
    return hits


def _first_linears_after(nodes: list[torch.fx.Node]) -> set[torch.fx.Node]:
    found: set[torch.fx.Node] = set()

    def visit(user: torch.fx.Node, source: torch.fx.Node) -> bool:
        if is_linear(user):
            found.add(user)
            return False
        return user.op == "call_function" and not is_layer(user)

    for node in nodes:
        walk_forward(node, visit, 16)
    return found


def _gated_activation(source: torch.fx.Node) -> str | None:
    if packet(source) is not aten.mul:
        return None
    for operand in source.all_input_nodes:
        inner = through_views(operand)
        if is_op(inner, ACTIVATION_OPS):
            return packet(inner).__name__
    return None


def _feeds_activation(linear: torch.fx.Node) -> str | None:
    found: list[str] = []

    def visit(user: torch.fx.Node, source: torch.fx.Node) -> bool:
        if is_op(user, ACTIVATION_OPS):
            found.append(packet(user).__name__)
            return False
        return is_view(user)

    walk_forward(linear, visit, 8)
    return found[0] if found else None


def assign_roles(linears: list[torch.fx.Node], attention: Attention) -> dict[torch.fx.Node, tuple[Role, str, bool]]:
    """role, reason and whether the input is plain-GELU output (shifted unsigned under INT4), per linear."""
    main_rank = max((rank_of(n.args[0]) or 0) for n in linears) if linears else 0
    main_rows = max((rows_of(n.args[0]) or 0) for n in linears) if linears else 0
    hits = {node: _attention_hits(node, attention) for node in linears}
    query_sites: dict[torch.fx.Node, set[str]] = defaultdict(set)
    for node in linears:
        query_sites[node.args[0]] |= {site for site, kind in hits[node] if kind == "q"}

    roles: dict[torch.fx.Node, tuple[Role, str, bool]] = {}
    final: set[torch.fx.Node] = set()
    first_embedders = {n for n in linears if not hits[n] and graph_inputs_feeding(n.args[0], set())}
    for node in linears:
        x = node.args[0]
        if hits[node]:
            kinds = sorted({kind for _, kind in hits[node]})
            reaches_query = "q" in kinds or any(site in query_sites[x] for site, _ in hits[node])
            sites = ", ".join(sorted({site for site, _ in hits[node]}))
            if reaches_query:
                roles[node] = (Role.QKV, f"feeds {'/'.join(kinds)} of {sites}", False)
            else:
                roles[node] = (Role.CROSS_KV, f"feeds {'/'.join(kinds)} of {sites}; its input-sharing siblings "
                                              f"feed no query there (another stream)", False)
            continue
        sources = graph_inputs_feeding(x, first_embedders if node not in first_embedders else set())
        if sources:
            roles[node] = (Role.EMBED, f"reads {', '.join(sources)} through no other layer", False)
        elif feeds_output(node):
            roles[node] = (Role.FINAL, "feeds a graph output through views and parameter-only ops", False)
            final.add(node)

    # The token stream is what the attention queries read, the widest of them where they differ: neither a pair
    # map of higher rank (RFD4-Proteina) nor a 1×1 convolution's NHWC input (a U-Net's) makes the tokens a
    # conditioning path.
    queried = [n.args[0] for n in linears if any(kind == "q" for _, kind in hits[n])]
    widest = max(queried, key=lambda x: ((rows_of(x) or 0), (rank_of(x) or 0)), default=None)
    stream_rank = main_rank if widest is None else (rank_of(widest) or 0)
    for node in linears:
        if node in roles:
            continue
        x = node.args[0]
        source = through_views(x)
        rows = rows_of(x)
        if rows is not None and rows < main_rows and ((rank_of(x) or 0) < stream_rank or _one_token(x)):
            modulated = _modulated(node)
            if modulated:
                targets = _first_linears_after(modulated)
                if targets and targets <= final:
                    roles[node] = (Role.FINAL, "modulates the input of the final projection", False)
                else:
                    roles[node] = (Role.ADALN, "conditioning-path input; output modulates the token stream", False)
            else:
                roles[node] = (Role.EMBED, f"conditioning-path embedding (input rank {rank_of(x)}, {rows} rows; "
                                           f"token stream rank {stream_rank})", False)
        elif source in attention.outputs:
            roles[node] = (Role.OUT, f"reads the output of attention {source.name}", False)
        elif is_op(source, ACTIVATION_OPS):
            name = packet(source).__name__
            roles[node] = (Role.MLP_DOWN, f"input is {name} output", name == "gelu")
        elif _gated_activation(source):
            roles[node] = (Role.MLP_DOWN, f"input is a {_gated_activation(source)}-gated product", False)
        elif _feeds_activation(node):
            roles[node] = (Role.MLP_UP, f"output feeds {_feeds_activation(node)}", False)
        else:
            roles[node] = (Role.OTHER, "no structural rule matched", False)
    return roles


def _one_token(x: torch.fx.Node) -> bool:
    """A [B, 1, C] input: a per-sample vector laid out like the tokens (Krea 2's timestep modulation), not a
    stream of its own (a text-only MLP beside joint attention has as many rows as text tokens)."""
    value = tensor_val(x)
    return value is not None and value.dim() >= 3 and value.shape[-2] == 1


def adapter_hints(adapter, model) -> dict[str, str]:
    """The adapter's role hints (name pattern → role name), if it has any."""
    if adapter is None or not hasattr(adapter, "role_hints"):
        return {}
    return dict(adapter.role_hints(model) or {})


def hinted_role(hints: dict[str, str], name: str, role: Role, reason: str) -> tuple[Role, str]:
    """The first hint whose pattern matches `name` overrides the structural role; the reason keeps both."""
    for pattern, hinted in hints.items():
        if re.search(pattern, name):
            return Role(hinted), f"adapter hint {pattern!r} (structure said {role}: {reason})"
    return role, reason
