"""ONNX export of a compiled graph: `export_onnx(gm, path, example_inputs=None, form="portable"|"custom")`.

Both forms go through `torch.onnx.export(dynamo=True)` on a re-export of the graph with the capture's dynamic
dimensions, so the token (and batch) axes stay symbolic in the ONNX model, and every ATen op is translated by
torch's own ONNX library. What differs is how the `torch.ops.svdq.*` calls become ONNX.

**portable** (opset 21, runs in any ONNX runtime; checked against our reference in onnxruntime on CPU):
1. the fused ops are decomposed into the lowered form they were fused from (`codegen.fused_ops`' reference
   compositions: `svdq.quantize_act`, `svdq.gemm`, the low-rank branch, bias and epilogue in ATen ops);
2. each `quantize_act` becomes its arithmetic in standard ops: (x + shift)/λ, per token and group of G channels
   absmax → scale = absmax/qmax (rounded to the model dtype; a zero scale becomes 1) → Round (half to even, as
   ours) → Clip → × scale, i.e. the values the codes and scales stand for. int4 clips to [−7, 7], the shifted
   post-GELU uint4 to [0, 15] (uint8: [0, 255]), int8 (per token) to [−127, 127];
3. each `gemm` becomes `MatMul(activation values, DequantizeLinear(W))` in float32, then a Cast to the model
   dtype, as our GEMM accumulates in float32. An int4 weight is an INT4 initializer [K_pad, N] (our codes
   unpacked and transposed) with its group scales [K_pad/G, N], `DequantizeLinear(axis=0, block_size=G)`: the
   pattern ONNX Runtime fuses into `MatMulNBits` (4 bits per weight stay 4 bits in memory). An int8 weight is an
   INT8 initializer with per-output-channel scales (`axis=1`);
4. `weight_only_linear` (W4A16) is the same dequantized MatMul on the unquantized input; nf4 (a codebook, which
   DequantizeLinear cannot express) is a Gather of the code values times the group scales.
nvfp4 has no portable form: ONNX's FLOAT4E2M1 and FLOAT8E4M3 types need opset 23 and no CPU runtime executes them
in DequantizeLinear; its activation rounding (E2M1 grid, E4M3 scales) has no standard-op equivalent that keeps
our tie rules. `form="custom"` exports it.

Note that ONNX Runtime's `MatMulNBits` computes with int8-quantized activations by default
(`accuracy_level` 4); the session option `session.qdq_matmulnbits_accuracy_level=1` keeps them float32, which
is how the tests compare against our reference.

**custom** (domain `svdq`, version 1, for runtimes that implement the fused kernels): each svdq op becomes one
node of the same name in CamelCase (`svdq.FusedQuantizeLoraDown`, `svdq.FusedGemm`,
`svdq.FusedWeightOnlyLinear`, `svdq.QuantizeAct`, `svdq.Gemm`, `svdq.WeightOnlyLinear`); packed weights stay in our layout (codegen/layout.py) as uint8/int8
initializers, the op's other arguments are attributes of the same names (the kernel spec string as `spec`, a
dtype as its name), absent optional inputs are empty names. Inputs keep the torch op's order, except that a
tensor list goes last: `FusedGemm` takes (a_codes, a_scales, w_codes, w_scales, w_tscale?, down?, lora_up?,
bias?, next_smooth?, next_lora_down?, a_tscale?, next_act_scale?, epilogue operands…). nvfp4 activations are
two-level: their fp32 per-tensor scale is an input (`act_scale` of `FusedQuantizeLoraDown`, `QuantizeAct` and
`Conv2d`; `a_tscale` of `FusedGemm` and `Gemm`, which multiply the accumulator by w_tscale·a_tscale;
`next_act_scale` for FusedGemm's quantize-for-next-layer), a float32 initializer of one value. Outputs are the torch op's (for `FusedGemm`: y unless
the spec's quantize-next drops it, then the next layer's codes, scales and down projection). torch.onnx writes
them through `torch.onnx.ops.symbolic_multi_out`.

The file is written to a temporary name and renamed; a model over protobuf's 2 GiB limit is written with its
tensors in `<name>.data` beside it (both files are renamed into place, the model last).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F

from svdq_compiler import quant
from svdq_compiler.capture import INPUTS_META, capture_report, decompose, dynamic_shapes_of, export_program
from svdq_compiler.codegen import fused_ops
from svdq_compiler.config import ONNX_FORMS
from svdq_compiler.codegen.layout import PackedWeight, effective_group, unpack_weight
from svdq_compiler.errors import CheckpointError, InputError, SvdqError, first_line
from svdq_compiler.files import ensure_dir
from svdq_compiler.ir import split_inputs
from svdq_compiler.ops import smoothed_input

FORMS = ONNX_FORMS
OPSET = 21  # the first with blocked DequantizeLinear and INT4
CUSTOM_DOMAIN = "svdq"
_PROTOBUF_LIMIT = 2 ** 31 - 2 ** 20  # protobuf's 2 GiB, less room for the graph itself


def form_problem(config, form: str) -> str | None:
    """Why a graph compiled with `config` (a QuantConfig) cannot be exported in `form`, or None: known before
    compiling, so that `svdq-compile --onnx` refuses at once instead of after the compile."""
    if form == "portable":
        formats = {config.weight_format, config.act_format, config.weight_only_format}
        if "nvfp4" in formats:
            return "nvfp4 has no portable ONNX form (FLOAT4E2M1 needs opset 23, which no CPU runtime executes)"
    return None


def require_onnx_packages(where: str) -> None:
    """torch.onnx's exporter needs onnx and onnxscript, which are an optional extra: say so before any work."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f"exporting ONNX needs the package{'s' if len(missing) > 1 else ''} "
                         f"{' and '.join(missing)}, which {'are' if len(missing) > 1 else 'is'} not installed",
                         where=where, fix="pip install 'svdq-compiler[onnx]'")


