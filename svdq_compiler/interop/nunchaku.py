"""Nunchaku SVDQuant FLUX checkpoints: import one into our graph, export our compiled FLUX to one.

Format (nunchaku_engine.md §3): one safetensors file whose metadata holds `config` (the diffusers config),
`model_class` and `quantization_config` (`{"weight": {"dtype": "int4" | "fp4_e2m1_all", "group_size": 64 | 16,
…}, "rank": r}`); or the legacy folder of `transformer_blocks.safetensors` + `unquantized_layers.safetensors` +
config.json. Per block, Nunchaku fuses linears along N (q/k/v → `qkv_proj`); each W4A4 module holds qweight,
wscales (+ wtscale / wcscales for nvfp4), bias, smooth, smooth_orig, lora_down, lora_up in its tiled layout
(`codegen.layout.to_nunchaku` / `from_nunchaku` convert one linear), and the AdaLN modulations are AWQ W4A16
(`to_nunchaku_awq` / `from_nunchaku_awq`). Keys use the v1 module names (`qkv_proj`, `mlp_fc1`, …) or the v2
diffusers-style ones (`attn.to_qkv`, `ff.net.0.proj`, …); both are read, either is written.

How the two models line up:
- a fused Nunchaku module is our linears' rows concatenated; q/k/v share λ and the down projection in both;
- the single blocks' `proj_out` reads [attention ‖ MLP]: our graph splits it in two (`proj_out.part0`,
  `proj_out.part1` — annotate_linears) exactly as Nunchaku does (`out_proj`, `mlp_fc2`); the bias lives on the
  MLP part, and an imported `out_proj` bias is added to it;
- Nunchaku's low-rank branch reads x, ours x/λ: `lora_down` = L2/λ (the converters fold λ in and out);
- the bias of a post-GELU layer is already compensated for the shift in both (our `shifted_bias`);
- nvfp4: Nunchaku has no per-tensor activation scale (its E4M3 block scale is min(amax/6, 448) of
  x/smooth_factor); ours, t, is folded into the quantized path on export: smooth_factor = λ·t and wtscale (or
  wcscales) × t, the branch keeps L2/λ (`NunchakuLinear.act_scale`). An import has t = 1, Nunchaku's own
  semantics, with λ·t as its λ: the same computation up to rounding λ·t to the model dtype;
- Nunchaku keeps `norm_out` 16-bit (its AdaLN there is not quantized): an import keeps it so; an export writes
  our weight-only norm_out dequantized.
Rounding: λ folded into `lora_down` is rounded once more to the model dtype, so L2 survives a round trip to
within one rounding step; every other tensor is carried bit for bit.

Import builds the graph the normal compile would build — meta-device capture, annotate_linears, then the
structure smooth and lowrank give (`apply_smoothing`, `apply_branches`, run on meta stand-ins) — fills it with
the checkpoint's tensors, and runs lower and fuse: the result runs on our reference ops or generated kernels and
saves as graph.pt like any compiled model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.fx

from svdq_compiler.codegen.layout import (NUNCHAKU_GROUPS, NunchakuLinear, PackedWeight, from_nunchaku,
                                          from_nunchaku_awq, round_up, to_nunchaku, to_nunchaku_awq, unpack_weight)
from svdq_compiler.errors import CheckpointError, InputError
from svdq_compiler.ir import get_attr_value, set_attr_value
from svdq_compiler.layers import Layers, find_layers, segment_rows
from svdq_compiler.quant import dequantize

MODEL_CLASS = "NunchakuFluxTransformer2dModel"
WEIGHT_DTYPES = {"int4": "int4", "nvfp4": "fp4_e2m1_all"}
GELU_SHIFT_INT4 = 0.171875
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


@dataclass(frozen=True)
class Fused:
    """A Nunchaku W4A4 module of a block: its v1 and v2 local names and our linears, in row order."""

    v1: str
    v2: str
    parts: tuple[str, ...]


DOUBLE = (
    Fused("qkv_proj", "attn.to_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    Fused("qkv_proj_context", "attn.add_qkv_proj", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    Fused("out_proj", "attn.to_out.0", ("attn.to_out.0",)),
    Fused("out_proj_context", "attn.to_add_out", ("attn.to_add_out",)),
    Fused("mlp_fc1", "ff.net.0.proj", ("ff.net.0.proj",)),
    Fused("mlp_fc2", "ff.net.2", ("ff.net.2",)),
    Fused("mlp_context_fc1", "ff_context.net.0.proj", ("ff_context.net.0.proj",)),
    Fused("mlp_context_fc2", "ff_context.net.2", ("ff_context.net.2",)),
)
SINGLE = (
    Fused("qkv_proj", "attn.to_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    Fused("mlp_fc1", "mlp_fc1", ("proj_mlp",)),
    Fused("out_proj", "attn.to_out", ("proj_out.part0",)),
    Fused("mlp_fc2", "mlp_fc2", ("proj_out.part1",)),
)
DOUBLE_AWQ = {"norm1.linear": 6, "norm1_context.linear": 6}
SINGLE_AWQ = {"norm.linear": 3}
DOUBLE_NORMS = {"norm_q": "attn.norm_q", "norm_k": "attn.norm_k", "norm_added_q": "attn.norm_added_q",
                "norm_added_k": "attn.norm_added_k"}
SINGLE_NORMS = {"norm_q": "attn.norm_q", "norm_k": "attn.norm_k"}
# Linears Nunchaku keeps 16-bit although our default compile would make them weight-only.
KEPT_16BIT = (r"^norm_out\.linear$",)
# QuantConfig fields a compile needs for Nunchaku to hold the result: every block linear W4A4 with its group's λ
# and its branch (no per-layer choice, no fallback), the AdaLN layers plain W4A16 (Nunchaku's AWQ kernel has no
# smoothing vector and no branch).
NUNCHAKU_COMPATIBLE = dict(fallback_error=None, layer_choice=False, weight_only_smooth=False, weight_only_rank=0,
                           weight_only_error=None)


def _block_kinds(config: Mapping[str, Any]):
    for index in range(config["num_layers"]):
        yield f"transformer_blocks.{index}", DOUBLE, DOUBLE_AWQ, DOUBLE_NORMS
    for index in range(config["num_single_layers"]):
        yield f"single_transformer_blocks.{index}", SINGLE, SINGLE_AWQ, SINGLE_NORMS


def _name(fused_or_norm: Fused | tuple[str, str], naming: str) -> str:
    if isinstance(fused_or_norm, Fused):
        return fused_or_norm.v2 if naming == "v2" else fused_or_norm.v1
    v1, ours = fused_or_norm
    return ours if naming == "v2" else v1


# ---- export -------------------------------------------------------------------------------------------------


def export_nunchaku(gm: torch.nn.Module, path: str | Path | None = None, *, naming: str = "v1",
                    config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Our compiled FLUX graph (from compile, load or import_nunchaku) → a Nunchaku checkpoint's tensors
    (written with its metadata to `path` if given, through a temporary file)."""
    from svdq_compiler.capture import CAPTURE_META
    from svdq_compiler.dropin import graph_module_of

    gm = graph_module_of(gm)

    if naming not in ("v1", "v2"):
        raise InputError(f"naming must be 'v1' or 'v2', got {naming!r}")
    config = dict(config or (gm.meta.get(CAPTURE_META) or {}).get("model_config") or {})
    if "num_layers" not in config:
        raise InputError("the graph does not say which FLUX config it was compiled from",
                         fix="pass config= (the diffusers config of the model)")
    layers = find_layers(gm)
    formats = {layers.quantized[name].fmt for name in layers.quantized}
    if len(formats) != 1 or next(iter(formats)) not in NUNCHAKU_GROUPS:
        raise CheckpointError(f"Nunchaku checkpoints are all-int4 (group 64) or all-nvfp4 (group 16); this graph "
                              f"has weight formats {sorted(formats)}", fix="compile with the int4 or nvfp4 preset")
    fmt = formats.pop()
    tensors: dict[str, torch.Tensor] = {}
    rank = 0
    for prefix, modules, awq, norms in _block_kinds(config):
        for fused in modules:
            linear = _exported_linear(gm, layers, prefix, fused)
            rank = max(rank, 0 if linear.lora_down is None else linear.lora_down.shape[0])
            for key, value in to_nunchaku(linear, naming=naming).items():
                tensors[f"{prefix}.{_name(fused, naming)}.{key}"] = value
        for local, splits in awq.items():
            weight = layers.weight_only.get(f"{prefix}.{local}")
            meta = None if weight is None else weight.node.meta.get("svdq")
            if weight is None or weight.fmt != "int4" or weight.group_size != 64 or \
                    getattr(meta, "smooth", None) or getattr(meta, "lora_up", None):
                raise CheckpointError(f"{prefix}.{local} must be plain weight-only int4 (group 64, no AWQ scaling, no "
                                      "branch) for Nunchaku", fix="compile with QuantConfig.preset(fmt, "
                                      "**svdq_compiler.interop.nunchaku.NUNCHAKU_COMPATIBLE)")
            bias = get_attr_value(gm, weight.bias) if weight.bias else None
            for key, value in to_nunchaku_awq(weight.packed(gm), bias, adanorm_splits=splits).items():
                tensors[f"{prefix}.{local}.{key}"] = value
        for v1, ours in norms.items():
            tensors[f"{prefix}.{_name((v1, ours), naming)}.weight"] = get_attr_value(gm, f"{prefix}.{ours}.weight")
    tensors.update(_unquantized(gm, layers))
    if path is not None:
        write_checkpoint(tensors, path, config, fmt, rank)
    return tensors


