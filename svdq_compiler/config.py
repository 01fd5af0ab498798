"""Quantization configuration: one QuantConfig per compile, built from a named preset plus overrides.

Every knob of the method is a field here (formats, group sizes, rank, smoothing search, low-rank iterations,
skip rules, per-role schemes, sensitivity fallback), so a preset is only a set of field values.

The model dtype (of the 16-bit weights, scales, λ and the low-rank branch) is not a field: it is the captured
module's own dtype, so the graph's inputs keep the dtype the module was captured with. Convert the model first
(`load_model(name, dtype=torch.bfloat16)`, `svdq-compile --dtype bfloat16`) to compile it in bf16 as the
reference does for FLUX.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from svdq_compiler.errors import InputError

SMOOTH_SEARCHES = ("svdquant", "smoothquant", "none")
CALIB_SOURCES = ("inputs", "weights")
CALIB_PROPAGATIONS = ("fp", "quantized")
SVD_METHODS = ("full", "randomized")
WEIGHT_ROUNDINGS = ("rtn", "gptq")
CONV_KXK = ("keep", "w4a4", "w4a4-all")
ONNX_FORMS = ("portable", "custom")  # svdq_compiler.export_onnx(form=...); here so that the CLI parser needs no torch
# Role names are defined in svdq_compiler.ir.Role; schemes a role can be given:
SCHEME_NAMES = ("w4a4", "w4a16", "w8a16", "fp")
GELU_SHIFT = 0.171875
# The unsigned activation format of each signed integer one (the same weights; codes from 0 for shifted inputs).
UNSIGNED_OF = {"int4": "uint4", "int8": "uint8"}
SILU_SHIFT = 0.2734375  # −min SiLU(x) ≈ 0.2785, rounded as the reference does


@dataclass(frozen=True)
class Scheme:
    """How one linear is executed. `weight`/`act` None means that operand stays 16-bit.

    A group size of 0 means per output channel (weights) or per token (activations).
    """

    weight: str | None
    act: str | None
    weight_group: int
    act_group: int
    smooth: bool
    rank: int
    shift: float = 0.0  # constant added to a non-negative-able input (post-GELU) before unsigned quantization

    @property
    def kind(self) -> str:
        from svdq_compiler.quant import FORMATS  # torch-free until a scheme is asked for (fast --help)

        if self.weight is None:
            return "fp"
        return "weight_only" if self.act is None else "w4a4" if FORMATS[self.weight].four_bit else "w8a8"

    def describe(self) -> str:
        if self.weight is None:
            return "fp16"
        w = f"W:{self.weight}" + (f"/g{self.weight_group}" if self.weight_group else "/ch")
        a = "A:16" if self.act is None else f"A:{'u' if self.shift else ''}{self.act}" + (
            f"/g{self.act_group}" if self.act_group else "/tok")
        extra = (" +smooth" if self.smooth else "") + (f" +r{self.rank}" if self.rank else "")
        return f"{w} {a}{extra}"


FP_SCHEME = Scheme(weight=None, act=None, weight_group=0, act_group=0, smooth=False, rank=0)


@dataclass(frozen=True)
class QuantConfig:
    """All settings of one compile. Build it with `QuantConfig.preset(name, **overrides)`."""

    preset_name: str = "int4"
    # Formats of the main ("w4a4") scheme.
    weight_format: str | None = "int4"
    act_format: str | None = "int4"
    group_size: int = 64  # along K, for weights and activations; 0 = per channel / per token (int8 only)
    rank: int = 32  # low-rank branch; 0 disables it
    # Smoothing: "svdquant" searches λ = a^α / b^β over the reference grid family, "smoothquant" searches α
    # with β = 1 − α, "none" keeps λ = 1.
    smooth: str = "svdquant"
    # grid steps: c ∈ {1/grid, …, (grid−1)/grid}; 10 (19 candidates) by evidence: the reference's 20 (39) costs
    # twice the search for no better output (bench/results/compile-speed-*.json)
    smooth_grid: int = 10
    # Low-rank refinement L = SVD_r(Ŵ − Q(Ŵ − L_prev)); 1 is the plain truncated SVD. 3 by evidence
    # (bench/results/lowrank-iterations.json): held-out error −7.8% on MiniLM and −10.5% on tiny-flux against 1;
    # 5 adds under 2%, and 10 overfits the calibration sample (worse than 5 on both).
    iterations: int = 3
    early_stop: bool = True
    # the low-rank pass's SVD: "full" (LAPACK) or "randomized", both float64; randomized by evidence: within 0.4%
    # of the optimal residual at 2–6× less time (bench/results/lowrank-svd.json)
    svd: str = "randomized"
    # The smoothing search decomposes every candidate's weights only to rank them: a randomized SVD suffices.
    search_svd: str = "randomized"
    # The smoothing search ranks its candidates, and lowrank its refinement iterates, on this many of the sample
    # rows (a seeded subset; None: all); the reported errors are those of the subset.
    search_rows: int | None = 128
    # ... and on at most this many output rows of each weight (a seeded subset; None: all), each candidate's
    # branch still being the whole weight's: a wide layer's search costs in proportion to its output rows.
    search_outputs: int | None = 1024
    # Coarse to fine: every other candidate of each family first, then the neighbours of each family's best
    # (15 of 19 candidates evaluated for smooth_grid 10); False evaluates every candidate. On by evidence: the
    # same λ as the full grid for all 37 tiny-flux groups (bench/results/smooth-search-flux12b.json).
    search_refine: bool = True
    # Post-GELU inputs are shifted by this constant and quantized unsigned (int4 → uint4, int8 → uint8); 0
    # disables.
    gelu_shift: float = GELU_SHIFT
    # k×k convolutions: "keep" 16-bit; "w4a4" quantizes the U-Net resnet convs (input is SiLU output, output
    # reaches no graph output) with the main formats, as the reference does: weights per output channel and
    # group of input channels at each kernel tap, no smoothing, no branch, the SiLU input shifted by
    # `silu_shift` and quantized unsigned (int4 only; 0 disables); "w4a4-all" also quantizes the other 2-D
    # convs (embedders, samplers, shortcuts). Grouped, depthwise and transposed convolutions stay 16-bit.
    conv_kxk: str = "keep"
    silu_shift: float = SILU_SHIFT
    # Scheme per structural role ("w4a4" = the main formats above, "w4a16" = weight-only at `weight_only_format`,
    # "w8a16" = int8 weight-only per output channel, "fp" = 16-bit).
    role_schemes: dict[str, str] = field(default_factory=lambda: {
        "adaln": "w4a16", "embed": "fp", "final": "fp", "cross_kv": "fp"})
    weight_only_format: str = "int4"  # the weight format of "w4a16" layers ("int8": per channel, group 0)
    weight_only_group: int = 64
    # Weight-only layers (AdaLN and the like, run at M = batch) are protected like the others: an activation-aware
    # weight scaling (AWQ: the smoothing search with 16-bit activations, ranked without a branch) and a
    # rank-`weight_only_rank` branch (None: `rank`). `layer_choice` keeps each only where it pays.
    weight_only_smooth: bool = True
    weight_only_rank: int | None = None
    # Per-layer choice by measured output error (quantize_weights): each weight's compiled form (smoothing and
    # branch) is measured against the same format without the branch and without either, on the calibration
    # rows, and the most accurate is kept, so smoothing or a branch never makes a layer worse than plain
    # quantization at its precision (W8A8: never worse than plain per-token INT8).
    layer_choice: bool = True
    # A weight-only layer (its role's scheme, or a fallback) whose best error exceeds this bound (and
    # `fallback_error`) moves up: int8 weight-only (W8A16), then 16-bit. None disables it.
    weight_only_error: float | None = 0.05
    skip: tuple[str, ...] = ()  # regular expressions on qualified layer names: those layers stay 16-bit
    conv1x1_as_linear: bool = True
    # A linear reading a concatenation of differently produced tensors (FLUX single blocks: attention output ‖
    # GELU output) is split into one linear per part, so each part gets its own smoothing, shift and branch.
    split_concat_linears: bool = True
    # Sensitivity fallback: a W4A4/W8A8 layer whose relative output error on calibration rows exceeds this bound
    # moves to weight-only, then int8 weight-only, then fp, never below the preset's own weight precision (the
    # first of these that meets the bounds). None disables it.
    fallback_error: float | None = 0.35
    calib_rows: int = 512  # rows sampled per smoothing group for the searches (bounded memory)
    # How a stored weight's codes are chosen, its scales being the same: "rtn" rounds each to the nearest; "gptq"
    # rounds column by column against the layer's calibration rows, each column's error compensated in the
    # columns after it (the reference's optional GPTQ, on the residual). Off by default, by evidence
    # (bench/results/weight-rounding-minilm.json, held-out token states): it pays where the weights carry the
    # error, w4a16-nf4 0.257 → 0.179, not where 4/8-bit activations do (int4 0.250 → 0.254, w8a8 0.0177 →
    # 0.0180, though each layer's calibration error drops 20%), and costs 6–16× the compile's CPU time.
    weight_rounding: str = "rtn"
    calib_prompts: int = 4  # adapter calibration inputs: prompts × denoising steps (when none are given)
    calib_steps: int = 4
    calib_seed: int = 0
    # Where the searches' activation statistics come from: "inputs" (calibration inputs run through the graph)
    # or "weights" (no data: isotropic Gaussian rows, GELU'd for post-GELU inputs, so every search minimises the
    # weight-space error ‖ΔW‖_F, since E‖ΔW·x‖² = ‖ΔW‖_F² for x ~ N(0, I)).
    calib_source: str = "inputs"
    # Block-wise calibration (the streamed compile): block i's statistics come from the outputs of block i−1
    # computed with its fp weights ("fp", as the reference: quantization error does not accumulate across
    # blocks during calibration) or with its compiled, quantized weights ("quantized": each block is
    # calibrated on what the quantized model feeds it).
    calib_propagation: str = "fp"
    # nvfp4 activations: the calibrated per-tensor scale covers this multiple of the largest |x/λ| seen in
    # calibration before a value saturates (why calibrated, with measurements: svdq_compiler/quant.py)
    nvfp4_act_headroom: float = 16.0
    pad_k: bool = True  # K not divisible by the group size: zero-pad (True) or keep the layer 16-bit (False)
    # A group size no generated kernel serves (int4 groups must be a power of two >= 32) would leave every
    # quantized layer on the slow reference ops: refused unless this says that is intended.
    allow_reference_ops: bool = False

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str = "int4", **overrides: Any) -> "QuantConfig":
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}", fix=f"choose one of: {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        values["preset_name"] = name
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown QuantConfig field(s) {unknown}", fix=f"valid fields: {', '.join(sorted(known))}")
        values = dict(values)
        if "skip" in values:
            values["skip"] = tuple(values["skip"])
        config = cls(**values)
        config.validate()
        return config

    def replace(self, **overrides: Any) -> "QuantConfig":
        return QuantConfig.from_dict({**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["skip"] = list(self.skip)
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def validate(self) -> None:
        self._check_types()

        def check(value, allowed, what):
            if value not in allowed:
                raise InputError(f"{what} must be one of {list(allowed)}, got {value!r}")

        from svdq_compiler.quant import FORMATS, WEIGHT_FORMATS

        check(self.weight_format, WEIGHT_FORMATS + (None,), "weight_format")
        check(self.act_format, tuple(n for n, f in FORMATS.items() if f.act and f.configurable) + (None,),
              "act_format")
        check(self.smooth, SMOOTH_SEARCHES, "smooth")
        check(self.calib_source, CALIB_SOURCES, "calib_source")
        check(self.calib_propagation, CALIB_PROPAGATIONS, "calib_propagation")
        check(self.svd, SVD_METHODS, "svd")
        check(self.search_svd, SVD_METHODS, "search_svd")
        check(self.weight_rounding, WEIGHT_ROUNDINGS, "weight_rounding")
        check(self.weight_only_format, tuple(n for n, f in FORMATS.items() if f.weight_only), "weight_only_format")
        check(self.conv_kxk, CONV_KXK, "conv_kxk")
        if "conv" in self.role_schemes:
            raise InputError("role_schemes['conv'] is not a setting: k×k convolutions follow conv_kxk",
                             fix=f"drop 'conv' from role_schemes and set conv_kxk to one of {list(CONV_KXK)}")
        for role, scheme in self.role_schemes.items():
            check(scheme, SCHEME_NAMES, f"role_schemes[{role!r}]")
        if self.weight_only_format == "int8" and self.weight_only_group != 0:
            raise InputError("int8 weight-only layers are quantized per output channel",
                             fix="set weight_only_group=0 with weight_only_format='int8'")
        if self.weight_only_rank is not None and self.weight_only_rank < 0:
            raise InputError(f"weight_only_rank must be >= 0 or None (the main rank), got {self.weight_only_rank}")
        if self.rank < 0 or self.iterations < 1 or self.group_size < 0 or self.smooth_grid < 2:
            raise InputError("rank >= 0, iterations >= 1, group_size >= 0 and smooth_grid >= 2 are required")
        if self.calib_rows < 1 or self.calib_prompts < 1 or self.calib_steps < 1:
            raise InputError("calib_rows, calib_prompts and calib_steps must be at least 1")
        if self.search_rows is not None and self.search_rows < 1:
            raise InputError(f"search_rows must be at least 1 or None (every sample row), got {self.search_rows}")
        if self.search_outputs is not None and self.search_outputs < 1:
            raise InputError(f"search_outputs must be at least 1 or None (every output row), got "
                             f"{self.search_outputs}")
        if not (isinstance(self.nvfp4_act_headroom, (int, float)) and 1 <= self.nvfp4_act_headroom <= 2 ** 16):
            raise InputError(f"nvfp4_act_headroom must be a number in [1, 65536], got {self.nvfp4_act_headroom!r}",
                             fix="use e.g. 16 (the default)")
        if self.weight_format == "nvfp4" and self.group_size != FORMATS["nvfp4"].default_group:
            raise InputError("nvfp4 uses groups of 16 channels", fix="set group_size=16 or use the nvfp4 preset")
        if self.weight_format is not None and FORMATS[self.weight_format].packing == "halves" \
                and self.group_size == 0:
            raise InputError(f"{self.weight_format} needs a group size", fix="set group_size=64")
        if self.act_format is not None and not self.allow_reference_ops:
            from svdq_compiler.codegen.spec import ActQuant, SpecError

            try:
                ActQuant(self.act_format, self.group_size).validate("QuantConfig")
            except SpecError as exc:
                raise InputError(f"group_size={self.group_size}: {exc.what}, so every quantized layer would run "
                                 f"the slow reference ops", fix="use group_size 32, 64 or 128, or add --set "
                                 "allow_reference_ops=true to accept the reference ops") from None

    def _check_types(self) -> None:
        """Each field has the type its annotation says (a value from --set or JSON can be anything)."""
        hints = typing.get_type_hints(QuantConfig)
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if not _has_type(value, hints[item.name]):
                hint = hints[item.name]
                shown = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
                raise InputError(f"QuantConfig field {item.name} must be {shown}, got {value!r}",
                                 fix=f"e.g. --set {item.name}={json.dumps(getattr(_DEFAULTS, item.name))}")

    # ---- per-layer schemes --------------------------------------------------------------------------------

    def scheme(self, name: str, *, unsigned_input: bool = False) -> Scheme:
        """The Scheme for a scheme name ("w4a4", "w4a16", "w8a16", "fp"); unsigned_input marks a post-GELU input.

        A weight-only scheme smooths (AWQ) and has a branch as `weight_only_smooth` / `weight_only_rank` say."""
        if name == "fp" or self.weight_format is None:
            return FP_SCHEME
        if name == "w8a16":
            fmt, group = "int8", 0
        elif name == "w4a16" or self.act_format is None:
            fmt = self.weight_format if self.act_format is None else self.weight_only_format
            group = self.group_size if self.act_format is None else self.weight_only_group
        if name in ("w4a16", "w8a16") or self.act_format is None:
            rank = self.rank if self.weight_only_rank is None else self.weight_only_rank
            return Scheme(weight=fmt, act=None, weight_group=group, act_group=0,
                          smooth=self.weight_only_smooth and self.smooth != "none", rank=rank)
        shift = self.gelu_shift if (unsigned_input and self.act_format in UNSIGNED_OF) else 0.0
        return Scheme(weight=self.weight_format, act=self.act_format, weight_group=self.group_size,
                      act_group=self.group_size, smooth=self.smooth != "none", rank=self.rank, shift=shift)

    def scheme_for_role(self, role: str, *, unsigned_input: bool = False) -> Scheme:
        return self.scheme(self.role_schemes.get(role, "w4a4"), unsigned_input=unsigned_input)

    def conv_scheme(self, *, silu_input: bool) -> Scheme:
        """The scheme of a k×k convolution under `conv_kxk` = "w4a4": the main formats, without smoothing or
        branch; a SiLU-output input is shifted by `silu_shift` and quantized unsigned (int4)."""
        if self.conv_kxk == "keep" or self.weight_format is None or self.act_format is None:
            return FP_SCHEME
        shift = self.silu_shift if (silu_input and self.act_format == "int4") else 0.0
        return dataclasses.replace(self.scheme("w4a4"), smooth=False, rank=0, shift=shift)


BASELINE = dict(layer_choice=False, weight_only_error=None, weight_only_smooth=False, weight_only_rank=0)

PRESETS: dict[str, dict[str, Any]] = {
    # SVDQuant INT4: smoothing (39-candidate grid) + rank-32 branch + INT4 g64 weights and activations.
    "int4": dict(weight_format="int4", act_format="int4", group_size=64, rank=32, smooth="svdquant"),
    # SVDQuant NVFP4: E2M1 with FP8-E4M3 scales per 16 channels; no GELU shift (FP4 is signed).
    "nvfp4": dict(weight_format="nvfp4", act_format="nvfp4", group_size=16, rank=32, smooth="svdquant",
                  gelu_shift=0.0),
    # INT8 weights and activations with one scale per group of 64 input channels (per token for activations),
    # smoothing and a rank-16 branch (SVDQ W8A8), each kept per layer only where it beats plain INT8; weight-only
    # layers are int8 per channel (nothing below 8 bits). Groups by evidence: all-MiniLM-L6-v2's token-state
    # error 3.3% per channel / per token, 1.8% at g64 (bench/results/w8a8-error-minilm.json).
    # Post-GELU inputs are shifted and quantized uint8, as int4's are uint4: MiniLM 1.77% → 1.58%.
    "w8a8": dict(weight_format="int8", act_format="int8", group_size=64, rank=16, smooth="svdquant",
                 fallback_error=None, weight_only_format="int8", weight_only_group=0),
    # The baselines below reproduce their methods as published: no per-layer choice, no fallback, plain
    # weight-only layers.
    # Weight-only NF4, group 64: the W4A16 baseline.
    "w4a16-nf4": dict(weight_format="nf4", act_format=None, group_size=64, rank=0, smooth="none",
                      fallback_error=None, role_schemes={"embed": "fp", "final": "fp", "cross_kv": "fp"},
                      **BASELINE),
    # Round-to-nearest W4A4: no smoothing, no branch.
    "w4a4-rtn": dict(weight_format="int4", act_format="int4", group_size=64, rank=0, smooth="none",
                     fallback_error=None, **BASELINE),
    # SmoothQuant W4A4: α-only smoothing search, no branch.
    "w4a4-smoothquant": dict(weight_format="int4", act_format="int4", group_size=64, rank=0, smooth="smoothquant",
                             fallback_error=None, **BASELINE),
}


_DEFAULTS = QuantConfig()


def _has_type(value: Any, hint: Any) -> bool:
    """isinstance for the annotations QuantConfig uses: int (not bool), float (int accepted), bool, str, None,
    unions, tuple[T, ...] and dict[K, V]."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_has_type(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_has_type(k, key) and _has_type(v, item) for k, v in value.items())
    return isinstance(value, hint)
