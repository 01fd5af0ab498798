"""Recording calibration statistics from activations: the table of sites a graph's quantized layers read, the
checked flat inputs of one calibration sample, the interpreter that records the sites it passes (the calibrate
pass runs it on the whole graph, `blockwise.BlockRunner` segment by segment), and the reservoir whose keys
depend on (seed, site, input) only, so every way of gathering the rows agrees (`distributed`)."""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from svdq_compiler.calibration import SiteStats
from svdq_compiler.errors import CalibrationError
from svdq_compiler.fx_utils import tensor_val
from svdq_compiler.ir import annotated_linears, module_path, split_inputs
from svdq_compiler.svdquant import conv_geometry, site_name


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return repr(value)


def flatten_inputs(gm: torch.fx.GraphModule, inputs: Any, index: int) -> list[Any]:
    """The graph's flat inputs for one calibration input, checked against the captured signature."""
    where = f"calibration input #{index}"
    in_spec = getattr(gm, "_in_spec", None)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        args, kwargs = split_inputs(inputs)
    except Exception as exc:
        raise CalibrationError(str(exc), where=where, fix="give each calibration input like the example inputs")
    if in_spec is None:
        flat = list(args) + list(kwargs.values())
    else:
        # torch >= 2.10 has children(); older releases only the children_specs attribute
        args_spec, kwargs_spec = in_spec.children() if hasattr(in_spec, "children") else in_spec.children_specs
        expected_keys = list(kwargs_spec.context or [])
        if len(args) != args_spec.num_children or set(kwargs) != set(expected_keys):
            raise CalibrationError(
                f"{len(args)} positional argument(s) and keywords {sorted(kwargs)} do not match the captured "
                f"signature: {args_spec.num_children} positional and keywords {sorted(expected_keys)}",
                where=where, fix="build calibration inputs the way the example inputs were built")
        try:
            flat, spec = pytree.tree_flatten((tuple(args), {k: kwargs[k] for k in expected_keys}))
        except Exception as exc:
            raise CalibrationError(f"cannot flatten the inputs: {exc}", where=where) from exc
        if spec != in_spec:
            raise CalibrationError("the nesting of the inputs differs from the captured signature", where=where,
                                   fix="build calibration inputs the way the example inputs were built")
    if len(flat) != len(placeholders):
        raise CalibrationError(f"{len(flat)} input values for {len(placeholders)} graph inputs", where=where)
    for value, placeholder in zip(flat, placeholders):
        expected = placeholder.meta.get("val")
        problem = None
        if isinstance(expected, torch.Tensor):
            if not isinstance(value, torch.Tensor):
                problem = "a tensor"
            elif value.dtype != expected.dtype or value.dim() != expected.dim():
                problem = f"a {str(expected.dtype).removeprefix('torch.')} tensor with {expected.dim()} dims"
            else:
                static = [(d, s) for d, s in enumerate(expected.shape) if isinstance(s, int)]
                if any(value.shape[d] != s for d, s in static):
                    problem = "sizes " + ", ".join(f"dim {d} = {s}" for d, s in static) + \
                              " (the other dims are dynamic)"
        elif expected is not None and value != expected:
            problem = repr(expected) + " (captured as a constant)"
        if problem:
            raise CalibrationError(f"input {placeholder.name!r} is {_describe(value)}, the captured graph expects "
                                   f"{problem}", where=where,
                                   fix="calibration inputs must match the example inputs' dtypes and static sizes")
    return flat


aten = torch.ops.aten
# The matrix products of a 16-bit graph. A CPU without native bf16/fp16 matrix instructions (AVX512-BF16, AMX)
# runs them several times slower than in float32 (a 768x3072x3072 linear on the 2-core EPYC here: 10 GFLOP/s in
# bf16, 77 in fp32), and they are nearly all of a block's calibration forward.
_MATRIX_OPS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
               aten.matmul.default, aten.scaled_dot_product_attention.default}


def _native_16bit_matmul(dtype: torch.dtype) -> bool:
    cpu = torch.cpu
    if dtype == torch.float16:
        return getattr(cpu, "_is_amx_fp16_supported", lambda: False)()
    return getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()


def matmul_in_float32(target: Any, args: tuple, kwargs: dict) -> Any:
    """`target(*args, **kwargs)` with its bf16/fp16 CPU tensors taken to float32 and the result rounded back
    once: what the 16-bit kernels compute (float32 accumulation, one rounding), up to the summation order, so a
    result can differ from theirs in the last bit of the 16-bit value. Other calls run as they are."""
    tensors = [value for value in pytree.tree_leaves((args, kwargs)) if isinstance(value, torch.Tensor)]
    dtype = next((t.dtype for t in tensors if t.dtype in (torch.bfloat16, torch.float16)), None)
    if target not in _MATRIX_OPS or dtype is None or any(t.device.type != "cpu" for t in tensors) \
            or _native_16bit_matmul(dtype):
        return target(*args, **kwargs)
    up = lambda v: v.float() if isinstance(v, torch.Tensor) and v.dtype == dtype else v  # noqa: E731
    result = target(*pytree.tree_map(up, args), **pytree.tree_map(up, kwargs))
    return pytree.tree_map(lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.dtype == torch.float32
                           else v, result)


