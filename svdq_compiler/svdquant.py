"""The math of an SVDQuant layer group, shared by the smooth, lowrank and quantize_weights passes.

A *group* is the set of linears that share one smoothing vector λ (they read the same tensor, or share a
weight). Its *sites* are the tensors its members read; calibration keeps a row sample of each. A *branch set*
is the weights that share one low-rank down projection L2: q/k/v (or add_q/k/v) reading one tensor are stacked
by rows; every other weight has its own.

For a candidate λ, branch L = (L1, L2) and quantized residual Q(R), member i reading rows X computes

    y_i = Q_a((X + s)/λ) · Q(R_i)ᵀ − (s/λ) · Q(R_i)ᵀ + (X/λ) · L2ᵀ · L1_iᵀ          (bias terms cancel)

against the FP output X · W_iᵀ: the shifted, quantized main path with its bias compensation plus the 16-bit
branch, as the lowered graph computes it. Quantizer inputs are rounded to the model dtype first, as at run
time; products and errors are accumulated in fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.fx

from svdq_compiler.config import Scheme
from svdq_compiler.conv import ConvGeometry
from svdq_compiler.errors import QuantizationError
from svdq_compiler.ir import META_KEY, LinearInfo, OpTag, QuantOpInfo, Role, annotated_linears, get_attr_value
from svdq_compiler.quant import fake_quantize_act, fake_quantize_weight

STACKED_ROLES = (Role.QKV, Role.CROSS_KV)
# The smoothing search evaluates a candidate this many weight elements at a time (1 MiB of fp32 per temporary).
SEARCH_CHUNK_ELEMENTS = 2**18
# and at least this many weight rows (fewer make the error product a narrow, slow matrix product)
SEARCH_CHUNK_ROWS = 64


def smoothing_candidates(search: str, grid: int) -> list[tuple[float, float]]:
    """(α, β) pairs: λ = 1 first, then the activation-only family (c, 0) and SmoothQuant's (c, 1 − c) for
    c ∈ {1/grid, …, (grid−1)/grid} — 39 candidates for grid 20 ("svdquant"), or (c, 1 − c) only
    ("smoothquant")."""
    if search == "none":
        return [(0.0, 0.0)]
    balanced = [(k / grid, (grid - k) / grid) for k in range(1, grid)]
    if search == "smoothquant":
        return [(0.0, 0.0)] + balanced
    return [(0.0, 0.0)] + [(k / grid, 0.0) for k in range(1, grid)] + balanced


def smoothing_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, beta: float,
                    dtype: torch.dtype) -> torch.Tensor:
    """λ_j = a_j^α / b_j^β in fp32, rounded to the model dtype. A channel whose λ is 0 or not finite (a dead
    activation or weight column) gets 1, so one dead channel cannot disable a group's smoothing."""
    if alpha == 0 and beta == 0:
        return torch.ones_like(act_absmax, dtype=dtype)
    scale = act_absmax.float().pow(alpha) / weight_absmax.float().pow(beta)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    scale = scale.to(dtype)
    # Rounding to a narrow dtype can still flush tiny values to 0 or overflow large ones.
    return torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))


