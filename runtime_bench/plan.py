"""Time and memory plan for pruning a whole model, from one decoder layer measured on this machine.

    thanos-export plan --config llama2-70b --device cuda --ranks 1,8

Builds one decoder layer of a real config with random weights (the solve and the forward passes
cost the same whatever the values), captures random calibration tokens in front of it, and times
the driver's own per-layer steps: moving the layer onto the device (layer offloading), the
statistics pass, each linear's solve, and the pass through the pruned layer. Where the layers are
of more than one kind (a dense MLP or experts, linear or full attention), one of each is timed.
The plan for the whole model multiplies each kind's layer by its count. For N ranks (`torchrun
... prune --distributed`) the two passes over the samples are divided by N and the solves are
dealt out by the same rule the distributed driver uses; the all-reduce and broadcast traffic is
reported in bytes, not timed.
"""
from __future__ import annotations

import copy
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from runtime_bench.model import RANDOM_CONFIGS, random_config
from runtime_bench.protocol import machine, timed
from thanos import prune_weight
from thanos.config import PruneConfig
from thanos.driver import (LayerStep, capture_layer_inputs, collect_statistics, prune_layer, quantizes_per_group,
                           run_layer, solve_costs)
from thanos.errors import InputError
from thanos.experts import UnfusedExperts, is_experts_module, unfuse_experts_
from thanos.model_config import is_multimodal, layer_kinds as config_layer_kinds
from thanos.models import (ADAPTERS, LayerSelection, adapter_for, attention_heads, decoder_layers, prunable_linears,
                           smoothing_groups)
from thanos.linears import weight_view
from thanos.parallel import Parallel, deal_by_cost
from thanos.outputs import atomic_write_text
from thanos.permute import ChannelLayout
from thanos.recipe import Permute, Quantize, Reconstruct
from thanos.devices import defaults_for, resolve_device, tf32_for_products
from thanos.pipeline import window_length

PLAN_VOCAB = 512  # the embedding is outside the measured layer; a small one keeps the model light
PLANNED_CONFIG_KEYS = ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"]


def _warm_up(device: torch.device, prune: PruneConfig) -> None:
    """A small solve first, so that no timed step pays for loading the solver's kernels."""
    x = torch.randn(256, 64, device=device)
    prune_weight(torch.randn(32, 64, device=device), x.T @ x / 256, prune.method, prune.pattern, prune.sparsity)


