"""PiecewiseGraphModule: a graph compiled in pieces computes what the flat GraphModule computes, shows the same code
and signature, and frees each value after the last piece that reads it; a loaded graph is compiled that way."""

from __future__ import annotations

import copy
import gc
import inspect
import linecache
import traceback
import weakref

import pytest
import torch
import torch.fx
from torch.utils import _pytree as pytree

import svdq_compiler
import svdq_compiler.piecewise as piecewise
from svdq_compiler.dropin import graph_module_of
from svdq_compiler.piecewise import PiecewiseGraphModule


class Before(torch.nn.Module):
    """Keyword inputs, an attribute read in several places, a value read far from where it is made, and an output
    that returns an input and an attribute as they are."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([1.5, -2.0, 0.25]))
        self.register_buffer("offset", torch.tensor([0.5, 0.0, -1.0]))

    def forward(self, x, y):
        early = x * self.scale
        h = early
        for step in range(7):
            h = torch.tanh(h + self.offset) * (step + 1)
        return {"out": h + early * y, "x": x, "offset": self.offset}


def flat_graph() -> torch.fx.GraphModule:
    inputs = {"x": torch.randn(2, 3), "y": torch.randn(2, 3)}
    program = torch.export.export(Before(), (), inputs, strict=False)
    return program.module(), inputs


def test_pieces_compute_the_flat_graph_and_show_its_code(monkeypatch):
    monkeypatch.setattr(piecewise, "PIECE_NODES", 3)
    compiled: list[int] = []
    original = piecewise._compile_piece
    monkeypatch.setattr(piecewise, "_compile_piece", lambda graph, index: compiled.append(sum(
        node.op not in ("placeholder", "get_attr", "output") for node in graph.nodes)) or original(graph, index))
    flat, inputs = flat_graph()
    pieces = PiecewiseGraphModule(flat, flat.graph)
    assert len(compiled) > 3 and max(compiled) <= 3
    assert pieces.code == flat.code
    assert inspect.signature(pieces.forward) == inspect.signature(flat.forward)
    expected, got = flat(**inputs), pieces(**inputs)
    assert pytree.tree_structure(got) == pytree.tree_structure(expected)
    for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(expected)):
        assert torch.equal(a, b)
    assert torch.equal(pieces(*inputs.values())["out"], expected["out"])  # positionally, in order
    with pytest.raises(TypeError, match="y"):
        pieces(x=inputs["x"])


def test_a_small_graph_compiles_as_torch_compiles_it(monkeypatch):
    flat, inputs = flat_graph()
    monkeypatch.setattr(piecewise, "_compile_piece", lambda *a: pytest.fail("a one-piece graph was split"))
    one = PiecewiseGraphModule(flat, flat.graph)
    assert torch.equal(one(**inputs)["out"], flat(**inputs)["out"])


def test_a_value_is_freed_after_the_last_piece_that_reads_it(monkeypatch):
    """Each value a piece returns is dropped by the last piece that reads it (kept for the output otherwise): by
    the time the last piece runs, every value of the first piece that neither it nor the output reads is gone."""
    monkeypatch.setattr(piecewise, "PIECE_NODES", 2)
    flat, inputs = flat_graph()
    pieces = piecewise._pieces(flat.graph)
    output_reads = {node.name for node in flat.graph.output_node().all_input_nodes}
    for piece in pieces:
        for name in piece.writes:
            readers = [i for i, later in enumerate(pieces) if name in later.reads]
            droppers = [i for i, later in enumerate(pieces) if name in later.last_reads]
            assert droppers == ([] if name in output_reads else [max(readers)])
    assert any(sum(name in later.reads for later in pieces) > 1 for piece in pieces for name in piece.writes)

    returned: dict[str, weakref.ref] = {}
    first, last = pieces[0], pieces[-1]
    dead_by_last: list[str] = []

    def watched_first(self, *arguments):
        outputs = first.function(self, *arguments)
        returned.update((name, weakref.ref(value)) for name, value in zip(first.writes, outputs))
        return outputs

    def watched_last(self, *arguments):
        gc.collect()
        dead_by_last.extend(name for name, ref in returned.items() if ref() is None)
        return last.function(self, *arguments)

    pieces[0] = piecewise.Piece(watched_first, first.reads, first.writes, first.last_reads)
    pieces[-1] = piecewise.Piece(watched_last, last.reads, last.writes, last.last_reads)
    piecewise._driver(flat.graph, pieces)(flat, **inputs)
    still_read = set(last.reads) | output_reads
    assert sorted(dead_by_last) == sorted(name for name in first.writes if name not in still_read)
    assert dead_by_last  # the test sees a value die early


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return x


def test_a_loaded_graph_is_compiled_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(piecewise, "PIECE_NODES", 8)
    inputs = {"x": torch.randn(2, 8, 32)}
    gm = svdq_compiler.compile(Stack().eval(), inputs)
    path = svdq_compiler.save(gm, tmp_path / "g.pt")
    compiled = []
    original = piecewise._compile_piece
    monkeypatch.setattr(piecewise, "_compile_piece", lambda graph, index: compiled.append(index) or
                        original(graph, index))
    loaded = graph_module_of(svdq_compiler.load(path))
    assert isinstance(loaded, PiecewiseGraphModule) and len(compiled) > 1
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), gm(**inputs))


def _fails_here(value):
    raise RuntimeError("a node failed")


def test_a_traceback_shows_the_line_of_its_own_graph_and_the_source_goes_with_it(monkeypatch):
    """Two graphs split alike: an error in a piece of the first shows the first's code, although the second was
    compiled later; once a graph is gone, linecache holds nothing of its pieces."""
    monkeypatch.setattr(piecewise, "PIECE_NODES", 3)
    flat, inputs = flat_graph()
    others = {name for name in linecache.cache if name.startswith("<svdq piece")}  # graphs of other tests
    broken = copy.deepcopy(flat.graph)
    tanh = [node for node in broken.nodes if node.target is torch.ops.aten.tanh.default]
    tanh[-1].target = _fails_here
    first = PiecewiseGraphModule(flat, broken)
    second = PiecewiseGraphModule(flat, flat.graph)
    with pytest.raises(RuntimeError, match="a node failed") as error:
        first(**inputs)
    shown = [linecache.getline(frame.f_code.co_filename, line) for frame, line in traceback.walk_tb(error.tb)
             if frame.f_code.co_filename.startswith("<svdq piece")]
    assert len(shown) == 1 and "_fails_here" in shown[0]
    names = {name for name in linecache.cache if name.startswith("<svdq piece")} - others
    assert len(names) >= 4 and all("def forward" in "".join(linecache.getlines(name)) for name in names)
    del first, second, error, broken, tanh, flat  # a graph refers to its module (owning_module)
    gc.collect()
    assert not names & set(linecache.cache)
