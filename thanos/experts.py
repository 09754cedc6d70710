"""Mixture-of-experts layers seen as one linear per expert and projection.

transformers stores a layer's experts fused: `gate_up_proj` (experts, 2 x intermediate, hidden), or
`up_proj` where the experts have no gate (Nemotron-H), and `down_proj` (experts, hidden,
intermediate), 3-D parameters that no per-linear step can see. While a model is loaded here, each
such module is replaced by `UnfusedExperts`: an `nn.Linear` per expert and projection whose weight
is a view of the fused tensor (no copy), called on the tokens routed to that expert only, so the
driver's hooks gather each expert's statistics from its own tokens and every step (solve,
permutation, reconstruction, checkpoint, report) names it like any linear:
`...mlp.experts.3.gate_proj`. Saving puts the fused modules back (`fused_for_saving`), so the
directory is the family's own checkpoint format. Llama 4's experts take every token scaled by its
router score instead of the routed tokens (`UnfusedScaledInputExperts`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn


def is_fused_experts(module: nn.Module) -> bool:
    """A fused experts module `UnfusedExperts` can stand in for: gate and up in one tensor (concatenated
    or interleaved) or up alone (no gate), each stored (out, in) or transposed, with or without biases,
    no norm after each expert (the flags transformers' `use_experts_implementation` sets)."""
    if not hasattr(module, "has_gate"):
        return False
    first = input_tensor(module)
    up, down = getattr(module, first, None), getattr(module, "down_proj", None)
    return (isinstance(up, nn.Parameter) and isinstance(down, nn.Parameter) and up.dim() == down.dim() == 3
            and hasattr(module, "is_concatenated") and hasattr(module, "is_transposed")
            and not getattr(module, "has_post_expert_norm", True)
            and (not getattr(module, "has_bias", True)
                 or hasattr(module, f"{first}_bias") and hasattr(module, "down_proj_bias")))


def input_tensor(fused: nn.Module) -> str:
    """The fused tensor that reads the experts' input: gate and up together, or up where there is no gate."""
    return "gate_up_proj" if fused.has_gate else "up_proj"


def is_scaled_input_experts(module: nn.Module) -> bool:
    """Llama 4's experts module: gate and up concatenated and down, stored (in, out), every expert run on
    every token's input scaled by its router score (zero where the token is not routed to it), the
    experts' inputs stacked in one (experts x tokens, hidden) tensor."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (type(module).__name__ == "Llama4TextExperts" and isinstance(gate_up, nn.Parameter)
            and isinstance(down, nn.Parameter) and gate_up.dim() == down.dim() == 3)


def is_experts_module(module: nn.Module) -> bool:
    """A fused experts module `unfuse_experts_` replaces (transformers' usual layout, or Llama 4's)."""
    return is_fused_experts(module) or is_scaled_input_experts(module)


def _declare_layout_(module: nn.Module) -> None:
    """Give Llama 4's experts module the layout flags (and gate function) transformers' other fused
    experts carry, which `expert_views` and saving read."""
    module.has_gate, module.is_concatenated, module.is_transposed = True, True, True
    module.has_bias, module.has_post_expert_norm = False, False

    def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return up * module.act_fn(gate)

    module._apply_gate = apply_gate


def expert_views(fused: nn.Module, e: int) -> dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Expert `e`'s {projection: (weight (out, in), bias or None)}, views of the fused tensors."""
    if is_scaled_input_experts(fused) and not hasattr(fused, "has_gate"):  # as transformers loads it
        _declare_layout_(fused)
    first = input_tensor(fused)
    weights = {**expert_weights(fused, first, getattr(fused, first).data, e),
               **expert_weights(fused, "down_proj", fused.down_proj.data, e)}
    biases = {}
    if fused.has_bias:
        bias = getattr(fused, f"{first}_bias").data[e]
        if fused.has_gate:
            gate, up = _gate_and_up(fused, bias.shape[-1])
            biases = dict(gate_proj=bias[gate], up_proj=bias[up])
        else:
            biases = dict(up_proj=bias)
        biases["down_proj"] = fused.down_proj_bias.data[e]
    return {projection: (weight, biases.get(projection)) for projection, weight in weights.items()}


def expert_weights(fused: nn.Module, tensor: str, stored: torch.Tensor, e: int) -> dict[str, torch.Tensor]:
    """Expert `e`'s {projection: weight (out, in)} in `stored`, the fused module's `tensor` ("gate_up_proj",
    "up_proj" or "down_proj") or that tensor as the files hold it: views, in whichever layout the module's
    flags say (gate and up concatenated or interleaved, stored (out, in) or transposed)."""
    weight = stored[e].T if fused.is_transposed else stored[e]  # transposed: stored (in, out), x @ W
    if tensor != "gate_up_proj":
        return {tensor: weight}
    gate, up = _gate_and_up(fused, weight.shape[0])
    return dict(gate_proj=weight[gate], up_proj=weight[up])


def _gate_and_up(fused: nn.Module, rows: int) -> tuple[slice, slice]:
    """Where gate's and up's rows are among gate_up's `rows`: halves, or interleaved (gate, up, gate, ...)."""
    return ((slice(0, rows // 2), slice(rows // 2, None)) if fused.is_concatenated
            else (slice(0, None, 2), slice(1, None, 2)))


class ExpertMLP(nn.Module):
    """One expert's projections (gate, up and down, or up and down), named as a dense MLP's."""

    def __init__(self, views: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]]):
        super().__init__()
        for name, (weight, bias) in views.items():
            setattr(self, name, _linear(weight, bias))


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    with torch.device("meta"):  # no memory: the weight is the fused tensor's view
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight)
    if bias is not None:
        linear.bias = nn.Parameter(bias)
    return linear