def _exported_linear(gm: torch.fx.GraphModule, layers: Layers, prefix: str, fused: Fused) -> NunchakuLinear:
    """Our linears of one Nunchaku module, concatenated along N."""
    names = [f"{prefix}.{part}" for part in fused.parts]
    missing = [name for name in names if name not in layers.quantized]
    if missing:
        kind = {name: ("weight-only" if name in layers.weight_only else "16-bit" if name in layers.dense
                       else "absent") for name in missing}
        raise CheckpointError(f"Nunchaku needs W4A4 layers; these are not: {kind}",
                              fix="compile with QuantConfig.preset(fmt, **svdq_compiler.interop.nunchaku."
                                  "NUNCHAKU_COMPATIBLE) and without skip rules for FLUX block linears")
    weights = [layers.quantized[name].packed(gm) for name in names]
    first = weights[0]
    wtscale = None
    if first.wtscale is not None:
        scales = [w.wtscale.reshape(-1) for w in weights]
        if all(torch.equal(s, scales[0]) for s in scales) and scales[0].numel() == 1:
            wtscale = first.wtscale
        else:
            wtscale = torch.cat([s.expand(w.n) for s, w in zip(scales, weights)])
    packed = PackedWeight(torch.cat([w.qweight for w in weights]), torch.cat([w.wscales for w in weights], dim=1),
                          wtscale, first.fmt, first.group_size, first.k, first.dtype)
    biases = [get_attr_value(gm, layers.quantized[name].bias) if layers.quantized[name].bias
              else torch.zeros(w.n, dtype=first.dtype) for name, w in zip(names, weights)]
    smooths = [_smooth_of(gm, layers, name) for name in names]
    if any(s is None for s in smooths) and not all(s is None for s in smooths) or \
            any(s is not None and not torch.equal(s, smooths[0]) for s in smooths):
        raise CheckpointError(f"{prefix}.{fused.v1}: its linears divide their input by different λ, which one "
                              f"Nunchaku module cannot express", fix="compile with q/k/v in one smoothing group")
    down, up = _exported_branch(gm, layers, names, weights)
    act_scales = [_act_scale_of(gm, layers, name) for name in names]
    if any(s is not None and not torch.equal(s, act_scales[0]) for s in act_scales):
        raise CheckpointError(f"{prefix}.{fused.v1}: its linears quantize their input under different nvfp4 "
                              f"activation scales, which one Nunchaku module cannot express",
                              fix="compile with q/k/v in one smoothing group")
    return NunchakuLinear(packed, bias=torch.cat(biases), smooth=smooths[0], lora_down=down, lora_up=up,
                          act_scale=act_scales[0])