@torch.no_grad()
def measure_layer(config, prune: PruneConfig, samples: int, seqlen: int, device: "str | torch.device",
                  dtype: torch.dtype, offload_activations: bool = True, echo=print, on_partial=None,
                  index: int = 0) -> dict:
    """Prune one random decoder layer of `config` (a transformers config, `plan_config`), of the kind
    its layer `index` is, and time each step.

    `on_partial(figures)` gets what is measured so far after each step and each solve, so a run
    stopped by a time limit still leaves its figures.
    """
    device = torch.device(device)
    store_device = torch.device("cpu") if offload_activations else device
    model = _one_layer_model(config, dtype, index).eval()
    layer = decoder_layers(model)[0]
    linears = prunable_linears(model, LayerSelection())[0]
    tokens = torch.randint(0, PLAN_VOCAB, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    inputs, args, kwargs = capture_layer_inputs(model, tokens, device, store_device)
    _warm_up(device, prune)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, load_s = timed(lambda: layer.to(device), device)
    run_layer(layer, inputs[:1], args, kwargs, device, store_device)  # first calls load the kernels; untimed
    echo(f"layer on {device} in {load_s:.2f}s; statistics pass over {samples} x {seqlen} tokens ...")
    # The driver's own layer step, timed whole: what is neither a permutation, a solve nor the
    # reconstruction is the statistics pass (the reductions are no-ops in one process).
    reconstruct = prune.recipe.get(Reconstruct)
    dense = list(inputs) if reconstruct and reconstruct.target == "dense" else None
    layout = ChannelLayout.of(model, layer) if prune.recipe.get(Permute) else None
    quantize = prune.recipe.get(Quantize)
    step = LayerStep(layer, linears, inputs, dense, args, kwargs, device, store_device,
                     prefix=f"{adapter_for(model).layers}.0.", layout=layout,
                     smoothing=smoothing_groups(model) if quantize and quantize.smooths else (),
                     heads=attention_heads(model, layer))
    # one sample is enough to learn the distinct inputs (and so Hessians) and which linears read each;
    # one accumulator is made, not all (a large mixture's are more than the device holds)
    first = collect_statistics(layer, linears, inputs[:1], args, kwargs, device, store_device, first_group_only=True)
    groups = first.groups()
    hessian_bytes = sum(8 * first.widths[group[0]] ** 2 for group in groups)
    partial = dict(config={k: getattr(config, k) for k in PLANNED_CONFIG_KEYS}, prune=prune.to_json(),
                   samples=samples, seqlen=seqlen, device=str(device), dtype=str(dtype),
                   seconds=dict(load=load_s, solves={}, refits={}, searches={}))

    def solved(report: dict) -> None:
        for key, field in (("solves", "seconds"), ("refits", "refit_seconds"), ("searches", "search_seconds")):
            partial["seconds"][key][report["name"]] = report[field]
        partial.setdefault("errors", {})[report["name"]] = report["error"]
        if on_partial:
            on_partial(partial)

    if on_partial:
        on_partial(partial)
    echo(f"statistics and {len(linears)} solves ...")
    (reports, _), total_s = timed(lambda: prune_layer(step, prune, None, Parallel(), solved), device)
    reconstruction_s = reports[0].get("reconstruction", {}).get("seconds", 0.0) if reports else 0.0
    permutation_s = sum(r.get("permutation", {}).get("seconds", 0.0) for r in reports)
    quantization_s = sum(r.get("quantization", {}).get("seconds", 0.0) for r in reports)
    statistics_s = (total_s - reconstruction_s - permutation_s - quantization_s
                    - sum(r["seconds"] for r in reports))
    _, forward_s = timed(lambda: run_layer(layer, inputs, args, kwargs, device, store_device), device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    _, unload_s = timed(lambda: layer.to("cpu"), device)
    return dict(
        config={k: getattr(config, k) for k in PLANNED_CONFIG_KEYS},
        prune=prune.to_json(), samples=samples, seqlen=seqlen, device=str(device), dtype=str(dtype),
        activations_on=str(store_device),
        seconds=dict(load=load_s, statistics=statistics_s, forward=forward_s, unload=unload_s,
                     solves={r["name"]: r["seconds"] for r in reports},
                     refits={r["name"]: r["refit_seconds"] for r in reports},
                     searches={r["name"]: r["search_seconds"] for r in reports},
                     reconstruction=reconstruction_s, permutation=permutation_s, quantization=quantization_s,
                     quantizations={r["name"]: r["quantization"]["seconds"] for r in reports
                                    if r.get("quantization")}),
        errors={r["name"]: r["error"] for r in reports},
        # the experts' statistics gathered in this many turns (half the device's free memory: prune_layer)
        statistics_turns=max((r["statistics_turn"][1] for r in reports if "statistics_turn" in r), default=1),
        solve_costs=solve_costs(linears),
        groups=groups,
        quantized_by_group=quantizes_per_group(prune, step.smoothing),
        work=step_work(linears, prune),
        bytes=dict(
            layer_weights=sum(p.numel() * p.element_size() for p in layer.parameters()),
            prunable_weights=sum(weight_view(m).numel() * weight_view(m).element_size() for m in linears.values()),
            # fp64 sums while they stream, one per distinct linear input (q/k/v and gate/up share theirs)
            hessians=hessian_bytes,
            activations=2 * sum(x.numel() * x.element_size() for x in inputs),  # a layer's inputs and outputs
            device_peak=peak,
        ),
    )


def step_work(linears: dict, prune: PruneConfig) -> dict:
    """Per linear: each step's flop and the estimated peak bytes of the largest (`thanos.recipe.Cost`),
    so a device's time can be read from its throughput before it has run anything."""
    work = {}
    for name, mod in linears.items():
        rows, cols = weight_view(mod).shape
        costs = prune.recipe.costs(rows, cols)
        work[name] = dict(shape=[rows, cols], flop={kind: cost.flop for kind, cost in costs.items()},
                          peak_bytes=max(cost.nbytes(rows, cols) for cost in costs.values()))
    return work


def plan(layer: dict, layers: int, ranks: list[int]) -> list[dict]:
    """Whole-model time and per-rank memory for each rank count, from one measured layer."""
    s = layer["seconds"]
    everything = [list(s["solves"])]
    batches = _dealt_by_group(layer) or everything
    # the 8-bit step is dealt out like the solves: per group where the driver quantizes each group
    # once solved, else once for the whole layer (files before round 10 have its total only)
    quantize_batches = batches if layer.get("quantized_by_group") else everything
    rows = []
    for n in ranks:
        solves_s = _slowest_ranks(layer, batches, s["solves"], n)
        quantize_s = (_slowest_ranks(layer, quantize_batches, s["quantizations"], n) if s.get("quantizations")
                      else s.get("quantization", 0.0))
        # every rank computes the same channel orders (they are cheap next to the solves)
        per_layer = (s["load"] + (s["statistics"] + s["forward"] + s.get("reconstruction", 0.0)) / n
                     + s.get("permutation", 0.0) + solves_s + quantize_s + s["unload"])
        traffic = 0 if n == 1 else layer["bytes"]["hessians"] + layer["bytes"]["prunable_weights"]
        rows.append(dict(
            ranks=n, seconds_per_layer=per_layer, hours_total=per_layer * layers / 3600,
            solve_seconds_per_layer=solves_s,
            activation_bytes_per_rank=layer["bytes"]["activations"] / n,
            collective_bytes_per_layer=traffic,
        ))
    return rows


def plan_model(kinds: list[dict], ranks: list[int]) -> list[dict]:
    """`plan` for each kind of layer ({count, layer: measured}), summed over the whole model per rank count."""
    per_kind = [plan(kind["layer"], kind["count"], ranks) for kind in kinds]
    return [dict(ranks=n, hours_total=sum(rows[i]["hours_total"] for rows in per_kind),
                 kinds=[rows[i] for rows in per_kind]) for i, n in enumerate(ranks)]


def _slowest_ranks(layer: dict, batches: list[list[str]], seconds: dict[str, float], ranks: int) -> float:
    """Each batch's linears dealt out over `ranks` by r*c^2 as the driver deals them and waited for:
    the sum over batches of the busiest rank's `seconds`."""
    total = 0.0
    for names in batches:
        owners = deal_by_cost({name: layer["solve_costs"][name] for name in names}, ranks)
        total += max(sum(seconds.get(name, 0.0) for name in names if owners[name] == r) for r in range(ranks))
    return total


def _dealt_by_group(layer: dict) -> Optional[list[list[str]]]:
    """The groups whose solves the ranks share out one at a time (`thanos.driver.solve_in_order`)
    when the layer is solved group by group; None when the whole layer is dealt at once."""
    return layer["groups"] if layer.get("prune", {}).get("sequential") and layer.get("groups") else None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 2 * 3600 else f"{seconds / 3600:.1f} h"


def _parts(seconds: dict, names: list[str], prune: dict) -> str:
    """' (mask search x, refit y)': the steps after the block solve of these linears, where the recipe has them."""
    parts = [f"{label} {_duration(sum(seconds[key][name] for name in names))}" for key, label, option in
             (("searches", "mask search", "mask_search_iterations"), ("refits", "refit", "refit_iterations"))
             if prune.get(option) and all(name in seconds.get(key, {}) for name in names)]
    return f" ({', '.join(parts)})" if parts else ""


def _error(layer: dict, names: list[str]) -> str:
    """'; error 0.0123': the relative output error on the calibration inputs of these linears, where recorded."""
    errors = [e for e in (layer.get("errors", {}).get(name) for name in names) if e is not None]
    if len(errors) > 1:
        return f"; error {sum(errors) / len(errors):.4g} on average, {max(errors):.4g} at most"
    return f"; error {errors[0]:.4g}" if errors else ""


EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")


def _by_projection(names) -> dict[str, list[str]]:
    """{short name: full names}: a layer's linears, each expert projection across the experts as one
    row ('mlp.experts.*.up_proj'), so a plan of 128 experts reads as one of a dense layer does."""
    rows: dict[str, list[str]] = {}
    for name in names:
        short = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        rows.setdefault(EXPERT_INDEX.sub(".experts.*.", short), []).append(name)
    return rows


def _each(short: str, names: list[str], figures_each: bool = False) -> str:
    """A row's linear: 'mlp.experts.*.up_proj (128 experts)' for an expert projection."""
    return f"{short} ({len(names)} experts{', each' if figures_each else ''})" if len(names) > 1 else short


def _layers(count: int) -> str:
    return f"{count} layer{'s' if count > 1 else ''}"


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def plan_config(name: str):
    """The transformers config to plan for: one of `RANDOM_CONFIGS` by name, or a model directory or
    config.json of any family `thanos.models.ADAPTERS` names (its weights are not read)."""
    if name in RANDOM_CONFIGS:
        return random_config(name)
    path = Path(name).expanduser()
    if not path.exists():
        raise InputError(f"--config {name} is neither a known config ({', '.join(RANDOM_CONFIGS)}) nor a model "
                         "directory or config.json; pass one of those")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"--config {name}: transformers cannot read a config there ({exc}); pass a model "
                         "directory holding config.json, or the file itself") from exc
    if config.model_type not in ADAPTERS:
        raise InputError(f"--config {name} is a {config.model_type!r} model; supported: {', '.join(sorted(ADAPTERS))}")
    # a vision-language checkpoint's plan is its language model's: the vision tower is never pruned
    return _causal(config.get_text_config()) if is_multimodal(config) else config


# language models transformers builds only inside their vision-language model, planned as the text
# family whose layers they share (the same linears; only their rotary positions differ, which no
# cost depends on), with that family's names for their fields
_PLANNED_AS = {"qwen3_vl_text": ("qwen3", {}), "qwen3_vl_moe_text": ("qwen3_moe", {"num_local_experts": "num_experts"})}


def _causal(text):
    """`text` (a language model's config) as a config `AutoModelForCausalLM` builds."""
    if text.model_type not in _PLANNED_AS:
        return text
    from transformers import AutoConfig

    family, renamed = _PLANNED_AS[text.model_type]
    fields = {renamed.get(key, key): value for key, value in text.to_dict().items()
              if key not in ("model_type", "transformers_version", "architectures")}
    return AutoConfig.for_model(family, **fields)


def layer_kinds(config) -> list[dict]:
    """The kinds of decoder layer in `config`, in order of first appearance: each {first, count, label}.

    Layers whose parameters differ in name or shape (a dense MLP or experts, linear or full
    attention) prune differently, so a plan times one of each kind and counts it for its layers.
    Read from the whole model built on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        layers = decoder_layers(AutoModelForCausalLM.from_config(config))
    found: dict[tuple, list[int]] = {}
    for index, layer in enumerate(layers):
        found.setdefault(tuple((name, tuple(p.shape)) for name, p in layer.named_parameters()), []).append(index)
    firsts = [indices[0] for indices in found.values()]
    traits = [_traits(config, layers[index], index) for index in firsts]
    varying = [i for i in range(3) if len({t[i] for t in traits}) > 1]  # name a kind by what tells it apart
    return [dict(first=first, count=len(indices), label=", ".join(t[i] for i in varying) or f"like layer {first}")
            for first, indices, t in zip(firsts, found.values(), traits)]


# Nemotron-H's layer kinds, each a layer's one mixer (its Mamba-2 layers are "linear_attention" there)
_MIXERS = {"linear_attention": "Mamba-2", "full_attention": "attention", "moe": "experts", "mlp": "MLP"}


def _traits(config, layer, index: int) -> tuple[str, str, str]:
    """(its attention kind, "experts" or "dense MLP", whether it reuses an earlier layer's keys and
    values) of decoder layer `index`; (its mixer, "", "") where each layer is one mixer (Nemotron-H)."""
    kinds = config_layer_kinds(config)
    if {"moe", "mlp"} & set(kinds):
        return _MIXERS.get(kinds[index], kinds[index]), "", ""
    experts = any(is_experts_module(m) or isinstance(m, UnfusedExperts) for m in layer.modules())
    reuses = getattr(getattr(layer, "self_attn", None), "is_kv_shared_layer", False)
    return ((kinds[index].replace("_", " ") if kinds else "attention"), ("experts" if experts else "dense MLP"),
            "keys and values reused" if reuses else "own keys and values")


def _layer_class(config, index: int) -> type:
    """The class the model builds its decoder layer `index` with."""
    from transformers import AutoModelForCausalLM

    shorter = copy.deepcopy(config)
    shorter.num_hidden_layers = index + 1
    if getattr(config, "layer_types", None):
        _set_layer_kinds(shorter, config.layer_types[:index + 1])
    with torch.device("meta"):
        return type(decoder_layers(AutoModelForCausalLM.from_config(shorter))[index])


@contextmanager
def _default_dtype(dtype: torch.dtype):
    """Parameters created in `dtype` (a 70B layer made in fp32 and then cast would double its host memory)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _one_layer_model(config, dtype: torch.dtype, index: int = 0):
    """A model of one random decoder layer behind a small embedding, the layer built as `config`'s
    full model builds its layer `index` (its class, the whole config, that index: what decides a
    dense MLP or experts, linear or full attention) and numbered 0 in the model around it; experts
    unfused, as pruning sees them."""
    from transformers import AutoModelForCausalLM

    kinds = getattr(config, "layer_types", None)
    # Gemma 4's embedding of the tokens for each layer is sized by the layer count: one layer's here
    per_layer_inputs = bool(getattr(config, "hidden_size_per_layer_input", 0))
    around = copy.deepcopy(config)
    around.num_hidden_layers, around.vocab_size = int(per_layer_inputs), PLAN_VOCAB
    if hasattr(config, "num_kv_shared_layers"):  # none of a one-layer model's layers reuses another's
        around.num_kv_shared_layers = 0
    if kinds:  # the model builds what layers of a kind share (Gemma 3's rotary tables per kind) from these
        _set_layer_kinds(around, [kinds[index]])
    model = AutoModelForCausalLM.from_config(around, dtype=dtype)
    layer_config = copy.deepcopy(model.config)  # the attention and experts implementations the model chose
    for key in ("num_hidden_layers", "num_kv_shared_layers"):
        if hasattr(config, key):
            setattr(layer_config, key, getattr(config, key))
    if kinds:
        _set_layer_kinds(layer_config, list(kinds))
    with _default_dtype(dtype):
        layer = _layer_class(config, index)(layer_config, layer_idx=index)
    for module in layer.modules():  # caches and masks of the one-layer model know one layer, number 0
        if hasattr(module, "layer_idx"):
            module.layer_idx = 0
    if per_layer_inputs:
        decoder_layers(model)[0] = layer  # in place of the one the model built to size them
    else:
        decoder_layers(model).append(layer)
    model.config.num_hidden_layers = 1
    model.init_weights()  # transformers' own initialisation for the new layer (fused experts start empty)
    unfuse_experts_(model)
    return model


def _set_layer_kinds(config, kinds: list) -> None:
    try:
        config.layer_types = kinds
    except AttributeError:  # derived from the layer count, all of one kind (Falcon-H1's)
        pass


def _meta_layer_linears(config, index: int = 0) -> dict:
    """{name: linear} of a decoder layer of `config` of the kind layer `index` is, on the meta device."""
    with torch.device("meta"):
        model = _one_layer_model(config, torch.float32, index)
    return prunable_linears(model, LayerSelection())[0]


def config_linear_shapes(name: str) -> list[tuple[int, int]]:
    """(out_features, in_features) of the distinct prunable linears of every kind of decoder layer of
    `plan_config(name)`."""
    config = plan_config(name)
    return sorted({tuple(weight_view(mod).shape) for kind in layer_kinds(config)
                   for mod in _meta_layer_linears(config, kind["first"]).values()})


def markdown(kinds: list[dict], rows: list[dict], name: str, layers: int, machine_info: dict) -> str:
    """The plan as Markdown: each kind of layer's steps ({first, count, label, layer: measured}), then
    the whole model per rank count (`plan_model`'s rows)."""
    first = kinds[0]["layer"]
    several = len(kinds) > 1
    where = machine_info.get("gpu") or machine_info.get("cpu")
    lines = [
        f"# Pruning plan: {name} ({layers} decoder layers"
        + (": " + ", ".join(f"{kind['count']} {kind['label']}" for kind in kinds) if several else "")
        + f"), {first['prune']['method']} {first['prune']['pattern']}, calibration {first['samples']} x "
        f"{first['seqlen']} tokens",
        "",
        f"Measured on {where} ({first['device']}, {first['dtype']}, torch {machine_info.get('torch')}): one "
        f"random-weight decoder layer{' of each kind' if several else ''}, activations kept on "
        f"{first['activations_on']}"
        + ("; the mask search's and refit's products in TF32 (errors in full fp32)."
           if first.get("tf32_products") else "; every product in full fp32.")
        + " Errors: each linear's relative output error on the calibration inputs"
        + ("; experts' projections one row each, their times summed over the experts." if any(
            len(names) > 1 for kind in kinds for names in _by_projection(kind["layer"]["seconds"]["solves"]).values())
           else "."),
    ]
    for kind in kinds:
        if several:
            lines += ["", f"## {kind['label']}: {_layers(kind['count'])}, timed on one like layer {kind['first']}"]
        lines += ["", *_step_lines(kind["layer"])]

    def per_kind(values: list[str]) -> str:
        return "; ".join(f"{value} {kind['label']}" for value, kind in zip(values, kinds)) if several else values[0]

    lines += [
        "",
        "| ranks | per layer | solves per layer (slowest rank) | whole model | activations per rank "
        "| all-reduce + broadcast per layer |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| {r['ranks']} | {per_kind([_duration(k['seconds_per_layer']) for k in r['kinds']])} "
          f"| {per_kind([_duration(k['solve_seconds_per_layer']) for k in r['kinds']])} "
          f"| {_duration(r['hours_total'] * 3600)} | {_size(r['kinds'][0]['activation_bytes_per_rank'])} "
          f"| {per_kind([_size(k['collective_bytes_per_layer']) for k in r['kinds']])} |" for r in rows],
        "",
        "N ranks divide the two passes over the samples by N (each rank holds a shard) and deal the solves out "
        "by r*c^2 as `prune --distributed` does"
        + (" (group by group: each group's solves dealt out and waited for before the next group's statistics)"
           if _dealt_by_group(first) else "")
        + (", the 8-bit step's linears too" + (" (with their group)" if first.get("quantized_by_group") else "")
           if first["seconds"].get("quantizations") else "")
        + "; the collectives are not timed (their bytes are in the table).",
        *_value_note(first),
    ]
    for kind in kinds:
        lines += _work_lines(kind["layer"]["work"], f"### {kind['label']} layers: work" if several else "")
    return "\n".join(lines) + "\n"


