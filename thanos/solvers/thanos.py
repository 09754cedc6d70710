"""Thanos: block-wise multi-weight OBS with dynamic Wanda masks (docs/ALGORITHM.md sections 2-6).

Symbols follow docs/ALGORITHM.md: `W` (r x c) the weight, `H` (c x c) the Hessian, `s = diag(H)`,
`U` the upper Cholesky factor of `inv(H)`, `G` the inverse of the active Hessian, `q` a row's
removal set inside the block, `B` the block size, `Lam` the r x B matrix of scattered lambdas.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch

from thanos.pattern import Pattern
from thanos.hessian import Curvature
from thanos.masks import leading_mask_of_region, nm_mask, smallest_mask, wanda_metric
from thanos.solvers import SolverOutput

DEFAULT_SOLVE_MEMORY = 512 * 2**20  # bytes for one chunk of batched k x k systems
# Rows per chunk of batched solves on an accelerator when the memory budget allows more: small
# enough that the rows of a chunk (sorted by k) need little padding, large enough to keep
# kernels busy.
ROWS_PER_CHUNK = 1024
# On a CPU a chunk's systems are sized to stay in cache through the gather, the factorisation
# and the solves; 4 MiB was the fastest of the sizes the solver benchmark tried.
CPU_CHUNK_BYTES = 4 * 2**20
# Largest system that `_batched_cholesky` hands to LAPACK whole on a CPU.
CHOLESKY_BASE = 16


def outlier_rows(W: torch.Tensor, s: torch.Tensor, alpha: float) -> torch.Tensor:
    """Rows kept dense (docs/ALGORITHM.md section 5): the top floor(alpha * r) by `sum_j W_ij^2 s_j`."""
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
    curvature: Optional[Curvature] = None,
) -> SolverOutput:
    """Prune `W` (r x c, fp32, modified in place and returned) under `pattern`.

    `curvature`: `H`'s `thanos.hessian.Curvature`, when linears that read the same input share it.

    `trailing_inverse="per-block"` is the paper's strategy, kept as the benchmark's reference:
    `torch.linalg.inv(H[i1:, i1:])` at every block, as `lib/thanos.py` in the paper's code
    does, with the damping as given (the paper's code does not escalate it). It gives the same
    answer as the one-Cholesky route, more slowly.
    """
    curvature = curvature or Curvature(H, layer)
    s = torch.diag(H).clone()  # Wanda's s_j, before the dead-input fix and damping
    if trailing_inverse == "per-block":
        if pattern.kind == "columns":
            raise ValueError("trailing_inverse='per-block' applies to block-wise patterns, not 'columns'")
        fixed = curvature.fixed()
        U, damped = None, fixed + damp * torch.diag(fixed).mean() * torch.eye(H.shape[0], device=H.device)
        damp_used, escalations = damp, 0
    else:
        factor = curvature.factor(damp)
        U, damped = factor.upper, None  # inv(H + damping) = U^T U
        damp_used, escalations = factor.damp_used, factor.escalations
    error = curvature.zero_dead_columns_(W, damp_used)

    dense_rows = outlier_rows(W, s, alpha)
    rows = (~dense_rows).nonzero().flatten()
    Wp = W[rows]  # (r', c), a copy: the rows being pruned
    mask_p = torch.zeros_like(Wp, dtype=torch.bool)

    if pattern.kind == "columns":
        error += _prune_columns(Wp, mask_p, U, s, sparsity)
    else:
        error += _prune_blocks(Wp, mask_p, U, s, pattern, sparsity, block_size or W.shape[1], solve_memory, damped,
                               progress)

    W[rows] = Wp
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[rows] = mask_p
    return SolverOutput(W, mask, damp_used, escalations, error)


def _prune_blocks(W, mask, U, s, pattern, sparsity, B, solve_memory, damped_H, progress=None) -> float:
    """Every block in turn; returns the summed cost of the removals (see `_remove_weights`)."""
    rows, cols = W.shape
    budget = math.floor(sparsity * rows * cols)  # unstructured: Z, the layer's exact zero count
    removed = 0
    error = 0.0
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        if damped_H is None:
            # inv(H[i1:, i1:]) = U[i1:, i1:]^T U[i1:, i1:]; its first B rows:
            G_block = U[i1:i2, i1:i2].T @ U[i1:i2, i1:]  # (B, c - i1)
        else:
            G_block = torch.linalg.inv(damped_H[i1:, i1:])[: i2 - i1]

        if pattern.is_nm:
            block_mask = nm_mask(wanda_metric(W[:, i1:i2], s[i1:i2]), pattern.n, pattern.m)
        else:
            region = wanda_metric(W[:, i1:], s[i1:])  # (r, c - i1), on the current weights
            block_mask = leading_mask_of_region(region, budget - removed, i2 - i1)
            removed += int(block_mask.sum())

        error += _remove_weights(W, i1, block_mask, G_block, solve_memory)
        mask[:, i1:i2] = block_mask
        if progress:
            progress(i2, cols)
    return error


def _remove_weights(W, i1, block_mask, G_block, solve_memory) -> float:
    """Multi-weight OBS (section 2) for every row at once; the update is one GEMM.

    Returns what the removals add to the damped error: the columns from `i1` on are at their
    optimum for the earlier ones as they stand, so removing a row's set q costs exactly
    `w_q . lambda` (lambda = inv(G_qq) w_q), the same sum over the blocks as the direct one.
    """
    B = block_mask.shape[1]
    G_bb = G_block[:, :B]  # (B, B), inverse of the active Hessian restricted to the block
    counts = block_mask.sum(dim=1)  # (r,) k per row
    active = (counts > 0).nonzero().flatten()
    error = 0.0
    if active.numel() == 0:
        return error
    # Rows sorted by k, so each chunk pads its systems only to a k close to its own rows'.
    active = active[torch.argsort(counts[active], stable=True)]
    Lam = torch.zeros(W.shape[0], B, dtype=W.dtype, device=W.device)  # (r, B)
    k_max = int(counts.max())
    chunk = max(1, min(_rows_per_chunk(W.device, k_max), solve_memory // (3 * 4 * k_max * k_max)))
    for start in range(0, active.numel(), chunk):
        idx_rows = active[start : start + chunk]
        sub_mask = block_mask[idx_rows]  # (R, B)
        k = counts[idx_rows]  # (R,)
        kc = int(k.max())
        # Removed positions first (stable sort keeps column order), then padding positions.
        q = torch.argsort((~sub_mask).to(torch.int8), dim=1, stable=True)[:, :kc]  # (R, kc)
        valid = torch.arange(kc, device=W.device)[None, :] < k[:, None]  # (R, kc)
        # G_bb[q_i][:, q_i] for every row: whole rows first, then columns (much faster on a CPU
        # than indexing both dimensions at once).
        Gqq = torch.gather(G_bb.index_select(0, q.flatten()).view(*q.shape, B), 2, q[:, None, :].expand(-1, kc, -1))
        rhs = torch.gather(W[idx_rows, i1 : i1 + B], 1, q)  # (R, kc)
        if not bool(valid.all()):
            # Pad with identity rows/columns and zero right-hand side: no effect on lambda.
            keep = valid.to(W.dtype)
            Gqq.mul_(keep[:, :, None]).mul_(keep[:, None, :])
            Gqq.diagonal(dim1=1, dim2=2).add_(1.0 - keep)
            rhs = rhs * keep
        lam = _spd_solve(Gqq, rhs)  # (R, kc)
        error += float((rhs * lam).sum(dtype=torch.float64))  # padding: rhs 0
        Lam[idx_rows] = torch.zeros_like(sub_mask, dtype=W.dtype).scatter_(1, q, lam)
    W[:, i1:].addmm_(Lam, G_block, alpha=-1.0)  # in place: no r x (c - i1) temporary
    W[:, i1 : i1 + B].masked_fill_(block_mask, 0.0)
    return error


def _rows_per_chunk(device: torch.device, k: int) -> int:
    if device.type == "cpu":
        return max(1, CPU_CHUNK_BYTES // (4 * k * k))
    return ROWS_PER_CHUNK


def _spd_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve batched SPD systems A x = b (A: (R, k, k), b: (R, k)) by Cholesky, LU where that fails."""
    L, info = _batched_cholesky(A)  # (R, k, k), A = L L^T
    # Two triangular solves are faster than cholesky_solve on CPU builds.
    y = torch.linalg.solve_triangular(L, b[..., None], upper=False)
    x = torch.linalg.solve_triangular(L.mT, y, upper=True)[..., 0]
    bad = info != 0
    if bool(bad.any()):
        x[bad] = torch.linalg.solve(A[bad], b[bad])
    return x


def _batched_cholesky(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factors of a batch of SPD matrices (R, k, k), and a non-zero flag per failure.

    LAPACK (MKL) factorises small matrices slowly one by one, so on a CPU the factorisation
    recurses on halves down to `CHOLESKY_BASE` columns; the off-diagonal block is a batched
    triangular solve and the Schur complement a batched matrix product, which beats one
    `cholesky_ex` call on the sizes the solver benchmark uses.
    """
    k = A.shape[-1]
    if A.device.type != "cpu" or k <= CHOLESKY_BASE:
        return torch.linalg.cholesky_ex(A)
    h = k // 2
    L11, info11 = _batched_cholesky(A[:, :h, :h])
    L21 = torch.linalg.solve_triangular(L11.mT, A[:, h:, :h], upper=True, left=False)  # L21 L11^T = A21
    L22, info22 = _batched_cholesky(torch.baddbmm(A[:, h:, h:], L21, L21.mT, alpha=-1.0))
    L = torch.empty_like(A)
    L[:, :h, :h] = L11
    L[:, h:, :h] = L21
    L[:, h:, h:] = L22
    L[:, :h, h:] = 0.0
    return L, info11 | info22


def _prune_columns(W, mask, U, s, sparsity) -> float:
    """Remove whole input columns in one block: one k x k system shared by every row; returns
    the removal's cost (see `_remove_weights`)."""
    cols = W.shape[1]
    k = math.ceil(sparsity * cols)
    if k == 0:
        return 0.0
    q = smallest_mask((W * W).sum(0) * s, k).nonzero().flatten()  # (k,), ascending column order
    G_q = U[:, q].T @ U  # (k, c): rows q of inv(H) = U^T U
    L, info = torch.linalg.cholesky_ex(G_q[:, q])  # (k, k)
    if info.item() == 0:
        lam = torch.cholesky_solve(W[:, q].T, L)  # (k, r)
    else:
        lam = torch.linalg.solve(G_q[:, q], W[:, q].T)
    error = float((W[:, q].T * lam).sum(dtype=torch.float64))
    W -= lam.T @ G_q
    W[:, q] = 0.0
    mask[:, q] = True
    return error
