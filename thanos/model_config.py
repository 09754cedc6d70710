"""What a model's config says, read before (or without) building the model: whether it is a
vision-language checkpoint, whether it has layers with a recurrent state, which transformers class
builds it whole."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from torch import nn


def text_config(model: nn.Module):
    """The language model's config: a multimodal checkpoint's text part (Gemma 3 from 4B up), else
    the model's config itself."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def is_multimodal(config) -> bool:
    """A checkpoint with a vision tower beside its language model (a config or config.json's dict)."""
    return (config.get("vision_config") if isinstance(config, dict) else getattr(config, "vision_config", None)) is not None


def auto_class(config):
    """transformers' Auto class that builds the whole checkpoint: a vision-language one's
    conditional-generation model, vision tower kept (for Qwen3.5, AutoModelForCausalLM builds the
    language model alone and drops the tower without a word), else the causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_multimodal(config) else AutoModelForCausalLM


def saved_config(model_dir: "Path | str | None") -> Optional[dict]:
    """A model directory's config.json as a dict; None where there is none or it cannot be parsed (the
    loader names a damaged one)."""
    config = Path(model_dir) / "config.json" if model_dir is not None else None
    if config is None or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def text_field(config, key: str):
    """`key` of the language model's part of a config or of config.json's dict (None if absent)."""
    if isinstance(config, dict):
        text = config.get("text_config") or config
        return text.get(key) if isinstance(text, dict) else None
    return getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, key, None)


def expert_count(config) -> int:
    """Routed experts per layer, under any of the names families give it (0: not a mixture of experts),
    from a config or config.json's dict. Nemotron-H's configs count experts whether or not a layer has
    them: there, only layers of kind `moe` do."""
    if text_field(config, "model_type") == "nemotron_h" and "moe" not in layer_kinds(config):
        return 0
    return next((n for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
                 if (n := text_field(config, key))), 0)


# Nemotron-H's released config.json spells its layers as one letter each (transformers' own reading)
_PATTERN_KINDS = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}


def layer_kinds(config) -> list[str]:
    """Each decoder layer's kind where the config lists them ([] where it does not), from a config or
    config.json's dict: `layer_types`, Nemotron-H's `layers_block_type` or its one-letter pattern."""
    kinds = text_field(config, "layer_types") or text_field(config, "layers_block_type")
    if kinds:
        return list(kinds)
    return [_PATTERN_KINDS.get(letter, letter) for letter in text_field(config, "hybrid_override_pattern") or ""]


def is_mixture_of_experts(config) -> bool:
    """Experts a router picks per token (Mixtral, Qwen3-MoE), from a config or config.json's dict."""
    return expert_count(config) > 0


RECURRENT_LAYER_KINDS = {"linear_attention", "mamba", "conv"}  # Qwen3.5 and Nemotron-H, Granite 4, LFM2
MAMBA_IN_EVERY_LAYER = {"falcon_h1"}  # beside the attention, no layer kinds listed


def has_recurrent_layers(config) -> bool:
    """Layers that carry a recurrent or convolution state instead of a KV cache (Qwen3.5's linear
    attention, Mamba-2 layers, LFM2's short convolutions), from a config or config.json's dict."""
    if text_field(config, "model_type") in MAMBA_IN_EVERY_LAYER:
        return True
    return bool(RECURRENT_LAYER_KINDS & set(layer_kinds(config)))


def has_per_layer_shapes(config) -> bool:
    """Layers whose attention differs in shape by more than its kind's window (transformers'
    heterogeneous configs: Gemma 4's wider full-attention heads), from a config or config.json's dict."""
    if isinstance(config, dict):
        return bool(text_field(config, "per_layer_config"))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "is_heterogeneous", False))