def _act_scale_of(gm: torch.fx.GraphModule, layers: Layers, name: str) -> torch.Tensor | None:
    """The nvfp4 per-tensor activation scale the layer's GEMM multiplies by (a_tscale), None for int4."""
    node = layers.quantized[name].node
    schema = [argument.name for argument in node.target._schema.arguments]
    position = schema.index("a_tscale") if "a_tscale" in schema else None
    scale = node.args[position] if position is not None and position < len(node.args) else None
    return get_attr_value(gm, scale.target) if isinstance(scale, torch.fx.Node) else None


def _smooth_of(gm: torch.fx.GraphModule, layers: Layers, name: str) -> torch.Tensor | None:
    if name in layers.branched and layers.branched[name][0].smooth:
        return get_attr_value(gm, layers.branched[name][0].smooth)
    node = layers.quantized[name].node
    if node.target == torch.ops.svdq.gemm.default:  # lowered, no branch: λ is the quantize_act's argument
        quantize = node.args[0].args[0]
        return get_attr_value(gm, quantize.args[1].target) if quantize.args[1] is not None else None
    return None


def _exported_branch(gm, layers: Layers, names: list[str], weights: list[PackedWeight]):
    """(L2, L1) of the module: one shared L2 with the L1s stacked, or — when the linears have their own L2 —
    the L2s stacked and the L1s block-diagonal."""
    if not any(name in layers.branched for name in names):
        return None, None
    if not all(name in layers.branched for name in names):
        raise CheckpointError(f"{names}: some have a low-rank branch and some not", fix="compile them alike")
    downs = [segment_rows(gm, layers, name) for name in names]
    ups = [get_attr_value(gm, layers.branched[name][2].up) for name in names]
    if all(torch.equal(d, downs[0]) for d in downs):
        return downs[0], torch.cat(ups)
    blocks = torch.zeros(sum(w.n for w in weights), sum(d.shape[0] for d in downs), dtype=ups[0].dtype)
    row = column = 0
    for up in ups:
        blocks[row:row + up.shape[0], column:column + up.shape[1]] = up
        row, column = row + up.shape[0], column + up.shape[1]
    return torch.cat(downs), blocks


