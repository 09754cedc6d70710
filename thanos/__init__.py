"""Pruning LLM weights with Thanos and the baselines it is measured against.

    from thanos import prune_weight
    result = prune_weight(weight, hessian, method="thanos", pattern="2:4")
"""
from thanos.api import PruneResult, PruningError, prune_weight
from thanos.config import ConfigError, Pattern, PruneConfig
from thanos.hessian import FactorizationError, HessianAccumulator

__all__ = [
    "ConfigError", "FactorizationError", "HessianAccumulator", "Pattern", "PruneConfig",
    "PruneResult", "PruningError", "prune_weight",
]
