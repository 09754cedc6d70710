"""Free channel permutations for n:m patterns (docs/ALGORITHM.md section 11).

An n:m mask groups m consecutive input columns of a linear. Which channels share a group is free
wherever those channels are rows of an earlier linear that reach this one through elementwise
maps only: reorder the producer's rows and the consumer's columns the same way and the model
computes the same function (gate/up rows with down_proj's columns; v_proj's rows, within each
head, with o_proj's columns). The order is chosen so that the n weights each group must lose
are, summed over rows, the least salient ones.

Saliency is w^2 * H_jj, the error a weight's removal costs if the inputs were uncorrelated (the
solver then compensates, so this only ranks orders). The search, after the channel allocation
of RIA (Zhang et al., 2024): for each position k of the groups, take every group's k-th channel
out and give each group back one of them by a linear assignment. With the other m - 1 channels
fixed, a group that receives a channel of saliency x per row loses the n - 1 smallest of the
others plus min(x, t), t being the others' n-th smallest; so the assignment's cost is
sum over rows of min(x, t), exact for that step, and no step raises the total.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Optional

import torch
from torch import nn

from thanos.pattern import Pattern
from thanos.errors import ThanosExportError
from thanos.models import FreeChannels, attention_heads, free_channels
from thanos.linears import weight_view
from thanos.quantized_model import quantization_of

log = logging.getLogger(__name__)

# Groups searched together: a window's costs take rows x window^2 work and its assignment window^3,
# and small windows keep most of the gain (docs/results/preset_trials_2of4_cpu.md, round 3).
WINDOW_GROUPS = 64
SWEEPS = 2  # passes over the m positions; the search stops early when a pass moves nothing


def pruned_saliency(scores: torch.Tensor, n: int, m: int) -> float:
    """Sum over rows and groups of m columns of the n smallest `scores` (r x c): what the mask loses."""
    rows, columns = scores.shape
    return float(scores.reshape(rows, columns // m, m).sort(dim=-1).values[..., :n].sum(dtype=torch.float64))


def group_order(scores: torch.Tensor, n: int, m: int, sweeps: int = SWEEPS,
                window: int = WINDOW_GROUPS) -> torch.Tensor:
    """A column order (new column j is old column order[j]) that lowers `pruned_saliency` of `scores`.

    Channels move only within windows of `window` groups. Never worse than the given order.
    """
    linear_sum_assignment = _assignment_solver()
    rows, columns = scores.shape
    groups = columns // m
    order = torch.arange(columns, device=scores.device)
    scores = scores.to(torch.float32)
    for _ in range(sweeps):
        moved = False
        for k in range(m):
            slots = order.view(groups, m)  # a view: assigning into it reorders `order`
            for start in range(0, groups, window):
                block = slots[start:start + window]
                grouped = scores[:, block]  # (r, g, m)
                candidates = grouped[:, :, k].contiguous()  # (r, g): the channel each group gives up
                others = torch.cat([grouped[:, :, :k], grouped[:, :, k + 1:]], dim=-1)
                threshold = _nth_smallest(others, n)  # (r, g)
                cost = _assignment_cost(candidates, threshold)
                _, choice = linear_sum_assignment(cost.cpu().numpy())
                choice = torch.as_tensor(choice, device=order.device)
                kept = cost[torch.arange(len(choice), device=cost.device), choice.to(cost.device)]
                gain = float(cost.diagonal().sum() - kept.sum())
                if gain > 1e-9 * float(cost.diagonal().abs().sum()):  # an assignment no better by round-off stays
                    block[:, k] = block[choice, k].clone()
                    moved = True
        if not moved:
            break
    return order


def _nth_smallest(values: torch.Tensor, n: int) -> torch.Tensor:
    """The n-th smallest along the last dimension; 2:4's case (the 2nd of 3, the median) by
    minima and maxima, the same value without a sort's cost."""
    if values.shape[-1] == 3 and n == 2:
        a, b, c = values.unbind(-1)
        return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))
    return values.sort(dim=-1).values[..., n - 1]


def _assignment_solver():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as exc:
        raise PermutationError("channel permutations need scipy's linear assignment, and scipy is not installed: "
                               "`pip install scipy` (a declared dependency), or prune with --no-permute-channels"
                               ) from exc
    return linear_sum_assignment


class PermutationError(ThanosExportError, RuntimeError):
    """Channels could not be permuted; the message names the fix."""


