"""A GraphModule whose forward is compiled in pieces, so that loading a graph does not hold its whole code's syntax
tree at once.

torch.fx compiles a graph's forward from one generated source, and CPython's parser holds every token of it while
it compiles: ~7 KiB a node, 8 MiB for the 1158-node tiny-flux graph, whose weights are 7.7 MiB. That transient,
not the weights, set the peak memory of loading a small graph. Here the graph stays one flat graph (`graph`,
`code` and the IR are unchanged); only its compiled form is split: each run of `PIECE_NODES` nodes becomes its own
function, compiled alone, that takes the values it reads from earlier pieces and returns those later pieces (or
the output) read. A driver binds the inputs as the generated forward does, calls the pieces in order and drops
each value after the last piece that reads it. A value a piece takes stays alive until that piece returns (the flat
forward may free it a few nodes sooner): at most the activations that cross one piece boundary.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import linecache
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
from torch.fx._pytree import tree_flatten_spec
from torch.fx.graph import _PyTreeCodeGen
from torch.fx.graph_module import _WrappedCall
from torch.utils import _pytree as pytree

PIECE_NODES = 32  # nodes compiled at once: ~0.25 MiB of parser memory; 26 pieces for tiny-flux


@dataclass(frozen=True)
class Piece:
    function: Callable[..., tuple]
    reads: tuple[str, ...]  # values it takes, in its parameters' order
    writes: tuple[str, ...]  # values it returns, in order
    last_reads: tuple[str, ...]  # values no later piece (nor the output) reads: dropped after this one


_serials = itertools.count()  # a piece's file name is unique, so that one graph's traceback never shows another's code


def _compile_piece(graph: torch.fx.Graph, index: int) -> Callable[..., tuple]:
    code = graph.python_code(root_module="self")
    filename = f"<svdq piece {index}>.{next(_serials)}"
    # Registered so that a traceback through a piece shows its line, as torch does for whole forwards: a lazy entry
    # holding the deflated source (~1/8 of it; only a traceback reads it), removed with the piece, so that loading
    # graphs again and again holds nothing of the ones gone.
    linecache.cache[filename] = (functools.partial(_inflate, zlib.compress(code.src.encode())),)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec", dont_inherit=True), namespace)  # noqa: S102 (our generated code)
    function = namespace["forward"]
    weakref.finalize(function, linecache.cache.pop, filename, None)
    return function


def _inflate(deflated: bytes) -> str:
    return zlib.decompress(deflated).decode()


def _computing(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The nodes that compute: not the inputs, attribute reads (each piece reads the attributes it uses itself)
    or the output."""
    return [node for node in graph.nodes if node.op not in ("placeholder", "get_attr", "output")]


def _pieces(graph: torch.fx.Graph) -> list[Piece]:
    computing = _computing(graph)
    runs = [computing[i:i + PIECE_NODES] for i in range(0, len(computing), PIECE_NODES)]
    output = graph.output_node()
    last_reader: dict[torch.fx.Node, int] = {}  # value → the last piece reading it (len(runs): the output)
    for index, run in enumerate(runs):
        for node in run:
            for read in node.all_input_nodes:
                if read.op != "get_attr":
                    last_reader[read] = index
    for read in output.all_input_nodes:
        last_reader[read] = len(runs)
    pieces = []
    for index, run in enumerate(runs):
        members = set(run)
        reads = list(dict.fromkeys(read for node in run for read in node.all_input_nodes
                                   if read not in members and read.op != "get_attr"))
        attributes = list(dict.fromkeys(read for node in run for read in node.all_input_nodes
                                        if read.op == "get_attr"))
        writes = [node for node in run if last_reader.get(node, index) > index]
        sub = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for read in reads:
            env[read] = sub.placeholder(read.name)
        for node in [*attributes, *run]:
            env[node] = sub.node_copy(node, env.__getitem__)
        sub.output(tuple(env[node] for node in writes))
        pieces.append(Piece(_compile_piece(sub, index), tuple(read.name for read in reads),
                            tuple(node.name for node in writes),
                            tuple(read.name for read in reads if last_reader[read] == index)))
    return pieces


