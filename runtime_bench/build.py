"""`prune_and_build`: prune, export, verify and (optionally) time, as one call.

This is what `thanos-export prune-and-build` runs; it lives above the exporters because its
optional quick latency bench is a measurement. Every refusal (an option the target ignores, a
pattern the hardware cannot run, a missing backend) happens before the pruning starts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from exporters import ExportOptions, check_backend, check_options_apply, check_traceable, export, relocated
from exporters.base import ExportError, default_dtype
from exporters.patterns import require_hardware_2to4
from thanos.checkpoint import PARTIAL_DIR, REPORT_NAME
from thanos.devices import resolve_device
from thanos.driver import Progress
from thanos.errors import InputError
from thanos.outputs import (OutputDirError, begin_staging, check_disjoint, check_writable, commit_staging,
                            discard_staging, output_lock)
from thanos.parallel import Parallel
from thanos.pipeline import PruneJob, prune_into, prune_to_directory
from thanos.recipe import Quantize

log = logging.getLogger(__name__)

SUMMARY_NAME = "build_summary.json"


def auto_target() -> str:
    """TensorRT where an NVIDIA GPU and TensorRT exist, ONNX everywhere else."""
    if torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt"
    return "onnx"


@dataclasses.dataclass(frozen=True)
class BuildJob:
    """A prune job plus where its export goes. `prune.out` is ignored: the model goes to OUT/pruned;
    `prune.overwrite` replaces a finished build in `out`, as a whole, once the new one is complete."""

    out: str
    prune: PruneJob
    target: str = "auto"
    options: ExportOptions = ExportOptions()
    bench: bool = False


def prune_and_build(job: BuildJob, progress: Optional[Progress] = None,
                    on_pruned=None, on_exported=None) -> dict:
    """Prune into OUT/pruned, export to OUT/<target>, optionally bench, write OUT/build_summary.json.

    The build folder is one output: it is made whole in a staging sibling and moved into place at
    the end, replacing an earlier build (with `overwrite`) only then, so OUT never holds a new
    model beside an old export. A failed build keeps its pruned layers in the staging folder and
    the same call resumes from them. Under torchrun every rank prunes; rank 0 alone exports,
    benches and writes. `on_pruned(report)` and `on_exported(summary)` let a caller show each
    stage as it ends (rank 0 only).
    """
    out = Path(job.out)
    target = auto_target() if job.target == "auto" else job.target
    options = job.options
    if target in ("onnx", "genai") and options.dtype == "bfloat16":
        options = dataclasses.replace(options, dtype="float16")  # ONNX has no bfloat16 path here
    if job.prune.trust_remote_code:
        options = dataclasses.replace(options, trust_remote_code=True)
    check_options_apply(target, options)
    try:
        check_traceable(target, job.prune.model)
    except ExportError as exc:
        raise ExportError(f"{exc} (--target auto picks {target} on this machine)" if job.target == "auto" else str(exc)
                          ) from None
    quantize = job.prune.config.recipe.get(Quantize)
    if quantize and options.split_dense_rows:
        raise InputError("--split-dense-rows would replace the 8-bit linears with unquantized ones; prune with "
                         "--alpha 0 for an 8-bit model, or drop --quantize")
    if target in ("tensorrt", "torch") and not options.allow_dense:
        require_hardware_2to4(None, dict(config=job.prune.config.to_json()), target, options.split_dense_rows)
    check_backend(target, quantize.format if quantize else None, quantize.inputs if quantize else "static",
                  options.dtype)
    if options.fused_int8:
        from exporters.genai import check_fused_int8

        fmt = quantize.format if quantize else None
        check_fused_int8(fmt, options.dtype or default_dtype(target, fmt)[0])
    if job.prune.distributed:
        from thanos.parallel import init_from_env

        init_from_env()
    parallel = Parallel()
    inputs = job.prune.inputs()
    with contextlib.ExitStack() as held:
        def claim() -> Path:  # rank 0 owns the folder; the other ranks only prune into its staging
            check_disjoint(out, inputs)
            check_writable(out)
            held.enter_context(output_lock(out))
            check_build_dir(out, job.prune.overwrite)
            return begin_staging(out, inputs, keep=True)

        staging = parallel.run_on_main(claim)
        if not parallel.is_main:
            prune_to_directory(_prune_job(job, staging))
            return dict(target=target, rank=parallel.rank)
        try:
            # the export's paths are shown where they will be once the build is committed
            shown = (lambda summary: on_exported(relocated(summary, str(staging), str(out)))) if on_exported else None
            build = _build(job, target, options, staging, progress, on_pruned, shown)
            build = relocated(build, str(staging), str(out))
            (staging / SUMMARY_NAME).write_text(json.dumps(build, indent=1, default=str))
            commit_staging(staging, out)
        except BaseException:
            _keep_or_discard(staging)
            raise
    return build


def _prune_job(job: BuildJob, staging: Path) -> PruneJob:
    # The staging folder is this build's own: a finished model in it from a failed build with the
    # same settings is reused, one with other settings replaced.
    return dataclasses.replace(job.prune, out=str(staging / "pruned"), overwrite=True, reuse_finished=True)


def _build(job: BuildJob, target: str, options, staging: Path, progress, on_pruned, on_exported) -> dict:
    pruned = prune_into(_prune_job(job, staging), progress)
    report = pruned.report
    if on_pruned:
        on_pruned(report)
    # The pruned model goes to the export in memory, as saved: the directory is not read back.
    source = (pruned.model, pruned.tokenizer, report) if pruned.model is not None else None
    summary = export(target, staging / "pruned", staging / target, options, overwrite=True, source=source)
    model = pruned.model if job.bench else None  # the bench times it in memory too
    del pruned, source
    if on_exported:
        on_exported(summary)
    build = dict(target=target, pruned=str(staging / "pruned"), export=str(staging / target),
                 sparsity=report["sparsity"], perplexity_before=report.get("perplexity_before"),
                 perplexity_after=report.get("perplexity_after"), export_summary=summary)
    if job.bench:
        from runtime_bench.bench import BenchSettings, run_bench
        from runtime_bench.gemm import with_8bit

        gpu = resolve_device(job.prune.device).type == "cuda"
        quantize = job.prune.config.recipe.get(Quantize)
        dtypes = with_8bit([options.dtype or "float16"] if gpu else ["float32"], quantize.format if quantize else None)
        quick = BenchSettings(target=str(staging / "pruned"), out=str(staging / "bench"), tokens=(1, 256, 2048),
                              grid=((1, 128),), dtypes=tuple(dtypes), device=job.prune.device, decode_steps=8)
        # The model as the export left it (cast to --dtype, dense rows split out with
        # --split-dense-rows): the model that is served.
        bench_summary = run_bench(quick, model=model)
        build["bench"] = str(staging / "bench" / "report.md")
        build["bench_crossovers"] = bench_summary["crossovers"]
    return build


def check_build_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a build folder that holds something else, or a finished build without `overwrite`."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / SUMMARY_NAME).is_file():
        raise OutputDirError(f"{out} is not empty and holds no finished build ({SUMMARY_NAME}); choose a new or "
                             "empty --out")
    if not overwrite:
        raise OutputDirError(f"{out} already holds a finished build; pass --overwrite to replace it as a whole (once "
                             "the new one is complete) or choose another --out")


def _keep_or_discard(staging: Path) -> None:
    """After a failed build: keep the staging folder if it holds pruning work to resume, else remove it."""
    pruned = staging / "pruned"
    if (pruned / PARTIAL_DIR).is_dir() or (pruned / REPORT_NAME).is_file():
        log.warning("the pruning done so far is kept in %s; running the same command again resumes from it", staging)
    else:
        discard_staging(staging)
