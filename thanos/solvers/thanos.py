"""Thanos: block-wise multi-weight OBS with dynamic Wanda masks (ALGORITHM.md sections 2-6).

Symbols follow ALGORITHM.md: `W` (r x c) the weight, `H` (c x c) the Hessian, `s = diag(H)`,
`U` the upper Cholesky factor of `inv(H)`, `G` the inverse of the active Hessian, `q` a row's
removal set inside the block, `B` the block size, `Lam` the r x B matrix of scattered lambdas.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch

from thanos.config import Pattern
from thanos.hessian import handle_dead_inputs_, inverse_upper_factor
from thanos.masks import leading_mask_of_region, nm_mask, smallest_mask, wanda_metric
from thanos.solvers import SolverOutput

DEFAULT_SOLVE_MEMORY = 512 * 2**20  # bytes for one chunk of batched k x k systems
# Rows per chunk of batched solves when the memory budget allows more: small enough that the
# rows of a chunk (sorted by k) need little padding, large enough to keep kernels busy.
ROWS_PER_CHUNK = 1024


def outlier_rows(W: torch.Tensor, s: torch.Tensor, alpha: float) -> torch.Tensor:
    """Rows kept dense (ALGORITHM.md section 5): the top floor(alpha * r) by `sum_j W_ij^2 s_j`."""
    count = math.floor(alpha * W.shape[0])
    keep = torch.zeros(W.shape[0], dtype=torch.bool, device=W.device)
    if count:
        keep[torch.topk((W * W) @ s, count).indices] = True
    return keep


def thanos_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    pattern: Pattern,
    sparsity: float,
    block_size: int | None,
    alpha: float = 0.0,
    damp: float = 0.01,
    layer: str = "layer",
    solve_memory: int = DEFAULT_SOLVE_MEMORY,
    trailing_inverse: Literal["one-cholesky", "per-block"] = "one-cholesky",
    progress: Optional[Callable[[int, int], None]] = None,
) -> SolverOutput:
    """Prune `W` (r x c, fp32, modified in place and returned) under `pattern`.

    `trailing_inverse="per-block"` re-inverts `H[i1:, i1:]` at every block, as the paper's code
    does; it gives the same answer more slowly and exists so the benchmark can show the gap.
    """
    H = H.clone()
    s = torch.diag(H).clone()  # Wanda's s_j, before the dead-input fix and damping
    handle_dead_inputs_(W, H)
    factor = inverse_upper_factor(H, damp, layer)
    U = factor.upper  # inv(H + damping) = U^T U

    dense_rows = outlier_rows(W, s, alpha)
    rows = (~dense_rows).nonzero().flatten()
    Wp = W[rows]  # (r', c), a copy: the rows being pruned
    mask_p = torch.zeros_like(Wp, dtype=torch.bool)

    if pattern.kind == "columns":
        _prune_columns(Wp, mask_p, U, s, sparsity)
    else:
        damped = None
        if trailing_inverse == "per-block":
            damped = H + factor.damp_used * torch.diag(H).mean() * torch.eye(H.shape[0], device=H.device)
        _prune_blocks(Wp, mask_p, U, s, pattern, sparsity, block_size or W.shape[1], solve_memory, damped, progress)

    W[rows] = Wp
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[rows] = mask_p
    return SolverOutput(W, mask, factor.damp_used, factor.escalations)


def _prune_blocks(W, mask, U, s, pattern, sparsity, B, solve_memory, damped_H, progress=None):
    rows, cols = W.shape
    budget = math.floor(sparsity * rows * cols)  # unstructured: Z, the layer's exact zero count
    removed = 0
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        if damped_H is None:
            # inv(H[i1:, i1:]) = U[i1:, i1:]^T U[i1:, i1:]; its first B rows:
            G_block = U[i1:i2, i1:i2].T @ U[i1:i2, i1:]  # (B, c - i1)
        else:
            G_block = torch.cholesky_inverse(torch.linalg.cholesky(damped_H[i1:, i1:]))[: i2 - i1]

        if pattern.is_nm:
            block_mask = nm_mask(wanda_metric(W[:, i1:i2], s[i1:i2]), pattern.n, pattern.m)
        else:
            region = wanda_metric(W[:, i1:], s[i1:])  # (r, c - i1), on the current weights
            block_mask = leading_mask_of_region(region, budget - removed, i2 - i1)
            removed += int(block_mask.sum())

        _remove_weights(W, i1, block_mask, G_block, solve_memory)
        mask[:, i1:i2] = block_mask
        if progress:
            progress(i2, cols)


def _remove_weights(W, i1, block_mask, G_block, solve_memory):
    """Multi-weight OBS (section 2) for every row at once; the update is one GEMM."""
    B = block_mask.shape[1]
    G_bb = G_block[:, :B]  # (B, B), inverse of the active Hessian restricted to the block
    counts = block_mask.sum(dim=1)  # (r,) k per row
    active = (counts > 0).nonzero().flatten()
    if active.numel() == 0:
        return
    # Rows sorted by k, so each chunk pads its systems only to a k close to its own rows'.
    active = active[torch.argsort(counts[active], stable=True)]
    Lam = torch.zeros(W.shape[0], B, dtype=W.dtype, device=W.device)  # (r, B)
    k_max = int(counts.max())
    chunk = max(1, min(ROWS_PER_CHUNK, solve_memory // (3 * 4 * k_max * k_max)))
    for start in range(0, active.numel(), chunk):
        idx_rows = active[start : start + chunk]
        sub_mask = block_mask[idx_rows]  # (R, B)
        k = counts[idx_rows]  # (R,)
        kc = int(k.max())
        # Removed positions first (stable sort keeps column order), then padding positions.
        q = torch.argsort((~sub_mask).to(torch.int8), dim=1, stable=True)[:, :kc]  # (R, kc)
        valid = torch.arange(kc, device=W.device)[None, :] < k[:, None]  # (R, kc)
        Gqq = G_bb[q[:, :, None], q[:, None, :]]  # (R, kc, kc)
        rhs = torch.gather(W[idx_rows, i1 : i1 + B], 1, q)  # (R, kc)
        if not bool(valid.all()):
            # Pad with identity rows/columns and zero right-hand side: no effect on lambda.
            keep = valid.to(W.dtype)
            Gqq.mul_(keep[:, :, None]).mul_(keep[:, None, :])
            Gqq.diagonal(dim1=1, dim2=2).add_(1.0 - keep)
            rhs = rhs * keep
        lam = _spd_solve(Gqq, rhs)  # (R, kc)
        Lam[idx_rows] = torch.zeros_like(sub_mask, dtype=W.dtype).scatter_(1, q, lam)
    W[:, i1:].addmm_(Lam, G_block, alpha=-1.0)  # in place: no r x (c - i1) temporary
    W[:, i1 : i1 + B][block_mask] = 0.0


def _spd_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve batched SPD systems A x = b (A: (R, k, k), b: (R, k)) by Cholesky, LU where that fails."""
    L, info = torch.linalg.cholesky_ex(A)  # (R, k, k), A = L L^T
    # Two triangular solves are several times faster than cholesky_solve on CPU builds.
    y = torch.linalg.solve_triangular(L, b[..., None], upper=False)
    x = torch.linalg.solve_triangular(L.mT, y, upper=True)[..., 0]
    bad = info != 0
    if bool(bad.any()):
        x[bad] = torch.linalg.solve(A[bad], b[bad])
    return x


def _prune_columns(W, mask, U, s, sparsity):
    """Remove whole input columns in one block: one k x k system shared by every row."""
    cols = W.shape[1]
    k = math.ceil(sparsity * cols)
    if k == 0:
        return
    q = smallest_mask((W * W).sum(0) * s, k).nonzero().flatten()  # (k,), ascending column order
    G_q = U[:, q].T @ U  # (k, c): rows q of inv(H) = U^T U
    L, info = torch.linalg.cholesky_ex(G_q[:, q])  # (k, k)
    if info.item() == 0:
        lam = torch.cholesky_solve(W[:, q].T, L)  # (k, r)
    else:
        lam = torch.linalg.solve(G_q[:, q], W[:, q].T)
    W -= lam.T @ G_q
    W[:, q] = 0.0
    mask[:, q] = True
