"""Block-wise calibration: the statistics of a model that is never whole in memory, gathered one block at a time.

The graph's nodes are cut into *segments*, maximal runs of nodes of one unit in execution order: the rest of
the model (embeddings before the blocks, the output head after them), then each repeated block
(`transformer_blocks.0`, …, `single_transformer_blocks.37`) — the units the streaming compile loads one by one
(`svdq_compiler.streaming`). `BlockRunner` holds each calibration input's *block inputs*: the values computed
so far that later segments still read (the hidden states, the conditioning, the RoPE tables). Asked for a
unit's statistics, it runs the segments up to the unit's last one on every input, recording the calibration
sites they pass (the calibrate pass's `Recorder`: same ranges, same reservoir), and keeps the new block inputs.

- Propagation (`config.calib_propagation`): "fp", the reference's choice, computes a block's outputs with its
  fp weights, before its passes run, so the quantization error of earlier blocks does not reach the
  statistics of later ones; "quantized" keeps the block's inputs, and once the block is compiled the
  propagate_block pass runs its compiled nodes on them (`propagate`) and keeps those outputs, so each block is
  calibrated on what the quantized model feeds it. The runner runs its own copy of the graph as captured: the
  passes rewrite each unit once it has run and rewire later units' reads to the nodes they add.
- Memory: only the weights of the unit being compiled (and the small rest of the model) are resident; block
  inputs stay in memory up to `memory_budget` bytes and spill to a temporary folder beyond it (removed on close).
- Determinism: reservoir keys depend on (seed, site, input index) only (`recording.reservoir_keys`), so
  the statistics equal those of the calibrate pass running the whole graph, and of any sharing of the inputs
  among processes (`svdq_compiler.distributed`).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx
import torch.utils._pytree as pytree

from svdq_compiler.calibration import Calibration
from svdq_compiler.config import QuantConfig
from svdq_compiler.errors import CalibrationError
from svdq_compiler.ir import annotated_linears, module_path
from svdq_compiler.recording import Recorder, calibration_sites, flatten_inputs
from svdq_compiler.svdquant import site_name

_BLOCK = re.compile(r"^([A-Za-z_][\w]*\.\d+)\.")
REST_UNIT = "(model)"
DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes of block inputs held in memory before they spill to disk


def unit_of(target: str) -> str:
    """The unit of an attribute: its repeated block (`transformer_blocks.7`), or the rest of the model."""
    match = _BLOCK.match(target)
    return match.group(1) if match else REST_UNIT


def node_unit(node: torch.fx.Node) -> str:
    """The unit a node computes in: its attribute's, or that of the module that produced it."""
    if node.op == "get_attr":
        return unit_of(node.target)
    return unit_of(module_path(node) + ".")


@dataclass
class Segment:
    unit: str
    nodes: list[torch.fx.Node]  # in execution order, with the attributes they read first
    live_after: frozenset[str]  # names of the values later segments read


def plan_segments(graph: torch.fx.Graph) -> list[Segment]:
    """The graph's computing nodes cut into maximal runs of one unit; each with the values that outlive it."""
    runs: list[tuple[str, list[torch.fx.Node]]] = []
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        unit = node_unit(node)
        if not runs or runs[-1][0] != unit:
            runs.append((unit, []))
        runs[-1][1].append(node)
    position = {node: index for index, (_, nodes) in enumerate(runs) for node in nodes}
    last_reader: dict[torch.fx.Node, int] = {}
    for node in graph.nodes:
        reader = position.get(node, len(runs))  # the output node reads after every segment
        for value in node.all_input_nodes:
            last_reader[value] = max(last_reader.get(value, -1), reader)
    segments = []
    for index, (unit, nodes) in enumerate(runs):
        attributes = list(dict.fromkeys(value for node in nodes for value in node.all_input_nodes
                                        if value.op == "get_attr"))
        live = frozenset(value.name for value, last in last_reader.items()
                         if last > index and value.op != "get_attr" and position.get(value, -1) <= index)
        segments.append(Segment(unit, attributes + nodes, live))
    seen: set[str] = set()
    for previous, segment in zip([None] + segments, segments):
        if segment.unit != REST_UNIT and segment.unit in seen and previous.unit != segment.unit:
            raise CalibrationError(f"unit {segment.unit} computes in two places of the graph, apart",
                                   fix="calibrate this model in memory (without --stream)")
        seen.add(segment.unit)
    return segments


