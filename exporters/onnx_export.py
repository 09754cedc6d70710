"""`--target onnx`: the full-sequence graph (input_ids, attention_mask -> logits), run by onnxruntime.

Every linear weight becomes a constant initializer. PyTorch exports `x @ W^T` as a MatMul whose
second input is the folded (K, N) transpose of W, so the n:m groups that ran along W's rows run
along axis 0 of the initializer; `onnx_weight_patterns` reads the initializers back and checks
the groups along K, whichever way each one is stored (MatMul (K, N), or Gemm with transB=1 (N, K)).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from exporters.base import (ONNX_DTYPES, ExportError, ExportFormat, ExportOptions, ValidationError, overflow_hint,
                            register)
from exporters.onnx_cache import WITH_CACHE_FILE, validate_onnx_with_cache, write_onnx_with_cache
from exporters.onnx_graph import (TOLERANCE, TWO_GIB, cached_decoding_note, check_patterns_kept, export_graph,
                                  onnx_weight_patterns, prefill_feed, require_onnx, run_onnxruntime)
from exporters.onnx_qdq import validate_qdq
from exporters.source import load_pruned, model_patterns, prompts
from thanos.quantized_model import quantized_linears

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def write_onnx(model, path: Path, opset: int = 18, external_data_threshold: int = TWO_GIB) -> Optional[dict]:
    """Export `model` (already in its export dtype) to `path`, with external data past the threshold;
    returns what `export_graph` says of its 8-bit linears."""
    ids = torch.ones(1, 8, dtype=torch.long)
    mask = torch.ones(1, 8, dtype=torch.long)
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
               "logits": {0: "batch", 1: "sequence"}}
    return export_graph(_LogitsOnly(model), (ids, mask), ["input_ids", "attention_mask"], ["logits"], dynamic, path, opset,
                 external_data_threshold)


@register(ExportFormat.ONNX)
def export_onnx(model_dir: Path, out: Path, options: ExportOptions, source: Optional[tuple] = None,
                loaded: Optional[tuple] = None) -> dict:
    """`source`: the pruned model still in memory (`load_pruned`); `loaded`: what `load_pruned` returned,
    when a caller has it already."""
    require_onnx()
    if options.dtype not in ONNX_DTYPES:
        raise ExportError(f"ONNX export supports {' and '.join(ONNX_DTYPES)}, not {options.dtype}")
    model, tokenizer, report = loaded or load_pruned(model_dir, options.dtype, options.split_dense_rows,
                                                     options.trust_remote_code, source)
    torch_layers = model_patterns(model)
    path = out / ONNX_FILE
    qdq = write_onnx(model, path, options.opset)
    tokenizer.save_pretrained(out)

    summary = dict(onnx=str(path), **check_patterns_kept(torch_layers, path))
    if qdq:
        summary["quantization"] = qdq
    if options.split_dense_rows:
        summary["split_rows"] = report["split_rows"]
    if options.validate:
        summary.update(validate_onnx(model, tokenizer, path, options.dtype))
    if options.with_cache:
        summary["with_cache"] = _export_with_cache(model, tokenizer, out, options)
    return summary


def _export_with_cache(model, tokenizer, out: Path, options: ExportOptions) -> dict:
    path = out / WITH_CACHE_FILE
    write_onnx_with_cache(model, path, options.opset)
    result = dict(onnx=str(path), layers_with_nm_pattern=sum(1 for l in onnx_weight_patterns(path) if l.pattern))
    note = cached_decoding_note(model)
    if note:
        result["note"] = note
    if options.validate:
        ids, mask = validation_prompts(tokenizer)
        if quantized_linears(model):
            result["quantized_linears"] = validate_qdq(path, model, lambda s: prefill_feed(s, ids.numpy(),
                                                                                           mask.numpy()), options.dtype)
        result["validation"] = validate_onnx_with_cache(model, ids, mask, path, options.dtype)
    return result


def validation_prompts(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Two held-out prompts and their mask, one row left-padded as batched serving produces."""
    ids = prompts(tokenizer)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def validate_onnx(model, tokenizer, path: Path, dtype: str) -> dict:
    """Run real prompts through onnxruntime and PyTorch; raise if the logits differ too much.

    A graph with 8-bit linears is checked linear by linear instead (`exporters.onnx_qdq.validate_qdq`):
    over a real model's depth, an activation that lands on the other side of an 8-bit rounding
    boundary in one runtime and not the other moves by a whole grid step, and such differences
    grow from layer to layer, so the logits of two correct implementations part by more than
    float round-off. Their difference and how often the top token agrees are reported.
    """
    ids, mask = validation_prompts(tokenizer)
    result = dict(prompts=ids.shape[0], runtime="onnxruntime CPUExecutionProvider")
    quantized = bool(quantized_linears(model))
    if quantized:  # before the reference below casts the model to float32
        result["quantized_linears"] = validate_qdq(path, model, lambda _: dict(input_ids=ids.numpy(),
                                                                               attention_mask=mask.numpy()), dtype)
    with torch.no_grad():
        expected = model.float()(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
    model.to(torch.float16 if dtype == "float16" else torch.float32)
    got = run_onnxruntime(path, ids, mask).astype(np.float32)
    valid = mask.bool().numpy()
    diff = float(np.abs(got - expected)[valid].max())
    result.update(tokens=int(valid.sum()), max_abs_diff=diff)
    if not np.isfinite(got[valid]).all():
        raise ExportError(f"ONNX ({dtype}) logits on {ids.shape[0]} prompts are not finite{overflow_hint(dtype)}")
    if quantized:
        result["top_token_agrees"] = float((got.argmax(-1) == expected.argmax(-1))[valid].mean())
        return dict(validation=result)
    tolerance = TOLERANCE[dtype] * float(np.abs(expected[valid]).max())
    if not diff <= tolerance:
        raise ValidationError(f"ONNX ({dtype}) logits on {ids.shape[0]} prompts", diff, tolerance)
    return dict(validation=dict(result, tolerance=tolerance))
