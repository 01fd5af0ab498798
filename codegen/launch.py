"""Python wrappers that check arguments, allocate outputs, pick a tile configuration and launch a kernel.

`quantize_lora_down` launches kernel A, `gemm` kernel B, `weight_only_linear` kernel W (W4A16). All accept `[..., K]` activations (the leading dims
are flattened into M rows and restored on the outputs) and run on CUDA (compiled) or on CPU under the Triton
interpreter. On CUDA the configurations of `configs.py` are timed once per (kernel, device, N, K, M bucket)
and the fastest is kept for the process.

Outputs of `gemm`, in order: y [..., N] (unless the spec's quantize-for-next-layer epilogue does not emit it),
then, with that epilogue, the next layer's codes and scales, then its down projection [..., rank′].
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading
import warnings
from typing import Callable, Sequence

import torch

from svdq_compiler.codegen.cache import load_kernel
from svdq_compiler.codegen.configs import (GemmConfig, QuantizeConfig, WeightOnlyConfig, gemm_configs, m_bucket,
                                           quantize_configs, tile_constexprs, weight_only_configs)
from svdq_compiler.codegen.generate import Target, nvfp4_path
from svdq_compiler.codegen.layout import packed_code_dtype, scale_dtype
from svdq_compiler.codegen.shapes import model_dtype, packed_act
from svdq_compiler.codegen.signature import signature_of
from svdq_compiler.codegen.spec import ActQuant, GemmSpec, KernelSpec, QuantizeSpec, WeightOnlySpec
from svdq_compiler.quant import code_table
from svdq_compiler.errors import SvdqError

class KernelInputError(SvdqError):
    """A fused kernel was called with tensors that do not match its spec."""


def current_target(device: torch.device) -> Target:
    if device.type == "cuda":
        return Target("cuda", tuple(torch.cuda.get_device_capability(device)))
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise KernelInputError("generated kernels run on the CPU only under the Triton interpreter",
                                   fix="set TRITON_INTERPRET=1 before Python starts (Triton reads it when it is "
                                       "imported), or run the fused ops on the reference backend")
        return Target("interpreter")
    raise KernelInputError(f"generated kernels run on CUDA or, interpreted, on the CPU; got {device}",
                           fix="move the tensors to a CUDA device or the CPU")


# ---------------------------------------------------------------------------------------------------------
# Argument checks


def _require(condition: bool, what: str, where: str, fix: str | None = None) -> None:
    if not condition:
        raise KernelInputError(what, where=where, fix=fix)


def _check_tensor(t: torch.Tensor | None, name: str, where: str, *, shape: Sequence[int] | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
    _require(t is not None, f"{name} is required by this spec", where)
    assert t is not None
    if shape is not None:
        _require(tuple(t.shape) == tuple(shape), f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}",
                 where)
    if dtype is not None:
        _require(t.dtype == dtype, f"{name} has dtype {t.dtype}, expected {dtype}", where)
    if device is not None:
        _require(t.device == device, f"{name} is on {t.device}, the other operands on {device}", where,
                 fix="move all operands of a fused op to one device")


def _absent(t: torch.Tensor | None, name: str, where: str) -> None:
    _require(t is None, f"{name} was given, but the spec has no use for it", where,
             fix="pass None, or regenerate the spec")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as an [M, C] matrix with unit column stride (a view when possible; rows may be strided)."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 or flat.shape[-1] == 1 else flat.contiguous()


# ---------------------------------------------------------------------------------------------------------
# Configuration choice


_TUNED: dict[tuple, object] = {}
_TUNE_LOCK = threading.Lock()


def _choose(key: tuple, configs: list, run: Callable[[object], None]) -> object:
    """The fastest of `configs` for `key` (timed once on CUDA), or the only candidate."""
    if len(configs) == 1:
        return configs[0]
    with _TUNE_LOCK:
        best = _TUNED.get(key)
        if best is not None:
            return best
        import triton.testing

        timings: list[tuple[float, int]] = []
        first_error: Exception | None = None
        for index, config in enumerate(configs):
            try:
                timings.append((triton.testing.do_bench(functools.partial(run, config), warmup=5, rep=25,
                                                        return_mode="median"), index))
            except Exception as exc:  # a tile that does not fit this GPU (shared memory, registers) is skipped
                first_error = first_error or exc
        if not timings:
            raise KernelInputError(f"no tile configuration of {key[0]} compiles on this device: {first_error}",
                                   fix="this is a code generator bug; report it with the spec") from first_error
        best = configs[min(timings)[1]]
        _TUNED[key] = best
        return best


def _device_key(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter"


# ---------------------------------------------------------------------------------------------------------
# Kernel A


def _check_act_scale(t: torch.Tensor | None, fmt: str, name: str, where: str, device: torch.device) -> None:
    """nvfp4's per-tensor activation scale: one fp32 value; no other format has one."""
    if fmt == "nvfp4":
        _check_tensor(t, name, where, dtype=torch.float32, device=device)
        _require(t.numel() == 1, f"{name} must hold one value, got shape {tuple(t.shape)}", where)
    else:
        _absent(t, name, where)


