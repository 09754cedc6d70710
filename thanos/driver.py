"""The whole-model driver (docs/ALGORITHM.md section 7), written once for every model family.

Capture the first decoder layer's inputs; then for each decoder layer: hook its prunable
linears to stream statistics, run the calibration samples through it, prune each linear, re-run
the samples through the pruned layer and feed the outputs to the next layer. Only the layer
being pruned is on the accelerator.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections import UserDict
from typing import Callable, Optional

import torch
from torch import nn

from thanos.api import PruneResult, prune_weight
from thanos.checkpoint import LayerCheckpoints
from thanos.config import ConfigError, PruneConfig
from thanos.devices import free_memory
from thanos.experts import UnfusedExperts, expert_chunks, merge_expert_groups, sync_experts_
from thanos.hessian import Curvature, HessianAccumulator
from thanos.models import (LayerSelection, ModelError, adapter_for, attention_heads, decoder_layers,
                           prunable_linears, smoothing_groups)
from thanos.linears import set_weight_, weight_view
from thanos.parallel import Parallel
from thanos.permute import ChannelLayout
from thanos.quantize import FORMATS, activation_scale
from thanos.quantized_model import LinearQuantization, inputs_rounded, quantization_of, set_quantization
from thanos.recipe import Permute, Quantize, Reconstruct
from thanos.smooth import SmoothGroup, smooth_layer_

log = logging.getLogger(__name__)

# progress(stage, done, total): stage is "layers", "samples", "linears" solved in a layer, or "columns"
# inside a wide linear's solve
Progress = Callable[[str, int, int], None]
WIDE_LAYER_COLUMNS = 4096  # layers this wide take long enough to solve that they report progress


class _Captured(Exception):
    pass


def check_pattern_fits(linears: dict[int, dict[str, nn.Module]], config: PruneConfig) -> None:
    if not config.pattern.is_nm:
        return
    m = config.pattern.m
    bad = [f"{name} ({weight_view(mod).shape[1]} inputs)" for layer in linears.values()
           for name, mod in layer.items() if weight_view(mod).shape[1] % m]
    if bad:
        raise ModelError(f"pattern {config.pattern} needs input widths divisible by {m}, but these are not: "
                         f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; leave them out with --exclude "
                         "or use --pattern unstructured")


def _move_non_layers(model: nn.Module, layers: nn.ModuleList, device) -> None:
    """Move every part of the model except its decoder layers (embeddings, rotary, norms)."""
    path = adapter_for(model).layers
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attr, nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(parent, attr, layers)


@torch.no_grad()
def capture_layer_inputs(model, samples: torch.Tensor, device, store_device):
    """Inputs of the first decoder layer for every sample, plus the extra args it was given."""
    layers = decoder_layers(model)
    captured, extra = [], {}

    def grab(module, args, kwargs):
        captured.append(args[0].to(store_device))
        extra["args"], extra["kwargs"] = args[1:], kwargs
        raise _Captured

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    _move_non_layers(model, layers, device)
    try:
        for sample in samples:
            try:
                model(sample[None].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
        _move_non_layers(model, layers, "cpu")
    return captured, extra["args"], extra["kwargs"]


@dataclasses.dataclass
class PerSample:
    """A decoder layer's argument that differs by sample: each of the walked samples' own, in the order
    of their inputs (`_forward`'s `sample` picks one)."""

    values: list
    filled: bool = False  # mappings the layers fill for later layers (fresh ones, not recorded values)


def layer_arguments(model, samples: torch.Tensor, device, walked: Optional[torch.Tensor] = None,
                    store_device=None) -> list[tuple[tuple, dict]]:
    """The extra arguments (attention mask, rotary embeddings, ...) the model gives each decoder layer.

    Families that mix sliding-window and full attention give each kind its own mask, and some (Gemma
    3, OLMo 3) their own rotary frequencies, so layer 0's are not every layer's. A forward of two of
    `samples` (n, seqlen), in which every layer hands its input on unchanged, records them (at the
    cost of layer 0 run once, to learn what a layer returns). Most depend on the window's length and
    positions only, so one set serves every sample. Where an argument differs by sample (Gemma 4's
    embedding of the tokens for each layer), it is recorded for each of the `walked` samples (the
    ones whose inputs the walk holds: this rank's; default `samples`), on `store_device`, as a
    `PerSample`; so is an empty mapping the model hands its layers to fill (the keys and values
    Gemma 4's last layers reuse from earlier ones): one fresh per walked sample, which the walk
    fills as the model's forward does.
    """
    layers = decoder_layers(model)
    walked = samples if walked is None else walked
    inputs, args, kwargs = capture_layer_inputs(model, samples[:1], device, device)
    layers[0].to(device)
    try:  # what a layer returns (a tensor, or a tuple in older transformers), so the stand-ins do too
        as_tuple = isinstance(layers[0](inputs[0], *args, **kwargs), tuple)
    finally:
        layers[0].to("cpu")
    seen: list[tuple[tuple, dict]] = []

    def hand_on(hidden_states, *args, **kwargs):
        seen.append((args, kwargs))
        return (hidden_states,) if as_tuple else hidden_states

    def record(windows: torch.Tensor, keep: Callable[[list], object] = list) -> list:
        """For each window, `keep` of its arguments of every layer (a list of (args, kwargs) per layer)."""
        kept = []
        for sample in windows:
            seen.clear()
            stack(sample[None].to(device), use_cache=False)
            if len(seen) != len(layers):
                raise ModelError(f"{type(model).__name__} called {len(seen)} of its {len(layers)} decoder layers in a "
                                 "forward; pruning needs each called once, in order")
            kept.append(keep(list(seen)))
        return kept

    for layer in layers:
        layer.forward = hand_on
    _move_non_layers(model, layers, device)
    stack = getattr(model, "base_model", model)  # no LM head: its logits would be the pass's largest tensor
    try:
        first, *second = record(samples[:2])
        differs = {spot for spot in _spots(first) if not _same(_at(first, spot), _at(second[0], spot))} if second else ()
        # each walked sample's own of what differs, on the store device as it is recorded
        own = record(walked, lambda arguments: {spot: _stored(_at(arguments, spot), store_device or device)
                                                for spot in differs}) if differs else [{}] * len(walked)
    finally:
        for layer in layers:
            del layer.forward
        _move_non_layers(model, layers, "cpu")
    return _per_sample(first, own)


def _spots(arguments: list[tuple[tuple, dict]]) -> list[tuple]:
    """Where each argument sits: (layer, position) for the positional ones, (layer, name) for the others."""
    return [(index, where) for index, (args, kwargs) in enumerate(arguments) for where in (*range(len(args)), *kwargs)]


def _at(arguments: list[tuple[tuple, dict]], spot: tuple):
    index, where = spot
    args, kwargs = arguments[index]
    return args[where] if isinstance(where, int) else kwargs[where]


def _stored(value, store_device):
    return value.to(store_device) if isinstance(value, torch.Tensor) else value


def _layers_share_state(arguments: list[tuple[tuple, dict]]) -> bool:
    """Whether some layers fill a mapping that later ones read (`layer_arguments`' fresh mappings)."""
    return any(isinstance(value, PerSample) and value.filled
               for args, kwargs in arguments for value in (*args, *kwargs.values()))


def _per_sample(first: list[tuple[tuple, dict]], own: list[dict]) -> list[tuple[tuple, dict]]:
    """`first` (each layer's (args, kwargs)) with each spot in `own` (one dict per walked window: spot ->
    its value) a `PerSample` of the windows' own, and each empty mapping one fresh per window (one object
    for all layers of a window, as in the model's forward)."""
    fresh: dict[int, PerSample] = {}

    def per_sample(spot, value):
        if isinstance(value, (dict, UserDict)) and not value:  # layers fill it for the layers after them
            return fresh.setdefault(id(value), PerSample([type(value)() for _ in own], filled=True))
        return PerSample([values[spot] for values in own]) if own and spot in own[0] else value

    return [(tuple(per_sample((index, k), a) for k, a in enumerate(args)),
             {key: per_sample((index, key), value) for key, value in kwargs.items()})
            for index, (args, kwargs) in enumerate(first)]


def _same(a, b) -> bool:
    """Equal nested arguments: tensors by value, anything else by equality."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def run_layer(layer, inputs, args, kwargs, device, store_device, progress: Optional[Progress] = None):
    outputs = []
    for i, x in enumerate(inputs):
        outputs.append(_forward(layer, x, args, kwargs, device, store_device, i))
        if progress:
            progress("samples", i + 1, len(inputs))
    return outputs


def _forward(layer, x, args, kwargs, device, store_device, sample: int) -> torch.Tensor:
    """`layer` on input `x`, the `sample`-th of the walked inputs (it picks each `PerSample` argument's)."""
    def own(value):
        if not isinstance(value, PerSample):
            return value
        value = value.values[sample]
        return value.to(device) if isinstance(value, torch.Tensor) else value

    y = layer(x.to(device), *(own(a) for a in args), **{key: own(value) for key, value in kwargs.items()})
    return (y[0] if isinstance(y, tuple) else y).to(store_device)


@torch.no_grad()
def prune_model_(
    model: nn.Module,
    samples: torch.Tensor,
    config: PruneConfig,
    device: "str | torch.device" = "cpu",
    selection: LayerSelection = LayerSelection(),
    checkpoints: Optional[LayerCheckpoints] = None,
    offload_activations: bool = False,
    progress: Optional[Progress] = None,
    parallel: Optional[Parallel] = None,
    linears: Optional[dict[int, dict[str, nn.Module]]] = None,
) -> list[dict]:
    """Prune `model` in place, layer by layer, on calibration `samples` (n, seqlen); returns per-linear reports.

    `linears`: `prunable_linears(model, selection)`, when the caller has already listed (and checked)
    them against the pattern.

    With `checkpoints`, each finished layer is saved, and layers already saved are loaded instead
    of pruned again (the calibration activations are recomputed through them), so a rerun
    resumes and ends with the same weights as an uninterrupted run. With an active `parallel`
    group, each rank runs its shard of `samples` and solves its share of the linears.
    """
    parallel = parallel or Parallel()
    device = torch.device(device)
    store_device = torch.device("cpu") if offload_activations else device
    if linears is None:
        linears = prunable_linears(model, selection)
        check_pattern_fits(linears, config)
    layers = decoder_layers(model)
    done = _open_checkpoints(checkpoints, parallel)
    own_samples = parallel.shard(samples)
    inputs, _, _ = capture_layer_inputs(model, own_samples, device, store_device)
    # each layer's mask and rotary embeddings; each sample's own where they differ by sample
    arguments = layer_arguments(model, samples, device, own_samples, store_device)
    # A reconstruction aimed at the dense model needs its activations beside the pruned path's.
    reconstruct = config.recipe.get(Reconstruct)
    dense_inputs = list(inputs) if reconstruct and reconstruct.target == "dense" else None
    if dense_inputs is not None and _layers_share_state(arguments):
        raise ConfigError("reconstruct_target 'dense' runs the dense model beside the pruned one, but this model's "
                          "layers pass keys and values on to later layers, which the two would share; use the "
                          "target 'layer' (the default)")
    sample_indices = parallel.shard_indices(len(samples))
    layout = ChannelLayout.of(model) if config.recipe.get(Permute) else None
    if layout is not None and not layout.free:
        log.warning("no free channels are known for %r models: pruning without channel permutations",
                    model.config.model_type)
    prefix = adapter_for(model).layers
    quantize = config.recipe.get(Quantize)
    smoothing = smoothing_groups(model) if quantize and quantize.smooths else ()
    if quantize and quantize.smooths and not smoothing:
        log.warning("no place to fold input ranges into is known for %r models: quantizing without smoothing",
                    model.config.model_type)
    reports: list[dict] = []
    for index, layer in enumerate(layers):
        args, kwargs = arguments[index]
        if layout is not None:  # heads may differ by layer (Gemma 4's by layer kind)
            layout = ChannelLayout.of(model, layer)
        layer.to(device)
        if index < done:
            if dense_inputs is not None:  # the layer is still dense until its checkpoint is loaded
                dense_inputs = run_layer(layer, dense_inputs, args, kwargs, device, store_device)
            reports += checkpoints.load(index, layer)
            log.info("layer %d: loaded from the interrupted run", index)
        else:
            step = LayerStep(layer, linears[index], inputs, dense_inputs, args, kwargs, device, store_device,
                             sample_indices, len(samples), f"{prefix}.{index}.", layout, smoothing,
                             attention_heads(model, layer))
            layer_reports, dense_inputs = prune_layer(step, config, progress, parallel)
            reports += layer_reports
        if quantize and linears[index]:
            inputs = final_pass_8bit(layer, linears[index], inputs, args, kwargs, device, store_device, quantize,
                                     parallel, reports[-len(linears[index]):],
                                     # set per group as it was solved (a checkpoint keeps them)
                                     scales_set=quantizes_per_group(config, smoothing))
        else:
            inputs = run_layer(layer, inputs, args, kwargs, device, store_device)
        layer.to("cpu")
        sync_experts_(layer)  # experts' weights back into their fused tensors: one copy on the host
        if checkpoints and index >= done and parallel.is_main:
            checkpoints.save(index, layer, reports[-len(linears[index]):] if linears[index] else [])
        if progress:
            progress("layers", index + 1, len(layers))
    thin = thin_statistics(reports)
    if thin and parallel.is_main:
        fewest = min(thin, key=lambda r: r["tokens"] / r["shape"][1])
        log.warning("%d of %d linears summed fewer calibration tokens than they have inputs (fewest: %s, %d for %d "
                    "inputs%s): their statistics are rank-deficient, so their solves fit those tokens and their "
                    "errors on them understate the loss on other text; more --calib-samples or a longer --seqlen "
                    "give them more", len(thin), len(reports), fewest["name"], fewest["tokens"], fewest["shape"][1],
                    "; an expert sees only the tokens routed to it" if any(".experts." in r["name"] for r in thin)
                    else "")
    return reports


class InputRanges:
    """While active, the largest input magnitude each of `linears` sees (for its static 8-bit scale)."""

    def __init__(self, linears: dict[str, nn.Module]):
        self.linears = linears
        self.amax: dict[str, torch.Tensor] = {}
        self._hooks = []
        self._last: tuple = (None, None)  # (input, its amax): q/k/v and gate/up read the same tensor

    def _see(self, name: str, x: torch.Tensor) -> None:
        if not x.numel():  # an expert no token was routed to in this pass
            return
        if self._last[0] is not x:
            self._last = (x, x.detach().abs().amax().float())
        top = self._last[1]
        self.amax[name] = torch.maximum(self.amax[name], top) if name in self.amax else top

    def __enter__(self):
        self._hooks = [mod.register_forward_pre_hook(lambda m, a, name=name: self._see(name, a[0]))
                       for name, mod in self.linears.items()]
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._last = (None, None)


def final_pass_8bit(layer, linears: dict[str, nn.Module], inputs, args, kwargs, device, store_device, step: Quantize,
                    parallel: Parallel, reports: list[dict], scales_set: bool = False) -> list[torch.Tensor]:
    """The next layer's inputs as the 8-bit layer computes them.

    A first pass finds each linear's static input scale (the largest magnitude it sees, over every
    rank's samples), unless `scales_set` (the sequential solves set each group's from the very
    inputs this pass would see) or the inputs are scaled per token; a second runs with every
    linear's input rounded by its scale, so the layers after this one are pruned and quantized
    against the inputs an 8-bit runtime feeds them.
    """
    if not scales_set:
        ranges = InputRanges(linears) if step.inputs == "static" else None
        if ranges is not None:
            with ranges:
                for i, x in enumerate(inputs):
                    _forward(layer, x, args, kwargs, device, store_device, i)
        set_input_scales_(linears, ranges, step, parallel, reports)
    with inputs_rounded(linears.values()):
        return run_layer(layer, inputs, args, kwargs, device, store_device)


def set_input_scales_(linears: dict[str, nn.Module], ranges: Optional[InputRanges], step: Quantize, parallel: Parallel,
                      reports: list[dict]) -> None:
    """Each quantized linear's static input scale from the largest magnitude over every rank's samples
    (per-token inputs need none: the report says so). A linear no calibration token reached (an
    expert the router never picked) takes the widest range among the linears here of the same
    projection (the other experts'), and the report and a warning say so."""
    for report in reports:
        report["quantization"]["inputs"] = step.inputs
    if step.inputs == "per-token":
        return
    fmt = FORMATS[step.format]
    amaxes = {}
    for name, mod in linears.items():
        device = weight_view(mod).device  # the layer's: NCCL reduces device tensors only
        seen = ranges.amax.get(name)
        amax = (seen if seen is not None else torch.tensor(-1.0)).reshape(1).to(device, torch.float32)  # -1: no token
        parallel.all_reduce_(amax, op="max")
        amaxes[name] = float(amax)
    for (name, mod), report in zip(linears.items(), reports):
        amax = amaxes[name]
        if amax < 0:
            projection = name.rsplit(".", 1)[-1]
            seen = ([a for n, a in amaxes.items() if a >= 0 and n.rsplit(".", 1)[-1] == projection]
                    or [a for a in amaxes.values() if a >= 0])
            if not seen:
                raise ModelError(f"{name}: no calibration token reached any of {', '.join(linears)}, so no 8-bit input "
                                 "scale can be set; calibrate on more samples")
            amax = max(seen)
            report["quantization"]["input_range"] = f"the widest of this layer's {projection} (no token reached it)"
            log.warning("%s: no calibration token reached it; its 8-bit input scale is from the widest range among "
                        "this layer's %s", name, projection)
        scale = activation_scale(amax, fmt)
        quantization_of(mod).input_scale = torch.tensor(scale, dtype=torch.float32)
        report["quantization"].update(input_amax=amax, input_scale=scale)


def _open_checkpoints(checkpoints: Optional[LayerCheckpoints], parallel: Parallel) -> int:
    """Rank 0 opens (or validates) the partial directory; every rank learns how many layers are done."""
    return parallel.run_on_main(checkpoints.open) if checkpoints else 0


class SharedInputStatistics:
    """Streams each distinct input of a layer's linears once.

    q/k/v (and gate/up) read the very same tensor, so they share one accumulator: a third of
    the statistics memory and work for attention. Inputs are matched by object identity within
    one forward pass, holding a reference so that no other tensor can take the same address.
    """

    def __init__(self, linears: dict[str, nn.Module], device, track_ranges: bool = False, first_only: bool = False,
                 told_apart=()):
        self.widths = {name: weight_view(mod).shape[1] for name, mod in linears.items()}
        self.device = device
        self.first_only = first_only  # accumulate only the first input read; the others are only told apart
        self.told_apart = frozenset(told_apart)  # linears whose inputs are only told apart (gathered in turns)
        self.source: dict[str, str] = {}  # linear -> linear whose accumulator it reads
        self.stats: dict[str, HessianAccumulator] = {}
        self.curvatures: dict[str, Curvature] = {}  # by source, made on first use
        self.track_ranges = track_ranges
        self.ranges: dict[str, torch.Tensor] = {}  # per input channel, the largest magnitude (if tracked)
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self.layer_outputs: Optional[list[torch.Tensor]] = None  # the dense layer on the pruned path's inputs

    def new_pass(self, *_) -> None:
        self._seen.clear()

    def add(self, name: str, x: torch.Tensor) -> None:
        seen = self._seen.get(id(x))
        if seen is not None and seen[0] is x:
            self.source.setdefault(name, seen[1])
            return
        self._seen[id(x)] = (x, name)
        self.source.setdefault(name, name)
        if name in self.told_apart or (self.first_only and name not in self.stats and self.stats):
            return
        if name not in self.stats:
            self.stats[name] = HessianAccumulator(self.widths[name], self.device)
        self.stats[name].add(x)
        if self.track_ranges and x.numel():  # an expert no token was routed to this pass has no range
            top = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()  # (c,)
            self.ranges[name] = torch.maximum(self.ranges[name], top) if name in self.ranges else top

    def hessian(self, name: str) -> torch.Tensor:
        return self._mean(self.source[name])

    def tokens(self, name: str) -> int:
        """The calibration tokens `name`'s statistics summed (over every rank, once reduced)."""
        return self.stats[self.source[name]].tokens

    def _mean(self, source: str) -> torch.Tensor:
        accumulator = self.stats[source]
        if not accumulator.tokens and accumulator.sum is not None:  # said once, on the first reading
            log.warning("%s: no calibration token reached it (an expert the router never picked): pruned by "
                        "weight magnitude; more calibration samples would give it some", source)
        return accumulator.hessian

    def groups(self) -> list[list[str]]:
        """The linears seen, grouped by the input they read, in the order the forward first reads each."""
        grouped: dict[str, list[str]] = {}
        for name, source in self.source.items():
            grouped.setdefault(source, []).append(name)
        return list(grouped.values())

    def forget_(self, names) -> None:
        """Free the statistics (and what was derived from them) of the inputs `names` read."""
        for source in {self.source[name] for name in names if name in self.source}:
            for held in (self.stats, self.curvatures, self.ranges):
                held.pop(source, None)

    def adopt_(self, fresh: "SharedInputStatistics") -> None:
        """Read `fresh`'s linears' statistics from it from now on (their old ones forgotten)."""
        self.forget_(fresh.source)
        self.source.update(fresh.source)
        self.stats.update(fresh.stats)
        self.ranges.update(fresh.ranges)

    def curvature(self, name: str) -> Curvature:
        """What the steps derive from `name`'s Hessian, one object for all linears that read its input.

        Made on first use, so after any reordering of the Hessians (`thanos.permute`)."""
        source = self.source[name]
        if source not in self.curvatures:
            self.curvatures[source] = Curvature(self.hessian(name), name)
        return self.curvatures[source]

    def release(self, name: str, keep_factors: bool = False) -> None:
        """Free what was derived from `name`'s Hessian (but its factors, if kept for the 8-bit step)."""
        curvature = self.curvatures.get(self.source[name])
        if curvature is not None:
            curvature.release(keep_factors)

    def channel_range(self, name: str) -> Optional[torch.Tensor]:
        """`name`'s per-channel input range (c,), or None if it is not one of these linears."""
        return self.ranges.get(self.source.get(name)) if name in self.source else None

    def own_range(self, name: str) -> Optional[torch.Tensor]:
        """`name`'s per-channel input range where `own_hessian` gives its Hessian (it moves with it), else None."""
        return self.ranges.get(name) if self.own_hessian(name) is not None else None

    def own_hessian(self, name: str) -> Optional[torch.Tensor]:
        """`name`'s Hessian if no other linear reads it (so it may be reordered in place), else None."""
        if (self.source.get(name) != name or name not in self.stats
                or sum(source == name for source in self.source.values()) > 1):
            return None
        return self._mean(name)

    @property
    def nbytes(self) -> int:
        return sum(acc.nbytes for acc in self.stats.values())


def solve_costs(linears: dict[str, nn.Module]) -> dict[str, float]:
    """Relative cost of each linear's solve: r * c^2, the row updates that dominate it."""
    return {name: float(weight_view(mod).shape[0]) * weight_view(mod).shape[1] ** 2 for name, mod in linears.items()}


@dataclasses.dataclass
class LayerStep:
    """What pruning one decoder layer works on: the layer, its linears, and the activations."""

    layer: nn.Module
    linears: dict[str, nn.Module]
    inputs: list[torch.Tensor]  # the pruned path's activations at this layer, one per sample
    dense_inputs: Optional[list[torch.Tensor]]  # the dense model's, when the reconstruction aims at them
    args: tuple
    kwargs: dict
    device: torch.device
    store_device: torch.device
    sample_indices: Optional[list[int]] = None  # global index of each of this rank's samples
    samples_total: Optional[int] = None  # samples over all ranks
    prefix: str = ""  # the layer's linears' full names start with it
    layout: Optional[ChannelLayout] = None  # channels to reorder before the solves (None: none)
    smoothing: tuple[SmoothGroup, ...] = ()  # where input ranges fold into a producer (8-bit step)
    heads: tuple[Optional[int], int] = (None, 1)  # (channels per attention head, query heads per KV head)

    def forward(self, x: torch.Tensor, sample: int) -> torch.Tensor:
        """The layer on `x`, the `sample`-th of `inputs` (or `dense_inputs`)."""
        return _forward(self.layer, x, self.args, self.kwargs, self.device, self.device, sample)


def quantizes_per_group(config: PruneConfig, smoothing: tuple[SmoothGroup, ...]) -> bool:
    """Whether the sequential solves quantize each group before the next one's statistics: only where
    nothing after the solves changes a weight (the reconstruction) or rescales one (smoothing folds
    into v_proj's and up_proj's rows, quantized by then)."""
    recipe = config.recipe
    quantize = recipe.get(Quantize)
    return (recipe.solve.sequential and quantize is not None and recipe.get(Reconstruct) is None
            and not (quantize.smooths and smoothing))


def prune_layer(step: LayerStep, config: PruneConfig, progress: Optional[Progress], parallel: Parallel,
                on_report: Optional[Callable[[dict], None]] = None):
    """Statistics, solves (group by group with `Solve.sequential`: `solve_in_order`), and (if asked)
    decoder-block reconstruction and the 8-bit step for one layer.

    Returns its per-linear reports and, when the reconstruction aims at the dense model's
    activations, the dense model's outputs of this layer (the next layer's dense inputs).
    `on_report(report)` gets each linear's report as soon as this rank has solved it; `progress` gets
    ("linears", solved, of) in one process (a layer of experts is hundreds of solves).
    """
    on_report = _counting_solves(on_report, progress, len(step.linears)) if not parallel.active else on_report
    recipe = config.recipe
    reconstruct = recipe.get(Reconstruct) if step.linears else None
    quantize = recipe.get(Quantize) if step.linears else None
    smooth = quantize is not None and quantize.smooths and step.smoothing
    per_group = quantize is not None and quantizes_per_group(config, step.smoothing)
    # Sequentially, the permutations are chosen on their group's own pass only where the 8-bit step
    # goes group by group (as good there, and no first-pass statistics to gather beyond q/k/v's);
    # with it at the layer's end (INT8) that was worse than the first pass's over 5 seeds
    # (docs/results/README.md, round 9), so there they are chosen on the first pass, as in round 8.
    permute_on_first_pass = recipe.solve.sequential and not per_group and step.layout is not None
    static = quantize is not None and quantize.inputs == "static"  # per-token inputs need no ranges
    ranges = InputRanges(step.linears) if per_group and static else contextlib.nullcontext()
    at_end = quantize is not None and not per_group  # the 8-bit step after every solve of the layer
    chunks = experts_in_turns(step, parallel, lambda chunks: _gathered_at_once(step, chunks, at_end, reconstruct,
                                                                              bool(smooth)))
    in_turns = _turn_of(chunks).keys()
    first = step.linears  # group by group, the first pass only tells the groups apart (all are hooked)
    if not recipe.solve.sequential:
        first = {name: mod for name, mod in step.linears.items() if name not in in_turns}
    with ranges:  # q/k/v's input ranges: their inputs do not depend on this layer's weights
        shared = collect_statistics(step.layer, first, step.inputs, step.args, step.kwargs, step.device,
                                    step.store_device, progress,
                                    keep_outputs=reconstruct is not None and step.dense_inputs is None,
                                    track_ranges=bool(smooth),
                                    first_group_only=recipe.solve.sequential and not permute_on_first_pass,
                                    told_apart=in_turns if permute_on_first_pass else ())
    dense_outputs = None
    if step.dense_inputs is not None:  # the layer is still dense here
        dense_outputs = run_layer(step.layer, step.dense_inputs, step.args, step.kwargs, step.device,
                                  step.store_device)
    permute = None
    if step.layout is not None:
        def permute(statistics: SharedInputStatistics, consumers=None):
            """Reorder the free channels of `consumers` (None: every one) from `statistics`."""
            def hessian_of(name):
                return statistics.own_hessian(name) if consumers is None or name in consumers else None
            return recipe.get(Permute).apply_(step.layer, step.prefix, step.layout, hessian_of, recipe.pattern,
                                              statistics.own_range)
    keep = quantize is not None  # the 8-bit step reads the statistics, and reuses the factors unless smoothed

    def finish(linears: dict[str, nn.Module], statistics: SharedInputStatistics, reports: list[dict]) -> None:
        """The 8-bit step at the layer's end for `linears` (a chunk of experts in its last turn, or the rest)."""
        quantize_at_end_(step, linears, statistics, quantize, recipe.solve.damp, parallel, reports)

    finish_chunk = finish if at_end and chunks else None
    if recipe.solve.sequential:
        reports = solve_in_order(step, shared, config, progress, parallel, permute, on_report, keep,
                                 keep and not smooth, quantize if per_group else None, ranges,
                                 permute_on_first_pass, chunks, finish_chunk)
    elif chunks:
        reports = solve_experts_in_turns(step, shared, chunks, config, progress, parallel, permute, on_report,
                                         finish_chunk, keep_factors=keep and not smooth)
    else:
        reports = solve_layer(step.linears, shared, config, progress, parallel, permute, on_report,
                              keep_statistics=keep, keep_factors=keep and not smooth)
    if reconstruct:
        # The target: the dense model's own activations, or the dense layer's outputs on the same inputs.
        targets = dense_outputs if dense_outputs is not None else shared.layer_outputs
        weights = [mod.weight for mod in step.linears.values()]
        result = reconstruct.apply_(step.layer, weights, step.inputs, targets, step.forward, step.sample_indices,
                                    step.samples_total, parallel.all_reduce_ if parallel.active else None)
        log.info("layer reconstruction: loss %.4g -> %.4g%s (%.1fs)", result.loss_before, result.loss_after,
                 "" if result.kept else " (discarded: no better)", result.seconds)
        for report in reports:
            report["reconstruction"] = dataclasses.asdict(result)
    if at_end:  # the experts taken in turns were finished in their turns
        rest = [(name, report) for name, report in zip(step.linears, reports) if name not in in_turns]
        finish({name: step.linears[name] for name, _ in rest}, shared, [report for _, report in rest])
    return reports, dense_outputs


def quantize_at_end_(step: LayerStep, linears: dict[str, nn.Module], statistics: "SharedInputStatistics",
                     quantize: Quantize, damp: float, parallel: Parallel, reports: list[dict]) -> None:
    """The 8-bit step after the solves (and the reconstruction): where `quantize` smooths, the groups
    whose consumers `statistics` holds the ranges of; then `linears` quantized on its Hessians."""
    smoothed = {}
    if quantize.smooths and step.smoothing:
        for channel_range in statistics.ranges.values():
            parallel.all_reduce_(channel_range, op="max")
        smoothed = smooth_layer_(step.layer, step.prefix, step.smoothing, quantize.smoothing, statistics.channel_range,
                                 statistics.hessian, *step.heads, qmax=FORMATS[quantize.format].qmax)
        statistics.curvatures.clear()  # smoothing rescaled the Hessians in place: derive again from them
    quantize_layer_(linears, statistics, quantize, damp, parallel, reports)
    for name, report in zip(linears, reports):
        if name in smoothed:
            report["quantization"]["smoothing"] = dataclasses.asdict(smoothed[name])


def _counting_solves(on_report: Optional[Callable[[dict], None]], progress: Optional[Progress],
                     total: int) -> Optional[Callable[[dict], None]]:
    """`on_report`, which also tells `progress` how many of the layer's `total` linears are solved."""
    if progress is None:
        return on_report
    solved = 0

    def reported(report: dict) -> None:
        nonlocal solved
        solved += 1
        progress("linears", solved, total)
        if on_report:
            on_report(report)

    return reported


def experts_in_turns(step: LayerStep, parallel: Parallel,
                     at_once: Callable[[list[list[str]]], Optional[str]]) -> list[list[str]]:
    """The layer's experts' linears in chunks whose statistics fit in half the device's free memory
    (the least of any rank's: every rank makes the same passes), each chunk to gather its statistics
    on a pass of its own; [] where they fit at once (or where `at_once(chunks)` gives a reason they
    cannot be taken in turns: a warning says it). A large mixture's are more than a GPU holds
    (DeepSeek V3's 256 experts: 114 GB a layer in fp64)."""
    if not any(isinstance(module, UnfusedExperts) for module in step.layer.modules()):
        return []
    free = free_memory(step.device)
    least = torch.tensor([-(free if free is not None else math.inf)], dtype=torch.float64, device=step.device)
    parallel.all_reduce_(least, op="max")  # the largest negative: the least free memory
    if math.isinf(least.item()):
        return []  # unknown here (no psutil)
    budget = int(-least.item()) // 2
    chunks = expert_chunks(step.layer, step.prefix, step.linears, budget)
    reason = at_once(chunks) if chunks else None
    if reason:
        log.warning("%s: the experts' statistics exceed %.1f GiB (half the free memory), but %s, so they are gathered "
                    "at once", step.prefix.rstrip("."), budget / 2**30, reason)
        return []
    if chunks:
        log.info("%s: the experts' statistics exceed %.1f GiB: gathered in %d turns, a pass through the layer each",
                 step.prefix.rstrip("."), budget / 2**30, len(chunks))
    return chunks


def _turn_of(chunks: list[list[str]]) -> dict[str, int]:
    """{an expert's linear: the index of the chunk (turn) it is in}."""
    return {name: index for index, names in enumerate(chunks) for name in names}


def _gathered_at_once(step: LayerStep, chunks: list[list[str]], at_end: bool, reconstruct, smooth: bool
                      ) -> Optional[str]:
    """Why the experts' statistics cannot be taken in `chunks`, or None. The 8-bit step at the layer's
    end runs for a chunk in its last turn, on that chunk's statistics: not after a reconstruction
    (it changes every weight after the last turn), nor across a smoothing group with linears of
    different turns (Gemma 4's norm before all its experts)."""
    if not at_end:
        return None
    if reconstruct:
        return "the 8-bit step after the reconstruction reads every linear's Hessian there"
    if smooth:
        turn_of = _turn_of(chunks)
        for group in step.smoothing:
            members = [step.prefix + name for name in (group.producer, *group.consumers)]
            if len({turn_of.get(name) for name in members if name in step.linears}) > 1:
                return f"smoothing into {step.prefix}{group.producer} reads linears of different turns"
    return None


def solve_experts_in_turns(step: LayerStep, shared: SharedInputStatistics, chunks: list[list[str]], config,
                           progress, parallel: Parallel, permute: Optional[Callable], on_report,
                           finish: Optional[Callable] = None, keep_factors: bool = False) -> list[dict]:
    """The one-pass solves of a layer whose experts' statistics are taken in turns: each chunk of
    experts gathers its own on a pass through the layer (stopped once they have their inputs) and is
    solved; then the other linears, on `shared`, the first pass's. No expert's weights reach another
    linear's input inside the layer, and the others are written only after the last chunk's pass, so
    every linear is solved on the dense layer's inputs, as in one pass (and to the same weights).

    `finish(linears, statistics, reports)`: the 8-bit step at the layer's end, run for each chunk
    once it is solved, on its statistics (kept with their factors if `keep_factors`); the other
    linears' statistics are then kept in `shared` for it."""
    reports: dict[str, dict] = {}
    keep = finish is not None
    for index, names in enumerate(chunks):
        group = {name: step.linears[name] for name in names}
        fresh = _pass_statistics(step, names, shared.track_ranges)
        solved = solve_layer(group, fresh, config, progress, parallel,
                             permute and (lambda statistics: permute(statistics, names)), on_report,
                             keep_statistics=keep, keep_factors=keep_factors)
        if finish:
            finish(group, fresh, solved)
        for report in solved:
            report["statistics_turn"] = [index + 1, len(chunks)]
        reports.update(zip(names, solved))
        log.info("experts' turn %d of %d (%d linears) solved", index + 1, len(chunks), len(names))
    others = {name: mod for name, mod in step.linears.items() if name not in reports}
    reports.update(zip(others, solve_layer(others, shared, config, progress, parallel,
                                           permute and (lambda statistics: permute(statistics, others)), on_report,
                                           keep_statistics=keep, keep_factors=keep_factors)))
    return [reports[name] for name in step.linears]


def _in_turns(groups: list[list[str]], chunks: list[list[str]]) -> list[tuple[list[str], int, int]]:
    """`groups` with each group's experts split by `chunks`, in order: (names, its turn, its group's turns)."""
    chunk_of = _turn_of(chunks)
    turns = []
    for group in groups:
        parts: dict[Optional[int], list[str]] = {}
        for name in group:
            parts.setdefault(chunk_of.get(name), []).append(name)
        turns += [(names, turn, len(parts)) for turn, names in enumerate(parts.values())]
    return turns


def solve_in_order(step: LayerStep, shared: "SharedInputStatistics", config: PruneConfig, progress, parallel: Parallel,
                   permute: Optional[Callable], on_report, keep_statistics: bool, keep_factors: bool,
                   quantize: Optional[Quantize], first_ranges, permute_on_first_pass: bool = False,
                   chunks: list[list[str]] = (), finish: Optional[Callable] = None) -> list[dict]:
    """The layer's linears solved group by group (those that read one input), in the order the
    forward reads them; each group after the first on statistics from a pass, stopped at its
    input, through the layer with the groups before it pruned (a mixture of experts' groups merged
    into two: every expert's gate/up, every expert's down_proj; `merge_expert_groups`). `shared`: the first pass's, which
    holds only the first group's statistics (`collect_statistics(first_group_only=True)`) unless
    `permute_on_first_pass`.

    `permute(shared, names)` reorders a group's free channels from its own statistics just before
    its solve (o_proj's with v_proj's rows, down_proj's with gate/up's, solved by then: their rows,
    8-bit scales included, move with them); with `permute_on_first_pass`, `permute(shared)`
    reorders every group's from the first pass's statistics before any solve.

    `chunks` (`experts_in_turns`): a merged group of experts is gathered and solved a chunk at a time,
    a pass each (no expert's input depends on another's weights: the same weights as at once); its
    input scales are set once its last chunk is quantized. With `permute_on_first_pass` each chunk's
    orders come from a pass of its own on the dense layer, before any other reordering (v_proj's
    and o_proj's change the experts' inputs in their last bits); the first pass only tells the
    chunks' linears apart. `finish(linears, statistics, reports)`: the 8-bit step at the layer's
    end, for a chunk in its last turn, whose pass also gathers again the statistics of the chunk's
    linears solved in its earlier turns (their inputs are as they were then: only later linears
    changed since).

    `quantize`: each group is also quantized once solved and its input scale set (the first
    group's from `first_ranges`, the first pass's `InputRanges`), and the later passes round the
    inputs of the groups done, as the 8-bit runtime will. `keep_statistics` / `keep_factors` keep
    each group's own statistics (and factors) in `shared` for the 8-bit step.
    """
    groups = merge_expert_groups(shared.groups(), step.layer, step.prefix)
    permuted = {}
    if permute_on_first_pass:  # the orders read every first-pass Hessian (the same on every rank)
        reduce_statistics_(step.linears, shared, parallel)
        for names in chunks:
            fresh = _pass_statistics(step, names, shared.track_ranges)
            reduce_statistics_(names, fresh, parallel)
            permuted.update({r.consumer: dataclasses.asdict(r) for r in permute(fresh, names)})
        permuted.update({r.consumer: dataclasses.asdict(r) for r in permute(shared)})
    reports: dict[str, dict] = {}
    done: list[nn.Module] = []  # quantized so far: the later passes round their inputs
    # a group's linears quantized and their ranges, waiting for its last turn to set their input
    # scales together (an expert no token reached takes the widest of all its group's)
    waiting: dict[str, nn.Module] = {}
    waiting_reports: list[dict] = []
    amax: dict[str, torch.Tensor] = {}
    turns = _in_turns(groups, chunks)
    chunk_of = _turn_of(chunks)
    last_turn = {chunk_of[names[0]]: index for index, (names, _, _) in enumerate(turns) if names[0] in chunk_of}
    for index, (names, turn, group_turns) in enumerate(turns):
        chunk = chunk_of.get(names[0])  # a turn's linears are one chunk's, or none's
        finishing = finish is not None and chunk is not None and last_turn[chunk] == index
        gathered = chunks[chunk] if finishing else names
        group = {name: step.linears[name] for name in names}
        ranges, statistics = first_ranges, shared
        # a later group, or a first one the first pass did not gather whole (experts first: it keeps one input)
        collect = index or finishing or any(shared.source.get(name) not in shared.stats for name in names)
        if collect:
            shared.forget_(names)  # the first pass's statistics of these, if it kept any: free them first
            ranges = InputRanges(group) if quantize and quantize.inputs == "static" else contextlib.nullcontext()
            with inputs_rounded(done), ranges:
                fresh = _pass_statistics(step, gathered, shared.track_ranges)
            if chunk is None:
                shared.adopt_(fresh)
            else:
                statistics = fresh  # a chunk's own: freed once it is done with
        if collect or not permute_on_first_pass:
            reduce_statistics_(gathered, statistics, parallel)
        if permute and not permute_on_first_pass:
            permuted = {r.consumer: dataclasses.asdict(r) for r in permute(statistics, names)}
        keep = keep_statistics if finish is None or chunk is None else finishing
        solved = solve_linears(group, statistics, config, progress, parallel, on_report, keep, keep_factors,
                               permuted)
        if quantize:
            quantize_layer_(group, statistics, quantize, config.recipe.solve.damp, parallel, solved)
            waiting.update(group)
            waiting_reports += solved
            amax.update(getattr(ranges, "amax", {}))
            if turn == group_turns - 1:
                whole = InputRanges(waiting)
                whole.amax = amax
                set_input_scales_(waiting, whole, quantize, parallel, waiting_reports)
                done += waiting.values()
                waiting, waiting_reports, amax = {}, [], {}
        if group_turns > 1:
            for report in solved:
                report["statistics_turn"] = [turn + 1, group_turns]
        reports.update(zip(names, solved))
        if finishing:
            finish({name: step.linears[name] for name in gathered}, statistics, [reports[name] for name in gathered])
        log.info("group %d of %d (%s) solved on the inputs the layer gives it%s", index + 1, len(turns),
                 ", ".join(names), " with the groups before it pruned" if index else "")
    return [reports[name] for name in step.linears]


def _pass_statistics(step: LayerStep, names, track_ranges: bool) -> "SharedInputStatistics":
    """The statistics of the linears `names` on a pass through the layer as it is, stopped at their inputs."""
    return collect_statistics(step.layer, {name: step.linears[name] for name in names}, step.inputs, step.args,
                              step.kwargs, step.device, step.store_device, track_ranges=track_ranges,
                              stop_at_inputs=True)


def quantize_layer_(linears: dict[str, nn.Module], shared: "SharedInputStatistics", step: Quantize, damp: float,
                    parallel: Parallel, reports: list[dict]) -> None:
    """8-bit weights for this rank's linears, then every rank gets every linear's weights and scales.

    The input scales are set later, from the layer's final calibration pass (`set_input_scales_`).
    """
    owners = parallel.owners(solve_costs(linears))
    records = {}
    for name, mod in linears.items():
        if owners[name] == parallel.rank:
            # q/k/v (and gate/up) share one factor, the one their solves used where the damping was not raised
            result = step.run(weight_view(mod), shared.hessian(name), damp, name, shared.curvature(name))
            set_weight_(mod, result.weight)
            set_quantization(mod, LinearQuantization(step.format, result.scale.cpu(), inputs=step.inputs))
            records[name] = dataclasses.asdict(result.report)
            log.info("%s: %s weights, %s rounding, rel. error %.3g (round-to-nearest %.3g)", name, step.format,
                     result.report.rounding, result.report.error, result.report.nearest_error)
    shared.stats.clear()
    shared.curvatures.clear()
    for (name, mod), report in zip(linears.items(), reports):
        parallel.broadcast_(mod.weight.data, owners[name])
        own = quantization_of(mod) if owners[name] == parallel.rank else None
        scale = own.weight_scale.to(mod.weight.device) if own else torch.empty(
            weight_view(mod).shape[0], dtype=torch.float32, device=mod.weight.device)
        parallel.broadcast_(scale, owners[name])  # on the weights' device: NCCL has no CPU tensors
        if not own:
            set_quantization(mod, LinearQuantization(step.format, scale.cpu(), inputs=step.inputs))
        report["quantization"] = parallel.broadcast_object(records.get(name), owners[name])


def collect_statistics(layer, linears: dict[str, nn.Module], inputs, args, kwargs, device, store_device,
                       progress=None, keep_outputs: bool = False, track_ranges: bool = False,
                       stop_at_inputs: bool = False, first_group_only: bool = False,
                       told_apart=()) -> SharedInputStatistics:
    """Run this rank's samples through `layer`, streaming each linear's input into its Hessian.

    `keep_outputs` keeps the still-dense layer's outputs on `inputs` in `layer_outputs`;
    `track_ranges` each input channel's largest magnitude (for smoothing before 8-bit quantization);
    `stop_at_inputs` ends each sample's pass once every one of `linears` has its input (nothing
    after them is computed). `first_group_only` accumulates only the first input the forward
    reads (the sequential solves' first group; the later groups gather their own): the first
    sample's whole pass tells which linears share an input (`groups`), and unless `keep_outputs`
    the later samples stop once the first group has its input. `told_apart`: linears whose inputs
    are only told apart (`groups`), not accumulated (experts whose statistics are gathered in turns).
    """
    shared = SharedInputStatistics(linears, device, track_ranges, first_only=first_group_only, told_apart=told_apart)
    awaited = set(linears)  # what a pass must have seen before it may stop
    waiting: set[str] = set()
    stop = stop_at_inputs  # the closures read these two as they are rebound below

    def new_pass(*_):
        shared.new_pass()
        waiting.update(awaited)

    def seen(name: str, x: torch.Tensor) -> None:
        shared.add(name, x)
        waiting.discard(name)
        if stop and not waiting:
            raise _Captured

    hooks = [layer.register_forward_pre_hook(new_pass)]
    hooks += [mod.register_forward_pre_hook(lambda m, a, name=name: seen(name, a[0])) for name, mod in linears.items()]
    try:
        if stop_at_inputs or (first_group_only and not keep_outputs):
            for i, x in enumerate(inputs):
                with contextlib.suppress(_Captured):
                    _forward(layer, x, args, kwargs, device, store_device, i)
                groups = shared.groups() if i == 0 and first_group_only else None
                if groups:
                    awaited = set(groups[0])
                    stop = True
                if progress:
                    progress("samples", i + 1, len(inputs))
        else:
            outputs = run_layer(layer, inputs, args, kwargs, device, store_device, progress)
            shared.layer_outputs = outputs if keep_outputs else None
    finally:
        for h in hooks:
            h.remove()
        shared.new_pass()
    return shared


@dataclasses.dataclass
class LinearReport:
    """What the report says about one pruned linear (its entry in thanos_report.json's "layers")."""

    name: str
    shape: list[int]
    sparsity: float
    error: Optional[float]  # relative output error on the calibration statistics
    seconds: float  # the solve with its mask search and refit
    refit_seconds: float
    search_seconds: float
    mask_changed: float  # share of entries the mask search moved
    damp_used: float
    damp_escalations: int
    rank: int  # the process that solved it
    tokens: int  # the calibration tokens its statistics summed (an expert's: those routed to it)
    permutation: Optional[dict] = None  # thanos.permute.PermutationReport, for a consumer whose inputs moved
    reconstruction: Optional[dict] = None  # thanos.reconstruct.ReconstructionReport of its decoder layer
    quantization: Optional[dict] = None  # thanos.quantize.QuantizationReport

    @classmethod
    def of(cls, name: str, result: PruneResult, rank: int, tokens: int,
           permutation: Optional[dict] = None) -> "LinearReport":
        return cls(name, list(result.weight.shape), result.sparsity, result.error, result.seconds,
                   result.refit_seconds, result.search_seconds, result.mask_changed, result.damp_used,
                   result.damp_escalations, rank, tokens, permutation)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None or k not in ("permutation", "reconstruction", "quantization")}


def thin_statistics(layers: list[dict]) -> list[dict]:
    """The reports of the linears whose statistics summed fewer calibration tokens than they have inputs:
    their Hessian is rank-deficient, so the solve can fit those tokens exactly, and a small error on them
    says little about other text (an expert sees only the tokens routed to it). Reports written before
    tokens were recorded count as enough."""
    return [r for r in layers if r.get("tokens", r["shape"][1]) < r["shape"][1]]


def reduce_statistics_(names, shared: SharedInputStatistics, parallel: Parallel) -> None:
    """Sum the statistics of the linears `names` over ranks (each shared input once)."""
    for name in names:
        if name in shared.stats:
            parallel.reduce_stats_(shared.stats[name])


def solve_layer(linears: dict[str, nn.Module], shared: SharedInputStatistics, config, progress,
                parallel: Parallel, permute: Optional[Callable] = None,
                on_report: Optional[Callable[[dict], None]] = None, keep_statistics: bool = False,
                keep_factors: bool = False) -> list[dict]:
    """Reduce the statistics over ranks, solve this rank's linears, and share every pruned weight.

    `permute(shared)`, if given, reorders free channels on every rank (the same way, from the
    reduced statistics) before any solve, and returns `thanos.permute.PermutationReport`s. The
    8-bit step is left to `quantize_layer_`, after the layer's reconstruction. `keep_statistics`
    keeps the Hessians for a later step (the 8-bit one), `keep_factors` their inverse factors
    too (its compensated rounding reuses them); otherwise they are freed.
    """
    reduce_statistics_(linears, shared, parallel)  # all reductions first, so no rank waits on another's solve
    permuted = {r.consumer: dataclasses.asdict(r) for r in permute(shared)} if permute else {}
    return solve_linears(linears, shared, config, progress, parallel, on_report, keep_statistics, keep_factors,
                         permuted)


def solve_linears(linears: dict[str, nn.Module], shared: SharedInputStatistics, config, progress, parallel: Parallel,
                  on_report: Optional[Callable[[dict], None]], keep_statistics: bool, keep_factors: bool,
                  permuted: dict[str, dict]) -> list[dict]:
    """Solve this rank's share of `linears` on `shared`'s (reduced) statistics and share every pruned
    weight; `permuted`: the permutation report of each consumer whose inputs moved."""
    owners = parallel.owners(solve_costs(linears))
    reports = {}
    mine = [name for name in linears if owners[name] == parallel.rank]
    for i, name in enumerate(mine):
        mod = linears[name]
        wide = weight_view(mod).shape[1] >= WIDE_LAYER_COLUMNS
        result = prune_weight(weight_view(mod), shared.hessian(name), config, name=name, quantize=False,
                              progress=(lambda done, total: progress("columns", done, total)) if progress and wide else None,
                              curvature=shared.curvature(name))
        if all(shared.source[later] != shared.source[name] for later in mine[i + 1:]):
            shared.release(name, keep_factors)  # no later linear here reads this input
        set_weight_(mod, result.weight)
        reports[name] = LinearReport.of(name, result, parallel.rank, shared.tokens(name), permuted.get(name)).to_json()
        log.info("%s: sparsity %.3f, rel. error %.4g, %.2fs", name, result.sparsity, result.error or 0, result.seconds)
        if on_report:
            on_report(reports[name])
    if not keep_statistics:
        shared.stats.clear()  # free the Hessians before the broadcasts
        shared.curvatures.clear()
    for name, mod in linears.items():
        parallel.broadcast_(mod.weight.data, owners[name])
        reports[name] = parallel.broadcast_object(reports.get(name), owners[name])
    return [reports[name] for name in linears]
