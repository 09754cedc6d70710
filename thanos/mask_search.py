"""Mask search by ADMM: the support and the kept weights moved together (docs/ALGORITHM.md section 10).

The block solvers choose each block's mask once, from the weights as they are at that block; a
removal decided early is never revisited. This step starts from a solver's result (weights `X`,
mask) and runs the alternating direction method of multipliers on

    minimise (w - t) Hd (w - t)^T  over every row w,  subject to w having the pattern,

splitting w into a free copy W (a ridge-regularised least-squares solve, the same c x c system
for every row) and a copy D that is projected on the pattern (the largest magnitudes kept in
every group of m, or in every row for unstructured), with a scaled dual V between them. The
penalty rho grows over the iterations, the faster the fewer weights change support, so W and D
meet and the support settles. One eigendecomposition of Hd per layer makes every ridge solve two
(r x c) @ (c x c) products. The refit (`thanos.refit`) then solves the kept weights on the final
support exactly.
"""
from __future__ import annotations

import dataclasses

import torch

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


def project(Z: torch.Tensor, mask: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """The closest matrix to `Z` with the pattern, and its mask.

    Keeps the largest magnitudes in every group of m (n:m), or in every row as many as `mask`
    keeps there (unstructured, so the solver's per-row sparsity is kept). Rows that `mask` leaves
    whole (dense outlier rows) stay whole.
    """
    rows, cols = Z.shape
    removed = mask.sum(1)
    if pattern.is_nm:
        groups = Z.reshape(rows, cols // pattern.m, pattern.m)
        drop = torch.topk(groups.abs(), pattern.n, dim=-1, largest=False).indices
        new = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True).reshape(rows, cols)
    else:
        order = Z.abs().argsort(1)  # smallest first
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(cols, device=Z.device).expand(rows, cols))
        new = ranks < removed[:, None]
    new &= (removed > 0)[:, None]
    return Z.masked_fill(new, 0.0), new


def admm_mask_search(X: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, Hd: torch.Tensor,
                     pattern: Pattern, iterations: int) -> SearchResult:
    """`iterations` of ADMM from (`X`, `mask`) towards `target` under `pattern`; inputs are not modified.

    The eigendecomposition runs in float64 (the scaled Hessian's eigenvalues span several orders
    of magnitude); the iterations in float32, since every ridge solve divides by an eigenvalue
    plus rho >= RHO_SPAN / iterations, which bounds its condition number. Returns the projected copy D,
    which has the pattern exactly.
    """
    dtype, work = X.dtype, torch.float32
    Hd = Hd.double()
    # In units where every input has unit variance (w_j sqrt(Hd_jj), Hd scaled to a unit
    # diagonal), so the projection's magnitudes weigh each input by its size.
    scale = Hd.diagonal().sqrt()
    Hs = Hd / scale[:, None] / scale[None, :]
    eigenvalues, Q = torch.linalg.eigh(Hs)
    B = ((target.double() * scale) @ Hs).to(work)
    eigenvalues, Q, scale = eigenvalues.to(work), Q.to(work), scale.to(work)
    D = X.to(work) * scale * ~mask
    V = torch.zeros_like(D)
    current = mask.clone()
    rho = RHO_SPAN / max(iterations, 1)
    kept = max(int((~mask).sum()), 1)
    moved = 0
    for t in range(iterations):
        W = (((B + rho * (D - V)) @ Q) / (eigenvalues + rho)) @ Q.T
        D, new = project(W + V, mask, pattern)
        moved += int((new & ~current).sum())
        current = new
        V += W - D
        if (t + 1) % RHO_EVERY == 0:
            share = moved / kept
            rho *= next(factor for threshold, factor in RHO_GROWTH if share >= threshold)
            moved = 0
    return SearchResult((D / scale).to(dtype), current, float((current != mask).float().mean()))