def _unquantized(gm: torch.fx.GraphModule, layers: Layers) -> dict[str, torch.Tensor]:
    """The layers outside the blocks under their diffusers names (weight-only ones dequantized)."""
    tensors = {}
    for name, target in layers.dense.items():
        if name.startswith(BLOCK_PREFIXES):
            continue
        tensors[target] = get_attr_value(gm, target)
        if hasattr(gm.get_submodule(name), "bias"):
            tensors[f"{name}.bias"] = get_attr_value(gm, f"{name}.bias")
    for name, weight in layers.weight_only.items():
        if name.startswith(BLOCK_PREFIXES):
            continue
        packed = weight.packed(gm)
        tensors[f"{name}.weight"] = dequantize(unpack_weight(packed))[:, : packed.k].contiguous()
        if weight.bias:
            tensors[f"{name}.bias"] = get_attr_value(gm, weight.bias)
    return tensors


def write_checkpoint(tensors: Mapping[str, torch.Tensor], path: str | Path, config: Mapping[str, Any], fmt: str,
                     rank: int) -> Path:
    """A Nunchaku single-file checkpoint with its metadata, written to a temporary file then renamed."""
    from safetensors.torch import save_file

    from svdq_compiler.files import atomic_path

    scale_dtype = None if fmt == "int4" else [None, "fp8_e4m3_nan"]
    quant = {"dtype": WEIGHT_DTYPES[fmt], "scale_dtype": scale_dtype, "group_size": NUNCHAKU_GROUPS[fmt]}
    metadata = {"config": json.dumps({"_class_name": "FluxTransformer2DModel", **config}),
                "model_class": MODEL_CLASS,
                "quantization_config": json.dumps({"method": "svdquant", "weight": quant, "activation": quant,
                                                   "rank": rank})}
    with atomic_path(path, "Nunchaku checkpoint") as temporary:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
    return Path(path)