def quantize_lora_down(x: torch.Tensor, smooth: torch.Tensor | None, lora_down: torch.Tensor | None,
                       spec: QuantizeSpec, act_scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel A: (codes, scales, down) for x [..., K]; down is [..., rank] ([..., 0] for rank 0); nvfp4 reads
    its per-tensor activation scale from `act_scale`."""
    where = f"fused_quantize_lora_down ({spec.name})"
    dtype = model_dtype(spec.dtype)
    quant = spec.quant
    _require(x.dim() >= 1 and x.shape[-1] > 0, f"x must be [..., K] with K > 0, got {tuple(x.shape)}", where)
    k = x.shape[-1]
    _require(spec.k is None or k == spec.k, f"x has K = {k}, the kernel was generated for K = {spec.k}", where)
    _check_tensor(x, "x", where, dtype=dtype)
    device = x.device
    if quant.smooth:
        _check_tensor(smooth, "smooth (λ)", where, shape=(k,), device=device)
    else:
        _absent(smooth, "smooth (λ)", where)
    if spec.rank:
        _check_tensor(lora_down, "lora_down (L2)", where, shape=(spec.rank, k), dtype=dtype, device=device)
    else:
        _absent(lora_down, "lora_down (L2)", where)
    _check_act_scale(act_scale, quant.fmt, "act_scale", where, device)
    lead = tuple(x.shape[:-1])
    x2 = _rows(x)
    m = x2.shape[0]
    packed = packed_act(quant, lead, k, dtype)
    codes = torch.empty(packed.codes_shape, dtype=packed.codes_dtype, device=device)
    scales = torch.empty(packed.scales_shape, dtype=packed.scales_dtype, device=device)
    down = torch.empty((*lead, spec.rank), dtype=dtype, device=device)
    if m == 0:
        return codes, scales, down
    target = current_target(device)
    kernel = load_kernel(spec, target)
    args = {"x_ptr": x2, "codes_ptr": codes, "scales_ptr": scales, "M": m, "stride_xm": x2.stride(0),
            **_sizes(spec, None, k)}
    args |= {"smooth_ptr": smooth.contiguous()} if quant.smooth else {}
    args |= {"lora_down_ptr": lora_down.contiguous(), "down_ptr": down} if spec.rank else {}
    args |= {"act_scale_ptr": act_scale.reshape(1)} if quant.fmt == "nvfp4" else {}

    def run(config: QuantizeConfig) -> None:
        _launch(kernel, spec, (math.ceil(m / config.block_m),), {**args, **tile_constexprs(spec, config, m, 0, k)},
                config)

    configs = quantize_configs(spec, target, m)
    config = _choose((spec.name, _device_key(device), k, m_bucket(m)), configs, run)
    run(config)
    return codes, scales, down


# ---------------------------------------------------------------------------------------------------------
# Kernel B


def _row_strides(operand: torch.Tensor, lead: tuple[int, ...], n: int, where: str, index: int):
    """(tensor, inner, stride_outer, stride_inner, stride_n) that address `operand` broadcast to [*lead, n]
    with rows split as m = outer·inner + inner_index; a layout that needs more than two row levels is copied."""
    try:
        expanded = operand.expand(*lead, n)
    except RuntimeError as exc:
        raise KernelInputError(f"epilogue operand {index} of shape {tuple(operand.shape)} does not broadcast to "
                               f"the output {(*lead, n)}", where=where) from exc
    # merge row dims whose strides chain (size-1 dims merge with anything)
    dims: list[list[int]] = []  # [size, stride]
    for size, stride in zip(expanded.shape[:-1], expanded.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    if len(dims) > 2:
        expanded = expanded.contiguous()
        dims = [[math.prod(lead), n]]
    if not dims:
        dims = [[1, 0]]
    if len(dims) == 1:
        dims = [[1, 0]] + dims
    (_, stride_outer), (inner, stride_inner) = dims
    return expanded, inner, stride_outer, stride_inner, expanded.stride(-1)


def _check_branch_epilogue(down, lora_up, bias, operands, spec: GemmSpec | WeightOnlySpec, lead: tuple, n: int,
                           dtype: torch.dtype, device: torch.device, where: str) -> None:
    """The low-rank up projection's inputs, the bias and the epilogue operands against the spec."""
    if spec.rank:
        _check_tensor(down, "down", where, shape=(*lead, spec.rank), dtype=dtype, device=device)
        _check_tensor(lora_up, "lora_up (L1)", where, shape=(n, spec.rank), dtype=dtype, device=device)
    else:
        _absent(down, "down", where)
        _absent(lora_up, "lora_up (L1)", where)
    if spec.bias:
        _check_tensor(bias, "bias", where, shape=(n,), device=device)
    else:
        _absent(bias, "bias", where)
    _require(len(operands) == spec.operand_count,
             f"{len(operands)} epilogue operands given, the spec's epilogue reads {spec.operand_count}", where)
    for index, operand in enumerate(operands):
        _check_tensor(operand, f"epilogue operand {index}", where, device=device)


def _branch_epilogue_args(down, lora_up, bias, operands, spec: GemmSpec | WeightOnlySpec, lead: tuple, n: int,
                          where: str) -> dict:
    """Kernel arguments, by name, for the branch, the bias and the epilogue operands."""
    args: dict = {}
    if spec.rank:
        down_rows = _rows(down)
        args |= {"down_ptr": down_rows, "stride_down": down_rows.stride(0), "lora_up_ptr": lora_up.contiguous()}
    args |= {"bias_ptr": bias.contiguous()} if spec.bias else {}
    for index, operand in enumerate(operands):
        names = (f"op{index}_ptr", f"op{index}_inner", f"op{index}_stride_outer", f"op{index}_stride_inner",
                 f"op{index}_stride_n")
        args |= dict(zip(names, _row_strides(operand, lead, n, where, index)))
    return args


def _sizes(spec: KernelSpec, n: int | None, k: int) -> dict:
    """The run-time N and K arguments of a spec that leaves them open (M is always one)."""
    return ({"N": n} if n is not None and not spec.n else {}) | ({} if spec.k else {"K": k})


def _launch(kernel, spec: KernelSpec, grid: tuple, values: dict, config) -> None:
    """Run `kernel` with `values` bound by name to the spec's signature."""
    kernel[grid](*signature_of(spec).bind(values), num_warps=config.num_warps, num_stages=config.num_stages)


def gemm(a_codes: torch.Tensor, a_scales: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor,
         w_tscale: torch.Tensor | None, down: torch.Tensor | None, lora_up: torch.Tensor | None,
         bias: torch.Tensor | None, operands: Sequence[torch.Tensor], next_smooth: torch.Tensor | None,
         next_lora_down: torch.Tensor | None, spec: GemmSpec, a_tscale: torch.Tensor | None = None,
         next_act_scale: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Kernel B; see the module docstring for the outputs. nvfp4 reads the activation's per-tensor scale
    `a_tscale` (and `next_act_scale` for a quantize-for-next-layer epilogue in nvfp4)."""
    where = f"fused_gemm ({spec.name})"
    dtype = model_dtype(spec.dtype)
    act = ActQuant(spec.act, spec.group_size)
    device = a_codes.device
    lead = tuple(a_codes.shape[:-1])
    n = w_codes.shape[0]
    _require(spec.n is None or n == spec.n, f"the weight has N = {n}, the kernel was generated for N = {spec.n}",
             where)
    k = spec.k if spec.k is not None else (a_codes.shape[-1] * 2 if act.packed else a_codes.shape[-1])
    packed = packed_act(act, lead, k, dtype)
    columns = packed.codes_shape[-1]
    _check_tensor(a_codes, "a_codes", where, shape=packed.codes_shape, dtype=packed.codes_dtype)
    _check_tensor(a_scales, "a_scales", where, shape=packed.scales_shape, dtype=packed.scales_dtype, device=device)
    _check_tensor(w_codes, "w_codes", where, shape=(n, columns), dtype=packed_code_dtype(spec.weight),
                  device=device)
    _check_tensor(w_scales, "w_scales", where, shape=(packed.groups, n), dtype=scale_dtype(spec.weight, dtype),
                  device=device)
    if spec.act == "nvfp4":
        _check_tensor(w_tscale, "w_tscale", where, dtype=torch.float32, device=device)
        _require(w_tscale.numel() in (1, n), f"w_tscale must hold one value or {n} (one per output channel), "
                 f"got shape {tuple(w_tscale.shape)}", where)
    else:
        _absent(w_tscale, "w_tscale", where)
    _check_act_scale(a_tscale, spec.act, "a_tscale", where, device)
    _check_branch_epilogue(down, lora_up, bias, operands, spec, lead, n, dtype, device, where)
    qn = spec.quantize_next
    if qn is not None and qn.quant.smooth:
        _check_tensor(next_smooth, "next_smooth (λ′)", where, shape=(n,), device=device)
    else:
        _absent(next_smooth, "next_smooth (λ′)", where)
    if qn is not None and qn.rank:
        _check_tensor(next_lora_down, "next_lora_down (L2′)", where, shape=(qn.rank, n), dtype=dtype,
                      device=device)
    else:
        _absent(next_lora_down, "next_lora_down (L2′)", where)
    _check_act_scale(next_act_scale, qn.quant.fmt if qn is not None else "", "next_act_scale", where, device)

    m = math.prod(lead)
    inputs = {"a_codes_ptr": a_codes.reshape(m, columns).contiguous(),
              "a_scales_ptr": a_scales.reshape(m, a_scales.shape[-1]).contiguous(),
              "w_codes_ptr": w_codes.contiguous(), "w_scales_ptr": w_scales.contiguous(), "M": m,
              **_sizes(spec, n, k)}
    # the kernel reads one α per output channel: the weight's scale × the activation's, as svdq.gemm multiplies
    inputs |= {"w_tscale_ptr": (w_tscale.reshape(-1) * a_tscale.reshape(())).expand(n).contiguous()} \
        if spec.act == "nvfp4" else {}
    inputs |= _branch_epilogue_args(down, lora_up, bias, operands, spec, lead, n, where)
    next_inputs = {"smooth": next_smooth.contiguous() if next_smooth is not None else None,
                   "lora_down": next_lora_down.contiguous() if next_lora_down is not None else None}

    def launch(target: Target | None) -> list[torch.Tensor]:
        """Allocate the outputs and run kernel B for `target` (None: nothing to run, M = 0)."""
        outputs: list[torch.Tensor] = []
        args = dict(inputs)
        if spec.emits_output:
            outputs.append(torch.empty((*lead, n), dtype=dtype, device=device))
            args["out_ptr"] = outputs[-1]
        next_down_acc = None
        if qn is not None:
            next_packed = packed_act(qn.quant, lead, n, dtype)
            outputs += [torch.empty(next_packed.codes_shape, dtype=next_packed.codes_dtype, device=device),
                        torch.empty(next_packed.scales_shape, dtype=next_packed.scales_dtype, device=device)]
            args |= {"next_codes_ptr": outputs[-2], "next_scales_ptr": outputs[-1]}
            args |= {"next_smooth_ptr": next_inputs["smooth"]} if qn.quant.smooth else {}
            args |= {"next_act_scale_ptr": next_act_scale.reshape(1)} if qn.quant.fmt == "nvfp4" else {}
            if qn.rank:
                next_down_acc = torch.zeros((*lead, qn.rank), dtype=torch.float32, device=device)
                args |= {"next_lora_down_ptr": next_inputs["lora_down"], "next_down_ptr": next_down_acc}
        if target is not None:
            _run_gemm(spec, target, args, m, n, k, next_down_acc)
        return outputs + ([next_down_acc.to(dtype)] if next_down_acc is not None else [])

    if m == 0:
        return launch(None)
    target = current_target(device)
    if nvfp4_path(spec, target) == "dot_scaled" and not _dot_scaled_verified(spec, device, launch, target):
        target = dataclasses.replace(target, fp4_mma=False)
    return launch(target)


def _run_gemm(spec: GemmSpec, target: Target, args: dict, m: int, n: int, k: int,
              next_down_acc: torch.Tensor | None) -> None:
    kernel = load_kernel(spec, target)

    def run(config: GemmConfig) -> None:
        if next_down_acc is not None:
            next_down_acc.zero_()
        grid = (math.ceil(m / config.block_m) * math.ceil(n / config.block_n),)
        _launch(kernel, spec, grid, {**args, **tile_constexprs(spec, config, m, n, k)}, config)

    configs = gemm_configs(spec, target, m)
    key = (spec.name, nvfp4_path(spec, target), _device_key(args["a_codes_ptr"].device), n, k, m_bucket(m))
    run(_choose(key, configs, run))


_FP4_CHECKED: dict[tuple[str, str], bool] = {}


def _dot_scaled_verified(spec: GemmSpec, device: torch.device, launch: Callable[[Target], list[torch.Tensor]],
                         target: Target) -> bool:
    """Whether this Triton's native FP4 MMA computes what the exact dequantize path computes, checked once per
    spec and device on the first real inputs (its NVFP4 lowering has changed between Triton releases)."""
    key = (spec.hash, _device_key(device))
    if key not in _FP4_CHECKED:
        exact = launch(dataclasses.replace(target, fp4_mma=False))
        try:
            native = launch(target)
            agrees = all(_agree(a, b) for a, b in zip(native, exact))
            reason = "its results differ from the exact dequantize path"
        except Exception as exc:  # a Triton without this lowering fails to compile: use the dequantize path
            agrees, reason = False, f"it does not compile here ({type(exc).__name__}: {exc})"
        if not agrees:
            warnings.warn(f"{spec.name}: tl.dot_scaled is not used on {_device_key(device)} because {reason}; "
                          f"the exact dequantize path runs instead", RuntimeWarning, stacklevel=3)
        _FP4_CHECKED[key] = agrees
    return _FP4_CHECKED[key]


def _agree(native: torch.Tensor, exact: torch.Tensor) -> bool:
    if not native.is_floating_point():  # codes of the next layer: allow rare flips from summation order
        return bool((native != exact).float().mean() <= 0.01)
    error = (native.float() - exact.float()).norm() / exact.float().norm().clamp_min(1e-30)
    return bool(error <= 1e-3)


# ---------------------------------------------------------------------------------------------------------
# Kernel W (W4A16)


def weight_only_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor, down: torch.Tensor | None,
                       lora_up: torch.Tensor | None, bias: torch.Tensor | None, operands: Sequence[torch.Tensor],
                       spec: WeightOnlySpec) -> torch.Tensor:
    """Kernel W: x [..., K] · dequantize(W)ᵀ + down·L1ᵀ + bias, then the epilogue → [..., N]."""
    where = f"fused_weight_only_linear ({spec.name})"
    dtype = model_dtype(spec.dtype)
    _require(x.dim() >= 1 and x.shape[-1] > 0, f"x must be [..., K] with K > 0, got {tuple(x.shape)}", where)
    k = x.shape[-1]
    _require(spec.k is None or k == spec.k, f"x has K = {k}, the kernel was generated for K = {spec.k}", where)
    _check_tensor(x, "x", where, dtype=dtype)
    device = x.device
    n = w_codes.shape[0]
    _require(spec.n is None or n == spec.n, f"the weight has N = {n}, the kernel was generated for N = {spec.n}",
             where)
    groups = -(-k // spec.group_size)
    _check_tensor(w_codes, "w_codes", where, shape=(n, groups * spec.group_size // 2), dtype=torch.uint8,
                  device=device)
    _check_tensor(w_scales, "w_scales", where, shape=(groups, n), dtype=dtype, device=device)
    lead = tuple(x.shape[:-1])
    _check_branch_epilogue(down, lora_up, bias, operands, spec, lead, n, dtype, device, where)
    out = torch.empty((*lead, n), dtype=dtype, device=device)
    m = math.prod(lead)
    if m == 0:
        return out
    target = current_target(device)
    kernel = load_kernel(spec, target)
    x2 = _rows(x)
    args = {"x_ptr": x2, "stride_xm": x2.stride(0), "w_codes_ptr": w_codes.contiguous(),
            "w_scales_ptr": w_scales.contiguous(), "out_ptr": out, "M": m, **_sizes(spec, n, k)}
    args |= {"codebook_ptr": code_table(spec.weight, device)} if spec.weight == "nf4" else {}
    args |= _branch_epilogue_args(down, lora_up, bias, operands, spec, lead, n, where)

    def run(config: WeightOnlyConfig) -> None:
        grid = (math.ceil(m / config.block_m) * math.ceil(n / config.block_n),)
        _launch(kernel, spec, grid, {**args, **tile_constexprs(spec, config, m, n, k)}, config)

    configs = weight_only_configs(spec, target, m)
    run(_choose((spec.name, _device_key(device), n, k, m_bucket(m)), configs, run))
    return out
