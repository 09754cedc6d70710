"""Mixture-of-experts layers seen as one linear per expert and projection.

transformers stores a layer's experts fused: `gate_up_proj` (experts, 2 x intermediate, hidden) and
`down_proj` (experts, hidden, intermediate), 3-D parameters that no per-linear step can see. While a
model is loaded here, each such module is replaced by `UnfusedExperts`: an `nn.Linear` per expert
and projection whose weight is a view of the fused tensor (no copy), called on the tokens routed
to that expert only, so the driver's hooks gather each expert's statistics from its own tokens
and every step (solve, permutation, reconstruction, checkpoint, report) names it like any linear:
`...mlp.experts.3.gate_proj`. Saving puts the fused modules back (`fused_for_saving`), so the
directory is the family's own checkpoint format.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def is_fused_experts(module: nn.Module) -> bool:
    """A fused experts module of the layout `UnfusedExperts` computes: gate and up concatenated, stored
    (out, in), no biases and no norm after each expert (transformers' `use_experts_implementation` flags)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == down.dim() == 3
            and getattr(module, "has_gate", False) and getattr(module, "is_concatenated", False)
            and not getattr(module, "is_transposed", True) and not getattr(module, "has_bias", True)
            and not getattr(module, "has_post_expert_norm", True))


class ExpertMLP(nn.Module):
    """One expert's three projections, named as a dense MLP's."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (_linear(w) for w in (gate, up, down))


def _linear(weight: torch.Tensor) -> nn.Linear:
    with torch.device("meta"):  # no memory: the weight is the fused tensor's view
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight)
    return linear


class UnfusedExperts(nn.ModuleList):
    """A fused experts module's function, one linear per expert and projection (views of its weights):
    expert e's are `e.gate_proj`, `e.up_proj`, `e.down_proj`.

    Every expert is called on every pass, with no rows where no token is routed to it, so that each
    linear's input is seen in each pass the driver makes; served (`serve_experts_`), only the
    experts some token is routed to are called (a sparse kernel need not take zero rows).
    """

    call_idle = True

    def __init__(self, fused: nn.Module):
        intermediate = fused.down_proj.shape[2]
        super().__init__(ExpertMLP(fused.gate_up_proj.data[e, :intermediate], fused.gate_up_proj.data[e, intermediate:],
                                   fused.down_proj.data[e]) for e in range(fused.gate_up_proj.shape[0]))
        object.__setattr__(self, "fused", fused)  # not a submodule: its tensors are the experts' storage

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            tokens, slot = torch.where(top_k_index == e)
            if not len(tokens) and not self.call_idle:
                continue
            x = hidden_states[tokens]
            hidden = self.fused._apply_gate(torch.cat([expert.gate_proj(x), expert.up_proj(x)], dim=-1))
            out = expert.down_proj(hidden) * top_k_weights[tokens, slot, None]
            final.index_add_(0, tokens, out.to(final.dtype))
        return final

    def sync_(self) -> None:
        """Write each expert's weight into the fused tensors where it is no longer a view of them (a
        move to another device and back copies), and make it a view again: one copy in memory."""
        fused = self.fused
        intermediate = fused.down_proj.shape[2]
        for e, expert in enumerate(self):
            for linear, target in ((expert.gate_proj, fused.gate_up_proj.data[e, :intermediate]),
                                   (expert.up_proj, fused.gate_up_proj.data[e, intermediate:]),
                                   (expert.down_proj, fused.down_proj.data[e])):
                if linear.weight.data_ptr() != target.data_ptr():
                    target.copy_(linear.weight.data)
                    if linear.weight.device == target.device:
                        linear.weight.data = target


def merge_expert_groups(groups: list[list[str]], layer: nn.Module, prefix: str) -> list[list[str]]:
    """A layer's linear groups in solving order (`SharedInputStatistics.groups`), each mixture of
    experts' merged: every expert's gate/up where the first of them was, every down_proj where the
    first down_proj was. No expert's input depends on another expert's weights, so one pass through
    the layer serves them all, where a pass per group would be two per expert (each going through
    the experts before it: quadratic in their number)."""
    stage_of = {}  # full linear name -> (experts module, its input or its output projection)
    for name, module in layer.named_modules():
        if isinstance(module, UnfusedExperts):
            for e in range(len(module)):
                for projection, stage in (("gate_proj", "in"), ("up_proj", "in"), ("down_proj", "out")):
                    stage_of[f"{prefix}{name}.{e}.{projection}"] = (name, stage)
    merged: list[list[str]] = []
    position: dict[tuple, int] = {}
    for group in groups:
        stages = {stage_of.get(name) for name in group}
        stage = stages.pop() if len(stages) == 1 else None
        if stage is not None and stage in position:
            merged[position[stage]] += group
        else:
            if stage is not None:
                position[stage] = len(merged)
            merged.append(list(group))
    return merged


def serve_experts_(model: nn.Module) -> None:
    """From now on call only the experts some token is routed to (for serving, not for statistics)."""
    for module in model.modules():
        if isinstance(module, UnfusedExperts):
            module.call_idle = False


def unfuse_experts_(model: nn.Module) -> int:
    """Replace every fused experts module in `model` by `UnfusedExperts`; returns how many."""
    found = [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]
    for name, module in found:
        _replace(model, name, UnfusedExperts(module))
    return len(found)


def sync_experts_(module: nn.Module) -> None:
    """`UnfusedExperts.sync_` for each in `module` (after a move back from the device)."""
    for unfused in module.modules():
        if isinstance(unfused, UnfusedExperts):
            unfused.sync_()


def fuse_experts_(model: nn.Module) -> list[tuple[str, UnfusedExperts]]:
    """Put each fused experts module back in place of its `UnfusedExperts` (holding its weights as
    they are now); returns what was replaced."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, UnfusedExperts)]
    for name, unfused in found:
        unfused.sync_()
        _replace(model, name, unfused.fused)
    return found


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextlib.contextmanager
def fused_for_saving(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with its fused experts modules back in place, for `save_pretrained`; unfused again after."""
    found = fuse_experts_(model)
    try:
        yield model
    finally:
        for name, unfused in found:
            _replace(model, name, unfused)

