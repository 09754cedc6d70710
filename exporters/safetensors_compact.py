"""`--target safetensors`: the compact n:m checkpoint (any n:m, 8-bit values for a quantized model),
checked bit for bit on reload."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from exporters.base import ExportError, ExportFormat, ExportOptions, register
from exporters.compact import save_compact
from thanos.compact import load_compact
from exporters.source import load_pruned
from thanos.config import Pattern
from thanos.models import LayerSelection, prunable_linears
from thanos.linears import stores_transposed, weight_view
from exporters.patterns import analyse
from thanos.quantized_model import quantization_of, quantized_linears


@register(ExportFormat.SAFETENSORS)
def export_compact(model_dir: Path, out: Path, options: ExportOptions, source: Optional[tuple] = None) -> dict:
    model, tokenizer, report = load_pruned(model_dir, options.dtype, trust_remote_code=options.trust_remote_code,
                                           source=source)
    declared = Pattern.parse((report or {}).get("config", {}).get("pattern", "unstructured"))
    patterns, transposed = {}, set()
    for layer in prunable_linears(model, LayerSelection()).values():
        for name, mod in layer.items():
            if stores_transposed(mod):
                transposed.add(name)
            if declared.is_nm:
                patterns[name] = (declared.n, declared.m)
            else:
                found = analyse(name, weight_view(mod)).pattern
                if found:
                    n, m = map(int, found.split(":"))
                    patterns[name] = (n, m)
    summary = save_compact(model, tokenizer, out, patterns, transposed, (Path(model_dir) / "thanos_report.json",))
    if options.validate:
        reloaded_model = load_compact(out)
        for name, mod in quantized_linears(model).items():
            mine, theirs = quantization_of(mod), quantization_of(reloaded_model.get_submodule(name))
            if theirs is None or theirs.inputs != mine.inputs or not (
                    torch.equal(mine.weight_scale, theirs.weight_scale)
                    and (mine.per_token or torch.equal(mine.input_scale, theirs.input_scale))):
                raise ExportError(f"{name}: the 8-bit scales did not round-trip through the compact checkpoint")
        reloaded = reloaded_model.state_dict()
        for key, tensor in model.state_dict().items():
            if not torch.equal(reloaded[key], tensor):
                diff = float((reloaded[key].float() - tensor.float()).abs().max())
                raise ExportError(f"{key} did not round-trip through the compact checkpoint (largest difference {diff:.3g})")
        summary["round_trip"] = "bit-exact"
    return summary
