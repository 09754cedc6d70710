"""Mask selection: which weights to remove, given an importance metric (docs/ALGORITHM.md section 4).

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
    block = region_metric[:, :block_cols]
    if count <= 0:
        return torch.zeros_like(block, dtype=torch.bool)
    if count >= region_metric.numel():
        return torch.ones_like(block, dtype=torch.bool)
    threshold, strictly_below = kth_smallest_and_rank(region_metric.flatten(), count)
    below = block < threshold
    ties_needed = count - strictly_below
    ties = (block == threshold).flatten()
    if ties_needed > 0 and ties.any():
        tie_idx = ties.nonzero().flatten()[:ties_needed]
        extra = torch.zeros_like(ties)
        extra[tie_idx] = True
        below = below | extra.reshape(block.shape)
    return below


# Values drawn to bracket the k-th smallest of a large tensor.
SAMPLE_SIZE = 1 << 16


def kth_smallest_and_rank(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The k-th smallest (1-based) of a 1-D tensor, and how many values are strictly below it.

    A sample brackets the answer, so that only the values inside the bracket go through
    `kthvalue` and the whole tensor is read by three comparisons. The sample is spread by the
    golden ratio rather than by a fixed stride, which on a row-major matrix would see only a few
    columns. If the bracket misses (it can, values are not random), the full `kthvalue` answers.
    """
    n = values.numel()
    if n <= 1 << 20:
        threshold = torch.kthvalue(values, k).values
        return threshold, int((values < threshold).sum())
    positions = (torch.arange(SAMPLE_SIZE, dtype=torch.float64, device=values.device) * (0.6180339887498949 * n)) % n
    sample = values[positions.long()]
    position = (k - 0.5) / n * SAMPLE_SIZE
    margin = 4.0 * SAMPLE_SIZE**0.5 + 8
    lo_idx, hi_idx = int(position - margin), int(position + margin)
    # An open end when the bracket would reach past the sample: nothing can be missed there.
    in_band = values >= torch.kthvalue(sample, lo_idx).values if lo_idx >= 1 else None
    below = n - int(in_band.sum()) if in_band is not None else 0
    if hi_idx <= SAMPLE_SIZE:
        upper = values <= torch.kthvalue(sample, hi_idx).values
        in_band = upper if in_band is None else in_band & upper
    band = values[in_band] if in_band is not None else values
    if below < k <= below + band.numel():
        threshold = torch.kthvalue(band, k - below).values
        return threshold, below + int((band < threshold).sum())
    threshold = torch.kthvalue(values, k).values
    return threshold, int((values < threshold).sum())