def _step_lines(layer: dict) -> list[str]:
    """One measured layer's steps, timed, and what it holds."""
    s, b, prune = layer["seconds"], layer["bytes"], layer["prune"]
    return [
        "| step, one layer | time |",
        "| --- | --- |",
        f"| move the layer onto the device | {_duration(s['load'])} |",
        f"| statistics pass (forward with Hessian hooks) | {_duration(s['statistics'])} |",
        *([f"| channel permutations (o_proj, down_proj) | {_duration(s['permutation'])} |"]
          if s.get("permutation") else []),
        *[f"| solve {_each(short, names)} | {_duration(sum(s['solves'][n] for n in names))}"
          + (" in all" if len(names) > 1 else "") + _parts(s, names, prune) + _error(layer, names) + " |"
          for short, names in _by_projection(s["solves"]).items()],
        *([f"| decoder-block reconstruction ({prune['reconstruct_epochs']} epochs) | "
           f"{_duration(s['reconstruction'])} |"] if s.get("reconstruction") else []),
        *([f"| {prune['quantize']} weights, every linear (their input scales: in the statistics) | "
           f"{_duration(s['quantization'])} |"] if s.get("quantization") else []),
        f"| forward through the pruned layer | {_duration(s['forward'])} |",
        f"| move the layer back to the host | {_duration(s['unload'])} |",
        "",
        f"One layer holds {_size(b['layer_weights'])} of weights and {_size(b['hessians'])} of Hessian sums "
        f"(fp64 while the statistics stream, one per distinct input)"
        + (f"; the experts' do not fit in half the free memory here and were gathered in {turns} turns, a pass "
           "through the layer each (timed above)" if (turns := layer.get("statistics_turns", 1)) > 1 else "")
        + (f"; the device allocator peaked at {_size(b['device_peak'])}" if b["device_peak"] is not None else "")
        + ".",
    ]


