"""`prune_and_build`: prune, export, verify and (optionally) time, as one call.

This is what `thanos-export prune-and-build` runs; it lives above the exporters because its
optional quick latency bench is a measurement. Every refusal (an option the target ignores, a
pattern the hardware cannot run, a missing backend) happens before the pruning starts.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Optional

import torch

from exporters import ExportOptions, check_backend, check_options_apply, export
from exporters.patterns import require_hardware_2to4
from thanos.driver import Progress
from thanos.pipeline import PruneJob, prune_to_directory

SUMMARY_NAME = "build_summary.json"


def auto_target() -> str:
    """TensorRT where an NVIDIA GPU and TensorRT exist, ONNX everywhere else."""
    if torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt"
    return "onnx"


@dataclasses.dataclass(frozen=True)
class BuildJob:
    """A prune job plus where its export goes. `prune.out` is ignored: the model goes to OUT/pruned."""

    out: str
    prune: PruneJob
    target: str = "auto"
    options: ExportOptions = ExportOptions()
    bench: bool = False


def prune_and_build(job: BuildJob, progress: Optional[Progress] = None,
                    on_pruned=None, on_exported=None) -> dict:
    """Prune into OUT/pruned, export to OUT/<target>, optionally bench, write OUT/build_summary.json.

    `on_pruned(report)` and `on_exported(summary)` let a caller show each stage as it ends.
    """
    out = Path(job.out)
    target = auto_target() if job.target == "auto" else job.target
    options = job.options
    if target in ("onnx", "genai") and options.dtype == "bfloat16":
        options = dataclasses.replace(options, dtype="float16")  # ONNX has no bfloat16 path here
    prune_job = dataclasses.replace(job.prune, out=str(out / "pruned"))
    check_options_apply(target, options)
    if target in ("tensorrt", "torch") and not options.allow_dense:
        require_hardware_2to4(None, dict(config=prune_job.config.to_json()), target, options.split_dense_rows)
    check_backend(target)
    report = prune_to_directory(prune_job, progress)
    if on_pruned:
        on_pruned(report)
    summary = export(target, out / "pruned", out / target, options)
    if on_exported:
        on_exported(summary)
    build = dict(target=target, pruned=str(out / "pruned"), export=str(out / target), sparsity=report["sparsity"],
                 perplexity_before=report.get("perplexity_before"), perplexity_after=report.get("perplexity_after"),
                 export_summary=summary)
    if job.bench:
        from runtime_bench.bench import BenchSettings, run_bench

        gpu = torch.cuda.is_available() and job.prune.device != "cpu"
        quick = BenchSettings(target=str(out / "pruned"), out=str(out / "bench"), tokens=(1, 256, 2048),
                              grid=((1, 128),), dtypes=(options.dtype or "float16",) if gpu else ("float32",),
                              device=job.prune.device, decode_steps=8)
        bench_summary = run_bench(quick)
        build["bench"] = str(out / "bench" / "report.md")
        build["bench_crossovers"] = bench_summary["crossovers"]
    (out / SUMMARY_NAME).write_text(json.dumps(build, indent=1, default=str))
    return build
