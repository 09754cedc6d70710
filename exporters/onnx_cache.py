"""ONNX with a KV cache: one graph that prefills (empty past) and decodes (one token per step).

Inputs: `input_ids` (batch, seq), `attention_mask` (batch, past + seq), `position_ids`
(batch, seq), and a past key and value (batch, kv_heads, past, head_dim) for every decoder layer;
outputs: `logits` (batch, seq, vocab) and a present key and value (batch, kv_heads, past + seq,
head_dim) per layer. The cache tensors are named by a `CacheNames`: ours (`past_key_<i>`,
`present_key_<i>`, ...) or ONNX Runtime GenAI's (`past_key_values.<i>.key`, `present.<i>.key`).
Batch, sequence and past length are dynamic; a past of length 0 is a prefill. Positions are
explicit so that left-padded rows count from their first real token, as `generate` does.
`OnnxDecoder` drives it (greedy) for the checks and the bench.
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from exporters.base import ExportError, ValidationError, overflow_hint
from exporters.onnx_graph import TOLERANCE, TWO_GIB, export_graph, prefill_feed
from exporters.onnx_qdq import onnxruntime_session
from thanos.quantized_model import quantized_linears
from thanos.models import cache_argument

WITH_CACHE_FILE = "model_with_cache.onnx"


def _layer_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


class _StepWithCache(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.argument = cache_argument(model)
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        # no config: every layer's cache is kept whole, as the inputs and outputs above say; a config would
        # give sliding-window layers (Gemma 2/3, Mistral) a cache cut to the window, whose present is
        # shorter than past + seq (which GenAI refuses); the mask still applies the window
        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.argument: cache})
        return (out.logits, *[t for pair in _layer_tensors(cache) for t in pair])


@dataclasses.dataclass(frozen=True)
class CacheNames:
    """The cache tensors' names, as %-formats of the layer index."""

    past_key: str = "past_key_%d"
    past_value: str = "past_value_%d"
    present_key: str = "present_key_%d"
    present_value: str = "present_value_%d"

    def inputs(self, layers: int) -> list[str]:
        return [name % i for i in range(layers) for name in (self.past_key, self.past_value)]

    def outputs(self, layers: int) -> list[str]:
        return [name % i for i in range(layers) for name in (self.present_key, self.present_value)]


# What ONNX Runtime GenAI's configs (and optimum's exports) call them.
GENAI_NAMES = CacheNames("past_key_values.%d.key", "past_key_values.%d.value", "present.%d.key", "present.%d.value")


def write_onnx_with_cache(model, path: Path, opset: int = 18, external_data_threshold: int = TWO_GIB,
                          names: CacheNames = CacheNames()) -> Optional[dict]:
    """Export `model` (on the CPU, in its export dtype) as the cached graph described above; returns
    what its 8-bit linears became (`exporters.onnx_qdq`), None without any."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ExportError(f"{type(model).__name__} takes no position_ids, which the cached ONNX graph needs; "
                          "export the full-sequence graph instead (the default)")
    shapes = [tuple(k.shape) for k, _ in _layer_tensors(_probe_cache(model))]
    layers = len(shapes)
    past_len, seq = 3, 2
    past = [torch.zeros(1, s[1], past_len, s[3], dtype=next(model.parameters()).dtype) for s in shapes for _ in (0, 1)]
    ids = torch.ones(1, seq, dtype=torch.long)
    mask = torch.ones(1, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq)[None]
    inputs, outputs = names.inputs(layers), names.outputs(layers)
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
               "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
               **{n: {0: "batch", 2: "past"} for n in inputs}, **{n: {0: "batch", 2: "total"} for n in outputs}}
    return export_graph(_StepWithCache(model), (ids, mask, positions, *past), ["input_ids", "attention_mask", "position_ids",
                 *inputs], ["logits", *outputs], dynamic, path, opset, external_data_threshold)


@torch.no_grad()
def _probe_cache(model):
    """One real call, for the cache's shapes (kv heads, head dim) whatever the architecture."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(torch.ones(1, 2, dtype=torch.long), use_cache=True, **{cache_argument(model): cache})
    return cache


class OnnxDecoder:
    """Greedy decoding with onnxruntime: on the cached graph, a prefill then one token per step; on
    the full-sequence graph (no past inputs), the whole sequence again at every step."""

    def __init__(self, path: Path, providers=None):
        self.session = onnxruntime_session(path, providers)
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_")]

    def stream(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """Yields (the next greedy tokens (batch, 1), the step's logits), for as long as asked."""
        batch = input_ids.shape[0]
        feed = prefill_feed(self.session, input_ids, attention_mask)
        while True:
            logits, *presents = self.session.run(None, feed)
            token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            yield token, logits
            attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), attention_mask.dtype)], 1)
            if self.past_names:
                feed = {"input_ids": token, "attention_mask": attention_mask,
                        "position_ids": feed["position_ids"][:, -1:] + 1, **dict(zip(self.past_names, presents))}
            else:
                input_ids = np.concatenate([input_ids, token], 1)
                feed = prefill_feed(self.session, input_ids, attention_mask)

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, steps: int):
        """(new tokens (batch, steps), logits of the prefill (batch, seq, vocab))."""
        tokens, prefill_logits = [], None
        for _, (token, logits) in zip(range(steps), self.stream(input_ids, attention_mask)):
            prefill_logits = logits if prefill_logits is None else prefill_logits
            tokens.append(token)
        return np.concatenate(tokens, 1), prefill_logits


def validate_onnx_with_cache(model, ids: torch.Tensor, mask: torch.Tensor, path: Path, dtype: str,
                             steps: int = 8) -> dict:
    """The cached graph must reproduce PyTorch: prefill logits within tolerance, same greedy tokens.

    A graph with 8-bit linears is checked linear by linear (`exporters.onnx_qdq.validate_qdq`, by the
    caller); its logits' difference and token agreement are reported only (`onnx_export.validate_onnx`
    says why)."""
    tokens, logits = OnnxDecoder(path).generate(ids.numpy(), mask.numpy(), steps)
    export_dtype = next(model.parameters()).dtype
    model.float()  # the reference in fp32; the export dtype is restored below
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits.numpy()
        sequence, full_mask = ids, mask
        reference = []
        for _ in range(steps):  # greedy without any cache: the plain definition
            positions = (full_mask.cumsum(1) - 1).clamp(min=0)
            token = model(input_ids=sequence, attention_mask=full_mask, position_ids=positions,
                          use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            reference.append(token)
            sequence = torch.cat([sequence, token], 1)
            full_mask = torch.cat([full_mask, torch.ones_like(token)], 1)
    model.to(export_dtype)
    valid = mask.bool().numpy()
    diff = float(np.abs(logits.astype(np.float32) - expected)[valid].max())
    agree = float((tokens == torch.cat(reference, 1).numpy()).mean())
    result = dict(max_abs_diff=diff, greedy_steps=steps, greedy_tokens_agree=agree)
    if not np.isfinite(logits[valid]).all():
        raise ExportError(f"cached ONNX ({dtype}) prefill logits are not finite{overflow_hint(dtype)}")
    if quantized_linears(model):
        return result
    tolerance = TOLERANCE[dtype] * float(np.abs(expected[valid]).max())
    if not diff <= tolerance:
        raise ValidationError(f"cached ONNX ({dtype}) prefill logits", diff, tolerance)
    return dict(result, tolerance=tolerance)
