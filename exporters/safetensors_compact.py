"""`--target safetensors`: the compact n:m checkpoint (any n:m), checked bit for bit on reload."""
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
from thanos.models import stores_transposed, weight_view
from exporters.patterns import analyse


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
        reloaded = load_compact(out).state_dict()
        for key, tensor in model.state_dict().items():
            if not torch.equal(reloaded[key], tensor):
                diff = float((reloaded[key].float() - tensor.float()).abs().max())
                raise ExportError(f"{key} did not round-trip through the compact checkpoint (largest difference {diff:.3g})")
        summary["round_trip"] = "bit-exact"
    return summary
