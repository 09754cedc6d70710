"""Which n:m pattern each linear weight satisfies, and whether NVIDIA 2:4 hardware can use it.

Weights are always analysed as (out_features, in_features): groups of m run along the input,
i.e. the reduction (K) dimension, the layout sparse tensor cores need.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from thanos.errors import ThanosExportError

# Shape constraints of torch's semi-structured kernels, per backend and dtype: (row multiple,
# column multiple) of the sparse weight (torch.sparse.semi_structured). cuSPARSELt is the backend
# on Hopper; CUTLASS is the other.
SEMI_STRUCTURED_SHAPES = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64)},
}
HARDWARE_DTYPES = (torch.float16, torch.bfloat16)
# 8-bit weights (an 8-bit export's QDQ initializers) run on sparse tensor cores as they are
EIGHT_BIT_DTYPES = {torch.int8: "INT8: compute capability 8.0+", torch.float8_e4m3fn: "FP8: compute capability 8.9+"}


class NotHardwareSparseError(ThanosExportError, ValueError):
    """A model whose pruned layers are not 2:4 along K; the message says why and what to do."""


def nonzero_bits(weight: torch.Tensor) -> torch.Tensor:
    """True where the stored bits are not all zero (so -0.0 counts as a value to keep)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    return weight.contiguous().view(ints) != 0


def nonzeros_per_group(weight: torch.Tensor, m: int) -> Optional[torch.Tensor]:
    """(rows, cols / m) counts of stored values in each group of m along K; None if m does not divide cols."""
    rows, cols = weight.shape
    return None if cols % m else nonzero_bits(weight).reshape(rows, cols // m, m).sum(-1)


def max_nonzeros_per_group(weight: torch.Tensor, m: int) -> Optional[int]:
    counts = nonzeros_per_group(weight, m)
    return None if counts is None else int(counts.max()) if counts.numel() else 0


@dataclasses.dataclass
class LayerPattern:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    dtype: str
    sparsity: float
    pattern: Optional[str]  # strongest n:m along K it satisfies ("2:4", "4:8"), or None
    hardware_2to4: bool  # usable by NVIDIA 2:4 sparse tensor cores (cast to fp16/bf16 if needed)
    reason: str  # why not, or what it needs

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["shape"] = list(self.shape)
        return data


def analyse(name: str, weight: torch.Tensor, backend: str = "cusparselt") -> LayerPattern:
    """Sparsity, n:m pattern along K, and 2:4 hardware eligibility of one (out, in) weight."""
    rows, cols = weight.shape
    sparsity = 1.0 - float(nonzero_bits(weight).sum()) / max(1, weight.numel())
    pattern = None
    for m in (4, 8, 16):
        worst = max_nonzeros_per_group(weight, m)
        if worst is not None and worst <= m // 2:
            pattern = f"{m - worst}:{m}"
            break
    four = max_nonzeros_per_group(weight, 4)
    row_mult, col_mult = SEMI_STRUCTURED_SHAPES[backend][torch.float16]
    if four is None or four > 2:
        ok, reason = False, ("not 2:4 along the input dimension" if pattern is None
                             else f"{pattern} is not 2:4: some groups of 4 hold {four} non-zeros")
    elif rows % row_mult or cols % col_mult:
        ok, reason = False, f"shape {rows}x{cols} is not a multiple of {row_mult}x{col_mult} ({backend})"
    elif weight.dtype in EIGHT_BIT_DTYPES:
        ok, reason = True, f"2:4 in 8 bits ({EIGHT_BIT_DTYPES[weight.dtype]})"
    elif weight.dtype not in HARDWARE_DTYPES:
        ok, reason = True, f"2:4; runs on sparse tensor cores once cast to float16/bfloat16 (stored {weight.dtype})"
    else:
        ok, reason = True, "2:4"
    return LayerPattern(name, (rows, cols), str(weight.dtype).replace("torch.", ""), sparsity, pattern, ok, reason)


def require_hardware_2to4(layers: Optional[list[LayerPattern]], report: Optional[dict], target: str,
                          split_dense_rows: bool = False) -> None:
    """Refuse a model that sparse tensor cores cannot run as 2:4, saying why and what to do.

    With `split_dense_rows` the outlier rows of alpha > 0 live in separate dense linears
    (`*.dense_rows`, exporters.row_split), which are meant to stay dense.
    """
    config = (report or {}).get("config", {})
    why = []
    if config.get("pattern") and config["pattern"] != "2:4":
        why.append(f"it was pruned with pattern {config['pattern']}, and sparse tensor cores need 2:4 along K")
    if config.get("alpha", 0) > 0 and not split_dense_rows:
        why.append(f"alpha={config['alpha']} kept outlier rows dense, which breaks 2:4 in those rows "
                   "(--split-dense-rows runs those rows as a separate dense product)")
    left_dense = {name for name, rows in (report or {}).get("split_rows", {}).items() if rows["sparse_rows"] == 0}
    pruned = [l for l in layers or [] if l.sparsity >= 0.25 and l.name not in left_dense
              and not (split_dense_rows and l.name.endswith(".dense_rows"))]
    broken = [l.name for l in pruned if not l.hardware_2to4]
    if layers is not None and not pruned:
        why.append("none of its linear layers is pruned")
    elif broken:
        why.append(f"{len(broken)} pruned layers are not 2:4 ({', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''})")
    if why:
        raise NotHardwareSparseError(
            f"cannot build a sparse {target} model: {'; '.join(why)}. Re-prune with --pattern 2:4 --alpha 0, "
            "pass --allow-dense to build it dense (no sparse speed-up), or use --target safetensors, "
            "whose compact format stores any n:m.")
