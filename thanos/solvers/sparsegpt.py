"""SparseGPT (Frantar & Alistarh, 2023): column-by-column OBS with lazy block updates.

Within a block of B columns each column is zeroed where the mask says so and its error is spread
over the columns to its right with one row of the inverse-Hessian factor `U`; the rest of the
matrix gets the block's accumulated errors in one GEMM. The mask is chosen adaptively per block
(unstructured) or per group of m (n:m) by the OBS saliency `w^2 / U_jj^2`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from thanos.pattern import ConfigError, Pattern
from thanos.hessian import Curvature
from thanos.masks import smallest_mask
from thanos.solvers import SolverOutput


def sparsegpt_prune(
    W: torch.Tensor, H: torch.Tensor, pattern: Pattern, sparsity: float, block_size: int,
    damp: float = 0.01, layer: str = "layer", progress: Optional[Callable[[int, int], None]] = None,
    curvature: Optional[Curvature] = None,
) -> SolverOutput:
    """Prune `W` (r x c, fp32, modified in place and returned); `curvature`: `H`'s, when shared."""
    if pattern.kind == "columns":
        raise ConfigError("SparseGPT prunes unstructured or n:m; for whole columns use method 'thanos'")
    curvature = curvature or Curvature(H, layer)
    factor = curvature.factor(damp)
    error = curvature.zero_dead_columns_(W, factor.damp_used)
    U = factor.upper  # (c, c), inv(H + damping) = U^T U
    rows, cols = W.shape
    mask = torch.zeros_like(W, dtype=torch.bool)
    B = block_size
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1 = W[:, i1:i2].clone()  # (r, B)
        U1 = U[i1:i2, i1:i2]  # (B, B)
        d = torch.diag(U1)  # (B,)
        Err1 = torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if not pattern.is_nm:
            # This block's share of the layer budget floor(p*r*c), so the total is exact.
            quota = math.floor(sparsity * rows * i2) - math.floor(sparsity * rows * i1)
            mask1 = smallest_mask(W1**2 / d**2, quota)
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                saliency = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m] ** 2  # (r, m)
                drop = torch.topk(saliency, pattern.n, dim=1, largest=False).indices
                mask1[:, i : i + pattern.m].scatter_(1, drop, True)
            w = W1[:, i]
            err = torch.where(mask1[:, i], w, torch.zeros_like(w)) / d[i]  # (r,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W1[mask1] = 0.0
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        # Removing column i at its optimum costs w^2 / inv(H[i:, i:])_00 = (w / U_ii)^2.
        error += float(Err1.pow(2).sum(dtype=torch.float64))
        if progress:
            progress(i2, cols)
    return SolverOutput(W, mask, factor.damp_used, factor.escalations, error)
