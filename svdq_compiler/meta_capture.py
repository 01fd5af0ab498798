"""Capture on the meta device: the graph of a model whose weights are not in memory (a 12B FLUX is 24 GB).

The model is built with `torch.device("meta")` (parameters have shapes and dtypes, no storage) and exported
with meta example inputs. Tracing bakes the device of the example into a few nodes (`arange(..., device=meta)`
for RoPE tables, `_assert_tensor_metadata(..., device=meta)` checks); `retarget_device` rewrites those to the
device the weights will live on, so the graph runs once real weights are attached; `retarget_vals` does the same
for the traced fake values, which passes combine with the fake values of the real tensors they add.

Tracing costs about as much per node as it does on real tensors (symbolic shapes dominate), so the 12B FLUX.1
(≈7000 nodes) took 22 minutes on the 2-core machine. Its blocks are identical, so only three of each kind are
traced (the lists its adapter's `repeated_blocks` names): the first two show how one block's outputs feed the
next, and `replicate_blocks` copies the middle one up to the configured depth (the copies read `transformer_blocks.<i>.…`). The first and the
middle block are checked node for node; a model whose blocks do not line up is traced in full.

`program_from_graph` turns the compiled GraphModule back into an ExportedProgram without tracing it again:
attributes become parameter and buffer placeholders, the nodes are copied with their fake values (the symbolic
token counts stay the capture's symbols) and the range constraints come from the capture's shape environment.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

from svdq_compiler.capture import CAPTURE_META, INPUTS_META, capture, model_config
from svdq_compiler.errors import CaptureError, InputError
from svdq_compiler.ir import RUN_DEVICE_META, get_attr_value, set_attr_value, split_inputs
from svdq_compiler.models.base import cast_module

log = logging.getLogger("svdq_compiler")

META = torch.device("meta")
TRACED_REPEATS = 3  # first, middle (the template) and last block of each kind


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
    example inputs kept for re-export (and written into graph.pt) are the ones given, on their own device.
    Models whose adapter declares `repeated_blocks` are traced with three blocks of each kind and replicated (module doc)."""
    stray = [name for name, t in list(module.named_parameters()) + list(module.named_buffers())
             if t.device != META]
    if stray:
        raise InputError(f"capture on the meta device needs a module built there; {stray[:4]} are not",
                         fix='build it inside `with torch.device("meta"):`')
    start = time.perf_counter()
    traced, depths = _shallow(module)
    gm = capture(traced, meta_inputs(example_inputs), dynamic_shapes=dynamic_shapes, adapter=adapter)
    replicated = {}
    if depths:
        try:
            for attribute, count in depths.items():
                replicated[attribute] = replicate_blocks(gm, attribute, count)
            _check_state(gm, module)
        except CaptureError as exc:
            log.warning("capture: %s; tracing every block instead", exc)
            gm, replicated = capture(module, meta_inputs(example_inputs), dynamic_shapes=dynamic_shapes,
                                     adapter=adapter), {}
    retargeted = retarget_device(gm.graph, device)
    retarget_vals(gm.graph, device)
    gm.recompile()
    gm.meta[INPUTS_META] = example_inputs
    gm.meta[RUN_DEVICE_META] = str(torch.device(device))
    report = gm.meta[CAPTURE_META]
    report["meta_device"] = {"retargeted_nodes": retargeted, "device": str(torch.device(device))}
    report["model_config"] = model_config(module)
    report["replicated_blocks"] = replicated
    report["wall_s"] = round(time.perf_counter() - start, 3)
    return gm