# ---- import -------------------------------------------------------------------------------------------------


def read_checkpoint(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors with v1 names, diffusers config, quantization config) of a Nunchaku file or legacy folder."""
    from safetensors import safe_open

    path = Path(source)
    files = [path] if path.is_file() else [path / "transformer_blocks.safetensors",
                                           path / "unquantized_layers.safetensors"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InputError(f"not a Nunchaku checkpoint: {missing} missing", where=str(path),
                         fix="give the svdq-*.safetensors file or the legacy folder")
    tensors, metadata = {}, {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                metadata.update(handle.metadata() or {})
                tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
        except Exception as exc:  # safetensors raises its own types for damaged files
            raise CheckpointError(f"not a readable safetensors file: {exc}", where=str(file)) from exc
    try:
        if "config" in metadata:
            config = json.loads(metadata["config"])
        elif (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
        else:
            raise CheckpointError("the checkpoint carries no model config", where=str(path),
                                  fix="Nunchaku files hold it in their metadata; legacy folders in config.json")
        quant = json.loads(metadata["quantization_config"]) if "quantization_config" in metadata else {}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"the checkpoint's config is not JSON ({exc})", where=str(path),
                              fix="re-export the checkpoint") from exc
    if not isinstance(config, dict) or not isinstance(quant, dict):
        raise CheckpointError("the checkpoint's config or quantization_config is not a JSON object", where=str(path),
                              fix="re-export the checkpoint")
    lacking = [key for key in FLUX_CONFIG_KEYS
               if not (isinstance(config.get(key), int) and not isinstance(config.get(key), bool) and config[key] > 0)]
    if lacking:
        raise CheckpointError(f"the checkpoint's FLUX config lacks positive integers for {lacking}", where=str(path),
                              fix="give the config the model was exported with (config metadata or config.json)")
    return _to_v1(tensors, config), {k: v for k, v in config.items() if not k.startswith("_")}, quant


FLUX_CONFIG_KEYS = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim")  # sizes the import reads


def _to_v1(tensors: dict[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename v2 (diffusers-style) keys to v1 module and tensor names."""
    renames = {}
    for prefix, modules, _, norms in _block_kinds(config):
        for fused in modules:
            renames[f"{prefix}.{fused.v2}."] = f"{prefix}.{fused.v1}."
        for v1, ours in norms.items():
            renames[f"{prefix}.{ours}."] = f"{prefix}.{v1}."
    tensor_names = {"smooth_factor_orig": "smooth_orig", "smooth_factor": "smooth", "proj_down": "lora_down",
                    "proj_up": "lora_up"}
    out = {}
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        module_key = renames.get(module + ".", module + ".")
        out[module_key + tensor_names.get(leaf, leaf)] = value
    return out


def _fmt(tensors: Mapping[str, torch.Tensor], quant: Mapping[str, Any]) -> str:
    dtype = (quant.get("weight") or {}).get("dtype")
    if dtype is not None:
        fmt = {v: k for k, v in WEIGHT_DTYPES.items()}.get(dtype)
        if fmt is None:
            raise CheckpointError(f"unknown Nunchaku weight dtype {dtype!r}", fix="int4 or fp4_e2m1_all")
        return fmt
    scales = next(v for k, v in tensors.items() if k.endswith(".wscales") and ".norm" not in k)
    return "nvfp4" if scales.dtype == torch.float8_e4m3fn else "int4"