class UnfusedExperts(nn.ModuleList):
    """A fused experts module's function, one linear per expert and projection (views of its weights):
    expert e's are `e.gate_proj` (where the experts are gated), `e.up_proj`, `e.down_proj`.

    Every expert is called on every pass, with no rows where no token is routed to it, so that each
    linear's input is seen in each pass the driver makes; served (`serve_experts_`), only the
    experts some token is routed to are called (a sparse kernel need not take zero rows).
    """

    call_idle = True

    def __init__(self, fused: nn.Module):
        super().__init__(ExpertMLP(expert_views(fused, e)) for e in range(fused.down_proj.shape[0]))
        object.__setattr__(self, "fused", fused)  # not a submodule: its tensors are the experts' storage

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            tokens, slot = torch.where(top_k_index == e)
            if not len(tokens) and not self.call_idle:
                continue
            x = hidden_states[tokens]
            out = expert.down_proj(self._hidden(expert, x)) * top_k_weights[tokens, slot, None]
            final.index_add_(0, tokens, out.to(final.dtype))
        return final

    def _hidden(self, expert: ExpertMLP, x: torch.Tensor) -> torch.Tensor:
        """What expert's down_proj reads: the family's gate function of gate and up, or its activation of up."""
        if not self.fused.has_gate:
            return self.fused.act_fn(expert.up_proj(x))
        gate, up = expert.gate_proj(x), expert.up_proj(x)
        # back in the fused layout, which the family's own gate function reads
        gate_up = torch.cat([gate, up], dim=-1) if self.fused.is_concatenated else \
            torch.stack([gate, up], dim=-1).flatten(-2)
        return self.fused._apply_gate(gate_up)

    def sync_(self) -> None:
        """Write each expert's weights into the fused tensors where they are no longer views of them (a
        move to another device and back copies), and make them views again: one copy in memory."""
        for e, expert in enumerate(self):
            for name, (weight, bias) in expert_views(self.fused, e).items():
                linear = getattr(expert, name)
                for held, target in ((linear.weight, weight), (linear.bias, bias)):
                    if target is not None and held.data_ptr() != target.data_ptr():
                        target.copy_(held.data)
                        if (held.device, held.dtype) == (target.device, target.dtype):  # not after a cast
                            held.data = target


class UnfusedScaledInputExperts(UnfusedExperts):
    """Llama 4's experts (`is_scaled_input_experts`), one linear per expert and projection: expert e
    reads the rows of its block where the router sent a token (the others are zero, and so is their
    output: no biases), so its statistics are those of its own tokens, as `UnfusedExperts`'."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        blocks = hidden_states.view(len(self), -1, hidden_states.shape[-1])  # (experts, tokens, hidden)
        final = torch.zeros_like(blocks)
        for e, expert in enumerate(self):
            tokens = torch.where(blocks[e].ne(0).any(-1))[0]
            if not len(tokens) and not self.call_idle:
                continue
            x = blocks[e, tokens]
            hidden = self.fused._apply_gate(torch.cat([expert.gate_proj(x), expert.up_proj(x)], dim=-1))
            final[e, tokens] = expert.down_proj(hidden).to(final.dtype)
        return final.view(-1, hidden_states.shape[-1])


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


def expert_chunks(layer: nn.Module, prefix: str, names, budget: int) -> list[list[str]]:
    """The experts' linears among `names`, in chunks of whole experts whose statistics fit `budget`
    bytes (fp64 c x c sums, one per distinct input: an expert's gate and up read one), in expert
    order; [] where they all fit at once (or the layer has none). An expert larger than the budget
    is a chunk of its own."""
    wanted = set(names)
    experts: list[tuple[list[str], int]] = []  # (its linears among `names`, its statistics' bytes)
    for name, module in layer.named_modules():
        if isinstance(module, UnfusedExperts):
            for e, expert in enumerate(module):
                own = [f"{prefix}{name}.{e}.{projection}" for projection in ("gate_proj", "up_proj", "down_proj")]
                own = [n for n in own if n in wanted]
                reads_down = any(n.endswith("down_proj") for n in own)
                reads_gate_up = len(own) > reads_down  # gate and up read one input
                experts.append((own, 8 * (reads_gate_up * expert.up_proj.in_features ** 2
                                          + reads_down * expert.down_proj.in_features ** 2)))
    if sum(nbytes for _, nbytes in experts) <= budget:
        return []
    chunks: list[list[str]] = []
    held = budget + 1  # the first expert opens a chunk
    for own, nbytes in experts:
        if not own:
            continue
        if held + nbytes > budget:
            chunks.append([])
            held = 0
        chunks[-1] += own
        held += nbytes
    return chunks


def serve_experts_(model: nn.Module) -> None:
    """From now on call only the experts some token is routed to (for serving, not for statistics)."""
    for module in model.modules():
        if isinstance(module, UnfusedExperts):
            module.call_idle = False


def unfuse_experts_(model: nn.Module) -> int:
    """Replace every fused experts module in `model` by `UnfusedExperts`; returns how many."""
    found = [(name, module) for name, module in model.named_modules() if is_experts_module(module)]
    for name, module in found:
        _replace(model, name, UnfusedScaledInputExperts(module) if is_scaled_input_experts(module)
                 else UnfusedExperts(module))
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