def capture_replicated(module: torch.nn.Module, example_inputs: tuple | dict, *, dynamic_shapes: Any = "auto",
                       adapter: Any = None) -> torch.fx.GraphModule | None:
    """`svdq_compiler.capture` of a module with real weights whose adapter declares repeated block lists longer
    than TRACED_REPEATS: a meta twin built from its config is captured with three blocks of each kind and
    replicated (`capture_on_meta`), then the module's own tensors are attached. The graph equals a full capture
    (tests/test_archive.py: the outputs are bit for bit those of a full capture); tracing 3 + 3 instead of 6 + 11
    blocks takes the 100M FLUX's capture from ~40 to ~15 CPU-s. None when there is nothing to replicate, or the
    module's parameters do not share one dtype and device (the twin could not stand for them)."""
    if not any(count > TRACED_REPEATS for count in _depths(module).values()):
        return None
    tensors = dict(module.state_dict())
    kinds = {(t.dtype, t.device) for t in tensors.values() if t.is_floating_point()}
    if len(kinds) != 1:
        return None
    (dtype, device), = kinds
    twin = _meta_twin(module, dtype)
    gm = capture_on_meta(twin, example_inputs, dynamic_shapes=dynamic_shapes, adapter=adapter, device=device)
    buffers = {name for name, _ in module.named_buffers()}
    for name, tensor in tensors.items():
        set_attr_value(gm, name, tensor, as_buffer=name in buffers)
    gm.meta[CAPTURE_META]["meta_device"]["weights"] = "the module's own tensors, attached after capture"
    return gm


def _meta_twin(module: torch.nn.Module, dtype: torch.dtype, **config_changes: Any) -> torch.nn.Module:
    """A model of `module`'s class built on the meta device from its config (with `config_changes`), in `dtype`."""
    config = {k: v for k, v in module.config.items() if not k.startswith("_")}
    config.update(config_changes)
    with torch.device("meta"):
        return cast_module(type(module).from_config(config).eval(), dtype)


def _repeated_blocks(module: torch.nn.Module) -> tuple[tuple[str, str], ...]:
    """The block lists the module's adapter declares repeated (`ModelAdapter.repeated_blocks`)."""
    from svdq_compiler.models import adapter_for

    return adapter_for(module).repeated_blocks


def _depths(module: torch.nn.Module) -> dict[str, int]:
    return {attribute: len(getattr(module, attribute)) for attribute, _ in _repeated_blocks(module)}


def _shallow(module: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, int]]:
    """(the module to trace, {block list: its full length}): a copy with TRACED_REPEATS blocks per repeated list,
    or the module itself when nothing is worth replicating."""
    lists = _repeated_blocks(module)
    depths = _depths(module)
    if not any(count > TRACED_REPEATS for count in depths.values()):
        return module, {}
    shallow = _meta_twin(module, next(module.parameters()).dtype,
                         **{key: min(depths[attribute], TRACED_REPEATS) for attribute, key in lists})
    return shallow, {attribute: count for attribute, count in depths.items() if count > TRACED_REPEATS}


def _check_state(gm: torch.fx.GraphModule, module: torch.nn.Module) -> None:
    """The replicated graph holds exactly the full model's parameters, with their shapes."""
    have = {name: tuple(t.shape) for name, t in list(gm.named_parameters()) + list(gm.named_buffers())}
    want = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    if have != want:
        differ = sorted(set(have.items()) ^ set(want.items()))
        raise CaptureError(f"the replicated graph's tensors differ from the model's: {differ[:6]}")


