"""Activation outliers moved into the weights before 8-bit quantization (SmoothQuant-style).

A few input channels of an LLM's linears carry values far larger than the rest, so one static
scale per input (what an 8-bit GEMM takes) leaves the other channels a few grid steps. Dividing
input channel j by s_j and multiplying column j of every weight that reads it by s_j computes the
same product; s_j = amax(x_j)^alpha / amax(W[:, j])^(1 - alpha) evens out the two ranges (the
migration strength alpha: 0 moves nothing, 1 all of the activations' range into the weights).
The division costs nothing at inference where it folds into what produces the input: the norm's
weight before q/k/v and before gate/up, up_proj's rows before down_proj (act(gate) * up is linear
in up), v_proj's rows before o_proj (the query heads that share a KV head share its scales). A
pruned weight is 0 and stays 0, so the pattern survives.

Which producers feed which consumers is per model family (`thanos.models.Adapter.smoothing`).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

import torch
from torch import nn

from thanos.linears import is_prunable, weight_view

log = logging.getLogger(__name__)

SCALE_RANGE = (1e-4, 1e4)  # s outside it would push a channel out of fp16's range


@dataclasses.dataclass(frozen=True)
class SmoothGroup:
    """`producer` (a norm, or a linear whose rows are the channels) feeds each of `consumers`' inputs.

    Names are relative to a decoder layer. `per_head`: the producer's rows are KV channels and the
    consumer's columns query-head channels (v_proj -> o_proj), query head q reading KV head
    q // repeats.
    """

    producer: str
    consumers: tuple[str, ...]
    per_head: bool = False


def smoothing_scales(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (c,) with s_j = act_j^alpha / weight_j^(1-alpha); 1 where either range is 0."""
    act, weight = act_amax.double(), weight_amax.double()
    scale = act.pow(alpha) / weight.pow(1 - alpha)
    scale = torch.where((act > 0) & (weight > 0), scale, torch.ones_like(scale))
    return scale.clamp(*SCALE_RANGE).float()


@dataclasses.dataclass
class SmoothingReport:
    producer: str
    alpha: float
    scale_min: float
    scale_max: float
    input_spread_before: float  # largest channel range / median channel range
    input_spread_after: float


def smooth_layer_(layer: nn.Module, prefix: str, groups: tuple[SmoothGroup, ...], alpha: float,
                  channel_amax_of: Callable[[str], Optional[torch.Tensor]],
                  hessian_of: Callable[[str], Optional[torch.Tensor]],
                  head_dim: Optional[int], kv_repeats: int) -> dict[str, SmoothingReport]:
    """Migrate each group's input ranges into its consumers, in place; returns {consumer full name: report}.

    `channel_amax_of(full name)` is a consumer's per-channel input range (c,) from calibration, or
    None when that linear is not quantized (then its group is left alone); `hessian_of(full name)`
    its statistics, rescaled in place to the smoothed input (a Hessian shared by several consumers
    once).
    """
    reports: dict[str, SmoothingReport] = {}
    for group in groups:
        names = [prefix + c for c in group.consumers]
        ranges = [channel_amax_of(n) for n in names]
        if any(r is None for r in ranges):
            continue
        consumers = [layer.get_submodule(c) for c in group.consumers]
        act = torch.stack(ranges).amax(0).float()  # (c,) they read the same input
        weight = torch.stack([weight_view(m).abs().amax(0).float().cpu() for m in consumers]).amax(0)  # (c,)
        if group.per_head:
            if head_dim is None:
                continue
            act, weight = (_per_kv_channel(t, head_dim, kv_repeats) for t in (act, weight))
        scale = smoothing_scales(act.cpu(), weight.cpu(), alpha)  # per producer channel
        columns = _query_columns(scale, head_dim, kv_repeats) if group.per_head else scale
        before = _spread(act)
        _divide_producer_(layer.get_submodule(group.producer), scale)
        seen = set()
        for name, module in zip(names, consumers):
            w = weight_view(module)
            w.copy_((w.float() * columns.to(w.device)[None, :]).to(w.dtype))
            hessian = hessian_of(name)
            if hessian is not None and id(hessian) not in seen:
                seen.add(id(hessian))
                inv = (1.0 / columns).to(hessian.device, hessian.dtype)
                hessian.mul_(inv[:, None]).mul_(inv[None, :])
        report = SmoothingReport(prefix + group.producer, alpha, float(scale.min()), float(scale.max()), before,
                                 _spread(act / scale))
        log.info("%s: input ranges smoothed (alpha %.2f), spread %.3g -> %.3g", report.producer, alpha,
                 report.input_spread_before, report.input_spread_after)
        reports.update({name: report for name in names})
    return reports


def _spread(ranges: torch.Tensor) -> float:
    median = float(ranges.median())
    return float(ranges.max()) / median if median > 0 else float("inf")


def _per_kv_channel(per_column: torch.Tensor, head_dim: int, kv_repeats: int) -> torch.Tensor:
    """Query-head columns (heads * head_dim,) to KV channels: the largest over the heads sharing one."""
    return per_column.reshape(-1, kv_repeats, head_dim).amax(1).reshape(-1)


def _query_columns(kv_scale: torch.Tensor, head_dim: int, kv_repeats: int) -> torch.Tensor:
    kv_heads = kv_scale.numel() // head_dim
    return kv_scale.reshape(kv_heads, 1, head_dim).expand(kv_heads, kv_repeats, head_dim).reshape(-1)


@torch.no_grad()
def _divide_producer_(module: nn.Module, scale: torch.Tensor) -> None:
    """Divide the producer's output channels by `scale`: a norm's weight (and bias), or a linear's rows."""
    if is_prunable(module):
        target = weight_view(module)
        target.copy_((target.float() / scale.to(target.device)[:, None]).to(target.dtype))
    else:
        module.weight.copy_((module.weight.float() / scale.to(module.weight.device)).to(module.weight.dtype))
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.copy_((bias.float() / scale.to(bias.device)).to(bias.dtype))
