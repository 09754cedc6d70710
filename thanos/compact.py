"""Reading compact n:m checkpoints (`thanos-export export --target safetensors`) back as dense models.

The format: for an n:m layer of shape (out, in) the file holds `NAME.values` (out, in*(m-n)/m) in
the layer's dtype and `NAME.keep` (out, ceil(in/8)) uint8, the row-wise packed bits of the mask of
kept positions (8-bit values with `NAME.weight_scale` and, with static input scales,
`NAME.input_scale` for a linear quantized by `thanos.quantize`); every other tensor is stored
dense under its own name. Reading lives here, below the exporters, because every command that
loads a model accepts such a directory; writing is `exporters.compact`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from thanos.errors import InputError
from thanos.experts import unfuse_experts_
from thanos.model_config import auto_class
from thanos.quantize import FORMATS, INPUT_SCALES, dequantize
from thanos.quantized_model import LinearQuantization, set_quantization, simulate_activations_

COMPACT_FILE = "model.compact.safetensors"
FORMAT = "thanos-compact/1"


def decompress(values: torch.Tensor, packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    keep = torch.from_numpy(np.unpackbits(packed.numpy(), axis=1, count=cols).astype(bool))  # (r, c)
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[keep] = values.flatten()
    return dense


def is_compact_dir(path: Path) -> bool:
    return (Path(path) / COMPACT_FILE).is_file()


def compact_is_8bit(path: Path) -> bool:
    """Whether a compact checkpoint stores 8-bit linears (read from its metadata alone)."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(path) / COMPACT_FILE), "pt") as f:
            layers = json.loads((f.metadata() or {}).get("layers", "{}"))
    except Exception:  # noqa: BLE001 a damaged file is reported by the full read that follows
        return False
    return any(info.get("quantized") for info in layers.values())


def read_compact_state(path: Path, scales: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """The dense state dict; `scales`, if given, receives {linear: LinearQuantization} of 8-bit linears."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / COMPACT_FILE), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise InputError(f"{path} is not a {FORMAT} checkpoint (format {meta.get('format')!r})")
        layers = json.loads(meta["layers"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    for name, info in layers.items():
        values, keep = state.pop(f"{name}.values"), state.pop(f"{name}.keep")
        if info.get("quantized"):
            fmt, scale, inputs = info["quantized"], state.pop(f"{name}.weight_scale"), info.get("inputs", "static")
            input_scale = state.pop(f"{name}.input_scale") if inputs == "static" else None
            if fmt not in FORMATS or inputs not in INPUT_SCALES:
                raise InputError(f"{path}: {name} is stored as {fmt!r} with {inputs!r} inputs, which this version "
                                 "cannot read")
            grid = decompress(values.float(), keep, tuple(info["shape"]))  # 8-bit values are exact in fp32
            dense = dequantize(grid, scale, getattr(torch, info["dtype"]))
            if scales is not None:
                scales[name] = LinearQuantization(fmt, scale, input_scale, inputs)
        else:
            dense = decompress(values, keep, tuple(info["shape"]))
        state[f"{name}.weight"] = dense.T.contiguous() if info["transposed"] else dense
    return state


def load_compact(path: "str | Path", dtype: Optional[torch.dtype] = None):
    """The transformers model stored in a compact directory, with dense weights."""
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    scales = {}
    state = read_compact_state(path, scales)
    model = auto_class(config).from_config(config, dtype=dtype or next(iter(state.values())).dtype)
    unfuse_experts_(model)  # the compact file names each expert's linears, as the pruned model does
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    untied = set(missing) - _tied_names(model)
    if untied or unexpected:
        raise InputError(f"{path}: checkpoint does not match its config (missing {sorted(untied)[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for name, quant in scales.items():
        set_quantization(model.get_submodule(name), quant)
    simulate_activations_(model)  # an 8-bit model computes as the 8-bit runtime will
    return model.eval()


def _tied_names(model) -> set[str]:
    """Parameter names that share their tensor with another name (e.g. lm_head and embeddings)."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return {name for names in by_tensor.values() if len(names) > 1 for name in names}