def _value_bytes(values: dict[str, Any]) -> int:
    return sum(leaf.numel() * leaf.element_size() for leaf in pytree.tree_leaves(values)
               if isinstance(leaf, torch.Tensor))


class BlockInputs:
    """Each calibration input's live values between segments: in memory up to a budget, then on disk."""

    def __init__(self, memory_budget: int):
        self.memory_budget = memory_budget
        self.in_memory: dict[int, dict[str, Any]] = {}
        self.memory_bytes = 0
        self.folder: Path | None = None
        self.spilled: set[int] = set()
        self.spilled_bytes = 0  # written to disk over the whole run
        self.peak_memory_bytes = 0

    def put(self, index: int, values: dict[str, Any]) -> None:
        size = _value_bytes(values)
        if self.memory_bytes + size <= self.memory_budget:
            self.in_memory[index] = values
            self.memory_bytes += size
            self.peak_memory_bytes = max(self.peak_memory_bytes, self.memory_bytes)
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="svdq-block-inputs-"))
        torch.save(values, self.folder / f"{index}.pt")
        self.spilled.add(index)
        self.spilled_bytes += size

    def take(self, index: int) -> dict[str, Any]:
        if index in self.in_memory:
            values = self.in_memory.pop(index)
            self.memory_bytes -= _value_bytes(values)
            return values
        self.spilled.remove(index)
        path = self.folder / f"{index}.pt"
        values = torch.load(path, weights_only=True)
        path.unlink()
        return values

    def close(self) -> None:
        self.in_memory.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class BlockRunner:
    """Runs calibration inputs through the graph one unit at a time and hands out each unit's statistics
    (module doc). `samples` are the global indices of the inputs this process runs (all of them, or its share
    under torch.distributed); `inputs` yields every calibration input in order."""

    def __init__(self, gm: torch.fx.GraphModule, config: QuantConfig, inputs: Iterable, *,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, source: str = ""):
        from svdq_compiler.distributed import share, total

        self.gm, self.config = gm, config
        # its own copy of the graph as captured (module doc), reading the module's attributes
        copies: dict[torch.fx.Node, torch.fx.Node] = {}
        self.graph = torch.fx.Graph()
        self.graph.output(self.graph.graph_copy(gm.graph, copies))
        self.segments = plan_segments(self.graph)
        self.cursor = 0  # the next segment to run
        self.sites, recorded = calibration_sites(gm)
        self.site_unit = {site_name(node, info): unit_of(info.weight) for node, info in annotated_linears(gm)
                          if site_name(node, info) in self.sites}
        self.recorder = Recorder(gm, {copies[node]: entries for node, entries in recorded.items()},
                                 config.calib_rows, config.calib_seed, graph=self.graph)
        self.store = BlockInputs(memory_budget)
        self.placeholders = [copies[node] for node in gm.graph.nodes if node.op == "placeholder"]
        self.samples: list[int] = []
        self.inputs = 0
        self.source = source
        for index, sample in share(enumerate(inputs)):
            flat = flatten_inputs(gm, sample, index)
            self.store.put(index, {node.name: value for node, value in zip(self.placeholders, flat)})
            self.samples.append(index)
        self.inputs = total(len(self.samples))
        if self.inputs == 0:
            raise CalibrationError("no calibration inputs were given", fix="pass at least one calibration input")
        self.by_name = {node.name: node for node in self.graph.nodes}
        # quantized propagation: the segment awaiting its compiled run, with the nodes that are not its own
        self.pending: tuple[Segment, set[torch.fx.Node]] | None = None
        self.alias: dict[str, str] = {}  # compiled node name → the name of the copy's node it stands for

    def last_segment(self, unit: str) -> int:
        return max((i for i, segment in enumerate(self.segments) if segment.unit == unit), default=-1)

    @torch.no_grad()
    def run_through(self, last: int, unit: str | None = None) -> None:
        """Run segments cursor..last on every input, recording the sites they pass. Under quantized propagation
        the segment of `unit` keeps its inputs: `propagate` runs it again once compiled."""
        if self.pending is not None:
            raise CalibrationError(f"unit {self.pending[0].unit} was calibrated but its compiled outputs were "
                                   f"never propagated", fix="run the propagate_block pass after each unit's passes")
        while self.cursor <= last:
            segment = self.segments[self.cursor]
            deferred = self.config.calib_propagation == "quantized" and segment.unit == unit != REST_UNIT
            for index in self.samples:
                values = self.store.take(index)
                self.recorder.input_index = index
                self.recorder.env = {self.by_name[name]: value for name, value in values.items()}
                env = self.recorder.env
                for node in segment.nodes:
                    env[node] = self.recorder.run_node(node)
                    for dead in self.recorder.user_to_last_uses.get(node, ()):
                        env.pop(dead, None)  # read for the last time: memory holds one block's live values
                self.store.put(index, values if deferred else {node.name: value for node, value in env.items()
                                                               if node.name in segment.live_after})
                self.recorder.env = {}
            if deferred:
                names = {node.name for node in segment.nodes}
                self.pending = (segment, {node for node in self.gm.graph.nodes if node.name not in names})
            self.cursor += 1

    @torch.no_grad()
    def propagate(self) -> int:
        """Quantized propagation: run the compiled nodes of the unit calibrated last on its kept inputs and keep
        their outputs as the next segments' inputs. Returns the number of nodes run (0: nothing pending).

        The compiled nodes are those the graph has now and had not before the unit's passes, less the nodes of
        every other unit. Values are kept under the names of the runner's graph copy: later segments read the
        compiled outputs through the same argument positions as the copy's nodes read the fp ones."""
        if self.pending is None:
            return 0
        segment, others = self.pending
        self.pending = None
        compiled = [node for node in self.gm.graph.nodes if node not in others and node.op not in ("placeholder",
                                                                                                  "output")]
        members = set(compiled)
        later = [node for later_segment in self.segments[self.cursor:] for node in later_segment.nodes]
        current = {node.name: node for node in self.gm.graph.nodes}
        outputs: dict[str, str] = {}  # copy's name of each value later segments read → the compiled node's name
        for original in later:
            now = current.get(original.name)
            if now is None or now.op == "get_attr":
                continue
            for fp_value, value in zip(original.all_input_nodes, now.all_input_nodes):
                if value in members:
                    outputs[fp_value.name] = value.name
                    self.alias[value.name] = fp_value.name
        executor = torch.fx.Interpreter(self.gm)
        for index in self.samples:
            values = self.store.take(index)
            env: dict[torch.fx.Node, Any] = {}
            for node in compiled:
                for value in node.all_input_nodes:
                    if value in members or value in env:
                        continue
                    env[value] = executor.fetch_attr(value.target) if value.op == "get_attr" else \
                        values[self.alias.get(value.name, value.name)]
            executor.env = env
            for node in compiled:
                env[node] = executor.run_node(node)
            by_name = {node.name: value for node, value in env.items()}
            kept = {}
            for name in segment.live_after:
                if name not in values and outputs.get(name) not in by_name:
                    raise CalibrationError(f"the compiled unit {segment.unit} has no value for {name!r}, which "
                                           f"later blocks read", fix="use calib_propagation='fp'")
                kept[name] = values[name] if name in values else by_name[outputs[name]]
            executor.env = {}
            self.store.put(index, kept)
        return len(compiled)

    def calibration(self, unit: str) -> Calibration:
        """The statistics of the sites `unit`'s linears read, complete: the segments up to the unit's last one
        (to the end of the graph for the rest of the model, whose output head comes after the blocks) have run,
        and, under torch.distributed, the statistics of every process are merged."""
        from svdq_compiler.distributed import merge_sites

        last = len(self.segments) - 1 if unit == REST_UNIT else self.last_segment(unit)
        self.run_through(last, unit)
        sites = {name: stats for name, stats in self.sites.items() if self.site_unit[name] == unit}
        merge_sites(sites, self.config.calib_rows)
        for name in sites:
            del self.sites[name]  # handed over: the unit's passes own them now
        return Calibration(sites=sites, source=self.source, inputs=self.inputs)

    def close(self) -> None:
        self.store.close()


def spill_summary(runner: BlockRunner) -> dict[str, Any]:
    store = runner.store
    return {"inputs": runner.inputs, "segments": len(runner.segments), "memory_budget_bytes": store.memory_budget,
            "peak_memory_bytes": store.peak_memory_bytes, "spilled_bytes": store.spilled_bytes}

