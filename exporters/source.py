"""Reading what an exporter starts from: the pruned model, its report, and its linear weights."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from exporters.patterns import LayerPattern, analyse
from thanos.driver import LayerSelection, prunable_linears
from thanos.models import load_model, weight_view

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_report(model_dir: Path) -> Optional[dict]:
    path = Path(model_dir) / "thanos_report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def linear_weights(model) -> dict[str, torch.Tensor]:
    """{module name: (out, in) weight} for every linear inside the decoder layers."""
    return {name: weight_view(mod) for layer in prunable_linears(model, LayerSelection()).values()
            for name, mod in layer.items()}


def model_patterns(model) -> list[LayerPattern]:
    return [analyse(name, w) for name, w in linear_weights(model).items()]


def load_pruned(model_dir: Path, dtype: Optional[str] = None):
    """(model, tokenizer, report) from a pruned or compact directory, optionally cast."""
    model, tokenizer = load_model(str(model_dir))
    if dtype:
        model.to(DTYPES[dtype])
    return model, tokenizer, read_report(model_dir)


def prompts(tokenizer, count: int = 2, length: int = 24) -> torch.Tensor:
    """Real text to check an export on: windows of the held-out default text, (count, length)."""
    from thanos.calibration import tokenize_split

    held_out = tokenize_split(tokenizer, None).evaluation
    return torch.stack([held_out[i * length : (i + 1) * length] for i in range(count)])
