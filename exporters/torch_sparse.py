"""`--target torch`: PyTorch semi-structured 2:4 weights (`to_sparse_semi_structured`).

Needs a CUDA GPU of compute capability 8.0+ and fp16/bf16 weights. The backend is chosen
explicitly: cuSPARSELt on Hopper (PyTorch's CUTLASS path is not enabled there), CUTLASS where
asked for. Linears that do not qualify stay dense and are listed. An 8-bit model's linears
become 8-bit cuSPARSELt linears instead (`exporters.torch_8bit`).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import torch

from exporters.base import (BackendMissingError, ExportError, ExportFormat, ExportOptions, ValidationError,
                            overflow_hint, register)
from exporters.patterns import analyse, require_hardware_2to4
from exporters.source import holds_8bit, load_pruned, model_patterns, prompts
from exporters.torch_8bit import check_linears, reference_run, require_8bit_sparse, to_8bit_semi_structured_
from thanos.experts import fused_for_saving, serve_experts_
from thanos.models import LayerSelection, prunable_linears
from thanos.linears import stores_transposed, weight_view
from thanos.quantized_model import model_format, quantized_linears, save_quantization

log = logging.getLogger(__name__)
TOLERANCE = 2e-2  # of the logits' largest magnitude: sparse kernels accumulate in another order


def require_sparse_gpu(device: "str | torch.device" = "cuda") -> torch.device:
    if not torch.cuda.is_available():
        raise BackendMissingError(
            "torch semi-structured 2:4 needs a CUDA GPU of compute capability 8.0 or newer (Ampere, Ada, Hopper); "
            f"torch {torch.__version__} sees none here. Use --target onnx or safetensors on this machine")
    device = torch.device(device)
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise BackendMissingError(f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; "
                                  "2:4 sparse tensor cores need 8.0 or newer")
    return device


def pick_backend(requested: str, device: torch.device) -> str:
    if requested in ("cusparselt", "cutlass"):
        return requested
    major, _ = torch.cuda.get_device_capability(device)
    return "cusparselt" if major >= 9 else "cutlass"


@dataclasses.dataclass
class SemiStructuredReport:
    backend: str
    converted: list[str]
    dense: dict[str, str]  # name -> why it stayed dense


@torch.no_grad()
def to_semi_structured_(model, backend: str = "auto") -> SemiStructuredReport:
    """Replace every qualifying linear weight of `model` (on a CUDA GPU, fp16/bf16) in place."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    device = require_sparse_gpu(next(model.parameters()).device)
    chosen = pick_backend(backend, device)
    SparseSemiStructuredTensor._FORCE_CUTLASS = chosen == "cutlass"
    converted, dense = [], {}
    for layer in prunable_linears(model, LayerSelection()).values():
        for name, mod in layer.items():
            info = analyse(name, weight_view(mod), chosen)
            if stores_transposed(mod):
                dense[name] = "GPT-2 Conv1D (x @ W) is not an nn.Linear; semi-structured needs F.linear"
            elif not info.hardware_2to4 or mod.weight.dtype not in (torch.float16, torch.bfloat16):
                dense[name] = info.reason if not info.hardware_2to4 else f"dtype {mod.weight.dtype}"
            else:
                mod.weight = torch.nn.Parameter(to_sparse_semi_structured(mod.weight.data), requires_grad=False)
                converted.append(name)
    serve_experts_(model)  # an expert no token is routed to is not called with zero rows
    return SemiStructuredReport(chosen, converted, dense)


def load_semi_structured(model_dir: "str | Path", dtype: str = "float16", backend: str = "auto",
                         device: str = "cuda", split_dense_rows: bool = False):
    """A ready-to-run sparse model from a pruned directory: (model, report).

    `split_dense_rows`: an alpha > 0 model's outlier rows run as separate dense linears. An 8-bit
    model (its scales beside the weights) gets 8-bit cuSPARSELt linears (`backend` does not apply).
    """
    dev = require_sparse_gpu(device)
    model, _, _ = load_pruned(Path(model_dir), dtype, split_dense_rows)
    model.to(dev)
    if quantized_linears(model):
        return model, to_8bit_semi_structured_(model)
    return model, to_semi_structured_(model, backend)


