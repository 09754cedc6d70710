"""Magnitude pruning: remove the smallest |W_ij| of the layer (or of each group of m)."""
from __future__ import annotations

import math

import torch

from thanos.pattern import Pattern
from thanos.masks import nm_mask, smallest_mask
from thanos.solvers import SolverOutput


def apply_mask(W: torch.Tensor, mask: torch.Tensor) -> SolverOutput:
    W[mask] = 0.0
    return SolverOutput(W, mask)


def column_mask(column_metric: torch.Tensor, rows: int, sparsity: float) -> torch.Tensor:
    """Remove the ceil(p * c) columns with the smallest total metric."""
    drop = smallest_mask(column_metric, math.ceil(sparsity * column_metric.numel()))  # (c,)
    return drop[None, :].expand(rows, -1).clone()


def magnitude_prune(W: torch.Tensor, pattern: Pattern, sparsity: float) -> SolverOutput:
    metric = W.abs()
    if pattern.is_nm:
        mask = nm_mask(metric, pattern.n, pattern.m)
    elif pattern.kind == "columns":
        mask = column_mask((W * W).sum(0), W.shape[0], sparsity)
    else:
        mask = smallest_mask(metric, math.floor(sparsity * W.numel()))
    return apply_mask(W, mask)
