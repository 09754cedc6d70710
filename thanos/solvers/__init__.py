"""One solver per file. Each is a pure tensor function: fp32 weight and statistics in, pruned
fp32 weight and removal mask out. `thanos.api.prune_weight` is the public entry point."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass
class SolverOutput:
    weight: torch.Tensor  # (r, c) fp32, pruned
    mask: torch.Tensor  # (r, c) bool, True where removed
    damp_used: float = 0.0
    escalations: int = 0
    # sum over rows of (w - w0) Hd (w - w0)^T against the input weight w0, with Hd the Hessian
    # damped as used, summed from each removal's exact cost as the solve went (None: not tracked)
    error: Optional[float] = None
