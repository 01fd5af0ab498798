"""quantize_weights: choose each weight's form by measured output error, quantize it (the residual, where it keeps
a branch), and move layers that exceed the sensitivity bounds to a safer scheme.

Requires: calibrate (and smooth/lowrank where the scheme asks for them). Ensures:
- per-layer choice (`layer_choice`): each weight's compiled form (its group's λ and its branch) is measured
  against the same scheme without the branch and without either, on the calibration rows (the worst of its
  call sites), and the most accurate is kept (a tie keeps the simpler); so smoothing or a branch never makes a
  layer worse than plain quantization at its precision. `LinearInfo.choice` lists every candidate's error;
- sensitivity ladder (`fallback_error` for W4A4/W8A8 layers, also `weight_only_error` for weight-only ones; None
  = off): a weight whose best error exceeds its bound moves to the next scheme that stores it at no fewer bits
  than the preset — weight-only at `weight_only_format` (keeping λ and branch where they pay), then int8
  weight-only, then 16-bit (a convolution has no weight-only form) — the first that meets the bound;
  `LinearInfo.fallback` says what happened;
- a dropped smoothing division or branch is removed from the graph, and `LinearInfo.scheme` is the form kept;
- every non-16-bit weight is quantized once (`quantize_weight` with the kept scheme's format and group, its
  codes rounded to the nearest or, with `weight_rounding="gptq"`, by GPTQ against the smoothed calibration rows
  of its call sites; a weight shared by several call sites included; a k×k convolution's as its tap-major im2col matrix,
  svdq_compiler.conv); the QTensor is kept in `ctx.quantized` for `lower`, and the graph's weight is replaced
  by its dequantized value, so the graph computes the model with quantized weights and 16-bit activations;
- `LinearInfo.errors["output_rel"]` is ‖y_q − y‖/‖y‖ of the layer as it will run (activation quantization,
  shift, branch) against the FP layer, on the calibration rows.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx

from svdq_compiler.config import FP_SCHEME, QuantConfig, Scheme
from svdq_compiler.fx_utils import drop_unused_attrs, erase_unused
from svdq_compiler.ir import LinearInfo, OpTag, get_attr_value, set_attr_value
from svdq_compiler.calibration import Calibration
from svdq_compiler.pipeline import PassContext, PassResult, register_pass
from svdq_compiler.quant import QTensor, dequantize, quantize_weight
from svdq_compiler.svdquant import (GroupProblem, branch_add, conv_geometry, every_quantized_weight_stored,
                                   group_problem, layer_weight, members_by_group, quant_op)


def _branches(gm: torch.fx.GraphModule, infos: list[LinearInfo]) -> dict | None:
    branches = {info.weight: (get_attr_value(gm, info.lora_up).float(), get_attr_value(gm, info.lora_down).float())
                for info in infos if info.lora_up is not None}
    return branches or None


def relative_errors(problem: GroupProblem, smooth: torch.Tensor | None, dequantized: dict[str, torch.Tensor],
                    branches: dict | None) -> dict[str, float]:
    errors = problem.errors(smooth, {k: v.float() for k, v in dequantized.items()}, branches)
    energy = problem.reference_energy()
    return {name: (errors[name] / energy[name]) ** 0.5 if energy[name] > 0 else 0.0 for name in errors}


def _drop_smoothing(node: torch.fx.Node, info: LinearInfo) -> tuple[list[torch.fx.Node], list[str]]:
    """Make `node` read its raw input; returns the node and attribute that may be dead."""
    x = node.args[0]
    if quant_op(x) != OpTag.SMOOTH_DIV:
        return [], []
    node.replace_input_with(x, x.args[0])
    attrs = [info.smooth] if info.smooth else []
    info.smooth = info.smooth_alpha = info.smooth_beta = None
    return [x], attrs


def _drop_branch(node: torch.fx.Node, info: LinearInfo) -> tuple[list[torch.fx.Node], list[str]]:
    """Remove `node`'s branch (up projection and add); returns the nodes and attributes that may be dead."""
    total = branch_add(node)
    if total is None:
        return [], []
    up = total.args[1]
    total.replace_all_uses_with(node)
    attrs = [a for a in (info.lora_up, info.lora_down) if a]
    info.lora_up = info.lora_down = None
    info.rank = 0
    return [total, up], attrs


@dataclass(frozen=True)
class Candidate:
    """One way to store a weight: a scheme, with or without the group's λ and its branch."""

    scheme: Scheme
    smooth: bool
    branch: bool

    def effective(self) -> Scheme:
        """The scheme as stored: smoothing and rank as kept."""
        if self.scheme.kind == "fp":
            return self.scheme
        return dataclasses.replace(self.scheme, smooth=self.smooth, rank=self.scheme.rank if self.branch else 0)

    def describe(self) -> str:
        if self.scheme.kind == "fp":
            return "fp16"
        extras = (["+smooth" if self.scheme.act is not None else "+awq"] if self.smooth else []) + \
                 ([f"+r{self.scheme.rank}"] if self.branch else [])
        base = dataclasses.replace(self.scheme, smooth=False, rank=0).describe()
        return " ".join([base, *extras]) if extras else f"{base} plain"