@contextlib.contextmanager
def _one_thread():
    """The randomized SVD is many small QR/SVD calls, where a thread pool only adds synchronisation (100× slower
    on a loaded 2-core machine); run them on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _tall(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (matrix.mT, True) if matrix.shape[-2] < matrix.shape[-1] else (matrix, False)


def low_rank(weight: torch.Tensor, rank: int, method: str = "full", *, seed: int = 0,
             oversample: int = 16, power_iterations: int = 4, dtype: torch.dtype = torch.float64,
             near: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors L1 [N, r] = U·Σ and L2 [r, K] = Vᵀ of `weight` [N, K] (or of each matrix of
    a batch [..., N, K]), computed in `dtype` (float64; the smoothing search, which only ranks candidates, uses
    float32). float32 halves the time of the products, but smoothed weights span a wide range (a λ-scaled
    outlier column): outlier-flux nvfp4 lost 0.3 dB (30.09 → 29.78 over three seeds) and float64 restored it.

    "full" is a truncated LAPACK SVD. "randomized" is a Halko–Martinsson–Tropp range finder (Gaussian sketch
    with `oversample` extra columns and `power_iterations` subspace iterations, seeded; one sketch for every
    matrix of a batch) followed by an exact SVD of the small projected matrix; tools/bench_lowrank.py measures
    its excess error against "full". `near`: factors (L1, L2) of a matrix close to `weight` (the previous
    refinement iterate, `refine` in passes/lowrank.py), whose subspace starts the sketch in place of as many
    Gaussian columns: the range is then mostly found, and `power_iterations` can be fewer.
    """
    work = weight.to(dtype)
    rank = min(rank, *work.shape[-2:])
    if rank == 0:
        return work.new_zeros(*work.shape[:-1], 0), work.new_zeros(*work.shape[:-2], 0, work.shape[-1])
    tall, transposed = _tall(work)
    if method == "full":
        u, s, vh = torch.linalg.svd(tall, full_matrices=False)
    elif method == "randomized":
        with _one_thread():
            generator = torch.Generator(device=tall.device).manual_seed(seed)
            width = min(rank + oversample, tall.shape[-1])
            start = None if near is None else (near[1].mT if transposed else near[0]).to(dtype)[..., :width]
            gaussian_width = width - (0 if start is None else start.shape[-1])
            sketch = tall @ torch.randn(tall.shape[-1], gaussian_width, generator=generator, dtype=tall.dtype,
                                        device=tall.device)
            basis = torch.linalg.qr(sketch if start is None else torch.cat([start, sketch], -1)).Q
            for _ in range(power_iterations):
                basis = torch.linalg.qr(tall @ torch.linalg.qr(tall.mT @ basis).Q).Q
            small_u, s, vh = torch.linalg.svd(basis.mT @ tall, full_matrices=False)
            u = basis @ small_u
    else:
        raise ValueError(f"unknown SVD method {method!r}")
    u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    if transposed:  # tallᵀ = weight: swap the roles of U and V
        u, vh = vh.mT, u.mT
    return u * s.unsqueeze(-2), vh


def right_vectors_from_gram(gram: torch.Tensor, rank: int, *, seed: int = 0, oversample: int = 16,
                            power_iterations: int = 2) -> torch.Tensor:
    """V [..., K, rank], the top right singular vectors of a tall W from its Gram matrix `gram` = WᵀW: subspace
    iteration on the Gram matrix (Gaussian start, seeded) and a Rayleigh–Ritz step. Every product is K×K instead
    of N×K, which is what makes it cheaper than `low_rank`'s randomized SVD when the Gram matrix is reused (the
    smoothing search: (W·diag(λ))ᵀ(W·diag(λ)) = diag(λ)·WᵀW·diag(λ) for every candidate λ)."""
    with _one_thread():
        generator = torch.Generator(device=gram.device).manual_seed(seed)
        width = min(rank + oversample, gram.shape[-1])
        basis = torch.linalg.qr(gram @ torch.randn(gram.shape[-1], width, generator=generator, dtype=gram.dtype,
                                                   device=gram.device)).Q
        for _ in range(power_iterations):
            basis = torch.linalg.qr(gram @ basis).Q
        _, vectors = torch.linalg.eigh(basis.mT @ gram @ basis)  # ascending eigenvalues
        return basis @ vectors[..., -min(rank, width):].flip(-1)