def export_onnx(gm: torch.nn.Module, path: str | Path, example_inputs: tuple | dict | None = None,
                form: str = "portable") -> Path:
    """Write the compiled graph `gm` (from compile or load) to `path` as an ONNX model; returns the path.

    `example_inputs` (a tuple of positional args or a dict of kwargs) default to the ones it was captured with;
    dimensions the capture made dynamic stay symbolic. See the module docstring for the two forms."""
    from svdq_compiler.dropin import graph_module_of

    if form not in FORMS:
        raise InputError(f"unknown ONNX form {form!r}", where="export_onnx(form=...)", fix=f"use one of {FORMS}")
    require_onnx_packages("export_onnx")
    gm = graph_module_of(gm)
    capture_report(gm)
    inputs = example_inputs if example_inputs is not None else gm.meta.get(INPUTS_META)
    if inputs is None:
        raise InputError("the graph has no example inputs to export it with", where="export_onnx",
                         fix="pass example_inputs, or export a graph made by svdq_compiler.compile or load")
    path = Path(path)
    ensure_dir(path.parent, "folder of the ONNX model")
    if path.is_dir():
        raise InputError("the ONNX model path is a folder", where=str(path), fix="give a file name such as model.onnx")
    args, kwargs = split_inputs(inputs)
    dynamic_shapes = dynamic_shapes_of(gm, list(args) or kwargs)
    with torch.no_grad():
        program = _export(gm, args, kwargs, dynamic_shapes, "the compiled graph")
        module = _portable_module(program) if form == "portable" else _custom_module(program)
        program = _export(module, args, kwargs, dynamic_shapes, f"the {form} form")
        model = _to_onnx(program, form)
    _write(model, path)
    return path


# ---- export steps -----------------------------------------------------------------------------------------

def _export(module: torch.nn.Module, args, kwargs, dynamic_shapes, what: str) -> torch.export.ExportedProgram:
    try:
        return export_program(module, args, kwargs, dynamic_shapes)
    except SvdqError:  # a graph with no ONNX form for one of its layers says which
        raise
    except Exception as exc:  # an un-exportable graph here is a bug of ours; say which step failed
        raise CheckpointError(f"{what} could not be exported for ONNX: {first_line(exc)}", where="export_onnx",
                              fix="check that the graph runs on these example inputs (svdq_compiler.load + call)") \
            from exc


def _not_a_torchvision_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("torchvision is not installed")