def _value_note(layer: dict) -> list[str]:
    """What random weights cannot tell: the steps whose iteration count depends on the values."""
    prune = layer.get("prune", {})
    if not (prune.get("refit_iterations") or prune.get("mask_search_iterations")):
        return []
    return ["", "The mask search and the refit stop early once they stop paying, which depends on the weights and "
                "inputs, so their times on this random layer need not be a real layer's: at most what their "
                "iteration caps cost."]


def _work_lines(work: dict, heading: str = "") -> list[str]:
    """The per-linear flop and memory table (leading terms, from `thanos.recipe.Cost`); each expert
    projection one row, its figures those of each expert."""
    kinds = list(next(iter(work.values()))["flop"])
    lines = [*(["", heading] if heading else []), "", "Work per linear, counted (leading terms of each step, fp32 flop; peak: the largest "
             "step's c x c and r x c matrices, the Hessian and the weight included; `thanos.recipe.Cost`):", "",
             "| linear | r x c | " + " | ".join(f"{kind} GFLOP" for kind in kinds) + " | peak memory |",
             "|" + " --- |" * (len(kinds) + 3)]
    for short, names in _by_projection(work).items():
        w = work[names[0]]  # the experts of a projection share its shape
        lines.append(f"| {_each(short, names, figures_each=True)} | {w['shape'][0]} x "
                     f"{w['shape'][1]} | " + " | ".join(f"{w['flop'][kind] / 1e9:,.0f}" for kind in kinds)
                     + f" | {_size(w['peak_bytes'])} |")
    total = _layer_flop(work)
    lines += ["", f"One layer's solves: {total / 1e12:.1f} TFLOP in all; at a sustained T TFLOP/s they take "
              f"{total / 1e12:.1f} / T seconds."]
    return lines