def _bits(scheme: Scheme) -> int:
    return 16 if scheme.weight is None else 8 if scheme.weight == "int8" else 4


def _ladder(scheme: Scheme, config: QuantConfig, convolution: bool) -> list[tuple[Scheme, float | None]]:
    """The schemes a weight may take, its own first, then safer ones at no fewer bits, each with its error bound
    (None: accepted as it is); 16-bit last."""
    def bound(candidate: Scheme) -> float | None:
        bounds = [config.fallback_error] + ([config.weight_only_error] if candidate.act is None else [])
        bounds = [b for b in bounds if b is not None]
        return min(bounds) if bounds else None

    ladder = [(scheme, bound(scheme))]
    if ladder[0][1] is None:
        return ladder
    if not convolution:  # a convolution has no weight-only form
        for name in ("w4a16", "w8a16"):
            safer = dataclasses.replace(config.scheme(name), rank=scheme.rank)
            if _bits(safer) >= _bits(scheme) and all(
                    dataclasses.replace(safer, smooth=s.smooth) != s for s, _ in ladder):
                ladder.append((safer, bound(safer)))
    return ladder + [(FP_SCHEME, None)]


def _candidates(scheme: Scheme, smooth: torch.Tensor | None, branches: dict | None, choose: bool
                ) -> list[Candidate]:
    """The compiled form (the group's λ and branch, where it has them) and, with `choose`, its reductions,
    simplest first, so a tie keeps the simpler one."""
    compiled = Candidate(scheme, smooth is not None, bool(branches))
    if not choose:
        return [compiled]
    forms = [Candidate(scheme, False, False), Candidate(scheme, compiled.smooth, False), compiled]
    return list(dict.fromkeys(forms))


def _measure(problem: GroupProblem, candidate: Candidate, smooth: torch.Tensor | None, branches: dict | None,
             compiled_residuals: dict[str, torch.Tensor], rounding: str
             ) -> tuple[dict[str, QTensor], dict[str, float]]:
    """The candidate's quantized weights (rounded to the nearest, or by GPTQ against the calibration rows) and
    per-member relative errors on the calibration rows."""
    scheme = candidate.scheme
    lam = smooth if candidate.smooth else None
    kept = branches if candidate.branch else None
    if candidate.branch:
        # only the compiled form keeps the branch, and its residual is what the graph holds: Ŵ − L1·L2 (with no
        # smoothing, W − L1·L2; the full weight plus the branch would count the branch twice)
        residuals = compiled_residuals
    else:
        residuals = problem.smoothed(lam)
    hessians = problem.hessians(lam) if rounding == "gptq" else {}
    quantized = {k: quantize_weight(r.to(problem.dtype), scheme.weight, scheme.weight_group, name=k,
                                    hessian=hessians.get(k)) for k, r in residuals.items()}
    evaluated = problem if scheme == problem.scheme else dataclasses.replace(problem, scheme=scheme)
    return quantized, relative_errors(evaluated, lam, {k: dequantize(q) for k, q in quantized.items()}, kept)


def choose_forms(problem: GroupProblem, smooth: torch.Tensor | None, branches: dict | None,
                 compiled_residuals: dict[str, torch.Tensor], config: QuantConfig, convolution: bool
                 ) -> dict[str, "Decision"]:
    """Per weight: the candidate kept, its quantized weight and errors, and every measurement (module doc)."""
    ladder = _ladder(problem.scheme, config, convolution)
    pending = set(problem.weights)
    decisions: dict[str, Decision] = {}
    tried: dict[str, list[tuple[Candidate, float]]] = {k: [] for k in pending}
    for scheme, bound in ladder:
        if not pending:
            break
        if scheme.kind == "fp":
            for key in pending:
                decisions[key] = Decision(Candidate(FP_SCHEME, False, False), None, {}, tried[key])
            break
        scheme_branches = branches if scheme.rank else None
        measured = []
        for candidate in _candidates(scheme, smooth, scheme_branches, config.layer_choice):
            quantized, errors = _measure(problem, candidate, smooth, scheme_branches, compiled_residuals,
                                         config.weight_rounding)
            measured.append((candidate, quantized, errors))
        for key in sorted(pending):
            def worst(errors):
                return max(errors[m.name] for m in problem.members if m.weight_key == key)

            results = [(candidate, quantized[key], errors, worst(errors)) for candidate, quantized, errors in measured]
            tried[key] += [(candidate, error) for candidate, _, _, error in results]
            candidate, qtensor, errors, error = min(results, key=lambda r: r[3])  # first minimum: the simplest
            if bound is None or error <= bound:
                decisions[key] = Decision(candidate, qtensor, errors, tried[key])
        pending -= set(decisions)
    return decisions


