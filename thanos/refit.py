"""Refit on the final support: the kept weights re-solved once the mask is fixed (docs/ALGORITHM.md section 8).

The block solvers freeze a block's kept weights once it is done, so later removals in the same
row are never compensated by them. Once the whole mask is known, the best kept weights of every
row solve a small least-squares problem on that row's support; `refit_on_support` solves all rows
together by Jacobi-preconditioned conjugate gradients, a pure tensor function like the solvers.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Refitted(NamedTuple):
    weight: torch.Tensor  # (r, c), exactly zero on the mask
    error: float  # sum over rows of (x - t) Hd (x - t)^T, as the iterations tracked it


def refit_on_support(X: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, Hd: torch.Tensor,
                     iterations: int, tolerance: float = 0.0) -> Refitted:
    """Kept weights re-solved for the fixed `mask`: at most `iterations` of preconditioned CG from `X`.

    Minimises `(x - t) Hd (x - t)^T` for every row `x` of the result, with `x` zero where `mask`
    is True (True = removed), `t` the row of `target`, `Hd` the damped Hessian
    (`thanos.hessian.Curvature.damped`). Every row has its own
    support, so the rows iterate together with a step length each; one iteration is one
    (r x c) @ (c x c) product. Stops early once an iteration lowers the summed error by less than
    `tolerance` times what is left of it (0: run every iteration). `X` (r x c, zero on the mask)
    is the starting point and is not modified; the result is exactly zero on the mask, so the
    pattern cannot change. The error comes with it for free: the start's, from the first
    residual's product, less each exact line search's decrease (equal to the direct sum to the
    round-off of fp32 products over c inputs, tests/thanos/test_refit.py).
    """
    keep = (~mask).to(X.dtype)  # (r, c) K
    inv_diag = 1.0 / Hd.diagonal()  # (c,) Jacobi preconditioner
    X = X * keep
    gap = target - X
    R = gap @ Hd
    error = float((R * gap).sum(dtype=torch.float64))  # the objective at the start, all rows
    if iterations <= 0:
        return Refitted(X, error)
    R.mul_(keep)  # residual of the normal equations on the support
    del gap
    # Every (r, c) matrix of the loop lives in one of these buffers: a fresh tensor of this size
    # on the CPU costs page faults on every iteration.
    Z = R * inv_diag
    P, AP, product = Z.clone(), torch.empty_like(Z), torch.empty_like(Z)
    rz = torch.mul(R, Z, out=product).sum(1)  # (r,)
    tiny = torch.finfo(X.dtype).tiny
    for _ in range(iterations):
        torch.matmul(P, Hd, out=AP).mul_(keep)
        curvature = torch.mul(P, AP, out=product).sum(1)
        step = torch.where(curvature > tiny, rz / curvature.clamp_min(tiny), torch.zeros_like(rz))
        X.addcmul_(step[:, None], P)
        # An exact line search along P lowers the row's objective by step * (r . z).
        decrease = float((step * rz).sum(dtype=torch.float64))
        error -= decrease
        if tolerance and decrease <= tolerance * error:
            break
        R.addcmul_(step[:, None], AP, value=-1.0)
        torch.mul(R, inv_diag, out=Z)
        rz_new = torch.mul(R, Z, out=product).sum(1)
        beta = torch.where(rz > tiny, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        P.mul_(beta[:, None]).add_(Z)  # Z + beta P
        rz = rz_new
    return Refitted(X.mul_(keep), error)
