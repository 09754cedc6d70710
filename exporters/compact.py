"""Compact n:m checkpoints: only the kept values plus a one-bit-per-weight keep mask.

For an n:m layer of shape (out, in) the file holds `NAME.values` (out, in*(m-n)/m) in the
layer's dtype and `NAME.keep` (out, ceil(in/8)) uint8, the row-wise packed bits of the mask of
kept positions; every other tensor is stored dense under its own name. For fp16 2:4 that is
0.5 + 0.0625 = 0.5625 of the dense bytes. A linear quantized to 8 bits (`thanos.quantize`)
stores its 8-bit values instead (int8 or float8_e4m3fn), with `NAME.weight_scale` (out,) and
`NAME.input_scale` () beside them (none with per-token inputs: the layer's entry says
`"inputs": "per-token"`): 0.25 + 0.0625 = 0.3125 of its fp16 dense bytes for 2:4, plus the scales
(an 8-bit linear without an n:m pattern is stored as 0:1, every position kept).
Reading (`thanos.compact`) scatters the values back (and dequantizes them) and
gives the exact same bits (`torch.equal`, and -0.0 stays -0.0).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from exporters.patterns import nonzero_bits
from thanos.compact import COMPACT_FILE, FORMAT
from thanos.errors import InputError
from thanos.quantize import FORMATS, grid_of
from thanos.quantized_model import quantization_of


def keep_mask(weight: torch.Tensor, n: int, m: int) -> Optional[torch.Tensor]:
    """Exactly m-n kept positions per group of m (the non-zeros, topped up with zeros in order),
    or None if some group holds more than m-n non-zeros."""
    rows, cols = weight.shape
    nz = nonzero_bits(weight).reshape(rows, cols // m, m)  # (r, c/m, m)
    if int(nz.sum(-1).max()) > m - n:
        return None
    position = torch.arange(m, 0, -1)  # earlier positions win ties among zeros
    score = nz.to(torch.int64) * (m + 1) + position
    keep_idx = torch.topk(score, m - n, dim=-1).indices
    return torch.zeros_like(nz).scatter_(-1, keep_idx, True).reshape(rows, cols)


def compress(weight: torch.Tensor, n: int, m: int, stored: Optional[torch.Tensor] = None
             ) -> Optional[dict[str, torch.Tensor]]:
    """The kept values of `weight` and the packed keep mask; `stored` (same shape) supplies the values
    to keep instead, e.g. the 8-bit values behind a dequantized weight."""
    keep = keep_mask(weight, n, m)
    if keep is None:
        return None
    rows, cols = weight.shape
    source = weight if stored is None else stored
    # 8-bit floats are gathered as their bytes: torch 2.6 cannot index them on the CPU
    raw = source.view(torch.uint8) if source.is_floating_point() and source.element_size() == 1 else source
    values = raw[keep].reshape(rows, cols * (m - n) // m).view(source.dtype)  # row-major: each row's kept values
    packed = torch.from_numpy(np.packbits(keep.numpy(), axis=1))  # (r, ceil(c/8)) uint8
    return {"values": values.contiguous(), "keep": packed}


def save_compact(model, tokenizer, out: Path, patterns: dict[str, tuple[int, int]],
                 transposed: set[str], extra_files: tuple[Path, ...] = ()) -> dict:
    """Write `model` compactly to `out`. `patterns` maps weight names to the (n, m) to store them with."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    modules = dict(model.named_modules())
    state = _unique_state(model)
    tensors, layers = {}, {}
    dense_bytes = compact_bytes = 0
    for key, tensor in state.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        if name in patterns or (name in modules and quantization_of(modules[name]) is not None):
            n, m = patterns.get(name, (0, 1))  # an 8-bit linear without n:m groups keeps every position
            weight = tensor.T if name in transposed else tensor  # (out, in): groups along K
            quant = quantization_of(modules[name])
            parts = compress(weight.cpu(), n, m, None if quant is None else _grid(name, weight.cpu(), quant))
            if parts is not None:
                tensors[f"{name}.values"], tensors[f"{name}.keep"] = parts["values"], parts["keep"]
                layers[name] = dict(shape=list(weight.shape), n=n, m=m, transposed=name in transposed)
                if quant is not None:
                    tensors[f"{name}.weight_scale"] = quant.weight_scale.float().contiguous()
                    if quant.per_token:
                        layers[name]["inputs"] = quant.inputs
                    else:
                        tensors[f"{name}.input_scale"] = quant.input_scale.float().reshape(())
                    layers[name].update(quantized=quant.format, dtype=str(weight.dtype).replace("torch.", ""))
                    parts = dict(parts, scale=tensors[f"{name}.weight_scale"])
                dense_bytes += weight.numel() * weight.element_size()
                compact_bytes += sum(p.numel() * p.element_size() for p in parts.values())
                continue
        tensors[key] = tensor.detach().cpu().contiguous()
    save_file(tensors, str(out / COMPACT_FILE), metadata={"format": FORMAT, "layers": json.dumps(layers)})
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    for f in extra_files:
        if f.is_file():
            shutil.copy2(f, out / f.name)
    return dict(compact_layers=len(layers), dense_bytes_of_compact_layers=dense_bytes,
                compact_bytes=compact_bytes, ratio=compact_bytes / dense_bytes if dense_bytes else None,
                file_bytes=(out / COMPACT_FILE).stat().st_size)


def _grid(name: str, weight: torch.Tensor, quant) -> torch.Tensor:
    grid = grid_of(weight, quant.weight_scale, FORMATS[quant.format])
    if grid is None:
        raise InputError(f"{name}: the weights are not exactly their {quant.format} values times their scales "
                         "(cast to another dtype?); export without --dtype")
    return grid


def _unique_state(model) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (the LM head tied to the embeddings)."""
    seen, state = {}, {}
    for key, tensor in model.state_dict().items():
        ptr = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and ptr in seen:
            continue
        seen[ptr] = key
        state[key] = tensor
    return state
