"""Prune a model into a directory that transformers loads, with a report; evaluate one.

This is what `thanos-export prune` and `eval` call: settings in, files out, nothing printed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import platform
import time
from pathlib import Path
from typing import Optional

import torch

from thanos.calibration import CalibrationError, sample_windows, tokenize_split
from thanos.checkpoint import PARTIAL_DIR, REPORT_NAME, LayerCheckpoints, check_output_dir
from thanos.config import PruneConfig
from thanos.driver import Progress, check_pattern_fits, prune_model_
from thanos.devices import defaults_for, device_description, resolve_device
from thanos.errors import InputError
from thanos.evaluate import perplexity
from thanos.experts import fuse_experts_, fused_for_saving, unfuse_experts_
from thanos.model_config import text_config
from thanos.models import (LayerSelection, ModelError, context_length, default_model_file, describe_source, load_model,
                           prunable_linears, source_files)
from thanos.outputs import (OutputDirError, begin_staging, check_disjoint, check_staging, check_writable, commit_staging,
                            discard_staging, output_lock, write_error)
from thanos.parallel import Parallel
from thanos.quantized_model import describe, quantized_linears, save_quantization, simulate_activations_

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class PruneJob:
    """Everything `thanos-export prune` needs. `None` sizes pick the device's defaults."""

    out: str
    config: PruneConfig = PruneConfig()
    model: Optional[str] = None  # HF directory or .gguf; None = embedded SmolLM2-135M-Instruct
    calib_file: Optional[str] = None
    calib_samples: Optional[int] = None
    seqlen: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    evaluate: bool = True
    eval_windows: Optional[int] = -1  # -1: the device's default; None: the whole held-out text
    offload_activations: bool = False
    trust_remote_code: bool = False
    overwrite: bool = False
    distributed: bool = False  # under torchrun: shard calibration and solves across ranks
    reuse_finished: bool = False  # a finished model in `out` with this job's fingerprint is kept, not pruned again

    def __post_init__(self):
        for name in ("calib_samples", "seqlen"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise CalibrationError(f"{name} must be a positive number, got {value}; leave it out for the default")
        if self.eval_windows is not None and self.eval_windows <= 0 and self.eval_windows != -1:
            raise CalibrationError(f"eval_windows must be positive, None (all) or -1 (the device's default), "
                                   f"got {self.eval_windows}")

    def resolved(self, device: torch.device) -> "PruneJob":
        defaults = defaults_for(device)
        return dataclasses.replace(
            self,
            calib_samples=self.calib_samples or defaults.samples,
            seqlen=self.seqlen or defaults.seqlen,
            eval_windows=defaults.eval_windows if self.eval_windows == -1 else self.eval_windows,
        )

    def inputs(self) -> tuple:
        """The paths this job reads, which its output may never overlap."""
        return (self.model if self.model is not None else default_model_file(), self.calib_file)

    def fingerprint(self, samples: torch.Tensor) -> dict:
        """What decides the pruned weights; a resume must match it.

        The calibration enters by the digest of the token windows used (`samples`), not by the
        file's name, so a file rewritten between two runs is never mixed into one model.
        """
        digest = hashlib.sha256(samples.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
        return dict(model=describe_source(self.model), model_files=source_files(self.model),
                    config=self.config.to_json(), calibration_digest=digest,
                    calib_samples=self.calib_samples, seqlen=self.seqlen, seed=self.seed,
                    include=list(self.include), exclude=list(self.exclude))


def versions() -> dict:
    import transformers

    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                thanos_export=_own_version())


def _own_version() -> str:
    try:
        from importlib.metadata import version

        return version("thanos-export")
    except Exception:
        return "source checkout"


@dataclasses.dataclass
class Pruned:
    """What `prune_into` leaves in memory beside the directory it wrote: the model as saved, or None
    where a finished model with the same fingerprint was reused from the directory."""

    model: Optional[torch.nn.Module]
    tokenizer: object
    report: dict


def prune_to_directory(job: PruneJob, progress: Optional[Progress] = None) -> dict:
    """Prune `job.model` and write a loadable model directory plus `thanos_report.json`; return the report."""
    return prune_into(job, progress).report


def prune_into(job: PruneJob, progress: Optional[Progress] = None) -> Pruned:
    """`prune_to_directory`, keeping the pruned model in memory for a caller that goes on with it (an export).

    Rank 0 holds a lock on the output for the whole run, so a second run into it is refused.
    """
    out = Path(job.out)
    if job.distributed:
        from thanos.parallel import init_from_env

        device = init_from_env()
    else:
        device = resolve_device(job.device)
    parallel = Parallel()
    inputs = job.inputs()
    with contextlib.ExitStack() as held:
        def claim() -> None:  # on rank 0; every rank hears of a refusal, so none waits for the others
            check_disjoint(out, inputs)
            check_staging(out, inputs)
            check_writable(out)
            held.enter_context(output_lock(out))
            check_output_dir(out, job.overwrite, job.reuse_finished)

        parallel.run_on_main(claim)
        return _prune(job, out, device, parallel, progress)


def _prune(job: PruneJob, out: Path, device: torch.device, parallel: Parallel, progress: Optional[Progress]) -> Pruned:
    asked_seqlen = job.seqlen
    job = job.resolved(device)
    if not parallel.is_main:
        progress = None
    started = time.time()

    model, tokenizer = load_model(job.model, trust_remote_code=job.trust_remote_code)
    check_finite(model)
    selection = LayerSelection(job.include, job.exclude)
    linears = prunable_linears(model, selection)
    if not any(linears.values()):
        raise InputError(f"no linear layer matches --include {job.include} minus --exclude {job.exclude}; "
                         "patterns match full names such as 'model.layers.0.mlp.up_proj'")
    check_pattern_fits(linears, job.config)
    job = dataclasses.replace(job, seqlen=window_length(asked_seqlen, job.seqlen, context_length(model)))
    text = tokenize_split(tokenizer, job.calib_file)
    samples = sample_windows(text.calibration, job.calib_samples, job.seqlen, job.seed)
    if job.evaluate and text.evaluation.numel() < job.seqlen:
        raise CalibrationError(
            f"the held-out 10% of the text has {text.evaluation.numel()} tokens, fewer than one window of "
            f"{job.seqlen}; pass --no-eval, a longer --calib-file or a smaller --seqlen")
    fingerprint = job.fingerprint(samples)
    if job.reuse_finished:
        earlier = _finished_report(out)
        if earlier is not None and earlier.get("fingerprint") == fingerprint:
            log.warning("%s already holds a model pruned with these settings and calibration tokens; reusing it", out)
            return Pruned(None, tokenizer, earlier)

    report = dict(config=job.config.to_json(), recipe=job.config.recipe.to_json(), job={k: v for k, v in dataclasses.asdict(job).items() if k != "config"},
                  model=describe_source(job.model), versions=versions(), device=device_description(device),
                  calibration=dict(source=text.source, samples=job.calib_samples, seqlen=job.seqlen, seed=job.seed,
                                   calibration_tokens=text.calibration.numel(), held_out_tokens=text.evaluation.numel(),
                                   digest=fingerprint["calibration_digest"]),
                  fingerprint=fingerprint)
    if parallel.world > 1:
        report["ranks"] = parallel.world
    evaluate = job.evaluate and parallel.is_main
    if evaluate:
        report["perplexity_before"] = _held_out_perplexity(model, text.evaluation, job, device)

    needed = activation_bytes(model, len(parallel.shard(samples)), job.seqlen)
    offload = job.offload_activations or activations_exceed_gpu(needed, device)
    if offload and not job.offload_activations:
        log.warning("calibration activations (%.1f GiB) would take over half the free GPU memory; keeping them "
                    "on the CPU", needed / 2**30)
    report["activations"] = dict(bytes=needed, kept_on="cpu" if offload else str(device))

    checkpoints = LayerCheckpoints(out, fingerprint)
    try:
        layers = prune_model_(model, samples, job.config, device, selection, checkpoints, offload, progress, parallel,
                              linears)
    except Exception as exc:  # a full or read-only disk is one line; anything else as it was
        raise write_error(exc, out, kept=f"the finished layers stay in {checkpoints.dir} and the rerun resumes "
                                         "from them") or exc
    report["layers"] = layers
    report["sparsity"] = _overall_sparsity(layers)
    _simulate_8bit_inputs(model, report)
    report["prune_seconds"] = checkpoints.earlier_seconds + time.time() - started  # every run of a resumed job
    if evaluate:
        report["perplexity_after"] = _held_out_perplexity(model, text.evaluation, job, device)

    def finish():
        _save_model_dir(model, tokenizer, out, report, job.inputs())
        checkpoints.remove()

    parallel.run_on_main(finish)
    return Pruned(model, tokenizer, report)


def prune(model, config: PruneConfig = PruneConfig(), calibration: Optional[torch.Tensor] = None, *,
          tokenizer=None, samples: Optional[int] = None, seqlen: Optional[int] = None, seed: int = 0,
          device: str = "auto", progress: Optional[Progress] = None) -> tuple:
    """Prune a loaded causal LM in memory: (model, recipe, calibration) in, (model, report) out.

    `calibration`: token windows (n, seqlen) to calibrate on; None draws `samples` windows of
    `seqlen` tokens (the device's defaults) from the default text with `tokenizer`. The model is
    pruned in place and returned with a report holding the recipe and each linear's record;
    nothing is written (`prune_to_directory` is the resumable, on-disk route).
    """
    dev = resolve_device(device)
    if calibration is None:
        if tokenizer is None:
            raise InputError("pass calibration token windows (n, seqlen), or the tokenizer to draw them from the "
                             "default text")
        defaults = defaults_for(dev)
        text = tokenize_split(tokenizer, None)
        calibration = sample_windows(text.calibration, samples or defaults.samples,
                                     window_length(seqlen, defaults.seqlen, context_length(model)), seed)
    if calibration.dim() != 2 or calibration.is_floating_point():
        raise InputError(f"calibration must be token ids shaped (windows, tokens), got a {calibration.dtype} tensor "
                         f"of shape {tuple(calibration.shape)}")
    check_finite(model)
    unfused = unfuse_experts_(model)
    try:
        layers = prune_model_(model, calibration, config, dev, progress=progress)
    finally:  # the caller's model keeps its own structure
        if unfused:
            fuse_experts_(model)
    report = dict(recipe=config.recipe.to_json(), config=config.to_json(), layers=layers,
                  sparsity=_overall_sparsity(layers), calibration=dict(samples=calibration.shape[0],
                                                                       seqlen=calibration.shape[1]))
    _simulate_8bit_inputs(model, report)
    return model, report


def _simulate_8bit_inputs(model, report: dict) -> None:
    """A quantized model rounds each linear's input from here on, as the 8-bit runtime will (and as
    `load_model` does for the saved directory): its perplexity is the 8-bit model's."""
    if quantized_linears(model):
        simulate_activations_(model)
        report["quantization"] = describe(model)


def _finished_report(out: Path) -> Optional[dict]:
    try:
        return json.loads((out / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None


def check_finite(model) -> None:
    """Refuse a model whose weights hold NaN or Inf, naming the first such tensor (pruning cannot mend it)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelError(f"the source model's {name} holds {bad} NaN or infinite values; the checkpoint is "
                             "damaged or was saved after a diverged step: use an intact copy")


def activation_bytes(model, samples: int, seqlen: int) -> int:
    """Memory of one decoder layer's calibration inputs and outputs, all samples together."""
    element = next(model.parameters()).element_size()
    return 2 * samples * seqlen * text_config(model).hidden_size * element


def activations_exceed_gpu(needed: int, device: torch.device) -> bool:
    """True when the activations would take over half of the GPU's free memory (never on a CPU)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return needed > free // 2


def _held_out_perplexity(model, tokens, job: PruneJob, device) -> dict:
    model.to(device)
    try:
        value = perplexity(model, tokens, job.seqlen, device, job.eval_windows)
    finally:
        model.to("cpu")
    windows = tokens.numel() // job.seqlen
    if job.eval_windows is not None:
        windows = min(windows, job.eval_windows)
    return dict(value=value, windows=windows, seqlen=job.seqlen)


def _overall_sparsity(layers: list[dict]) -> float:
    total = sum(r["shape"][0] * r["shape"][1] for r in layers)
    return sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers) / total if total else 0.0


def _save_model_dir(model, tokenizer, out: Path, report: dict, inputs: tuple) -> None:
    """Write the model, tokenizer and report into a staging sibling, then move it to `out` whole.

    The move replaces whatever `out` held (an old model under --overwrite, the partial layers)
    only now, so an interrupted save leaves the old output or the resumable partial run; a failed
    save removes its staging folder (a full disk stays full otherwise).
    """
    staging = begin_staging(out, inputs)
    try:
        with fused_for_saving(model):  # the family's own layout for mixture-of-experts weights
            model.save_pretrained(staging, safe_serialization=True)
        save_quantization(model, staging)
        tokenizer.save_pretrained(staging)
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=1, default=str))
        commit_staging(staging, out)
    except Exception as exc:  # a full or read-only disk is one line; anything else as it was
        discard_staging(staging)
        raise write_error(exc, out, kept=f"the finished layers stay in {out / PARTIAL_DIR} and the rerun resumes "
                                         "from them") or exc
    except BaseException:
        discard_staging(staging)
        raise


def window_length(asked: Optional[int], default: int, context: Optional[int]) -> int:
    """Tokens per calibration or evaluation window: `asked` if the model's context holds it (else a
    refusal), or the device's default cut to the context (GPT-2's 1024 against the GPU's 2048)."""
    if asked is None:
        if context and default > context:
            log.info("windows of %d tokens, the model's context (the device's default is %d)", context, default)
        return min(default, context or default)
    if context and asked > context:
        raise CalibrationError(f"--seqlen {asked} is longer than the model's context of {context} tokens; "
                               f"pass --seqlen {context} or less")
    return asked


def evaluate_directory(path: str, text_file: Optional[str] = None, seqlen: Optional[int] = None,
                       device: str = "auto", max_windows: Optional[int] = -1, trust_remote_code: bool = False) -> dict:
    """Held-out perplexity of a pruned (or any) model directory, compact checkpoint or .gguf file.

    (An exported model.onnx is evaluated by `exporters.onnx_graph.evaluate_onnx`.)
    """
    dev = resolve_device(device)
    model, tokenizer = load_model(path, trust_remote_code=trust_remote_code)
    model.to(dev)
    return evaluate_model(model, tokenizer, path, text_file, seqlen, dev, max_windows, device_description(dev))


def evaluate_model(model, tokenizer, path: str, text_file: Optional[str], seqlen: Optional[int],
                   dev: torch.device, max_windows: Optional[int], where: str) -> dict:
    """Perplexity of any `model(ids).logits` callable on the held-out part of the default or a given text."""
    defaults = defaults_for(dev)
    seqlen = window_length(seqlen, defaults.seqlen, context_length(model) if hasattr(model, "config") else None)
    max_windows = defaults.eval_windows if max_windows == -1 else max_windows
    text = tokenize_split(tokenizer, text_file)
    tokens = text.evaluation
    value = perplexity(model, tokens, seqlen, dev, max_windows)
    windows = min(tokens.numel() // seqlen, max_windows or 10**9)
    return dict(model=path, text=text.source, perplexity=value, windows=windows, seqlen=seqlen, device=where)


__all__ = ["PruneJob", "Pruned", "prune", "prune_into", "prune_to_directory", "evaluate_directory", "OutputDirError"]
