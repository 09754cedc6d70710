"""Mask search by ADMM: the support and the kept weights moved together (docs/ALGORITHM.md section 10).

The block solvers choose each block's mask once, from the weights as they are at that block; a
removal decided early is never revisited. This step starts from a solver's result (weights `X`,
mask) and runs the alternating direction method of multipliers on

    minimise (w - t) Hd (w - t)^T  over every row w,  subject to w having the pattern,

splitting w into a free copy W (a ridge-regularised least-squares solve, the same c x c system
for every row) and a copy D that is projected on the pattern (the largest magnitudes kept in
every group of m, or in every row for unstructured), with a scaled dual V between them. The
penalty rho grows over the iterations, the faster the fewer weights change support, so W and D
meet and the support settles. A Cholesky factor per penalty value makes every ridge solve two
triangular solves, together about the cost of one (r x c) @ (c x c) product. The refit
(`thanos.refit`) then solves the kept weights on the final support exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from thanos.hessian import FactorizationError
from thanos.pattern import Pattern

# Penalty schedule, in units of the scaled Hessian's unit diagonal: start at RHO_SPAN / iterations
# (low, so the support can move; a shorter search starts nearer the solver's weights), then raise
# it every `RHO_EVERY` iterations by a factor that depends on how many weights changed support.
RHO_SPAN = 3.0
RHO_EVERY = 3
RHO_GROWTH = ((0.1, 1.3), (0.005, 1.2), (0.0, 1.1))  # (share of kept weights that moved, factor)


@dataclasses.dataclass
class SearchResult:
    weight: torch.Tensor  # on the pattern, zero where `mask`
    mask: torch.Tensor  # True = removed
    changed: float  # share of entries whose removed/kept state differs from the starting mask
    target_energy: Optional[float] = None  # sum over rows of t Hd t^T (t: the target), from B


def project(Z: torch.Tensor, mask: torch.Tensor, pattern: Pattern,
            removed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The closest matrix to `Z` with the pattern, and its mask.

    Keeps the largest magnitudes in every group of m (n:m; of equal magnitudes the later column
    goes first), or in every row as many as `mask` keeps there (unstructured, so the solver's
    per-row sparsity is kept). Rows that `mask` leaves whole (dense outlier rows) stay whole.
    `removed`: `mask.sum(1)`, when the caller has it.
    """
    removed = mask.sum(1) if removed is None else removed
    if pattern.is_nm:
        new = nm_keep(Z, pattern.n, pattern.m) == 0
    else:
        rows, cols = Z.shape
        order = Z.abs().argsort(1)  # smallest first
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(cols, device=Z.device).expand(rows, cols))
        new = ranks < removed[:, None]
    new &= (removed > 0)[:, None]
    return Z.masked_fill(new, 0.0), new


