"""`prune_weight`: the one public entry point to every solver."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch

from thanos.config import ConfigError, Pattern, PruneConfig
from thanos.hessian import reconstruction_error
from thanos.solvers.magnitude import magnitude_prune
from thanos.solvers.sparsegpt import sparsegpt_prune
from thanos.solvers.thanos import DEFAULT_SOLVE_MEMORY, thanos_prune
from thanos.solvers.wanda import wanda_prune


class PruningError(RuntimeError):
    """A solver produced something unusable (NaN or Inf); the message names the layer."""


@dataclasses.dataclass
class PruneResult:
    weight: torch.Tensor  # same shape, dtype and device as the input weight
    mask: torch.Tensor  # bool, True where a weight was removed
    config: PruneConfig
    sparsity: float  # fraction of removed weights
    error: Optional[float]  # relative reconstruction error ||(W'-W)X||^2 / ||WX||^2, if H given
    damp_used: float
    damp_escalations: int
    seconds: float


def prune_weight(
    weight: torch.Tensor,
    hessian: Optional[torch.Tensor],
    method: str = "thanos",
    pattern: "str | Pattern" = "2:4",
    sparsity: Optional[float] = None,
    block_size: Optional[int] = None,
    alpha: float = 0.0,
    damp: float = 0.01,
    *,
    name: str = "layer",
    solve_memory: int = DEFAULT_SOLVE_MEMORY,
    progress: Optional[Callable[[int, int], None]] = None,
) -> PruneResult:
    """Prune one linear weight (r x c) given its input statistics `hessian` (c x c, mean x x^T).

    Runs on the weight's device in fp32 whatever the weight's dtype, and returns the weight in
    its own dtype. `method` is thanos, sparsegpt, wanda or magnitude (magnitude needs no
    hessian; wanda also accepts the diagonal alone as a (c,) tensor). See `PruneConfig` for
    `pattern`, `sparsity`, `block_size`, `alpha` and `damp`. `progress(columns_done, columns)`
    is called after each block by the block solvers (thanos, sparsegpt).
    """
    config = PruneConfig(method, Pattern.parse(pattern), sparsity, block_size, alpha, damp)
    _check_inputs(weight, hessian, config, name)
    start = time.perf_counter()
    W = weight.detach().to(torch.float32).clone()  # (r, c) fp32 working copy
    H = None if hessian is None else hessian.detach().to(device=W.device, dtype=torch.float32)
    pattern = config.pattern
    if config.method == "thanos":
        out = thanos_prune(W, H, pattern, config.sparsity, config.resolved_block_size, config.alpha, damp,
                           layer=name, solve_memory=solve_memory, progress=progress)
    elif config.method == "sparsegpt":
        out = sparsegpt_prune(W, H, pattern, config.sparsity, config.resolved_block_size, damp, layer=name,
                              progress=progress)
    elif config.method == "wanda":
        out = wanda_prune(W, H if H.dim() == 1 else torch.diag(H), pattern, config.sparsity)
    else:
        out = magnitude_prune(W, pattern, config.sparsity)
    if not torch.isfinite(out.weight).all():
        raise PruningError(
            f"{name}: pruning produced NaN or Inf weights (method {config.method}); check the layer's "
            "calibration statistics for NaN, or raise --damp"
        )
    if weight.device.type == "cuda":
        torch.cuda.synchronize(weight.device)
    seconds = time.perf_counter() - start
    error = None
    if H is not None and H.dim() == 2:
        error = reconstruction_error(weight.detach().to(W), out.weight, H)
    return PruneResult(
        weight=out.weight.to(weight.dtype),
        mask=out.mask,
        config=config,
        sparsity=float(out.mask.float().mean()),
        error=error,
        damp_used=out.damp_used,
        damp_escalations=out.escalations,
        seconds=seconds,
    )


def _check_inputs(weight, hessian, config: PruneConfig, name: str) -> None:
    if weight.dim() != 2:
        raise ConfigError(f"{name}: weight must be 2-D (out_features x in_features), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ConfigError(f"{name}: weight must be a floating-point tensor, got {weight.dtype}")
    rows, cols = weight.shape
    pattern = config.pattern
    if pattern.is_nm and cols % pattern.m:
        raise ConfigError(
            f"{name}: {cols} input columns are not a multiple of m={pattern.m}, so pattern {pattern} cannot "
            f"tile the rows; exclude this layer or use pattern 'unstructured'"
        )
    if hessian is None:
        if config.method != "magnitude":
            raise ConfigError(f"{name}: method {config.method!r} needs the input statistics (hessian); "
                              "pass it, or use method 'magnitude'")
        return
    expected = (cols,) if config.method == "wanda" and hessian.dim() == 1 else (cols, cols)
    if tuple(hessian.shape) != expected:
        raise ConfigError(
            f"{name}: hessian has shape {tuple(hessian.shape)} but a weight with {cols} input columns needs "
            f"{cols} x {cols} (the mean of x x^T over inputs x of length {cols}); is the weight transposed?"
        )
    if not torch.isfinite(hessian).all():
        raise ConfigError(f"{name}: hessian contains NaN or Inf; recompute the calibration statistics")
