"""Time one layer's pruning for each method and print seconds and reconstruction error.

    python -m runtime_bench.solver                          # every shape, method, pattern
    python -m runtime_bench.solver --shapes 4096x4096 --patterns 2:4 --block-sizes 128

Inputs are realistic in the way that matters to the solvers: the calibration activations have a
few high-variance channels, as real LLM activations do. The row `thanos (per-block)` is the
paper's strategy of re-inverting the trailing Hessian at every block (`torch.linalg.inv`, as
the paper's code calls it), kept as the reference the one-Cholesky route is measured against.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from runtime_bench import protocol
from thanos import prune_weight
from thanos.config import Pattern
from thanos.devices import resolve_device
from thanos.hessian import reconstruction_error
from thanos.outputs import atomic_write_text
from thanos.solvers.thanos import thanos_prune

SHAPES = ["576x576", "1536x576", "2048x2048", "4096x4096", "4096x11008"]
# The reference costs O(c^4 / B): past 4096 columns it takes many minutes on a CPU, not on a GPU.
PER_BLOCK_MAX_COLUMNS = {"cpu": 4096, "cuda": 16384}


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


def _warm_up(device, methods, patterns):
    """One small solve per method and pattern first, so that no timing includes the kernels' first load."""
    W, H = layer_problem(64, 64, device)
    for pattern in patterns:
        for method in methods:
            prune_weight(W, H, method, pattern, 0.5 if pattern == "unstructured" else None, block_size=None,
                         preset=_fast(method))
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

    per_block_max_columns = per_block_max_columns or PER_BLOCK_MAX_COLUMNS[torch.device(device).type]
    _warm_up(device, methods, patterns)
    header = "| shape | method | pattern | block | seconds | rel. error |"
    echo(header)
    echo("|" + "---|" * 6)
    for shape in shapes:
        rows, cols = map(int, shape.lower().split("x"))
        W, H = layer_problem(rows, cols, device)
        for pattern in patterns:
            sparsity = 0.5 if pattern == "unstructured" else None
            for method in methods:
                sizes = block_sizes if method in ("thanos", "sparsegpt") and pattern != "columns" else [None]
                for block in sizes:
                    res = min((prune_weight(W, H, method, pattern, sparsity, block_size=block, preset=_fast(method))
                               for _ in range(repeat)),
                              key=lambda r: r.seconds)
                    rec = dict(shape=shape, method=method, pattern=pattern,
                               block_size=res.config.resolved_block_size if block else None,
                               seconds=res.seconds, error=res.error, repeat=repeat)
                    add(rec)
                    echo(f"| {shape} | {method} | {pattern} | {rec['block_size'] or '-'} | {res.seconds:.2f} | {res.error:.5f} |")
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


def main(argv=None) -> None:
    """`python -m runtime_bench.solver`: benchmark the pruning solvers on single layers of real LLM shapes."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m runtime_bench.solver", description=main.__doc__)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated ROWSxCOLS")
    parser.add_argument("--methods", default="thanos,sparsegpt,wanda,magnitude")
    parser.add_argument("--patterns", default="2:4,4:8,unstructured")
    parser.add_argument("--block-sizes", default="64,128,512")
    parser.add_argument("--device", default="auto", help="auto (the GPU where there is one), cpu or cuda")
    parser.add_argument("--no-per-block", action="store_true", help="skip the slow per-block re-inversion reference")
    parser.add_argument("--per-block-up-to", type=int, default=None,
                        help="widest layer (columns) to run the reference on (default 4096 on a CPU, 16384 on a GPU)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each solve this many times and keep the fastest (timings on a shared machine vary)")
    parser.add_argument("--json-out", default=None, help="also write the records as JSON")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.device = str(resolve_device(args.device))
    machine = dict(protocol.machine(), device=args.device)
    print(f"machine: {json.dumps(machine)}", flush=True)

    def write(records: list, complete: bool = False, stopped: Optional[str] = None) -> None:
        if args.json_out:  # after every record: a run stopped by its time limit keeps what it measured
            figures = dict(machine=machine, complete=complete, results=records)
            atomic_write_text(Path(args.json_out), json.dumps(figures | ({"stopped": stopped} if stopped else {}),
                                                              indent=1))

    protocol.stop_on_sigterm()
    records: list = []
    try:
        run(args.shapes.split(","), args.methods.split(","), args.patterns.split(","),
            [int(b) for b in args.block_sizes.split(",")], args.device, per_block=not args.no_per_block,
            echo=lambda line: print(line, flush=True), per_block_max_columns=args.per_block_up_to,
            repeat=args.repeat, sink=records, on_record=write)
    except BaseException as exc:
        write(records, stopped=f"{type(exc).__name__}: {exc}"[:300])
        raise
    write(records, complete=True)


if __name__ == "__main__":
    main()