def import_nunchaku(source: str | Path, *, batch: int = 2, tokens: Any = None, dump_ir: str | Path | None = None,
                    verify: bool = False, print_ir_after_change: bool = False) -> torch.fx.GraphModule:
    """A Nunchaku FLUX checkpoint → our compiled graph (lowered and fused), ready to run, save or export.
    `dump_ir`, `verify` and `print_ir_after_change` are `svdq_compiler.compile`'s, over the import's passes
    (annotate_linears, import_weights, lower, fuse)."""
    from svdq_compiler import compile_report
    from svdq_compiler.capture import install_shape_check
    from svdq_compiler.config import QuantConfig
    from svdq_compiler.meta_capture import capture_on_meta
    from svdq_compiler.models import adapter_for_class, cast_module
    from svdq_compiler.pipeline import PassContext, PassResult, make_pass, run_passes, svdquant_pipeline
    from svdq_compiler.serialize import REPORT_META

    tensors, config, quant = read_checkpoint(source)
    fmt = _fmt(tensors, quant)
    rank = quant.get("rank")
    adapter = adapter_for_class("FluxTransformer2DModel")
    with torch.device("meta"):
        model = adapter.model_class().from_config(config).eval()
    check_shapes(tensors, model, config, str(source))
    dtype = next(v.dtype for k, v in tensors.items() if k.endswith(".bias") and v.is_floating_point())
    cast_module(model, dtype)
    example = adapter.example_inputs(model, batch=batch, tokens=tokens)
    gm = capture_on_meta(model, example, adapter=adapter)
    quant_config = QuantConfig.preset(fmt, rank=rank or 32, skip=KEPT_16BIT, **NUNCHAKU_COMPATIBLE)
    ctx = PassContext(config=quant_config, example_inputs=example, adapter=adapter, verify_each=verify,
                      dump_dir=None if dump_ir is None else Path(dump_ir), print_ir_after_change=print_ir_after_change)

    def import_weights(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        _Importer(gm, tensors, fmt, rank, config, str(source), ctx.imported).run()
        return PassResult(gm, True, {"imported_from": str(source), "format": fmt})

    # The checkpoint's packed weights take the place of quantize_weights' QTensors: `lower` takes them from
    # ctx.imported.
    importer = make_pass("import_weights", import_weights, requires=("linears",), produces=("quantized",),
                         summary="the checkpoint's packed weights, λ and branches are on the graph")
    annotate, lower, fuse = svdquant_pipeline(["annotate_linears", "lower", "fuse"])
    gm = run_passes(gm, ctx, [annotate, importer, lower, fuse])
    empty = sorted(name for name, t in list(gm.named_parameters()) + list(gm.named_buffers()) if t.is_meta)
    if empty:
        raise CheckpointError(f"{len(empty)} model tensor(s) got no value from the checkpoint: {empty[:8]}",
                              where=str(source), fix="the checkpoint misses layers its config has")
    install_shape_check(gm)
    gm.meta[REPORT_META] = compile_report(gm, quant_config, ctx.records)
    return gm


def check_shapes(tensors: Mapping[str, torch.Tensor], model: torch.nn.Module, config: Mapping[str, Any],
                 where: str) -> None:
    """Every W4A4 module of the config is in the checkpoint with the qweight size its linears need (N and K
    padded to 128, two codes a byte): a checkpoint of another model fails here, before the capture."""
    named = dict(model.named_modules())
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    problems = []
    for prefix, modules, _, _ in _block_kinds(config):
        for fused in modules:
            key = f"{prefix}.{fused.v1}.qweight"
            if fused.parts[0].startswith("proj_out"):  # the halves of a single block's proj_out
                n = named[f"{prefix}.proj_out"].out_features
                k = inner if fused.v1 == "out_proj" else named[f"{prefix}.proj_out"].in_features - inner
            else:
                n = sum(named[f"{prefix}.{part}"].out_features for part in fused.parts)
                k = named[f"{prefix}.{fused.parts[0]}"].in_features
            expected = round_up(n, 128) * round_up(k, 128) // 2
            if key not in tensors:
                problems.append(f"{key} missing")
            elif tensors[key].numel() != expected:
                problems.append(f"{key} has {tensors[key].numel()} bytes, {n}×{k} needs {expected}")
    if problems:
        raise CheckpointError(f"the checkpoint does not fit its FLUX config: {'; '.join(problems[:8])}"
                              + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""), where=where,
                              fix="the checkpoint and its config come from different models")