@dataclass
class Decision:
    candidate: Candidate
    qtensor: QTensor | None  # None: 16-bit
    errors: dict[str, float]  # per member
    tried: list[tuple[Candidate, float]]  # every candidate measured, with the weight's worst member error

    def note(self) -> str:
        """Why this form: every candidate measured, with its worst relative error on the calibration rows (the
        candidates of the kept scheme by their extras alone)."""
        def label(candidate: Candidate) -> str:
            same = candidate.scheme == self.candidate.scheme
            return candidate.describe().split(" ", 2)[-1] if same else candidate.describe()

        measured = ", ".join(f"{label(c)} {e:.4f}" for c, e in self.tried)
        moved = any(c.scheme != self.candidate.scheme for c, _ in self.tried)
        return f"chose {self.candidate.describe() if moved else label(self.candidate)}: {measured}"


@register_pass("quantize_weights", requires=("linears", "calibration"), produces=("quantized",),
               ensures=every_quantized_weight_stored,
               summary="weights quantized (QTensors in ctx.quantized), per-layer output errors, sensitivity fallback")
@torch.no_grad()
def quantize_weights(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Quantize, measure, fall back (module doc)."""
    config = ctx.config
    calibration: Calibration = ctx.calibration
    store: dict = {}
    ctx.quantized = store
    groups = members_by_group(gm, lambda info: info.scheme is not None and info.scheme.kind != "fp")
    fallbacks, errors_seen, dead, touched_attrs = [], [], [], []
    kept_forms: Counter = Counter()
    for members_all in ctx.progress(groups.values(), "quantize_weights", total=len(groups)):
        by_scheme: dict[Scheme, list] = {}
        for node, info in members_all:
            by_scheme.setdefault(info.scheme, []).append((node, info))
        for scheme, members in by_scheme.items():
            infos = [info for _, info in members]
            problem = group_problem(gm, members, calibration, scheme)
            smooth = get_attr_value(gm, infos[0].smooth) if infos[0].smooth else None
            branches = _branches(gm, infos)
            residuals = {info.weight: layer_weight(gm, node, info).float() for node, info in members}
            # a convolution's weight is quantized as its im2col matrix and stored back in the conv's shape
            graph_shape = {info.weight: conv_geometry(gm, node, info).weight for node, info in members
                           if info.kind == "conv"}
            decisions = choose_forms(problem, smooth, branches, residuals, config, bool(graph_shape))
            for node, info in members:
                decision = decisions[info.weight]
                kept = decision.candidate
                if not kept.smooth:
                    nodes, attrs = _drop_smoothing(node, info)
                    dead += nodes
                    touched_attrs += attrs
                if not kept.branch:
                    nodes, attrs = _drop_branch(node, info)
                    dead += nodes
                    touched_attrs += attrs
                info.note_error("output_rel", decision.errors.get(info.name, 0.0))
                if len(decision.tried) > 1:
                    info.choice = decision.note()
                if kept.scheme == problem.scheme:  # (a convolution's problem has its per-tap activation groups)
                    info.scheme = dataclasses.replace(scheme, smooth=kept.smooth and scheme.smooth,
                                                      rank=scheme.rank if kept.branch else 0)
                else:
                    info.scheme = kept.effective()
                    if kept.scheme.act is None:
                        info.shift = 0.0
                    group = kept.scheme.weight_group
                    info.pad_k = -info.in_features % group if group else 0
                    before = min(error for candidate, error in decision.tried if candidate.scheme == problem.scheme)
                    bound = min(b for b in (config.fallback_error, config.weight_only_error) if b is not None)
                    info.fallback = (f"{scheme.describe()} error {before:.3f} > {bound} → " +
                                     ("16-bit" if kept.scheme.kind == "fp" else
                                      f"{kept.describe()} (error {info.errors['output_rel']:.3f})"))
                    fallbacks.append(f"{info.name}: {info.fallback}")
            for key, decision in decisions.items():
                if decision.qtensor is None:
                    value = problem.weights[key].to(problem.dtype)
                else:
                    store[key] = decision.qtensor
                    value = dequantize(decision.qtensor).to(problem.dtype)
                set_attr_value(gm, key, graph_shape.get(key, lambda w: w)(value))
            errors_seen += [info.errors["output_rel"] for info in infos if info.scheme.kind != "fp"]
            kept_forms.update(decisions[info.weight].candidate.describe() for info in infos)
    erase_unused(gm, dead)
    dropped = drop_unused_attrs(gm, touched_attrs)
    stats = {
        "weights_quantized": len(store),
        "output_rel_median": round(statistics.median(errors_seen), 4) if errors_seen else None,
        "output_rel_max": round(max(errors_seen), 4) if errors_seen else None,
        "fallback_bound": config.fallback_error,
        "fallbacks": fallbacks,
        "layer_choice": config.layer_choice,
        "kept_forms": dict(kept_forms),
        "dropped_attributes": len(dropped),
    }
    return PassResult(gm, bool(store) or bool(fallbacks), stats)
