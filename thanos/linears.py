"""How a model's linears hold their weights, whichever module type stores them."""
from __future__ import annotations

import torch
from torch import nn


def stores_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D keeps its weight as (in_features, out_features) and computes x @ W."""
    return type(module).__name__ == "Conv1D"


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or stores_transposed(module)


def weight_view(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whichever way the module stores it."""
    return module.weight.data.T if stores_transposed(module) else module.weight.data


def set_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    module.weight.data.copy_(weight.T if stores_transposed(module) else weight)