@register(ExportFormat.TORCH)
def export_torch(model_dir: Path, out: Path, options: ExportOptions, source: Optional[tuple] = None) -> dict:
    # `source` is not used: the check needs a dense copy beside the converted model, read from the directory.
    device = require_sparse_gpu()
    if holds_8bit(model_dir):
        return _export_8bit(model_dir, out, options, device)
    model, tokenizer, report = load_pruned(model_dir, options.dtype, options.split_dense_rows, options.trust_remote_code)
    if not options.allow_dense:
        require_hardware_2to4(model_patterns(model), report, "torch semi-structured", options.split_dense_rows)
    model.to("cuda")
    ids = prompts(tokenizer).cuda()
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits.float()
    if not torch.isfinite(expected).all():  # else every difference below is NaN, which no bound refuses
        raise ExportError(f"the pruned model's logits in {options.dtype} on the GPU are not finite"
                          f"{overflow_hint(options.dtype)}")
    result = to_semi_structured_(model, options.backend)
    with torch.no_grad():
        got = model(ids, use_cache=False).logits.float()
    diff, scale = float((got - expected).abs().max()), float(expected.abs().max())
    if not diff <= TOLERANCE * scale:
        raise ValidationError("torch semi-structured logits", diff, TOLERANCE * scale)
    # The weights on disk stay the pruned dense ones (in the export dtype); the loader converts them.
    model_dense, _, _ = load_pruned(model_dir, options.dtype, trust_remote_code=options.trust_remote_code)
    with fused_for_saving(model_dense):  # a mixture of experts in its family's layout
        model_dense.save_pretrained(out)
    tokenizer.save_pretrained(out)
    split = ", split_dense_rows=True" if options.split_dense_rows else ""
    return dict(backend=result.backend, converted=result.converted, dense=result.dense,
                split_rows=(report or {}).get("split_rows"),
                validation=dict(max_abs_diff=diff, tolerance=TOLERANCE * scale),
                load_with=f"exporters.torch_sparse.load_semi_structured(OUT{split})")


def _export_8bit(model_dir: Path, out: Path, options: ExportOptions, device: torch.device) -> dict:
    """The 8-bit model with 8-bit cuSPARSELt linears, each checked on the fake-quantized model's own
    inputs to it (a bound from the scales and the dtypes, `check_linears`); the logits of the
    whole model are compared too, but only reported: an input within round-off of a rounding
    boundary lands one grid step apart, and over the layers such differences grow."""
    model, tokenizer, report = load_pruned(model_dir, options.dtype, options.split_dense_rows, options.trust_remote_code)
    fmt = model_format(model)
    kernel = require_8bit_sparse(fmt, device)  # before the reference run: refused before any work
    if not options.allow_dense:
        require_hardware_2to4(model_patterns(model), report, "torch 8-bit 2:4", False)
    model.to(device)
    ids = prompts(tokenizer).to(device)
    expected, captured = reference_run(model, ids)
    result = to_8bit_semi_structured_(model, kernel)
    checked = check_linears(model, {name: captured[name] for name in result.converted})
    with torch.no_grad():
        got = model(ids, use_cache=False).logits.float()
    model_dense, _, _ = load_pruned(model_dir, options.dtype, trust_remote_code=options.trust_remote_code)
    with fused_for_saving(model_dense):  # a mixture of experts in its family's layout
        model_dense.save_pretrained(out)
    save_quantization(model_dense, out)
    tokenizer.save_pretrained(out)
    return dict(backend=f"cusparselt {fmt}", converted=result.converted, dense=result.dense,
                validation=dict(per_linear=checked, logits_max_abs_diff=float((got - expected).abs().max()),
                                logits_scale=float(expected.abs().max())),
                load_with="exporters.torch_sparse.load_semi_structured(OUT)")
