"""Time one layer's pruning for each method and print seconds and reconstruction error.

    thanos-export bench-solvers                          # every shape, method, pattern
    thanos-export bench-solvers --shapes 4096x4096 --patterns 2:4 --block-sizes 128
    thanos-export bench-solvers --shapes 4096x4096,4096x11008 --patterns 2:4 --no-per-block \
        --methods sparsegpt:reference,sparsegpt,thanos:fast,thanos:default,thanos:best

Inputs are realistic in the way that matters to the solvers: the calibration activations have a
few high-variance channels, as real LLM activations do. Methods: `thanos`, `sparsegpt`, `wanda`,
`magnitude` once per block size (Thanos with its block solve alone); `thanos:PRESET` a preset's
per-linear steps (solve, mask search, refit: what it costs per linear, the decoder-layer steps
aside); `thanos:PRESET+fp8` (or `+int8`) the same, then the 8-bit step (its own seconds in the
JSON as `quantize_seconds`; INT8's smoothing aside, a decoder-layer step); `sparsegpt:reference`
SparseGPT as its authors' code computes it (`reference_sparsegpt`), the yardstick for time. The
row `thanos (per-block)` is the paper's strategy of re-inverting the trailing Hessian at every
block (`torch.linalg.inv`, as the paper's code calls it), kept as the reference the one-Cholesky
route is measured against.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from runtime_bench import protocol
from thanos import prune_weight
from thanos.config import PRESETS, Pattern, PruneConfig
from thanos.devices import resolve_device
from thanos.errors import InputError
from thanos.hessian import reconstruction_error
from thanos.outputs import atomic_write_text
from thanos.quantize import FORMATS
from thanos.solvers.thanos import thanos_prune

SHAPES = ["576x576", "1536x576", "2048x2048", "4096x4096", "4096x11008"]
METHODS = ["thanos", "sparsegpt", "wanda", "magnitude", "sparsegpt:reference", "thanos:default"]
REFERENCE_BLOCK = 128  # the block size SparseGPT's code prunes with
# The reference costs O(c^4 / B): past 4096 columns it takes many minutes on a CPU, not on a GPU.
PER_BLOCK_MAX_COLUMNS = {"cpu": 4096, "cuda": 16384}


def reference_sparsegpt(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, sparsity: float,
                        block: int = REFERENCE_BLOCK, damp: float = 0.01) -> torch.Tensor:
    """SparseGPT by the route its authors' code takes, for timing: the pruned copy of `W`.

    Dead inputs get a unit diagonal, the damping is added, then a Cholesky factorisation, its
    inverse and a second (upper) factorisation give the rows the column loop spreads each error
    with; blocks of `block` columns update the rest lazily. Unstructured masks are chosen per
    block by the saliency's quantile, n:m every m columns. The project's `sparsegpt_prune` reaches
    the same factor with one Cholesky and a triangular inverse instead.
    """
    W, H = W.float().clone(), H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diag(H).mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    cols = W.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = torch.diag(U1)
        errors = torch.zeros_like(W1)
        if pattern.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            saliency = W1**2 / d**2
            cut = torch.sort(saliency.flatten()).values[int(saliency.numel() * sparsity)]
            mask1 = saliency <= cut
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                saliency = W1[:, i:i + pattern.m] ** 2 / d[i:i + pattern.m] ** 2
                mask1[:, i:i + pattern.m].scatter_(1, torch.topk(saliency, pattern.n, 1, largest=False).indices, True)
            w = W1[:, i]
            err = torch.where(mask1[:, i], w, torch.zeros_like(w)) / d[i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            errors[:, i] = err
        W[:, i1:i2] = W1.masked_fill(mask1, 0.0)
        W[:, i2:] -= errors @ U[i1:i2, i2:]
    return W


def layer_problem(rows: int, cols: int, device: str, seed: int = 0):
    """A weight with LLM-like scale and a Hessian from inputs with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) / cols**0.5
    tokens = min(2 * cols, 8192)
    X = torch.randn(tokens, cols, generator=g)
    X[:, torch.randperm(cols, generator=g)[: max(4, cols // 256)]] *= 20.0
    X = X.to(device)
    H = X.T @ X / tokens
    return W.to(device), H


def _fast(method: str):
    """The block solve alone: Thanos' `fast` preset; the other methods have no presets."""
    return "fast" if method == "thanos" else None


def parse_shape(text: str) -> tuple[int, int]:
    """(rows, cols) from "ROWSxCOLS"."""
    try:
        rows, cols = (int(n) for n in text.lower().split("x"))
    except ValueError:
        raise InputError(f"shape {text!r} is not ROWSxCOLS (for example 4096x11008)") from None
    if rows < 1 or cols < 1:
        raise InputError(f"shape {text!r} has no rows or no columns")
    return rows, cols


def check_methods(methods) -> None:
    """Refuse a method name before any timing, naming the choices."""
    known = ({"thanos", "sparsegpt", "wanda", "magnitude", "sparsegpt:reference"} | {f"thanos:{p}" for p in PRESETS}
             | {f"thanos:{p}+{fmt}" for p in PRESETS for fmt in FORMATS})
    bad = [m for m in methods if m not in known]
    if bad:
        raise InputError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(sorted(known))}")


def _timed_once(method: str, W, H, pattern: str, sparsity, block,
                device) -> tuple[float, float, Optional[int], Optional[float]]:
    """(seconds, error, block size, the 8-bit step's seconds) of one run of `method` on (W, H)."""
    if method == "sparsegpt:reference":
        pruned, seconds = protocol.timed(lambda: reference_sparsegpt(W, H, Pattern.parse(pattern), sparsity or 0.5),
                                         device)
        return seconds, reconstruction_error(W, pruned, H), REFERENCE_BLOCK, None
    name, _, preset = method.partition(":")
    preset, _, fmt = preset.partition("+")
    if preset:
        config = PruneConfig(name, Pattern.parse(pattern), sparsity, preset=preset, quantize=fmt or None)
        res = prune_weight(W, H, config)
    else:
        res = prune_weight(W, H, name, pattern, sparsity, block_size=block, preset=_fast(name))
    quantize_seconds = res.quantization.seconds if res.quantization else None
    return res.seconds, res.error, res.config.resolved_block_size if (block or preset) else None, quantize_seconds


def _warm_up(device, methods, patterns):
    """One small solve per method and pattern first, so that no timing includes the kernels' first load."""
    W, H = layer_problem(64, 64, device)
    for pattern in patterns:
        sparsity = 0.5 if pattern == "unstructured" else None
        for method in methods:
            if not (pattern == "columns" and method == "sparsegpt:reference"):
                _timed_once(method, W, H, pattern, sparsity, None, device)
        if pattern != "unstructured":
            thanos_prune(W.float().clone(), H, Pattern.parse(pattern), 0.5, 32, trailing_inverse="per-block")


def run(shapes, methods, patterns, block_sizes, device, per_block=True, echo=print, per_block_max_columns=None,
        repeat=1, sink: Optional[list] = None, on_record=None):
    """Time every (shape, pattern, method, block size); each timing is the fastest of `repeat` runs.

    Records go into `sink` (and are returned); `on_record(records)` is called after each one.
    """
    records = [] if sink is None else sink

    def add(rec: dict) -> None:
        records.append(rec)
        if on_record:
            on_record(records)

    check_methods(methods)
    per_block_max_columns = per_block_max_columns or PER_BLOCK_MAX_COLUMNS[torch.device(device).type]
    _warm_up(device, methods, patterns)
    header = "| shape | method | pattern | block | seconds | rel. error |"
    echo(header)
    echo("|" + "---|" * 6)
    for shape in shapes:
        rows, cols = parse_shape(shape)
        W, H = layer_problem(rows, cols, device)
        for pattern in patterns:
            sparsity = 0.5 if pattern == "unstructured" else None
            for method in methods:
                if pattern == "columns" and method == "sparsegpt:reference":
                    continue  # SparseGPT has no whole-column pattern
                blocked = method in ("thanos", "sparsegpt") and pattern != "columns"
                for block in block_sizes if blocked else [None]:
                    runs = [_timed_once(method, W, H, pattern, sparsity, block, device) for _ in range(repeat)]
                    seconds, error, used, quantize_s = min(runs, key=lambda run: run[0])
                    rec = dict(shape=shape, method=method, pattern=pattern, block_size=used, seconds=seconds,
                               error=error, repeat=repeat)
                    if quantize_s is not None:
                        rec["quantize_seconds"] = quantize_s
                    add(rec)
                    echo(f"| {shape} | {method} | {pattern} | {used or '-'} | {seconds:.2f} | {error:.5f} |")
            if per_block and pattern != "unstructured" and cols <= per_block_max_columns:
                for block in block_sizes:
                    out, seconds = min((protocol.timed(lambda: thanos_prune(W.float().clone(), H, Pattern.parse(pattern), 0.5,
                                                                            block, trailing_inverse="per-block"), device)
                                        for _ in range(repeat)), key=lambda pair: pair[1])
                    err = reconstruction_error(W, out.weight, H)
                    add(dict(shape=shape, method="thanos (per-block)", pattern=pattern, block_size=block,
                             seconds=seconds, error=err, repeat=repeat))
                    echo(f"| {shape} | thanos (per-block) | {pattern} | {block} | {seconds:.2f} | {err:.5f} |")
    return records


def bench(shapes: list[str], methods: list[str], patterns: list[str], block_sizes: list[int], device: str = "auto",
          per_block: bool = True, per_block_max_columns: Optional[int] = None, repeat: int = 1,
          json_out: Optional[str] = None, echo=print) -> list[dict]:
    """`run`, with the machine stated first and, given `json_out`, the records written after every
    one and on a stop (SIGTERM from a time limit, Ctrl-C): a stopped run keeps what it measured."""
    if repeat < 1:
        raise InputError(f"--repeat must be at least 1, not {repeat}")
    check_methods(methods)
    for shape in shapes:
        parse_shape(shape)
    device = str(resolve_device(device))
    machine = dict(protocol.machine(), device=device)
    echo(f"machine: {json.dumps(machine)}")

    def write(records: list, complete: bool = False, stopped: Optional[str] = None) -> None:
        if json_out:
            figures = dict(machine=machine, complete=complete, results=records)
            atomic_write_text(Path(json_out), json.dumps(figures | ({"stopped": stopped} if stopped else {}),
                                                         indent=1))

    records: list = []
    try:
        run(shapes, methods, patterns, block_sizes, device, per_block=per_block, echo=echo,
            per_block_max_columns=per_block_max_columns, repeat=repeat, sink=records, on_record=write)
    except BaseException as exc:
        write(records, stopped=f"{type(exc).__name__}: {exc}"[:300])
        raise
    write(records, complete=True)
    return records
