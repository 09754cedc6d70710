"""Outlier rows (alpha > 0) made hardware-usable: a 2:4 product plus a small dense one (docs/ALGORITHM.md 5).

Thanos with alpha > 0 keeps its outlier rows dense, so the layer as a whole is not 2:4 and
sparse tensor cores cannot take it. `split_dense_rows_` replaces each such linear by a
`RowSplitLinear`: the 2:4 rows become one linear (`sparse_rows`, which the torch and TensorRT
targets run on sparse kernels), the dense rows another (`dense_rows`), and the outputs are put
back in the original order. The arithmetic is the same products, so outputs match the original
layer to round-off. The 2:4 part keeps a row count that the semi-structured kernels accept
(a multiple of ROW_MULTIPLE); the few 2:4 rows left over ride along in the dense part.
"""
from __future__ import annotations

import torch
from torch import nn

from exporters.patterns import nonzeros_per_group
from thanos.models import LayerSelection, prunable_linears
from thanos.linears import weight_view

ROW_MULTIPLE = 32  # rows of a semi-structured weight: 16 for cuSPARSELt, 32 for CUTLASS (fp16/bf16)


def two_four_rows(weight: torch.Tensor) -> torch.Tensor:
    """(r,) True for the rows of an (out, in) weight in which every group of 4 holds at most 2 values."""
    counts = nonzeros_per_group(weight, 4)
    return torch.zeros(weight.shape[0], dtype=torch.bool) if counts is None else (counts <= 2).all(-1)


class RowSplitLinear(nn.Module):
    """y = x W^T + b, computed as a 2:4 linear over most rows and a dense one over the rest."""

    def __init__(self, weight: torch.Tensor, bias, sparse: torch.Tensor):
        super().__init__()
        sparse_idx, dense_idx = sparse.nonzero().flatten(), (~sparse).nonzero().flatten()
        self.sparse_rows = _linear(weight[sparse_idx])
        self.dense_rows = _linear(weight[dense_idx])
        self.register_buffer("order", torch.argsort(torch.cat([sparse_idx, dense_idx])))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.sparse_rows(x), self.dense_rows(x)], dim=-1).index_select(-1, self.order)
        return y if self.bias is None else y + self.bias


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return layer


def kernel_rows(two_four: torch.Tensor) -> torch.Tensor:
    """The rows the 2:4 part takes: the 2:4 rows (`two_four_rows`), rounded down to a multiple of ROW_MULTIPLE."""
    sparse = two_four.clone()
    extra = int(sparse.sum()) % ROW_MULTIPLE
    if extra:
        sparse[sparse.nonzero().flatten()[-extra:]] = False
    return sparse


@torch.no_grad()
def split_dense_rows_(model) -> dict[str, dict]:
    """Split every linear that is 2:4 except in some rows; returns {name: {sparse_rows, dense_rows, outlier_rows}}.

    A layer with fewer than ROW_MULTIPLE 2:4 rows is left whole and reported with sparse_rows 0:
    it runs dense.
    """
    done = {}
    for layer in prunable_linears(model, LayerSelection()).values():
        for name, mod in layer.items():
            weight = weight_view(mod)
            two_four = two_four_rows(weight)
            outliers = int((~two_four).sum())
            if outliers == 0 or not two_four.any():
                continue  # already 2:4 everywhere, or not pruned to 2:4 at all
            sparse = kernel_rows(two_four)  # the 2:4 rows left over ride in the dense part
            if not sparse.any():  # too few 2:4 rows for the kernels: the layer stays dense
                done[name] = dict(sparse_rows=0, dense_rows=weight.shape[0], outlier_rows=outliers)
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child,
                    RowSplitLinear(weight, getattr(mod, "bias", None), sparse))
            done[name] = dict(sparse_rows=int(sparse.sum()), dense_rows=int((~sparse).sum()),
                              outlier_rows=outliers)
    return done