def _in_block(node: torch.fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(_in_block_path(fqn, path) for fqn, _ in stack.values())


def replicate_blocks(gm: torch.fx.GraphModule, attribute: str, count: int) -> int:
    """Grow the traced blocks `<attribute>.0`, `.1`, `.2` to `count` blocks.

    Block 1 is the template: a middle block (the last one lost the outputs nobody reads to dead-code
    elimination). Blocks 0 and 1 must be node-for-node alike; where block 1 reads a node of block 0 at position
    i, that is the state carried from block to block, except for symbolic sizes block 0 computed once for all
    (shared). Copies 2 … count−2 are inserted after block 1, each reading the previous one where block 1 reads
    block 0, its own `<attribute>.<i>.…` parameters (meta stand-ins), and whatever else block 1 reads
    (conditioning, RoPE tables) as it is; the traced last block becomes block count−1 and reads the last copy.
    Raises CaptureError when the traced blocks do not line up so."""
    graph = gm.graph
    blocks = [[n for n in graph.nodes if n.op == "call_function" and _in_block(n, f"{attribute}.{i}")]
              for i in range(TRACED_REPEATS)]
    first, middle, last = blocks
    hoisted = {n for n in first if not isinstance(n.meta.get("val"), torch.Tensor)
               and any(user in middle for user in n.users)}
    first = [n for n in first if n not in hoisted]
    index0, index1 = {n: i for i, n in enumerate(first)}, {n: i for i, n in enumerate(middle)}
    prefixes = [f"{attribute}.{i}." for i in range(TRACED_REPEATS)]
    if not first or len(first) != len(middle):
        raise CaptureError(f"{attribute}.0 and .1 traced to {len(first)} and {len(middle)} nodes")

    def alike(a: Any, b: Any) -> bool:
        """b (an argument of block 1) plays the role of a (the same argument of block 0)."""
        if not isinstance(a, torch.fx.Node):
            return not isinstance(b, torch.fx.Node) and type(a) is type(b) and a == b
        if a in index0:
            return b in index1 and index1[b] == index0[a]
        if a.op == "get_attr" and a.target.startswith(prefixes[0]):
            return b.op == "get_attr" and b.target == prefixes[1] + a.target[len(prefixes[0]):]
        return b is a or b in index0  # shared (conditioning, RoPE, sizes), or carried from the previous block

    for a, b in zip(first, middle):
        flat_a, spec_a = torch.utils._pytree.tree_flatten((a.args, a.kwargs))
        flat_b, spec_b = torch.utils._pytree.tree_flatten((b.args, b.kwargs))
        if a.target != b.target or spec_a != spec_b or not all(map(alike, flat_a, flat_b)):
            raise CaptureError(f"{attribute}.0 and .1 differ at {a.format_node()} / {b.format_node()}")
    readers = [(user, n) for n in middle for user in n.users if user not in index1]
    if any(user not in last for user, _ in readers):
        raise CaptureError(f"{attribute}.1 is read outside {attribute}.2")

    templates = {arg.target: arg for node in middle for arg in node.all_input_nodes
                 if arg.op == "get_attr" and arg.target.startswith(prefixes[1])}
    _move_block(gm, last, f"{attribute}.{TRACED_REPEATS - 1}", f"{attribute}.{count - 1}")  # frees its numbers
    previous = list(middle)
    with graph.inserting_before(middle[-1].next):
        for block in range(TRACED_REPEATS - 1, count - 1):
            own = {template: _attribute_copy(gm, template, f"{attribute}.{block}.{target[len(prefixes[1]):]}")
                   for target, template in templates.items()}
            copies: list[torch.fx.Node] = []

            def source(arg: torch.fx.Node) -> torch.fx.Node:
                if arg in index1:
                    return copies[index1[arg]]
                if arg in index0:
                    return previous[index0[arg]]
                return own.get(arg, arg)

            for node in middle:
                copies.append(graph.node_copy(node, source))
                _rename_stack(copies[-1], f"{attribute}.1", f"{attribute}.{block}")
            previous = copies
    for user, node in readers:
        user.replace_input_with(node, previous[index1[node]])
    graph.lint()
    return count


def _attribute_copy(gm: torch.fx.GraphModule, template: torch.fx.Node, target: str) -> torch.fx.Node:
    """A get_attr of a new meta stand-in at `target` shaped like the template's attribute."""
    value = get_attr_value(gm, template.target)
    set_attr_value(gm, target, torch.empty_like(value, device=META),
                   as_buffer=not isinstance(value, torch.nn.Parameter))
    node = gm.graph.get_attr(target)
    node.meta = dict(template.meta)
    return node


def _rename_stack(node: torch.fx.Node, old: str, new: str) -> None:
    stack = node.meta.get("nn_module_stack")
    if stack:
        node.meta["nn_module_stack"] = {key: (new + fqn[len(old):] if _in_block_path(fqn, old) else fqn, kind)
                                        for key, (fqn, kind) in stack.items()}


def _move_block(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], old: str, new: str) -> None:
    """Renumber a traced block: its parameters move from `old.…` to `new.…`, its nodes follow."""
    if old == new:
        return
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg.target.startswith(old + "."):
                target = new + arg.target[len(old):]
                value = get_attr_value(gm, arg.target)
                set_attr_value(gm, target, value, as_buffer=not isinstance(value, torch.nn.Parameter))
                owner, leaf = arg.target.rsplit(".", 1)
                delattr(gm.get_submodule(owner), leaf)
                arg.target = target
        _rename_stack(node, old, new)


