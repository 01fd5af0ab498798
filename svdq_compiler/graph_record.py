"""The graph of a graph file as svdq-compiler reads it back: `extra/svdq_graph.json`, a compact record of the
GraphModule that `ExportedProgram.module()` returns (the graph with its weights as attributes and the model's
call convention).

The record lists the nodes in order, each as `[name, op, target, args, kwargs]`; the kind of every attribute
the graph reads (parameter, buffer, non-persistent buffer, constant); and the pytree specs and argument names
of the call convention. `load` rebuilds the GraphModule from it directly, so torch's program deserializer is
not involved: that is a private API whose format changes between torch releases, and the largest cost of a
load (it parses the program a second time into schema objects, builds a fake tensor with symbolic sizes for
every value and generates the module's code twice).

Nothing in the record is code. Targets resolve from a fixed set (`archive_check.check_target`: aten, prims and
svdq operators, Python operators and math functions on sizes, torch's sym_* functions), arguments are data
(numbers, strings, dtypes, devices, layouts, memory formats, slices, lists and tuples of them, references to
earlier nodes), and the kernel specs of fused ops are checked as in the program (`check_kernel_spec`).
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any, Callable

import torch
import torch.fx
import torch.utils._pytree as pytree

from svdq_compiler.archive_check import check_kernel_spec, check_target, refuse
from svdq_compiler.errors import CheckpointError

GRAPH_FILE = "svdq_graph.json"
RECORD_VERSION = 1
GUARDS_MODULE = "_guards_fn"  # torch's generated size guards: the loaded graph checks its inputs itself
ATTRIBUTE_KINDS = ("parameter", "buffer", "non_persistent_buffer", "constant")
_OPS = ("placeholder", "get_attr", "call_function", "output")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ATTRIBUTE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_MEMORY_FORMATS = ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")


# ---- writing ----------------------------------------------------------------------------------------------

def graph_record(program: torch.export.ExportedProgram) -> dict[str, Any]:
    """The record of `program.module()` (its tensors may be on the meta device: only the graph is read)."""
    gm = program.module()
    kinds: dict[str, str] = {}
    for name, _ in gm.named_parameters(remove_duplicate=False):
        kinds[name] = "parameter"
    for name, _ in gm.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        transient = leaf in gm.get_submodule(owner)._non_persistent_buffers_set
        kinds[name] = "non_persistent_buffer" if transient else "buffer"
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == GUARDS_MODULE:
            continue
        if node.op not in _OPS:
            raise CheckpointError(f"the graph has a {node.op} node ({node.name}); a graph file holds operator calls "
                                  f"only", fix="report this: the compiled graph should be flat")
        if node.op == "get_attr":
            kinds.setdefault(node.target, "constant")
        target = torch.fx.node._get_qualified_name(node.target) if node.op == "call_function" else node.target
        nodes.append([node.name, node.op, target, _encode(node.args), _encode(dict(node.kwargs))])
    info = gm.graph._codegen.pytree_info
    return {"version": RECORD_VERSION, "arg_names": list(info.orig_args),
            "in_spec": pytree.treespec_dumps(info.in_spec), "out_spec": pytree.treespec_dumps(info.out_spec),
            "attributes": dict(sorted(kinds.items())), "nodes": nodes}


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(item) for item in value]}
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {"dict": {key: _encode(item) for key, item in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    raise CheckpointError(f"a graph argument of type {type(value).__name__} ({str(value)[:60]}) cannot be saved",
                          fix="report this: compiled graphs hold tensors, numbers and names only")


# ---- reading ----------------------------------------------------------------------------------------------

def rebuild(record: Any, tensors: dict[str, torch.Tensor], where: str, device: torch.device) -> torch.fx.GraphModule:
    """The GraphModule a record describes, its attributes taken from `tensors` (fqn → tensor, as loaded). The
    graph's device arguments name `device`, where its weights are (a graph file holds a one-device graph; what
    the graph creates, and its own dtype/device assertions, must match the weights wherever they are loaded)."""
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        raise refuse(f"{GRAPH_FILE} is not a version-{RECORD_VERSION} graph record", where)
    try:
        names, in_spec = record["arg_names"], pytree.treespec_loads(record["in_spec"])
        out_spec, kinds, nodes = pytree.treespec_loads(record["out_spec"]), record["attributes"], record["nodes"]
    except (KeyError, TypeError, ValueError, NotImplementedError) as exc:
        raise refuse(f"{GRAPH_FILE} lacks its call convention ({type(exc).__name__}: {exc})", where) from None
    if not (isinstance(names, list) and all(isinstance(n, str) and _NAME.fullmatch(n) for n in names)
            and isinstance(kinds, dict) and isinstance(nodes, list)):
        raise refuse(f"{GRAPH_FILE} is damaged", where)
    root = torch.nn.Module()
    for fqn, kind in kinds.items():
        if not isinstance(fqn, str) or not _ATTRIBUTE.fullmatch(fqn) or kind not in ATTRIBUTE_KINDS:
            raise refuse(f"{GRAPH_FILE} names an attribute {str(fqn)[:80]!r} of kind {str(kind)[:20]!r}", where)
        if fqn not in tensors:
            raise refuse(f"the graph reads {fqn!r}, which the file holds no tensor for", where)
        try:
            _attach(root, fqn, tensors[fqn], kind)
        except (KeyError, TypeError, AttributeError) as exc:
            raise refuse(f"{GRAPH_FILE}: attribute {fqn!r} cannot be set ({str(exc)[:80]})", where) from None
    graph = torch.fx.Graph()
    graph._codegen = torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(names, in_spec, out_spec))
    built: dict[str, torch.fx.Node] = {}
    for item in nodes:
        if not (isinstance(item, list) and len(item) == 5 and isinstance(item[0], str) and _NAME.fullmatch(item[0])
                and item[1] in _OPS and isinstance(item[2], (str, type(None)))) or item[0] in built:
            raise refuse(f"{GRAPH_FILE} has a damaged node {str(item)[:80]}", where)
        name, op, target, args, kwargs = item
        decode = _decoder(built, device, where)
        args, kwargs = decode(args), decode(kwargs)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise refuse(f"{GRAPH_FILE}: node {name} has no argument list", where)
        if op == "call_function":
            target = _resolve(target, where)
            _check_spec(target, args, kwargs, where)
        elif op == "get_attr" and target not in kinds:
            raise refuse(f"{GRAPH_FILE}: node {name} reads {str(target)[:80]!r}, which is not an attribute", where)
        elif op == "placeholder" and target not in names:
            raise refuse(f"{GRAPH_FILE}: input {str(target)[:80]!r} is not an argument", where)
        built[name] = graph.create_node(op, target, args, kwargs, name=name)
        if built[name].name != name:
            raise refuse(f"{GRAPH_FILE}: node name {name!r} is taken", where)
    if not built or next(reversed(built.values())).op != "output":
        raise refuse(f"{GRAPH_FILE} has no output", where)
    try:
        return torch.fx.GraphModule(root, graph)
    except Exception as exc:  # the record is consistent node by node, yet torch cannot generate its code
        raise refuse(f"{GRAPH_FILE} does not form a graph ({type(exc).__name__}: {str(exc)[:120]})", where) \
            from None


def _attach(root: torch.nn.Module, fqn: str, tensor: torch.Tensor, kind: str) -> None:
    *path, leaf = fqn.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
        if not isinstance(owner, torch.nn.Module):
            raise TypeError(f"{part!r} is not a module")
    if kind == "parameter":
        owner.register_parameter(leaf, tensor if isinstance(tensor, torch.nn.Parameter)
                                 else torch.nn.Parameter(tensor, requires_grad=False))
    elif kind == "constant":
        setattr(owner, leaf, tensor.detach() if isinstance(tensor, torch.nn.Parameter) else tensor)
    else:
        owner.register_buffer(leaf, tensor.detach(), persistent=kind == "buffer")


def _decoder(built: dict[str, torch.fx.Node], device: torch.device | None, where: str) -> Callable[[Any], Any]:
    def decode(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if not isinstance(value, dict) or len(value) != 1:
            raise refuse(f"{GRAPH_FILE} holds an argument that is not data: {str(value)[:80]}", where)
        (kind, data), = value.items()
        if kind == "node" and data in built:
            return built[data]
        if kind in ("list", "tuple") and isinstance(data, list):
            items = [decode(item) for item in data]
            return items if kind == "list" else tuple(items)
        if kind == "dict" and isinstance(data, dict):
            return {key: decode(item) for key, item in data.items()}
        if kind == "float" and data in ("inf", "-inf", "nan"):
            return float(data)
        if kind == "dtype" and isinstance(getattr(torch, str(data), None), torch.dtype):
            return getattr(torch, data)
        if kind == "layout" and isinstance(getattr(torch, str(data), None), torch.layout):
            return getattr(torch, data)
        if kind == "memory_format" and data in _MEMORY_FORMATS:
            return getattr(torch, data)
        if kind == "slice" and isinstance(data, list) and len(data) == 3:
            return slice(*(decode(item) for item in data))
        if kind == "device" and isinstance(data, str) and re.fullmatch(r"(cpu|cuda|meta)(:\d{1,2})?", data):
            return torch.device(data) if data == "meta" else device
        raise refuse(f"{GRAPH_FILE} holds an argument that is not data: {str(value)[:80]}", where)

    return decode


_PYTHON_FUNCTIONS = {"_operator": operator, "math": math}


def _resolve(target: Any, where: str) -> Callable:
    """The callable a target names, after `check_target` allowed the name (never a general attribute walk)."""
    if not isinstance(target, str):
        raise refuse(f"{GRAPH_FILE}: a call has no target", where)
    check_target(target, where)
    parts = target.split(".")
    if parts[:2] == ["torch", "ops"]:
        try:
            resolved = getattr(getattr(getattr(torch.ops, parts[2]), parts[3]), parts[4])
        except (AttributeError, RuntimeError):
            resolved = None
        if not isinstance(resolved, torch._ops.OpOverload):
            raise refuse(f"the graph calls {target!r}, which this torch does not have", where)
        return resolved
    if parts[0] in _PYTHON_FUNCTIONS:
        return getattr(_PYTHON_FUNCTIONS[parts[0]], parts[1])
    resolved = getattr(torch, parts[1], None)  # torch.sym_* and torch._check, as check_target allowed
    if not callable(resolved):
        raise refuse(f"the graph calls {target!r}, which this torch does not have", where)
    return resolved


def _check_spec(target: Callable, args: tuple, kwargs: dict, where: str) -> None:
    """The kernel spec of a fused op, from which code is generated, must be plain words and numbers."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "svdq" or \
            not target._opname.startswith("fused_"):
        return
    names = [argument.name for argument in target._schema.arguments]
    if "spec" in kwargs:
        check_kernel_spec(kwargs["spec"], where)
    elif "spec" in names and names.index("spec") < len(args):
        check_kernel_spec(args[names.index("spec")], where)
    else:
        raise refuse(f"a call of {target} has no kernel spec", where)