def _assignment_cost(candidates: torch.Tensor, threshold: torch.Tensor, chunk_elements: int = 1 << 18) -> torch.Tensor:
    """cost[g, j] = sum over rows of min(candidates[:, j], threshold[:, g]), accumulated in float64.

    Rows go in chunks small enough for the (rows, g, g) minima to stay in cache (one pass over a
    tensor of every row's minima is memory-bound and several times slower), written into one
    buffer (a fresh one per chunk costs page faults on a CPU).
    """
    rows, groups = candidates.shape
    cost = torch.zeros(groups, groups, dtype=torch.float64, device=candidates.device)
    step = max(1, chunk_elements // max(1, groups * groups))
    pair = torch.empty(min(step, rows), groups, groups, dtype=candidates.dtype, device=candidates.device)
    for start in range(0, rows, step):
        chunk = candidates[start:start + step, None, :]
        minima = torch.minimum(chunk, threshold[start:start + step, :, None], out=pair[:chunk.shape[0]])
        cost += minima.sum(dim=0, dtype=torch.float64)
    return cost


@dataclasses.dataclass(frozen=True)
class ChannelLayout:
    """What a model family allows to be reordered in each decoder layer, and its attention heads."""

    free: tuple[FreeChannels, ...]
    head_dim: Optional[int]  # channels per attention head
    kv_repeats: int  # query heads per KV head

    @classmethod
    def of(cls, model: nn.Module, layer: Optional[nn.Module] = None) -> "ChannelLayout":
        """`model`'s family's free channels, with `layer`'s heads where they differ by layer."""
        return cls(free_channels(model), *attention_heads(model, layer))


@dataclasses.dataclass
class PermutationReport:
    consumer: str
    moved: float  # share of the consumer's columns that changed place
    saliency_before: float  # pruned_saliency in the original order
    saliency_after: float
    seconds: float


def permute_free_channels_(layer: nn.Module, prefix: str, layout: ChannelLayout,
                           hessian_of: Callable[[str], Optional[torch.Tensor]], pattern: Pattern,
                           ranges_of: Optional[Callable[[str], Optional[torch.Tensor]]] = None
                           ) -> list[PermutationReport]:
    """Reorder each pruned consumer's input channels (and its producers' rows, and its Hessian) in place.

    `prefix` + relative name is a linear's full name; `hessian_of(full name)` is the consumer's
    Hessian, to be reordered in place, or None when that linear is not pruned (then it is left
    alone). `ranges_of(full name)`, if given, is the consumer's per-channel input range (or None),
    reordered in place with it. Every rank computes the same order from the same reduced statistics.
    """
    if not pattern.is_nm:
        return []
    reports = []
    head_dim, kv_repeats = layout.head_dim, layout.kv_repeats
    for spec in layout.free:
        hessian = hessian_of(prefix + spec.consumer)
        if hessian is None or not all(isinstance(_child(layer, name), nn.Module) for name in spec.producers):
            continue  # not pruned here, or a layer without one of its producers (Gemma 4's keys as values)
        start = time.perf_counter()
        consumer = layer.get_submodule(spec.consumer)
        weight = weight_view(consumer)
        scores = weight.to(torch.float32) ** 2 * hessian.diagonal().to(weight.device, torch.float32)[None, :]
        if spec.per_head:
            order = _per_head_order(scores, head_dim, kv_repeats, pattern)
        else:
            order = group_order(scores, pattern.n, pattern.m)
        if order is None:
            continue
        columns = _head_columns(order, head_dim, kv_repeats) if spec.per_head else order
        before = pruned_saliency(scores, pattern.n, pattern.m)
        after = pruned_saliency(scores[:, columns], pattern.n, pattern.m)
        _reorder_columns_(consumer, columns)
        hessian.copy_(hessian[columns][:, columns])
        ranges = ranges_of(prefix + spec.consumer) if ranges_of else None
        if ranges is not None:
            ranges.copy_(ranges[columns.to(ranges.device)])
        for name in spec.producers:
            _reorder_rows_(layer.get_submodule(name), order)
        moved = float((columns != torch.arange(len(columns), device=columns.device)).float().mean())
        reports.append(PermutationReport(prefix + spec.consumer, moved, before, after, time.perf_counter() - start))
        log.info("%s: channels permuted (%.0f%% moved), pruned saliency %.4g -> %.4g", prefix + spec.consumer,
                 100 * moved, before, after)
    return reports


def _child(layer: nn.Module, name: str) -> Optional[nn.Module]:
    """`layer`'s submodule `name`, or None where it has none (or holds None there)."""
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def _per_head_order(scores: torch.Tensor, head_dim: Optional[int], kv_repeats: int,
                    pattern: Pattern) -> Optional[torch.Tensor]:
    """The producer's row order: each KV head's channels reordered, the same for every query head reading it.

    Scores of the query heads that share a KV head are stacked as rows, so one order serves them all.
    """
    if head_dim is None or head_dim % pattern.m:
        return None
    rows, columns = scores.shape
    kv_heads = columns // (head_dim * kv_repeats)
    by_head = scores.reshape(rows, kv_heads, kv_repeats, head_dim)
    orders = [group_order(by_head[:, h].permute(1, 0, 2).reshape(kv_repeats * rows, head_dim), pattern.n, pattern.m)
              + h * head_dim for h in range(kv_heads)]
    return torch.cat(orders)


def _head_columns(kv_order: torch.Tensor, head_dim: int, kv_repeats: int) -> torch.Tensor:
    """The consumer's column order from the KV channels' order: query head q reads KV head q // kv_repeats."""
    kv_heads = len(kv_order) // head_dim
    per_kv = kv_order.view(kv_heads, head_dim) % head_dim
    heads = [per_kv[q // kv_repeats] + q * head_dim for q in range(kv_heads * kv_repeats)]
    return torch.cat(heads)


def _reorder_columns_(module: nn.Module, columns: torch.Tensor) -> None:
    weight = weight_view(module)
    weight.copy_(weight[:, columns])


def _reorder_rows_(module: nn.Module, rows: torch.Tensor) -> None:
    """A producer's rows, with their bias and (once quantized: the sequential solves) 8-bit scales."""
    weight = weight_view(module)
    weight.copy_(weight[rows])
    bias = getattr(module, "bias", None)
    if bias is not None and bias.shape[0] == len(rows):
        bias.data.copy_(bias.data[rows])
    quantization = quantization_of(module)
    if quantization is not None:
        quantization.weight_scale = quantization.weight_scale[rows.to(quantization.weight_scale.device)]
