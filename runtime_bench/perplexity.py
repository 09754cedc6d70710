"""Held-out perplexity and pruning time of every method on one model, same calibration for all.

    python -m runtime_bench.perplexity                       # embedded SmolLM2-135M-Instruct
    python -m runtime_bench.perplexity --patterns 2:4 --methods thanos,sparsegpt
"""
from __future__ import annotations

import copy
import json
import time

import click

from thanos import PruneConfig
from thanos.calibration import sample_windows, tokenize_split
from thanos.driver import prune_model_
from thanos.evaluate import perplexity
from thanos.models import describe_source, load_model
from thanos.pipeline import device_description, resolve_device, versions


@click.command()
@click.option("--model", default=None, help="Model directory or .gguf (default: the embedded SmolLM2-135M).")
@click.option("--methods", default="thanos,sparsegpt,wanda,magnitude", show_default=True)
@click.option("--patterns", default="2:4,4:8,unstructured", show_default=True)
@click.option("--samples", default=32, show_default=True)
@click.option("--seqlen", default=512, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False))
def main(model, methods, patterns, samples, seqlen, device, json_out):
    """Compare methods on held-out perplexity (all held-out windows) and pruning time."""
    dev = resolve_device(device)
    base, tokenizer = load_model(model)
    text = tokenize_split(tokenizer, None)
    calib = sample_windows(text.calibration, samples, seqlen, seed=0)
    settings = dict(model=describe_source(model), calibration=f"{samples} x {seqlen} tokens of {text.source}",
                    held_out_tokens=text.evaluation.numel(), seqlen=seqlen, device=device_description(dev),
                    versions=versions())
    click.echo(json.dumps(settings))

    def held_out(m):
        m.to(dev)
        value = perplexity(m, text.evaluation, seqlen, dev)
        m.to("cpu")
        return value

    rows = [dict(method="dense", pattern="-", perplexity=held_out(base), seconds=0.0)]
    click.echo("| method | pattern | perplexity | prune seconds |\n|---|---|---|---|")
    click.echo(f"| dense | - | {rows[0]['perplexity']:.2f} | - |")
    for pattern in patterns.split(","):
        for method in methods.split(","):
            model_copy = copy.deepcopy(base)
            config = PruneConfig(method, pattern, 0.5 if pattern == "unstructured" else None)
            start = time.perf_counter()
            prune_model_(model_copy, calib, config, dev)
            seconds = time.perf_counter() - start
            rows.append(dict(method=method, pattern=pattern, perplexity=held_out(model_copy), seconds=seconds,
                             block_size=config.resolved_block_size))
            click.echo(f"| {method} | {pattern} | {rows[-1]['perplexity']:.2f} | {seconds:.1f} |")
            del model_copy
    if json_out:
        with open(json_out, "w") as f:
            json.dump(dict(settings=settings, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