def _to_onnx(program: torch.export.ExportedProgram, form: str):
    import onnx

    table = _portable_translations() if form == "portable" else {}
    # Without torchvision, torch.onnx logs a warning for each torchvision op it skips; svdq graphs use none.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration_log.addFilter(_not_a_torchvision_notice)
    try:
        exported = torch.onnx.export(program, dynamo=True, opset_version=OPSET, custom_translation_table=table,
                                     optimize=False, verbose=False)
    except Exception as exc:
        raise CheckpointError(f"torch.onnx could not translate the {form} graph: {first_line(exc)}",
                              where="export_onnx", fix="report it with the graph file (svdq-inspect --ir shows it)") \
            from exc
    finally:
        registration_log.removeFilter(_not_a_torchvision_notice)
    model = exported.model_proto
    if form == "portable":
        _fold_int4_casts(model)
    if model.ByteSize() <= _PROTOBUF_LIMIT:  # a larger one is checked from its files (_write)
        onnx.checker.check_model(model)
    return model


def _write(model, path: Path) -> None:
    """Atomic: a temporary folder beside `path` gets the model (and its external data), then renames."""
    import onnx

    external = model.ByteSize() > _PROTOBUF_LIMIT
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        data_name = f"{path.name}.data"
        onnx.save_model(model, str(folder / path.name), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data_name)
        if external:
            onnx.checker.check_model(str(folder / path.name))
            os.replace(folder / data_name, path.parent / data_name)
        os.replace(folder / path.name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- portable form: the lowered graph, then standard ops ---------------------------------------------------

def _reference_quantize_lora_down(x, smooth, lora_down, act_scale, spec):
    return fused_ops.reference_quantize_lora_down(x, smooth, lora_down, fused_ops.quantize_spec(spec), act_scale)


def _reference_gemm(*args):
    *tensors, a_tscale, next_act_scale, spec = args
    return fused_ops.reference_gemm(*tensors, fused_ops.gemm_spec(spec), a_tscale, next_act_scale)


def _reference_weight_only_linear(*args):
    return fused_ops.reference_weight_only_linear(*args[:-1], fused_ops.weight_only_spec(args[-1]))


class _ActValues:
    """What a quantize op's (codes, scales) stand for, as float32 values [..., K_pad]: carried in place of the
    codes while the portable module is traced (the scales are folded in)."""

    def __init__(self, values: torch.Tensor):
        self.values = values


def _fake_quantized_act(x, smooth, shift: float, fmt: str, group_size: int) -> torch.Tensor:
    """svdq.quantize_act's values, traced as plain torch ops (so torch.onnx translates each), float32 [..., K_pad]."""
    if fmt not in quant.INTEGER_FORMATS:
        raise InputError(f"{fmt} activations have no portable ONNX form", where="export_onnx(form='portable')",
                         fix="export with form='custom', or compile with an int4 or int8 preset")
    return quant.fake_quantize_act_values(smoothed_input(x, smooth, shift), fmt, group_size,
                                          name="svdq::quantize_act input")


def _portable_quantize_act(x, smooth, shift, fmt, group_size, act_scale=None):  # act_scale: nvfp4, refused
    return _ActValues(_fake_quantized_act(x, smooth, shift, fmt, group_size)), None


def _portable_gemm(a_codes, a_scales, w_codes, w_scales, w_tscale, fmt, group_size, k, out_dtype, a_tscale=None):
    weight = _weight_values(w_codes, w_scales, quant.weight_format_of(fmt), group_size)
    return torch.matmul(a_codes.values, weight).to(out_dtype)


def _portable_weight_only_linear(x, w_codes, w_scales, bias, fmt, group_size):
    weight = _weight_values(w_codes, w_scales, fmt, group_size).to(x.dtype)
    pad = weight.shape[0] - x.shape[-1]
    y = torch.matmul(F.pad(x, (0, pad)) if pad else x, weight)
    return y if bias is None else y + bias.to(x.dtype)


def _weight_values(codes_kn, scales_kn, fmt: str, group_size: int) -> torch.Tensor:
    """The dequantized weight [K_pad, N] in float32, from the prepared (unpacked, transposed) codes; for nf4
    `codes_kn` is (codes, codebook)."""
    if fmt == "nf4":
        codes, codebook = codes_kn
        return codebook[codes.long()] * scales_kn.repeat_interleave(group_size, 0)
    return torch.ops.svdq_onnx.dequantize_linear(codes_kn, scales_kn, group_size)


@torch.library.custom_op("svdq_onnx::dequantize_linear", mutates_args=())
def dequantize_linear(codes: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """ONNX DequantizeLinear on a weight [K, N]: scales [K/block, N] (blocked along K), or [N] for block 0."""
    if block_size == 0:
        return codes.float() * scales.float()
    return codes.float() * scales.float().repeat_interleave(block_size, 0)


@dequantize_linear.register_fake
def _(codes, scales, block_size):
    return codes.new_empty(codes.shape, dtype=torch.float32)


_PORTABLE_TARGETS: dict[Any, Callable] = {
    torch.ops.svdq.quantize_act.default: _portable_quantize_act,
    torch.ops.svdq.gemm.default: _portable_gemm,
    torch.ops.svdq.weight_only_linear.default: _portable_weight_only_linear,
}
# position of (w_codes, w_scales) and of the format and group-size arguments, per op
_WEIGHT_ARGS = {torch.ops.svdq.gemm.default: (2, 3, 5, 6), torch.ops.svdq.weight_only_linear.default: (1, 2, 4, 5)}


def _portable_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The lowered graph (fused ops decomposed) with each svdq op replaced by its standard-op form and each
    packed weight by its unpacked [K_pad, N] codes and float32 scales."""
    lowered = decompose(program, {
        torch.ops.svdq.fused_quantize_lora_down.default: _reference_quantize_lora_down,
        torch.ops.svdq.fused_gemm.default: _reference_gemm,
        torch.ops.svdq.fused_weight_only_linear.default: _reference_weight_only_linear,
    }).module()
    prepared: dict[str, tuple[str, str]] = {}
    graph = lowered.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "svdq":
            continue
        _refuse_conv(node)
        if node.target not in _PORTABLE_TARGETS:
            raise InputError(f"{node.target} has no portable ONNX form", where=f"node {node.name}",
                             fix="export with form='custom'")
        if node.target in _WEIGHT_ARGS:
            codes_at, scales_at, fmt_at, group_at = _WEIGHT_ARGS[node.target]
            fmt = node.args[fmt_at]
            weight_only = node.target is torch.ops.svdq.weight_only_linear.default
            weight_fmt = fmt if weight_only else quant.weight_format_of(fmt)
            codes_node, scales_node = node.args[codes_at], node.args[scales_at]
            if codes_node.op != "get_attr" or scales_node.op != "get_attr":
                raise InputError("a quantized weight is computed in the graph, not stored", where=f"node {node.name}",
                                 fix="export a graph from svdq_compiler.compile or load")
            if codes_node.target not in prepared:
                prepared[codes_node.target] = _prepare_weight(lowered, codes_node.target, scales_node.target,
                                                              weight_fmt, node.args[group_at])
            args = list(node.args)
            with graph.inserting_before(node):
                codes_name, scales_name, *codebook = prepared[codes_node.target]
                args[codes_at], args[scales_at] = graph.get_attr(codes_name), graph.get_attr(scales_name)
                if codebook:
                    args[codes_at] = (args[codes_at], graph.get_attr(codebook[0]))
            node.args = tuple(args)
        node.target = _PORTABLE_TARGETS[node.target]
    graph.eliminate_dead_code()
    lowered.recompile()
    return lowered


def _prepare_weight(module: torch.nn.Module, codes_name: str, scales_name: str, fmt: str,
                    group_size: int) -> tuple[str, ...]:
    """Register the weight's unpacked codes [K_pad, N] and float32 scales ([K_pad/G, N], or [N] for int8), and
    for nf4 its codebook, as buffers of `module`; returns their names."""
    from svdq_compiler.ir import get_attr_value

    codes, scales = get_attr_value(module, codes_name), get_attr_value(module, scales_name)
    if fmt == "nvfp4":
        raise InputError("nvfp4 weights have no portable ONNX form", where=codes_name,
                         fix="export with form='custom', or compile with an int4 or int8 preset")
    k_pad = codes.shape[1] * (1 if fmt == "int8" else 2)
    group = effective_group(group_size, k_pad)
    q = unpack_weight(PackedWeight(codes, scales, None, fmt, group, k_pad, scales.dtype))
    codes_kn = q.codes.t().contiguous()
    scales_kn = q.scales.float().reshape(-1) if group_size == 0 else q.scales.t().float().contiguous()
    buffers = [("codes", codes_kn), ("scales", scales_kn)]
    if fmt == "nf4":
        buffers.append(("codebook", quant.code_values(torch.arange(16, dtype=torch.uint8), "nf4")))
    names = []
    for suffix, value in buffers:
        name = f"{codes_name.replace('.', '_')}_onnx_{suffix}"
        module.register_buffer(name, value)
        names.append(name)
    return tuple(names)


def _portable_translations() -> dict[Any, Callable]:
    import onnx
    from onnxscript import opset21 as op

    def dequantize(codes, scales, block_size: int):
        if block_size == 0:
            return op.DequantizeLinear(codes, scales, axis=1)
        return op.DequantizeLinear(op.Cast(codes, to=onnx.TensorProto.INT4), scales, axis=0, block_size=block_size)

    return {torch.ops.svdq_onnx.dequantize_linear.default: dequantize}


def _int4_bytes(values) -> bytes:
    """ONNX's INT4 raw data: two's-complement nibbles, element 2i in the low nibble of byte i."""
    import numpy as np

    flat = values.astype(np.uint8).reshape(-1) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _fold_int4_casts(model) -> None:
    """Cast(int8 initializer → INT4) becomes an INT4 initializer: DequantizeLinear then reads a constant, which
    is what ONNX Runtime's MatMulNBits fusion needs, and the file holds 4 bits per weight."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for node in list(graph.node):
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        source = initializers.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if to != onnx.TensorProto.INT4 or source is None:
            continue
        values = numpy_helper.to_array(source)
        name = f"{source.name}_int4"
        graph.initializer.append(onnx.helper.make_tensor(name, onnx.TensorProto.INT4, values.shape,
                                                         _int4_bytes(values), raw=True))
        for reader in graph.node:
            reader.input[:] = [name if value == node.output[0] else value for value in reader.input]
        graph.node.remove(node)
        if readers[source.name] == 1:
            graph.initializer.remove(source)


# ---- custom form: svdq-domain nodes ------------------------------------------------------------------------

def _refuse_conv(node: torch.fx.Node) -> None:
    if node.target is torch.ops.svdq.conv2d.default:
        raise InputError("quantized k×k convolutions (svdq.conv2d) have no ONNX form yet", where=f"node {node.name}",
                         fix="compile with conv_kxk='keep' to export ONNX")


def _custom_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The graph with each svdq op replaced by `torch.onnx.ops.symbolic_multi_out`, which torch.onnx writes as
    one node of the `svdq` domain."""
    module = program.module()
    for node in module.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "svdq":
            continue
        _refuse_conv(node)
        values = node.meta["val"]
        single = isinstance(values, torch.Tensor)
        outputs = tuple((value.dtype, int(value.shape[-1])) for value in ([values] if single else values))
        names = tuple(argument.name for argument in node.target._schema.arguments)
        op_type = "".join(part.capitalize() for part in node.target._opname.split("_"))
        node.args = (op_type, names, outputs, single, *node.args)
        node.target = _svdq_node
    module.recompile()
    return module


def _svdq_node(op_type: str, names: tuple, outputs: tuple, single: bool, *args):
    """One svdq-domain ONNX node: tensor arguments are its inputs (a tensor list goes last, variadic), the other
    arguments its attributes; its outputs keep the leading dimensions of the first input."""
    inputs, operands, attributes = [], [], {}
    for name, value in zip(names, args):
        if isinstance(value, (list, tuple)):
            operands = list(value)
        elif value is None or isinstance(value, torch.Tensor):
            inputs.append(value)
        elif isinstance(value, torch.dtype):
            attributes[name] = str(value).removeprefix("torch.")
        else:
            attributes[name] = value
    lead = tuple(inputs[0].shape[:-1])
    results = torch.onnx.ops.symbolic_multi_out(
        f"{CUSTOM_DOMAIN}::{op_type}", inputs + operands, attributes, dtypes=[dtype for dtype, _ in outputs],
        shapes=[(*lead, last) for _, last in outputs], version=1)
    return results[0] if single else list(results)
