"""Activation outliers moved into the weights before 8-bit quantization (SmoothQuant-style).

A few input channels of an LLM's linears carry values far larger than the rest, so one static
scale per input (what an 8-bit GEMM takes) leaves the other channels a few grid steps. Dividing
input channel j by s_j and multiplying column j of every weight that reads it by s_j computes the
same product; s_j = amax(x_j)^alpha / amax(W[:, j])^(1 - alpha) evens out the two ranges (the
migration strength alpha: 0 moves nothing, 1 all of the activations' range into the weights).
The division costs nothing at inference where it folds into what produces the input: the norm's
weight (and a LayerNorm's bias) before q/k/v and before gate/up, up_proj's rows before down_proj (act(gate) * up is linear
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


AUTO = "auto"
ALPHA_GRID = tuple(i / 20 for i in range(20))  # 0, 0.05, ..., 0.95: what "auto" chooses from


def estimated_error(weights: list[torch.Tensor], act_amax: torch.Tensor, second_moment: torch.Tensor,
                    columns: torch.Tensor, qmax: float) -> float:
    """The output error energy that INT8 rounding adds to the consumers `weights` (r, c) when their
    input channels are divided by `columns` (c,) and their columns multiplied by it.

    A model of uniform rounding noise: an input channel with per-tensor step t = max_j(a_j / s_j) /
    qmax adds variance min(E[x_j^2] / s_j^2, t^2 / 12) (a channel far below one step rounds to 0,
    its whole value lost), weighted by the squared norm of the column it meets; each kept weight
    of row i with step t_i = max_j |W_ij s_j| / qmax adds min((W_ij s_j)^2, t_i^2 / 12) E[x_j^2] /
    s_j^2. `second_moment` is E[x_j^2] (the statistics' diagonal), `act_amax` the channels' ranges.
    """
    columns = columns.double()
    moment = second_moment.double() / columns ** 2
    step = float((act_amax.double() / columns).max()) / qmax
    input_noise = torch.clamp(moment, max=step ** 2 / 12)  # (c,)
    total = 0.0
    for weight in weights:
        w = weight.double() * columns[None, :]
        total += float((w.pow(2).sum(0) * input_noise).sum())
        row_step = w.abs().amax(1, keepdim=True) / qmax  # (r, 1)
        total += float((torch.minimum(w.pow(2), row_step ** 2 / 12) * (w != 0) * moment[None, :]).sum())
    return total


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
    estimated_error_vs_unsmoothed: Optional[float] = None  # "auto": the chosen strength's estimate / alpha 0's


def smooth_layer_(layer: nn.Module, prefix: str, groups: tuple[SmoothGroup, ...], alpha: "float | str",
                  channel_amax_of: Callable[[str], Optional[torch.Tensor]],
                  hessian_of: Callable[[str], Optional[torch.Tensor]],
                  head_dim: Optional[int], kv_repeats: int, qmax: float = 127.0) -> dict[str, SmoothingReport]:
    """Migrate each group's input ranges into its consumers, in place; returns {consumer full name: report}.

    `channel_amax_of(full name)` is a consumer's per-channel input range (c,) from calibration, or
    None when that linear is not quantized (then its group is left alone); `hessian_of(full name)`
    its statistics, rescaled in place to the smoothed input (a Hessian shared by several consumers
    once). `alpha` "auto": each group takes the strength of `ALPHA_GRID` whose `estimated_error`
    on a grid of `qmax` steps is the smallest.
    """
    reports: dict[str, SmoothingReport] = {}
    for group in groups:
        names = [prefix + c for c in group.consumers]
        ranges = [channel_amax_of(n) for n in names]
        if any(r is None for r in ranges):
            continue
        consumers = [layer.get_submodule(c) for c in group.consumers]
        column_act = torch.stack(ranges).amax(0).float().cpu()  # (c,) they read the same input
        weight = torch.stack([weight_view(m).abs().amax(0).float().cpu() for m in consumers]).amax(0)  # (c,)
        act = column_act  # per producer channel
        if group.per_head:
            if head_dim is None:
                continue
            act, weight = (_per_kv_channel(t, head_dim, kv_repeats) for t in (act, weight))

        def columns_for(strength: float) -> tuple[torch.Tensor, torch.Tensor]:
            scale = smoothing_scales(act, weight, strength)  # per producer channel
            return scale, _query_columns(scale, head_dim, kv_repeats) if group.per_head else scale

        chosen, estimates = alpha, None
        if alpha == AUTO:
            moment = torch.diagonal(hessian_of(names[0])).float().cpu()
            weights = [weight_view(m).detach().float().cpu() for m in consumers]
            estimates = {a: estimated_error(weights, column_act, moment, columns_for(a)[1], qmax) for a in ALPHA_GRID}
            chosen = min(estimates, key=estimates.get)
        scale, columns = columns_for(chosen)
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
        report = SmoothingReport(prefix + group.producer, chosen, float(scale.min()), float(scale.max()), before,
                                 _spread(act / scale), None if estimates is None else
                                 estimates[chosen] / estimates[0.0] if estimates[0.0] > 0 else 1.0)
        log.info("%s: input ranges smoothed (alpha %.2f), spread %.3g -> %.3g", report.producer, chosen,
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
