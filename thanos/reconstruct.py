"""Decoder-block reconstruction: tune a pruned layer's kept weights so the block's output matches.

After the linears of a decoder layer are pruned one by one, each against its own input
statistics, the layer as a whole (attention, MLP, norms, residuals) still drifts from what it
should output. This step runs a few Adam epochs over the calibration samples on the kept weights
of the pruned linears only, with the masks frozen (removed weights get no gradient and stay
exactly zero), minimising the mean squared difference from `targets`: the dense layer's outputs
on the same inputs, or the dense model's own activations (docs/ALGORITHM.md section 9).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReconstructionReport:
    loss_before: float  # mean squared error / mean squared target, over all samples
    loss_after: float
    kept: bool  # False: the tuned weights were worse on the samples and were discarded
    seconds: float = 0.0


# Samples per optimiser step: small steps move the weights furthest for one pass of compute, and a
# fixed grouping by sample index makes the steps the same however the samples are sharded.
SAMPLES_PER_STEP = 4


def reconstruct_layer_(layer: nn.Module, weights: list[nn.Parameter], inputs: list[torch.Tensor],
                       targets: list[torch.Tensor], forward: Callable[[torch.Tensor, int], torch.Tensor], epochs: int,
                       lr: float, indices: Optional[list[int]] = None, total: Optional[int] = None,
                       all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> ReconstructionReport:
    """Tune `weights` (parameters of `layer`, zero where pruned) so `forward(x, j)` (x the `j`-th of
    `inputs`) matches its target.

    Each epoch takes `ceil(total / SAMPLES_PER_STEP)` Adam steps; step `k` averages the gradient of
    the samples whose index is `k` modulo the step count. Under torch.distributed each rank passes
    the global `indices` of its samples, the global `total` and an `all_reduce` that sums a tensor
    over ranks: every rank then takes the same steps as one process holding all the samples. The
    tuned weights are kept only if the loss over all samples went down; otherwise they are
    restored, so the layer never ends worse on its calibration data.

    A half-precision layer (fp16, bf16) is tuned in fp32 and written back in its own dtype: Adam's
    epsilon (1e-8) is 0 in fp16, so its update would be 0/0 wherever a gradient is 0. Both losses
    are measured in the layer's own dtype, so the comparison sees the weights as they are kept.
    """
    start = time.perf_counter()
    indices = list(range(len(inputs))) if indices is None else indices
    total = len(inputs) if total is None else total
    steps = max(1, math.ceil(total / SAMPLES_PER_STEP))
    step_sizes = [len(range(k, total, steps)) for k in range(steps)]  # samples in each step, over all ranks
    own = [[j for j, index in enumerate(indices) if index % steps == k] for k in range(steps)]  # this rank's
    keep = [(w != 0).to(w.dtype) for w in weights]
    saved = [w.detach().clone() for w in weights]
    trainable = {id(w) for w in weights}
    frozen = [p for p in layer.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
        w.grad = torch.zeros_like(w)
    optimizer = torch.optim.Adam(weights, lr=lr)
    # Each step's gradient is summed per sample in fp64: the same sum whichever rank holds which
    # sample (as the statistics, thanos.hessian.HessianAccumulator).
    sums = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    dtype = weights[0].dtype
    tuned = forward if dtype == torch.float32 else (lambda x, j: forward(x.float(), j))
    try:
        before = _loss(inputs, targets, forward, total, all_reduce, weights[0].device)
        layer.float()  # the parameters keep their identity: `weights` and the optimiser see fp32 data
        with torch.enable_grad():
            for _ in range(epochs):
                for k in range(steps):
                    for total_grad in sums:
                        total_grad.zero_()
                    for j in own[k]:
                        out = tuned(inputs[j], j)
                        (_relative_mse(out, targets[j].to(out)) / step_sizes[k]).backward()
                        for total_grad, w in zip(sums, weights):
                            total_grad += w.grad
                            w.grad.zero_()
                    for w, total_grad, mask in zip(weights, sums, keep):
                        if all_reduce:
                            all_reduce(total_grad)
                        w.grad.copy_(total_grad).mul_(mask)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=False)
                    with torch.no_grad():
                        for w, mask in zip(weights, keep):
                            w.mul_(mask)  # Adam's moments are zero off the mask; this keeps zeros exact
        layer.to(dtype)
        after = _loss(inputs, targets, forward, total, all_reduce, weights[0].device)
        kept = after <= before
        if not kept:
            with torch.no_grad():
                for w, s in zip(weights, saved):
                    w.copy_(s)
    finally:
        layer.to(dtype)
        for w in weights:
            w.grad = None
            w.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
    return ReconstructionReport(before, after if kept else before, kept, time.perf_counter() - start)


def _relative_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out.float() - target.float()).pow(2).mean() / target.float().pow(2).mean().clamp_min(1e-30)


@torch.no_grad()
def _loss(inputs, targets, forward, total: int, all_reduce, device: torch.device) -> float:
    """Mean relative error over all samples (every rank's, with `all_reduce`).

    The sum lives where the layer computes: NCCL reduces only tensors on the GPU.
    """
    summed = torch.zeros((), dtype=torch.float64, device=device)
    for j, (x, target) in enumerate(zip(inputs, targets)):
        out = forward(x, j)
        summed += _relative_mse(out, target.to(out)).double()
    if all_reduce:
        all_reduce(summed)
    return float(summed) / max(total, 1)