def _side_by_side(matrix: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """matrix @ blocks[c] for every c of blocks [C, K, w], as one [N, K] × [K, C·w] product."""
    count, inner, width = blocks.shape
    product = matrix @ blocks.transpose(0, 1).reshape(inner, count * width)
    return product.view(matrix.shape[0], count, width).transpose(0, 1)


def low_rank_scaled(weight: torch.Tensor, scales: torch.Tensor, rank: int, *, seed: int = 0, oversample: int = 16,
                    power_iterations: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """`low_rank(weight · diag(λ), rank, "randomized")` for every λ in `scales` [C, K]: factors L1 [C, N, r] and
    L2 [C, r, K], in weight's dtype, without forming the C scaled matrices. Every product with W·diag(λ) is a
    product with W and a diagonal scaling, so the C candidates' sketches go through W side by side, as one wide
    matrix product (1.5× the throughput of C narrow ones on CPU); the first sketch, with the shared seeded
    Gaussian, is common to all candidates when W is wide."""
    rows, columns = weight.shape
    rank = min(rank, rows, columns)
    wide = rows < columns  # low_rank decomposes the tall orientation: (W·Λ)ᵀ = Λ·Wᵀ when W is wide
    scales = scales.to(weight.dtype).unsqueeze(-1)  # [C, K, 1]

    def tall_times(blocks):  # tall_c @ blocks_c
        return scales * _side_by_side(weight.mT, blocks) if wide else _side_by_side(weight, scales * blocks)

    def tall_t_times(blocks):  # tall_cᵀ @ blocks_c
        return _side_by_side(weight, scales * blocks) if wide else scales * _side_by_side(weight.mT, blocks)

    def orthonormal(blocks):  # small QRs: one thread (_one_thread); the wide products above keep the pool
        with _one_thread():
            return torch.linalg.qr(blocks).Q

    generator = torch.Generator(device=weight.device).manual_seed(seed)
    inner = rows if wide else columns
    width = min(rank + oversample, inner)
    gaussian = torch.randn(inner, width, generator=generator, dtype=weight.dtype, device=weight.device)
    basis = orthonormal(scales * (weight.mT @ gaussian) if wide else tall_times(gaussian.expand(len(scales), -1, -1)))
    for _ in range(power_iterations):
        basis = orthonormal(tall_times(orthonormal(tall_t_times(basis))))
    projected = tall_t_times(basis).mT
    with _one_thread():
        small_u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    u = basis @ small_u
    u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    if wide:
        u, vh = vh.mT, u.mT
    return u * s.unsqueeze(-2), vh


def _stacked(weights: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return weights[keys[0]] if len(keys) == 1 else torch.cat([weights[k] for k in keys])


@dataclass
class Member:
    """One linear of a group: its weight (fp32, unsmoothed), the site it reads, and its FP outputs there."""

    name: str
    weight_key: str
    site: str
    reference: torch.Tensor  # X · Wᵀ on the site's sample rows, fp32


@dataclass
class GroupProblem:
    """Everything needed to evaluate the output error of one group under any λ, branch and quantization."""

    scheme: Scheme
    dtype: torch.dtype  # the model dtype (weights, λ, quantizer inputs)
    weights: dict[str, torch.Tensor]  # weight key → W [N, K] fp32 (the original, unsmoothed weight)
    rows: dict[str, torch.Tensor]  # site → sample rows X [n, K] fp32
    shifts: dict[str, float]  # site → constant added before unsigned quantization
    members: list[Member] = field(default_factory=list)
    branch_sets: list[list[str]] = field(default_factory=list)  # weight keys sharing one L2
    grams: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict, repr=False)  # see _gram
    input_grams: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # see hessians
    # After `subsample_outputs`: the whole weights (a branch is always the whole weight's) and the rows kept
    whole: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    kept_outputs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # act_inputs of the last λ asked for (and its version counter): lowrank's refinement and quantize_weights's
    # per-layer choice evaluate several weights under one λ, whose fake-quantized rows are then made once. Not an
    # init field, so `dataclasses.replace(problem, scheme=…)` (a fallback scheme) starts without it.
    last_act_inputs: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, scheme: Scheme, dtype: torch.dtype, weights: dict[str, torch.Tensor],
              rows: dict[str, torch.Tensor], shifts: dict[str, float],
              members: list[tuple[str, str, str, Role]]) -> "GroupProblem":
        """`members`: (name, weight key, site, role) per linear."""
        problem = cls(scheme, dtype, {k: w.float() for k, w in weights.items()},
                      {k: x.float() for k, x in rows.items()}, shifts)
        stacked: dict[str, list[str]] = {}
        for name, key, site, role in members:
            problem.members.append(Member(name, key, site, problem.rows[site] @ problem.weights[key].T))
            if role in STACKED_ROLES:
                stacked.setdefault(site, [])
                if key not in stacked[site]:
                    stacked[site].append(key)
        in_stacks = {key for keys in stacked.values() for key in keys}
        problem.branch_sets = list(stacked.values()) + [[k] for k in dict.fromkeys(m.weight_key for m in
                                                                                   problem.members)
                                                        if k not in in_stacks]
        return problem

    def ranking_rows(self, rows: int | None, seed: int = 0) -> "GroupProblem":
        """The problem the searches rank on: `subsample(rows)` when it has more sample rows, else itself."""
        return self.subsample(rows, seed) if rows is not None and self.sample_rows() > rows else self

    def subsample(self, rows: int, seed: int = 0) -> "GroupProblem":
        """The same problem on at most `rows` sample rows per site: a seeded uniform subset (the sample is
        itself a uniform sample of every row calibration saw)."""
        generator = torch.Generator().manual_seed(seed)
        keep = {site: torch.randperm(x.shape[0], generator=generator)[:rows].sort().values
                for site, x in self.rows.items()}
        problem = GroupProblem(self.scheme, self.dtype, self.weights,
                               {site: x[keep[site]] for site, x in self.rows.items()}, self.shifts,
                               branch_sets=self.branch_sets, grams=self.grams, whole=self.whole,
                               kept_outputs=self.kept_outputs)
        problem.members = [Member(m.name, m.weight_key, m.site, m.reference[keep[m.site]]) for m in self.members]
        return problem

    def subsample_outputs(self, rows: int, seed: int = 0) -> "GroupProblem":
        """The same problem on at most `rows` output rows of each weight (a seeded uniform subset, with the
        members' reference outputs there): a candidate's summed output error over those rows, for ranking
        candidates at a fraction of the cost on wide layers. Each candidate's branch is still the whole
        weight's (`search_branches`), restricted to the rows kept. An nvfp4 weight, whose tensor scale spans
        every row, keeps them all."""
        generator = torch.Generator().manual_seed(seed)
        kept = {key: torch.randperm(w.shape[0], generator=generator)[:rows].sort().values
                for key, w in self.weights.items() if w.shape[0] > rows and self.scheme.weight != "nvfp4"}
        if not kept:
            return self
        problem = GroupProblem(self.scheme, self.dtype,
                               {k: w[kept[k]] if k in kept else w for k, w in self.weights.items()}, self.rows,
                               self.shifts, branch_sets=self.branch_sets, grams=self.grams,
                               whole=self.whole or self.weights, kept_outputs=kept)
        problem.members = [Member(m.name, m.weight_key, m.site, m.reference[:, kept[m.weight_key]]
                                  if m.weight_key in kept else m.reference) for m in self.members]
        return problem

    def sample_rows(self) -> int:
        return max(x.shape[0] for x in self.rows.values())

    # ---- the three steps of an SVDQuant layer -------------------------------------------------------------

    def act_absmax(self, site_absmax: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([site_absmax[site] for site in self.rows]).amax(0)

    def weight_absmax(self) -> torch.Tensor:
        return torch.cat([w for w in self.weights.values()]).abs().amax(0)

    def smoothed(self, smooth: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """W·diag(λ), rounded to the model dtype (what the compiled graph stores), as fp32."""
        return {k: (w if smooth is None else w * smooth.float().unsqueeze(-2)).to(self.dtype).float()
                for k, w in self.weights.items()}

    def branches(self, targets: dict[str, torch.Tensor], rank: int, method: str, seed: int = 0,
                 near: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Rank-r factors per weight key (model dtype, as fp32); a branch set shares L2. `near`: the branches
        of targets close to these (the previous refinement iterate), which start the randomized SVD with
        one subspace iteration instead of four."""
        factors = {}
        for keys in self.branch_sets:
            stacked = _stacked(targets, keys)
            warm = {} if near is None else {
                "near": (_stacked({k: near[k][0] for k in keys}, keys), near[keys[0]][1]), "power_iterations": 1}
            up, down = low_rank(stacked, rank, method, seed=seed, **warm)
            down = down.to(self.dtype).float()
            for key, part in zip(keys, up.split([targets[k].shape[0] for k in keys])):
                factors[key] = (part.to(self.dtype).float(), down)
        return factors

    def search_branches(self, smooths: torch.Tensor, rank: int, svd: str, seed: int = 0
                        ) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The float32 rank-r branch the smoothing search refits to each candidate λ in `smooths` [C, K]: per
        candidate, (L1, L2) per weight key in the model dtype, as fp32; a branch set shares L2.

        Unlike `branches` of `smoothed(λ)`, W·diag(λ) is decomposed before its rounding to the model dtype, and
        never formed: a tall set (N > K) from its Gram matrix diag(λ)·WᵀW·diag(λ), computed once
        (`right_vectors_from_gram`, L1 = W·diag(λ)·V), any other by `low_rank_scaled` (2 subspace iterations
        each, as only the ranking matters); "full" is LAPACK's SVD of each rounded W·diag(λ).
        """
        result: list[dict] = [{} for _ in smooths]
        scales = smooths.float()
        whole = self.whole or self.weights
        for keys in self.branch_sets if rank else ():
            stacked = _stacked(whole, keys)
            tall = svd == "randomized" and stacked.shape[0] > stacked.shape[1]
            if tall:
                gram = self._gram(keys)
                rights = torch.stack([right_vectors_from_gram(scale.unsqueeze(-1) * gram * scale.unsqueeze(-2),
                                                              rank, seed=seed) for scale in scales])
                # L1 = W·diag(λ)·V of the rows kept only
                ups, downs = _side_by_side(_stacked(self.weights, keys), scales.unsqueeze(-1) * rights), rights.mT
                kept = {}  # already only the rows kept
            else:
                if svd == "randomized":
                    ups, downs = low_rank_scaled(stacked, scales, rank, seed=seed)
                else:
                    ups, downs = zip(*(low_rank((stacked * scale).to(self.dtype).float(), rank, svd, seed=seed,
                                                dtype=torch.float32) for scale in scales))
                kept = self.kept_outputs
            sizes = [(self.weights if tall else whole)[k].shape[0] for k in keys]
            for factors, up, down in zip(result, ups, downs):
                down = down.to(self.dtype).float()
                for key, part in zip(keys, up.split(sizes)):
                    factors[key] = ((part[kept[key]] if key in kept else part).to(self.dtype).float(), down)
        return result

    def _gram(self, keys: list[str]) -> torch.Tensor:
        """WᵀW of the branch set's stacked whole unsmoothed weights (fp32), computed once."""
        if tuple(keys) not in self.grams:
            stacked = _stacked(self.whole or self.weights, keys)
            self.grams[tuple(keys)] = stacked.T @ stacked
        return self.grams[tuple(keys)]

    def residuals(self, smoothed: dict[str, torch.Tensor], branches: dict | None) -> dict[str, torch.Tensor]:
        """Ŵ − L1·L2 in the model dtype, as fp32."""
        if not branches:
            return dict(smoothed)
        # −(L1·L2) + Ŵ in place of Ŵ − L1·L2 (the same numbers): no second [N, K] temporary
        return {k: (branches[k][0] @ branches[k][1]).neg_().add_(w).to(self.dtype).float()
                for k, w in smoothed.items()}

    def quantized(self, residuals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self._fake_quantize_weight(r.to(self.dtype), k).float() for k, r in residuals.items()}

    def _fake_quantize_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        return fake_quantize_weight(weight, self.scheme.weight, self.scheme.weight_group, name=name)

    # ---- evaluation ---------------------------------------------------------------------------------------

    def errors(self, smooth: torch.Tensor | None, quantized: dict[str, torch.Tensor],
               branches: dict | None) -> dict[str, float]:
        """Squared output error per member (summed over its sample rows)."""
        return {name: float(error) for name, error in self.squared_errors(smooth, quantized, branches).items()}

    def squared_errors(self, smooth: torch.Tensor | None, quantized: dict[str, torch.Tensor],
                       branches: dict | None) -> dict[str, torch.Tensor]:
        """Squared output error per member, summed over its sample rows (0-d tensors)."""
        act_inputs = self.act_inputs(smooth)
        downs: dict[tuple[str, int], torch.Tensor] = {}
        result = {}
        for member in self.members:
            main, smoothed_rows = act_inputs[member.site]
            output = main @ quantized[member.weight_key].mT
            if branches:
                up, down = branches[member.weight_key]
                key = (member.site, id(down))
                if key not in downs:
                    downs[key] = (smoothed_rows.to(self.dtype).float() @ down.mT).to(self.dtype).float()
                output = output + downs[key] @ up.mT
            result[member.name] = (output - member.reference).pow(2).sum((-2, -1))
        return result

    def hessians(self, smooth: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per weight key, XᵀX (fp64 [K, K]) of the smoothed sample rows X/λ of every site it is called at: what
        GPTQ rounds the weight against. The rows' own XᵀX is summed once; λ only rescales it."""
        if not self.input_grams:
            for key, site in dict.fromkeys((m.weight_key, m.site) for m in self.members):
                rows = self.rows[site].double()
                self.input_grams[key] = self.input_grams.get(key, 0) + rows.mT @ rows
        if smooth is None:
            return dict(self.input_grams)
        inverse = 1.0 / smooth.double()
        return {key: gram * inverse.unsqueeze(-1) * inverse.unsqueeze(-2) for key, gram in self.input_grams.items()}

    def act_inputs(self, smooth: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per site, (what the main path multiplies: Q_a((X + s)/λ) − s/λ, or X/λ for a weight-only scheme; what
        the branch multiplies: X/λ), fp32."""
        version = None if smooth is None else smooth._version
        if self.last_act_inputs is not None and self.last_act_inputs[0] is smooth \
                and self.last_act_inputs[1] == version:
            return self.last_act_inputs[2]
        scheme = self.scheme
        inverse = None if smooth is None else 1.0 / smooth.float().unsqueeze(-2)
        act_inputs = {}
        for site, rows in self.rows.items():
            shift = self.shifts.get(site, 0.0)
            if scheme.act is None:  # weight-only: x/λ (AWQ) in the model dtype feeds both paths
                smoothed = rows if inverse is None else (rows * inverse).to(self.dtype).float()
                act_inputs[site] = (smoothed, smoothed)
                continue
            main = rows + shift if shift else rows
            if inverse is not None:
                main = main * inverse
            main = main.to(self.dtype)
            main = fake_quantize_act(main, scheme.act, scheme.act_group, unsigned=shift > 0, name=site).float()
            if shift:
                main = main - shift * (inverse if inverse is not None else 1.0)
            act_inputs[site] = (main, rows if inverse is None else rows * inverse)
        self.last_act_inputs = (smooth, version, act_inputs)
        return act_inputs

    def reference_energy(self) -> dict[str, float]:
        return {m.name: float(m.reference.pow(2).sum()) for m in self.members}

    def candidate_errors(self, smooths: torch.Tensor, rank: int, svd: str, seed: int = 0) -> torch.Tensor:
        """The group's summed squared output error [C] for each candidate λ in `smooths` [C, K] (model dtype),
        with the scheme's quantizers and, when `rank` > 0, the branch `search_branches` refits to every
        candidate: the smoothing search's objective."""
        branches = self.search_branches(smooths, rank, svd, seed)
        return torch.stack([self._candidate_error(smooth, factors) for smooth, factors in zip(smooths, branches)])

    def _candidate_error(self, smooth: torch.Tensor, branches: dict) -> torch.Tensor:
        """sum(squared_errors(λ, quantized(residuals(smoothed(λ), branches)), branches)), computed a chunk of
        weight rows at a time (SEARCH_CHUNK_ELEMENTS): the dozen elementwise steps then run on temporaries that
        stay in cache instead of streaming a [N, K] matrix through memory each. An nvfp4 weight, whose tensor
        scale spans the matrix, is one chunk."""
        dtype, scale = self.dtype, smooth.float()
        act_inputs = self.act_inputs(smooth)
        projected: dict[tuple[str, int], torch.Tensor] = {}  # (X/λ)·L2ᵀ per (site, L2)
        total = torch.zeros((), device=smooth.device)  # accumulated in place: on the device of the products
        for key, weight in self.weights.items():
            readers = [m for m in self.members if m.weight_key == key]
            up, down = branches.get(key, (None, None))
            step = weight.shape[0] if self.scheme.weight == "nvfp4" else max(SEARCH_CHUNK_ROWS,
                                                                             SEARCH_CHUNK_ELEMENTS // weight.shape[1])
            for start in range(0, weight.shape[0], step):
                residual = (weight[start:start + step] * scale).to(dtype).float()
                if up is not None:  # −(L1·L2) + Ŵ: no second temporary
                    residual = (up[start:start + step] @ down).neg_().add_(residual).to(dtype).float()
                quantized = self._fake_quantize_weight(residual.to(dtype), key).float()
                for member in readers:
                    main, smoothed_rows = act_inputs[member.site]
                    output = main @ quantized.mT
                    if up is not None:
                        site_down = (member.site, id(down))
                        if site_down not in projected:
                            projected[site_down] = (smoothed_rows.to(dtype).float() @ down.mT).to(dtype).float()
                        output.addmm_(projected[site_down], up[start:start + step].mT)
                    total += output.sub_(member.reference[:, start:start + step]).pow_(2).sum()
        return total


# ---- the graph form of smoothed and branched linears ----------------------------------------------------------
#
# After smooth:   xs = aten.div(x, λ)                 one per (group, x); QuantOpInfo op "smooth_div"
#                 y  = aten.linear(xs, Ŵ, b)
# After lowrank:  down = aten.linear(xs, L2)          one per (x, L2);    QuantOpInfo op "lora_down"
#                 y  = aten.linear(xs, R, b);  up = aten.linear(down, L1)   ("lora_up")
#                 out = aten.add(y, up)                                        ("lora_add"), read in y's place
# Each step leaves a graph that computes what the FP model computes (up to the model dtype's rounding).


def search(problem: GroupProblem, act_absmax: torch.Tensor, candidates, rank: int, svd: str, seed: int,
           search_rows: int | None = None, refine: bool = False, search_outputs: int | None = None
           ) -> tuple[tuple[float, float], torch.Tensor, float, float | None]:
    """(α, β), λ, its error and the error of λ = 1 (None when λ = 1 is not a candidate), over the candidates.

    Every candidate is evaluated on at most `search_rows` of the sample rows and `search_outputs` output rows of
    each weight (None: all of them), and the errors returned are those of that subset: measuring the winner and
    λ = 1 again on every row cost as much as a third of the search on a FLUX-12B layer, for a number only the
    report reads. With `refine`, only the candidates `coarse_to_fine` picks are evaluated.
    """
    weight_absmax = problem.weight_absmax()
    smooths = torch.stack([smoothing_scale(act_absmax, weight_absmax, alpha, beta, problem.dtype)
                           for alpha, beta in candidates])
    ranked = problem.ranking_rows(search_rows, seed)
    if search_outputs is not None:
        ranked = ranked.subsample_outputs(search_outputs, seed)
    errors: dict[int, float] = {}

    def evaluate(indices):
        indices = sorted(set(indices) - errors.keys())
        if indices:
            errors.update(zip(indices, ranked.candidate_errors(smooths[indices], rank, svd, seed).tolist()))
        return errors

    if refine:
        coarse_to_fine(candidates, evaluate)
    else:
        evaluate(range(len(candidates)))
    best = min(errors, key=lambda index: (errors[index], -index))  # a tie goes to the later candidate
    identity = candidates.index((0.0, 0.0)) if (0.0, 0.0) in candidates else None
    return candidates[best], smooths[best], errors[best], None if identity is None else errors[identity]


def coarse_to_fine(candidates: list[tuple[float, float]], evaluate) -> None:
    """Evaluate (`evaluate(indices)` → every error so far) the candidates outside a family, every other member
    of each family — (c, 0) and (c, 1 − c), by c, both ends included — and then the neighbours of each family's
    best. The error over c is smooth enough at the grid's spacing that this finds the full grid's winner (every
    tiny-flux group at smooth_grid 10) with 15 of 19 evaluations."""
    families = [sorted((i for i, (a, b) in enumerate(candidates) if a > 0 and b == 0), key=lambda i: candidates[i]),
                sorted((i for i, (a, b) in enumerate(candidates) if a > 0 and b > 0 and abs(a + b - 1) < 1e-9),
                       key=lambda i: candidates[i])]
    members = {i for family in families for i in family}
    coarse = [i for i in range(len(candidates)) if i not in members]
    for family in families:
        coarse += family[::2] + family[-1:]
    errors = evaluate(coarse)
    fine = []
    for family in families:
        if family:
            position = min((p for p in range(len(family)) if family[p] in errors),
                           key=lambda p: (errors[family[p]], -p))
            fine += family[max(position - 1, 0):position + 2]
    evaluate(fine)


def layer_name(weight_target: str) -> str:
    """A linear's qualified name from its weight's attribute path ("blocks.0.q.weight" → "blocks.0.q")."""
    return weight_target[: -len(".weight")] if weight_target.endswith(".weight") else weight_target


def quant_op(node) -> OpTag | None:
    meta = node.meta.get(META_KEY) if isinstance(node, torch.fx.Node) else None
    return meta.op if isinstance(meta, QuantOpInfo) else None


def raw_input(linear: torch.fx.Node) -> torch.fx.Node:
    """The tensor a linear reads before smoothing (looks through its smooth_div)."""
    x = linear.args[0]
    return x.args[0] if quant_op(x) == OpTag.SMOOTH_DIV else x


def site_name(node: torch.fx.Node, info: LinearInfo) -> str:
    """The calibration site of a layer: the name of the tensor it reads; for a k×k convolution, its own im2col
    patches of that tensor (svdq_compiler.conv)."""
    x = raw_input(node)
    return f"{x.name}>{info.name}" if info.kind == "conv" else x.name


def conv_geometry(gm: torch.fx.GraphModule, node: torch.fx.Node, info: LinearInfo) -> ConvGeometry:
    return ConvGeometry.of(node, get_attr_value(gm, info.weight).shape, info.scheme.weight_group)


def layer_weight(gm: torch.fx.GraphModule, node: torch.fx.Node, info: LinearInfo) -> torch.Tensor:
    """The 2-D weight a layer quantizes: a linear's [N, K]; a k×k convolution's tap-major im2col matrix."""
    weight = get_attr_value(gm, info.weight)
    return conv_geometry(gm, node, info).matrix(weight) if info.kind == "conv" else weight


def branch_add(linear: torch.fx.Node) -> torch.fx.Node | None:
    return next((user for user in linear.users if quant_op(user) == OpTag.LORA_ADD), None)


def members_by_group(gm: torch.fx.GraphModule, keep) -> dict[str, list[tuple[torch.fx.Node, LinearInfo]]]:
    """{group name: [(linear node, info)]} in graph order, for the annotated linears `keep(info)` accepts."""
    groups: dict[str, list[tuple[torch.fx.Node, LinearInfo]]] = {}
    for node, info in annotated_linears(gm):
        if info.group is not None and keep(info):
            groups.setdefault(info.group, []).append((node, info))
    return groups


def unmet_in_groups(gm: torch.fx.GraphModule, select, holds, problem: str) -> list[str]:
    """A per-layer contract over the members of the groups `select` picks: "<layer>: <problem>" for every member
    whose annotation `holds` rejects (the passes' `ensures`)."""
    return [f"{info.name}: {problem}" for members in members_by_group(gm, select).values()
            for _, info in members if not holds(info)]


def every_quantized_weight_stored(gm: torch.fx.GraphModule, ctx) -> list[str]:
    """The contract of the passes that produce `quantized` (quantize_weights, compress): every non-16-bit layer's
    weight has its QTensor in `ctx.quantized`."""
    return [f"{info.name}: scheme {info.scheme.describe()} but no quantized weight"
            for _, info in annotated_linears(gm) if info.scheme is not None and info.scheme.kind != "fp"
            and info.weight not in ctx.quantized]


def group_problem(gm: torch.fx.GraphModule, members: list[tuple[torch.fx.Node, LinearInfo]], calibration,
                  scheme: Scheme) -> GroupProblem:
    """The GroupProblem of the group's current graph state: weights are divided back by λ where smoothed, so
    `smoothed(λ)` reproduces the stored Ŵ and the reference is the function the graph computes now."""
    weights, rows, shifts, entries = {}, {}, {}, []
    for node, info in members:
        site = site_name(node, info)
        stats = calibration.sites.get(site)
        if stats is None:
            raise QuantizationError(f"no calibration sample for the input of {info.name}",
                                    fix="run calibrate after annotate_linears")
        weight = layer_weight(gm, node, info).float()
        if info.kind == "conv" and not scheme.act_group:
            # per-pixel activations (group 0) are, in a patch row, one group per tap
            scheme = dataclasses.replace(scheme, act_group=conv_geometry(gm, node, info).padded_channels)
        if info.lora_up is not None:
            weight = weight + get_attr_value(gm, info.lora_up).float() @ get_attr_value(gm, info.lora_down).float()
        if info.smooth is not None:
            weight = weight / get_attr_value(gm, info.smooth).float()
        weights[info.weight] = weight
        rows[site], shifts[site] = stats.rows, info.shift
        entries.append((info.name, info.weight, site, info.role))
    dtype = get_attr_value(gm, members[0][1].weight).dtype
    return GroupProblem.build(scheme, dtype, weights, rows, shifts, entries)