def _in_block_path(fqn: str, path: str) -> bool:
    return fqn == path or fqn.startswith(path + ".")


def program_from_graph(gm: torch.fx.GraphModule) -> torch.export.ExportedProgram:
    """The ExportedProgram of a GraphModule made by capture (and passes), built without tracing it again.

    Every tensor attribute the graph reads becomes a parameter or buffer placeholder (in that order, before the
    user inputs, as torch.export lays them out), torch's guard call is left to the unlifting at load, and the
    nodes are copied with their fake values. The program's tensors are the GraphModule's (meta stand-ins are
    fine for a `StreamingArchive`); its example inputs are the capture's."""
    from torch.export.exported_program import ExportedProgram, ModuleCallEntry, ModuleCallSignature
    from torch.export.graph_signature import (ConstantArgument, ExportGraphSignature, InputKind, InputSpec,
                                              OutputKind, OutputSpec, SymIntArgument, TensorArgument)

    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    state: dict[str, torch.Tensor] = {}
    specs: list[InputSpec] = []
    readers = {}  # attribute target → one get_attr node reading it (for its fake value)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(node.target, node)
    for kind, prefix in ((InputKind.PARAMETER, "p_"), (InputKind.BUFFER, "b_")):
        for target, reader in readers.items():
            value = get_attr_value(gm, target)
            if not isinstance(value, torch.Tensor):
                raise CaptureError(f"the graph reads a non-tensor attribute {target!r}; only tensors can be lifted")
            if isinstance(value, torch.nn.Parameter) != (kind == InputKind.PARAMETER):
                continue
            placeholder = graph.placeholder(prefix + target.replace(".", "_"))
            placeholder.meta = dict(reader.meta)
            specs.append(InputSpec(kind, TensorArgument(placeholder.name), target,
                                   None if kind == InputKind.PARAMETER else True))
            state[target] = value
            env[reader] = placeholder
    by_target = {target: env[reader] for target, reader in readers.items()}
    outputs: list[OutputSpec] = []
    ranges = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            env[node] = by_target[node.target]
        elif node.op == "call_module":
            if node.target != "_guards_fn":
                raise CaptureError(f"the graph calls submodule {node.target!r}; only a flat graph can be lifted")
        elif node.op == "output":
            flat = node.args[0]
            graph.output(tuple(env[n] if isinstance(n, torch.fx.Node) else n for n in flat))
            outputs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(env[n].name) if isinstance(n, torch.fx.Node)
                                  else ConstantArgument("", n), None) for n in flat]
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
            if node.op == "placeholder":
                value = node.meta.get("val")
                argument = TensorArgument(node.name) if isinstance(value, torch.Tensor) else \
                    SymIntArgument(node.name) if isinstance(value, torch.SymInt) else ConstantArgument(node.name, value)
                specs.append(InputSpec(InputKind.USER_INPUT, argument, None))
                for size in value.shape if isinstance(value, torch.Tensor) else ():
                    if isinstance(size, torch.SymInt):
                        shape_env = size.node.shape_env
                        ranges.update({s: shape_env.var_to_range[s] for s in size.node.expr.free_symbols})
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    call_graph = [ModuleCallEntry("", ModuleCallSignature([], [], gm._in_spec, gm._out_spec, forward_arg_names=names))]
    program = ExportedProgram(torch.nn.Module(), graph, ExportGraphSignature(specs, outputs), state, ranges,
                              call_graph)
    program.example_inputs = split_inputs(gm.meta[INPUTS_META])
    return program