def has_keywords(in_spec: pytree.TreeSpec) -> bool:
    """Whether a call convention is `(args, kwargs)` (torch's test, in _PyTreeCodeGen)."""
    return in_spec.type is tuple and in_spec.num_children == 2 and in_spec.child(0).type is tuple \
        and in_spec.child(1).type is dict


def argument_count(in_spec: pytree.TreeSpec) -> int:
    """How many arguments (positional, then keyword) a call convention takes."""
    if has_keywords(in_spec):
        return in_spec.child(0).num_children + in_spec.child(1).num_children
    return in_spec.num_children


def keywords(in_spec: pytree.TreeSpec) -> list[str]:
    """The keyword names of a call convention: the generated code passes its last arguments by these names."""
    return list(in_spec.child(1).context) if has_keywords(in_spec) else []


def _driver(graph: torch.fx.Graph, pieces: list[Piece]) -> Callable[..., Any]:
    """The forward: the generated forward's call convention (one parameter per input name, flattened through the
    input spec), then the pieces."""
    info = graph._codegen.pytree_info
    names, in_spec, out_spec = list(info.orig_args), info.in_spec, info.out_spec
    named, keyworded = keywords(in_spec), has_keywords(in_spec)
    positional = len(names) - len(named)
    input_names = [node.name for node in graph.nodes if node.op == "placeholder"]
    output = graph.output_node()
    signature = inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                   for name in ["self", *names]])

    def forward(self, *args, **kwargs):
        given = signature.bind(self, *args, **kwargs).arguments
        values = [given[name] for name in names]
        tree = (values[:positional], dict(zip(named, values[positional:]))) if keyworded else values
        live = dict(zip(input_names, tree_flatten_spec(tree, in_spec)))
        for piece in pieces:
            arguments = [live[name] for name in piece.reads]
            for name in piece.last_reads:
                del live[name]
            live.update(zip(piece.writes, piece.function(self, *arguments)))
            del arguments  # this piece's last reads go now, not once the next piece's arguments are gathered
        result = torch.fx.node.map_arg(output.args[0], lambda node: functools.reduce(
            getattr, node.target.split("."), self) if node.op == "get_attr" else live[node.name])
        if not isinstance(result, (list, tuple)):
            result = [result]
        return pytree.tree_unflatten(list(result), out_spec)

    forward.__signature__ = signature
    return forward


class PiecewiseGraphModule(torch.fx.GraphModule):
    """A GraphModule compiled in pieces (module doc). A graph without a call convention (no pytree input and
    output specs), or small enough for one piece, compiles as torch compiles it."""

    def recompile(self):
        graph = self._graph
        if not isinstance(graph._codegen, _PyTreeCodeGen) or graph._codegen.pytree_info is None \
                or len(_computing(graph)) <= PIECE_NODES:
            return super().recompile()
        self._in_spec = graph._codegen.pytree_info.in_spec
        self._out_spec = graph._codegen.pytree_info.out_spec
        python_code = graph.python_code(root_module="self")  # what `code` shows: generated, never compiled
        self._code = python_code.src
        self._lineno_map = python_code._lineno_map
        cls = type(self)
        cls.forward = _driver(graph, _pieces(graph))
        # the rest as GraphModule.recompile does it: calls go through _wrapped_call (its error messages)
        cls_call = cls.__call__ if "__call__" in vars(cls) else None
        if "_wrapped_call" not in vars(cls):
            cls._wrapped_call = _WrappedCall(cls, cls_call)

        def call_wrapped(self, *args, **kwargs):
            return self._wrapped_call(self, *args, **kwargs)

        cls.__call__ = call_wrapped
        return python_code
