"""Mask selection: which weights to remove, given an importance metric (ALGORITHM.md section 4).

All functions return a bool tensor, True where a weight is removed.
"""
from __future__ import annotations

import torch


def wanda_metric(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda importance `|W_ij| * sqrt(s_j)`, with `s_j` the mean squared input of column j."""
    return weight.abs() * input_sq_norms.clamp_min(0).sqrt()


def nm_mask(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Remove the `n` smallest of every `m` consecutive columns in each row."""
    rows, cols = metric.shape
    groups = metric.reshape(rows, cols // m, m)  # (r, c/m, m)
    drop = torch.topk(groups, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(rows, cols)


def smallest_mask(metric: torch.Tensor, count: int) -> torch.Tensor:
    """Remove exactly `count` entries of `metric`, the smallest ones (ties broken by position)."""
    mask = torch.zeros(metric.numel(), dtype=torch.bool, device=metric.device)
    if count > 0:
        mask[torch.topk(metric.flatten(), count, largest=False).indices] = True
    return mask.reshape(metric.shape)


def row_smallest_mask(metric: torch.Tensor, count_per_row: int) -> torch.Tensor:
    """Remove the `count_per_row` smallest entries of every row (Wanda's comparison groups)."""
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if count_per_row > 0:
        drop = torch.topk(metric, count_per_row, dim=1, largest=False).indices
        mask.scatter_(1, drop, True)
    return mask


def leading_mask_of_region(region_metric: torch.Tensor, count: int, block_cols: int) -> torch.Tensor:
    """Of the `count` smallest entries of `region_metric` (r x L), the ones in its first `block_cols` columns.

    This is the global residual budget of unstructured Thanos: the whole remaining region is
    ranked, and only the part of the selection inside the current block is removed now. A
    threshold (k-th smallest value) replaces a full top-k over the region, and ties at the
    threshold go to the block first, so no block ever removes more than the budget allows.
    """
    rows, width = region_metric.shape
    block = region_metric[:, :block_cols]
    if count <= 0:
        return torch.zeros_like(block, dtype=torch.bool)
    if count >= region_metric.numel():
        return torch.ones_like(block, dtype=torch.bool)
    flat = region_metric.flatten()
    threshold = kth_smallest(flat, count)
    below = block < threshold
    ties_needed = count - int((flat < threshold).sum())
    ties = (block == threshold).flatten()
    if ties_needed > 0 and ties.any():
        tie_idx = ties.nonzero().flatten()[:ties_needed]
        extra = torch.zeros_like(ties)
        extra[tie_idx] = True
        below = below | extra.reshape(block.shape)
    return below


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th smallest (1-based) of a 1-D tensor, cheaper than `kthvalue` on large inputs.

    A strided sample brackets the answer; only the values inside the bracket go through
    `kthvalue`. If the bracket misses (it can, values are not random), fall back to the full one.
    """
    n = values.numel()
    if n <= 1 << 20:
        return torch.kthvalue(values, k).values
    stride = n // (1 << 16)
    sample = values[::stride]  # (~65k,)
    position = (k - 0.5) / n * sample.numel()
    margin = 4.0 * sample.numel() ** 0.5 + 8
    lo_idx = int(max(1, min(sample.numel(), position - margin)))
    hi_idx = int(max(1, min(sample.numel(), position + margin)))
    lo = torch.kthvalue(sample, lo_idx).values
    hi = torch.kthvalue(sample, hi_idx).values
    below = int((values < lo).sum())
    band = values[(values >= lo) & (values <= hi)]
    if below < k <= below + band.numel():
        return torch.kthvalue(band, k - below).values
    return torch.kthvalue(values, k).values