def nm_keep(Z: torch.Tensor, n: int, m: int, out: Optional[torch.Tensor] = None,
            scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1.0 where a weight of `Z` is among the m - n largest magnitudes of its group of m, else 0.0.

    Each weight's rank in its group is counted by pairwise comparisons, m (m - 1) / 2 elementwise
    passes: several times faster than a top-k over millions of groups of 4 or 8. Of equal
    magnitudes the later column ranks lower. `out` (Z's shape, float) and `scratch` (the same) are
    reused when given; the search passes them, since a fresh tensor of this size on the CPU costs
    page faults on every iteration.
    """
    rows, cols = Z.shape
    magnitude = torch.abs(Z, out=scratch).view(rows, cols // m, m)
    ranks = [torch.zeros(rows, cols // m, dtype=torch.uint8, device=Z.device) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            later_lower = magnitude[..., j] <= magnitude[..., i]
            ranks[i] += later_lower
            ranks[j] += ~later_lower
    keep = (torch.empty_like(Z) if out is None else out).view(rows, cols // m, m)
    for i in range(m):
        torch.ge(ranks[i], n, out=keep[..., i])
    return keep.view(rows, cols)


@dataclasses.dataclass
class ScaledHessian:
    """The damped Hessian scaled to a unit diagonal, and Cholesky factors of it plus each penalty.

    Built once per Hessian (`thanos.hessian.Curvature.derived`), so linears that read the same
    input share it, and the first penalty's factor (the same for every search of that length).
    """

    scale: torch.Tensor  # (c,) sqrt(diag Hd)
    Hs: torch.Tensor  # (c, c) Hd / scale scale^T, fp32
    factors: dict = dataclasses.field(default_factory=dict)  # rho -> lower factor of Hs + rho I

    @classmethod
    def of(cls, Hd: torch.Tensor) -> "ScaledHessian":
        scale = Hd.diagonal().float().sqrt()
        inv = 1.0 / scale
        Hs = Hd.float() * inv[:, None] * inv[None, :]
        Hs.diagonal().fill_(1.0)
        return cls(scale, Hs)

    def ridge_factor(self, rho: float, keep: bool, layer: str = "layer") -> torch.Tensor:
        """Lower Cholesky factor of `Hs + rho I`; `keep` caches it.

        `Hs` is damped and has a unit diagonal, so with `rho >= RHO_SPAN / iterations` this
        cannot fail short of absurd iteration counts; if it does, the error names the fix.
        """
        if rho in self.factors:
            return self.factors[rho]
        shifted = self.Hs.clone()
        shifted.diagonal().add_(rho)
        lower, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        if int(info):
            raise FactorizationError(f"{layer}: the mask search's ridge system is not positive definite at penalty "
                                     f"{rho:g}; use fewer mask search iterations (the first penalty is "
                                     f"{RHO_SPAN:g} / iterations) or raise --damp")
        if keep:
            self.factors[rho] = lower
        return lower


def admm_mask_search(X: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, Hd: torch.Tensor,
                     pattern: Pattern, iterations: int, scaled: Optional[ScaledHessian] = None,
                     layer: str = "layer") -> SearchResult:
    """`iterations` of ADMM from (`X`, `mask`) towards `target` under `pattern`; inputs are not modified.

    `Hd` is the damped Hessian; `scaled` its `ScaledHessian`, when linears share it. Every ridge
    solve is a Cholesky solve in float32 with the factor of the current penalty (the penalty
    changes every `RHO_EVERY` iterations, so a few factorisations per search): it divides by an
    eigenvalue plus rho >= RHO_SPAN / iterations, which bounds its condition number. The search
    stops early once a whole penalty period moves no weight across the support (the refit then
    solves the kept weights exactly). Returns the projected copy D, which has the pattern exactly.
    """
    dtype, work = X.dtype, torch.float32
    # In units where every input has unit variance (w_j sqrt(Hd_jj), Hd scaled to a unit
    # diagonal), so the projection's magnitudes weigh each input by its size.
    scaled = scaled or ScaledHessian.of(Hd)
    scale = scaled.scale
    target_scaled = target.to(work) * scale
    B = target_scaled @ scaled.Hs
    target_energy = float((B * target_scaled).sum(dtype=torch.float64))
    del target_scaled
    keep = (~mask).to(work)  # 1.0 kept, 0.0 removed
    D = X.to(work) * scale * keep
    V = torch.zeros_like(D)
    # Buffers reused by every iteration (see `nm_keep`).
    Z, spare, work_buffer = torch.empty_like(D), torch.empty_like(D), torch.empty_like(D)
    removed = mask.sum(1)
    whole = removed == 0  # rows the solver left dense stay dense
    whole = whole if bool(whole.any()) else None
    rho = RHO_SPAN / max(iterations, 1)
    kept = max(mask.numel() - int(removed.sum()), 1)
    moved = 0
    lower = scaled.ridge_factor(rho, True, layer)  # the first penalty is every search's
    for t in range(iterations):
        rhs = torch.sub(D, V, out=work_buffer).mul_(rho).add_(B)  # B + rho (D - V)
        W = torch.cholesky_solve(rhs.T, lower).T
        torch.add(W, V, out=Z)
        if pattern.is_nm:
            new_keep = nm_keep(Z, pattern.n, pattern.m, out=spare, scratch=work_buffer)
            if whole is not None:
                new_keep[whole] = 1.0
        else:
            spare.copy_(~project(Z, mask, pattern, removed)[1])
            new_keep = spare
        torch.mul(Z, new_keep, out=D).add_(0.0)  # the projection; + 0.0 turns the -0.0 of removed negatives to 0.0
        # Newly removed weights: both masks remove the same count per row, so each one removed
        # matches one restored, and this counts the weights that moved.
        moved += int(torch.count_nonzero(new_keep < keep))
        keep, spare = new_keep, keep
        V.add_(torch.sub(W, D, out=work_buffer))
        if (t + 1) % RHO_EVERY == 0 and t + 1 < iterations:
            if moved == 0:
                break
            share = moved / kept
            rho *= next(factor for threshold, factor in RHO_GROWTH if share >= threshold)
            lower = scaled.ridge_factor(rho, False, layer)  # one factorisation per penalty value
            moved = 0
    current = keep == 0
    return SearchResult((D / scale).to(dtype), current, float((current != mask).float().mean()), target_energy)