class Recorder(torch.fx.Interpreter):
    """Runs the graph (or, stepped by `blockwise.BlockRunner`, one segment of it) and records the sites it passes."""

    def __init__(self, gm: torch.fx.GraphModule, sites: dict[torch.fx.Node, list[tuple[SiteStats, Any]]],
                 limit: int, seed: int, graph: torch.fx.Graph | None = None):
        super().__init__(gm, graph=graph)
        self.sites, self.limit, self.seed = sites, limit, seed
        self.input_index = 0
        self.extra_traceback = False  # our errors name the node themselves

    def run_node(self, node: torch.fx.Node) -> Any:
        try:
            result = super().run_node(node)
        except Exception as exc:
            text = str(exc).strip()
            first_line = text.splitlines()[0] if text else type(exc).__name__
            raise CalibrationError(f"the graph failed at node {node.name} (module {module_path(node)!r}): "
                                   f"{first_line}", where=f"calibration input #{self.input_index}",
                                   fix="check that the calibration inputs are valid for the model") from exc
        for stats, to_rows in self.sites.get(node, ()):
            self.record(node, stats, to_rows(result))
        if node.op == "output":
            for value in pytree.tree_leaves(result):
                if isinstance(value, torch.Tensor) and value.is_floating_point() and \
                        not torch.isfinite(value).all():
                    raise CalibrationError("the model output contains NaN or Inf",
                                           where=f"calibration input #{self.input_index}",
                                           fix="check the calibration inputs and the model in fp32")
        return result

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        # only the recorded statistics come out of a calibration forward: float32 products (`matmul_in_float32`)
        # change them by the 16-bit rounding of a value at most
        return matmul_in_float32(target, args, kwargs)

    def record(self, node: torch.fx.Node, stats: SiteStats, rows: torch.Tensor) -> None:
        minimum, maximum = rows.amin(0).float(), rows.amax(0).float()
        if not (torch.isfinite(minimum).all() and torch.isfinite(maximum).all()):
            kind = "NaN" if torch.isnan(minimum).any() or torch.isnan(maximum).any() else "Inf"
            producer = module_path(node) or "graph input"
            raise CalibrationError(
                f"{kind} in the activation entering layer {stats.readers[0]}"
                + (f" (and {len(stats.readers) - 1} more)" if len(stats.readers) > 1 else "")
                + f"; it is produced by node {node.name} in module {producer!r}",
                where=f"calibration input #{self.input_index}",
                fix="check that input, or run the model in fp32 (fp16 overflow is the usual cause)")
        stats.minimum = torch.minimum(stats.minimum, minimum)
        stats.maximum = torch.maximum(stats.maximum, maximum)
        stats.rows_seen += rows.shape[0]
        keys = reservoir_keys(self.seed, stats.readers, self.input_index, rows.shape[0]).to(stats.priorities.device)
        keep_largest_keys(stats, keys, rows, self.limit)


def reservoir_keys(seed: int, readers: list[str], input_index: int, count: int) -> torch.Tensor:
    """The reservoir priorities of the rows one input brings to one site, named by the linears reading it (node
    names depend on how the graph was captured). They depend on (seed, site, input) only, not on the order sites
    and inputs are visited in, so the sample is the same whether the graph runs whole, block by block, or with
    the inputs shared among processes (`svdq_compiler.distributed`)."""
    site = ",".join(sorted(readers))
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{site}/{input_index}".encode()))
    return torch.rand(count, generator=generator)


def keep_largest_keys(stats: SiteStats, keys: torch.Tensor, rows: torch.Tensor, limit: int) -> None:
    """Add rows with their keys to a site's reservoir: keeping the `limit` largest keys of all rows seen is a
    uniform sample. Rows are held in descending key order, so any two ways of gathering them agree row for row."""
    all_keys = torch.cat([stats.priorities, keys])
    all_rows = torch.cat([stats.rows, rows.to(stats.rows.dtype)])
    keep = all_keys.topk(min(limit, all_keys.numel())).indices
    stats.priorities, stats.rows = all_keys[keep], all_rows[keep].clone()


def every_quantized_input_has_a_site(gm: torch.fx.GraphModule, ctx) -> list[str]:
    """The contract of the passes that produce `calibration` (calibrate, calibrate_blocks)."""
    if ctx.calibration is None:
        return ["ctx.calibration is not set"]
    return [f"{info.name}: no calibration site {site_name(node, info)!r}" for node, info in annotated_linears(gm)
            if info.scheme is not None and info.scheme.kind != "fp"
            and site_name(node, info) not in ctx.calibration.sites]


def calibration_sites(gm: torch.fx.GraphModule
                      ) -> tuple[dict[str, SiteStats], dict[torch.fx.Node, list[tuple[SiteStats, Any]]]]:
    """One empty `SiteStats` per tensor a non-16-bit layer reads, and per tensor the sites that record it with
    the function turning the tensor into that site's rows."""
    sites: dict[str, SiteStats] = {}
    recorded: dict[torch.fx.Node, list[tuple[SiteStats, Any]]] = {}
    for node, info in annotated_linears(gm):
        if info.scheme is None or info.scheme.kind == "fp":
            continue
        x, name = node.args[0], site_name(node, info)
        if name not in sites:
            val = tensor_val(x)
            if info.kind == "conv":
                geometry = conv_geometry(gm, node, info)
                channels = geometry.columns
                to_rows = lambda v, g=geometry, fill=-info.shift: g.patches(v.detach(), fill)  # noqa: E731
            else:
                channels = val.shape[-1]
                to_rows = lambda v: v.detach().reshape(-1, v.shape[-1])  # noqa: E731
            sites[name] = SiteStats(node=name, readers=[],
                                    minimum=torch.full((channels,), float("inf"), device=val.device),
                                    maximum=torch.full((channels,), float("-inf"), device=val.device),
                                    rows=torch.empty(0, channels, dtype=val.dtype, device=val.device),
                                    priorities=torch.empty(0, device=val.device))
            recorded.setdefault(x, []).append((sites[name], to_rows))
        sites[name].readers.append(info.name)
    return sites, recorded