class _Importer:
    """Fills a meta-captured, annotated FLUX graph with a Nunchaku checkpoint's tensors."""

    def __init__(self, gm, tensors, fmt, rank, config, where, imported: dict[str, torch.Tensor]):
        self.gm, self.tensors, self.fmt, self.rank, self.config, self.where = gm, dict(tensors), fmt, rank, config, where
        self.imported = imported  # the packed tensors lower puts on the graph (PassContext.imported)
        self.used: set[str] = set()

    def take(self, prefix: str) -> dict[str, torch.Tensor]:
        found = {key[len(prefix) + 1:]: value for key, value in self.tensors.items() if key.startswith(prefix + ".")}
        if not found:
            raise CheckpointError(f"the checkpoint has no tensors for {prefix}", where=self.where,
                                  fix="the checkpoint does not match its config, or is not a FLUX checkpoint")
        self.used.update(f"{prefix}.{key}" for key in found)
        return found

    def put(self, target: str, value: torch.Tensor) -> None:
        """Set an attribute (a parameter stays a parameter; what the import adds is a buffer, as lower makes)."""
        stand_in = get_attr_value(self.gm, target) if _has_attr(self.gm, target) else None
        if stand_in is not None and tuple(stand_in.shape) != tuple(value.shape):
            raise CheckpointError(f"{target}: the checkpoint has {list(value.shape)}, the model needs "
                                  f"{list(stand_in.shape)}", where=self.where)
        parameter = isinstance(stand_in, torch.nn.Parameter) and value.is_floating_point()
        set_attr_value(self.gm, target, value, as_buffer=not parameter)

    def run(self) -> None:
        from svdq_compiler.ir import annotated_linears

        self.infos = {info.name: (node, info) for node, info in annotated_linears(self.gm)}
        decoded: dict[str, NunchakuLinear] = {}
        for prefix, modules, awq, norms in _block_kinds(self.config):
            for fused in modules:
                decoded.update(self.decode(prefix, fused))
            for local, splits in awq.items():
                self.weight_only(f"{prefix}.{local}", splits)
            for v1, ours in norms.items():
                self.put(f"{prefix}.{ours}.weight", self.take(f"{prefix}.{v1}")["weight"])
        self.move_split_biases(decoded)
        self.attach(decoded)
        for key in sorted(set(self.tensors) - self.used):
            if _has_attr(self.gm, key):
                self.put(key, self.tensors[key])
                self.used.add(key)
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            raise CheckpointError(f"{len(unused)} checkpoint tensor(s) have no place in the FLUX config: "
                                  f"{unused[:8]}", where=self.where,
                                  fix="the checkpoint and its config disagree (or it is not a FLUX checkpoint)")

    def move_split_biases(self, decoded: dict[str, NunchakuLinear]) -> None:
        """A single block's out_proj and mlp_fc2 are the two parts of one diffusers proj_out, whose single
        bias the graph adds with the part that read the MLP: hand it the out_proj bias."""
        for name, linear in list(decoded.items()):
            if self.infos[name][1].bias is None and linear.bias is not None:
                carrier = name.replace(".part0", ".part1")
                if carrier == name or carrier not in decoded:
                    raise CheckpointError(f"{name} has a bias in the checkpoint but not in the model",
                                          where=self.where)
                other = decoded[carrier]
                decoded[carrier] = NunchakuLinear(other.weight, other.bias + linear.bias, other.smooth,
                                                  other.lora_down, other.lora_up)
                decoded[name] = NunchakuLinear(linear.weight, None, linear.smooth, linear.lora_down,
                                               linear.lora_up)

    def decode(self, prefix: str, fused: Fused) -> dict[str, NunchakuLinear]:
        """One Nunchaku module → our linears (rows split back)."""
        names = [f"{prefix}.{part}" for part in fused.parts]
        infos = [self.infos[name][1] for name in names]
        total = sum(info.out_features for info in infos)
        parts = self.take(f"{prefix}.{fused.v1}")
        absent = [name for name in ("smooth", "lora_down", "lora_up") if name not in parts or not parts[name].numel()]
        if absent:
            raise CheckpointError(f"{prefix}.{fused.v1} has no {' or '.join(absent)} (or an empty one)",
                                  where=self.where, fix="the checkpoint is incomplete: re-export or re-download it")
        linear = from_nunchaku(parts, self.fmt, in_features=infos[0].in_features, out_features=total,
                               rank=self.rank, where=f"{self.where}: {prefix}.{fused.v1}")
        out, row = {}, 0
        for name, info in zip(names, infos):
            rows = slice(row, row + info.out_features)
            w = linear.weight
            wtscale = w.wtscale if w.wtscale is None or w.wtscale.dim() == 0 else w.wtscale[rows]
            weight = PackedWeight(w.qweight[rows], w.wscales[:, rows].contiguous(), wtscale, w.fmt, w.group_size,
                                  w.k, w.dtype)
            up = None if linear.lora_up is None else linear.lora_up[rows]
            out[name] = NunchakuLinear(weight, linear.bias[rows], linear.smooth, linear.lora_down, up)
            row += info.out_features
        return out

    def weight_only(self, name: str, splits: int) -> None:
        node, info = self.infos[name]
        weight, bias = from_nunchaku_awq(self.take(name), in_features=info.in_features,
                                         out_features=info.out_features, adanorm_splits=splits,
                                         where=f"{self.where}: {name}")
        self.imported[f"{name}.qweight"], self.imported[f"{name}.wscales"] = weight.qweight, weight.wscales
        self.put(info.bias, bias)

    def attach(self, decoded: dict[str, NunchakuLinear]) -> None:
        """λ, branches, packed weights and biases, through the smooth and lowrank passes' own graph rewrites."""
        from svdq_compiler.calibration import Calibration, SiteStats
        from svdq_compiler.rewrites import apply_branches, apply_smoothing
        from svdq_compiler.svdquant import group_problem, members_by_group, raw_input

        groups = members_by_group(self.gm, lambda info: info.scheme is not None and info.scheme.act is not None)
        meta = torch.device("meta")
        sites = {}
        for members in groups.values():
            for node, info in members:
                x = raw_input(node)
                sites[x.name] = SiteStats(x.name, [], torch.zeros(0), torch.zeros(0),
                                          torch.empty(1, info.in_features, device=meta), torch.zeros(0))
        calibration = Calibration(sites)
        for group, members in groups.items():
            linears = [decoded[info.name] for _, info in members]
            smooth = linears[0].smooth
            if any(not torch.equal(lin.smooth, smooth) for lin in linears):
                raise CheckpointError(f"group {group}: linears reading one input have different smoothing λ, "
                                      f"which our graph (one λ per input) cannot hold", where=self.where)
            scheme = members[0][1].scheme
            apply_smoothing(self.gm, members, group, smooth.to(meta))
            problem = group_problem(self.gm, members, calibration, scheme)
            downs: dict[int, torch.Tensor] = {}  # one stand-in per shared down projection (q/k/v share one)
            branches = {}
            for _, info in members:
                linear = decoded[info.name]
                down = downs.setdefault(id(linear.lora_down), linear.lora_down.float().to(meta))
                branches[info.weight] = (linear.lora_up.float().to(meta), down)
            apply_branches(self.gm, members, problem, smooth.to(meta), branches)
            self.put(f"{group}.smooth", smooth)
            for _, info in members:
                linear = decoded[info.name]
                self.put(info.lora_down, linear.lora_down)
                self.put(info.lora_up, linear.lora_up)
                self.imported[f"{info.name}.qweight"] = linear.weight.qweight
                self.imported[f"{info.name}.wscales"] = linear.weight.wscales
                if linear.weight.wtscale is not None:
                    self.imported[f"{info.name}.wtscale"] = linear.weight.wtscale
                self.put_bias(info, linear)

    def put_bias(self, info, linear: NunchakuLinear) -> None:
        """The checkpoint's bias (already shift-compensated, as our shifted_bias) where lower reads it."""
        if linear.bias is None:
            return
        if info.shift:
            self.imported[f"{info.name}.shifted_bias"] = linear.bias
        else:
            self.put(info.bias, linear.bias)


def _has_attr(gm: torch.nn.Module, target: str) -> bool:
    try:
        get_attr_value(gm, target)
        return True
    except AttributeError:
        return False

