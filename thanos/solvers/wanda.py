"""Wanda (Sun et al., 2023): remove by `|W_ij| * sqrt(s_j)`, no weight update.

Comparison groups are each output row for unstructured sparsity and each group of m for n:m.
"""
from __future__ import annotations

import math

import torch

from thanos.pattern import Pattern
from thanos.masks import nm_mask, row_smallest_mask, wanda_metric
from thanos.solvers import SolverOutput
from thanos.solvers.magnitude import apply_mask, column_mask


def wanda_prune(W: torch.Tensor, s: torch.Tensor, pattern: Pattern, sparsity: float) -> SolverOutput:
    """`s` (c,) is the mean squared input per column, i.e. the diagonal of the Hessian."""
    metric = wanda_metric(W, s)
    if pattern.is_nm:
        mask = nm_mask(metric, pattern.n, pattern.m)
    elif pattern.kind == "columns":
        mask = column_mask((W * W).sum(0) * s, W.shape[0], sparsity)
    else:
        mask = row_smallest_mask(metric, math.floor(sparsity * W.shape[1]))
    return apply_mask(W, mask)