def _layer_flop(work: dict) -> float:
    return sum(sum(w["flop"].values()) for w in work.values())


def count_work(name: str, prune: PruneConfig, index: int = 0) -> dict:
    """`step_work` for a decoder layer of config `name` of the kind its layer `index` is, built on the
    meta device: counted, nothing run."""
    return step_work(_meta_layer_linears(plan_config(name), index), prune)


def markdown_from_json(path: "str | Path") -> str:
    """The Markdown of a finished plan, rebuilt from its `--json-out` file (the device run brings back
    the JSON alone)."""
    data = json.loads(Path(path).read_text())
    if not data.get("complete"):
        raise InputError(f"{path} holds a plan stopped before its end ({data.get('stopped', 'no reason recorded')}); "
                         "its figures are in the JSON, per solve")
    # files from before layers were timed by kind hold one layer for all
    kinds = data.get("kinds") or [dict(first=0, count=data["layers"], label="", layer=data["layer"])]
    return markdown(kinds, plan_model(kinds, [row["ranks"] for row in data["plan"]]), data["model"], data["layers"],
                    data["machine"])


def _counted_markdown(counted: list[dict], name: str, layers: int, prune: PruneConfig) -> str:
    """`--count-only`'s Markdown: each kind of layer's work per linear ({first, count, label, work}), and
    the whole model's."""
    several = len(counted) > 1
    recipe = ", ".join(step.kind for step in prune.recipe.steps)
    lines = [f"# Work counted: {name} ({layers} decoder layers"
             + (": " + ", ".join(f"{kind['count']} {kind['label']}" for kind in counted) if several else "")
             + f"), {prune.method} {prune.pattern}" + (f", preset {prune.preset}" if prune.preset else "")
             + f" ({recipe})"]
    for kind in counted:
        lines += _work_lines(kind["work"], f"## {kind['label']}: {_layers(kind['count'])}, like layer {kind['first']}"
                             if several else "")
    total = sum(kind["count"] * _layer_flop(kind["work"]) for kind in counted)
    lines += ["", f"The whole model's solves: {total / 1e15:.2f} PFLOP ({layers} layers)."]
    return "\n".join(lines) + "\n"


def run_plan(name: str = "llama2-70b", device: Optional[str] = None, ranks: tuple[int, ...] = (1, 8),
             calib_samples: Optional[int] = None, seqlen: Optional[int] = None, pattern: str = "2:4",
             method: str = "thanos", preset: Optional[str] = None, json_out: Optional[str] = None,
             md_out: Optional[str] = None, echo=print, permute_channels: Optional[bool] = None,
             count_only: bool = False, sequential: Optional[bool] = None, quantize: Optional[str] = None,
             tf32: bool = False) -> str:
    """Measure one decoder layer of config `name`, plan the whole model, write the files; returns the Markdown.

    `count_only`: count each step's flop and memory per linear instead, in a second, on no device.
    `quantize` ("fp8", "int8"): with the 8-bit step (the pass that feeds the next layer not timed).
    `tf32`: the mask search's and refit's products in TF32 on a GPU (`thanos.devices.tf32_for_products`);
    the layer errors reported beside the times are computed in full fp32 either way.
    """
    if not ranks or min(ranks) < 1:
        raise InputError(f"--ranks are process counts, 1 or more (1,8), not {list(ranks)}")
    prune = PruneConfig(method=method, pattern=pattern, preset=preset, permute_channels=permute_channels,
                        sequential=sequential, quantize=quantize)
    full = plan_config(name)
    layers, kinds = full.num_hidden_layers, layer_kinds(full)
    several = len(kinds) > 1
    if count_only:
        counted = [dict(kind, work=step_work(_meta_layer_linears(full, kind["first"]), prune)) for kind in kinds]
        text = _counted_markdown(counted, name, layers, prune)
        if json_out:
            atomic_write_text(Path(json_out), json.dumps(dict(model=name, layers=layers, prune=prune.to_json(),
                                                              kinds=counted), indent=2))
        if md_out:
            Path(md_out).write_text(text)
        return text
    if getattr(full, "num_kv_shared_layers", 0):
        raise InputError(f"{name}: its last {full.num_kv_shared_layers} layers reuse the keys and values of earlier "
                         "ones, which a layer timed alone does not have; --count-only counts every layer's work")
    dev = resolve_device(device)
    defaults = defaults_for(dev)
    samples = calib_samples or defaults.samples
    seqlen = window_length(seqlen, defaults.seqlen, getattr(full, "max_position_embeddings", None))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    info = machine()

    def write(measured: list[dict], rows: Optional[list] = None, stopped: Optional[str] = None) -> None:
        if json_out:  # rewritten after every step: a run stopped by its time limit keeps what it measured
            figures = dict(machine=info, model=name, layers=layers, complete=rows is not None, kinds=measured,
                           plan=rows)
            atomic_write_text(Path(json_out), json.dumps(figures | ({"stopped": stopped} if stopped else {}),
                                                         indent=2))

    measured: list[dict] = []
    try:
        with tf32_for_products(tf32):
            for kind in kinds:
                if several:
                    echo(f"{kind['label']} layers ({kind['count']}): timing one like layer {kind['first']} ...")
                partial = dict(kind, layer=dict(tf32_products=tf32))
                measured.append(partial)
                partial["layer"].update(measure_layer(
                    full, prune, samples, seqlen, dev, dtype, echo=echo, index=kind["first"],
                    on_partial=lambda figures: (partial["layer"].update(figures), write(measured))))
    except BaseException as exc:  # a time limit's SIGTERM or Ctrl-C, or a failure: say so beside the figures
        write(measured, stopped=f"{type(exc).__name__}: {exc}"[:300])
        raise
    rows = plan_model(measured, list(ranks))
    text = markdown(measured, rows, name, layers, info)
    write(measured, rows)
    if md_out:
        Path(md_out).write_text(text)
    return text
