"""`thanos-export`: prune, evaluate, export, inspect and benchmark sparse LLMs.

Each command builds its settings from the options and calls one public function; anything the
CLI does is a few lines of Python for a library user.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

import click

from exporters.base import ExportFormat, lossless_dtype
from runtime_bench.gemm import DEFAULT_TOKENS
from runtime_bench.model import ALL_BACKENDS, RANDOM_CONFIGS
from runtime_bench.perplexity import DEFAULT_METHODS as QUALITY_METHODS
from runtime_bench.solver import METHODS as SOLVER_METHODS, SHAPES as SOLVER_SHAPES
from thanos.config import DEFAULT_SMOOTHING, PRESETS, PruneConfig
from thanos.driver import thin_statistics
from thanos.quantize import FORMATS, INPUT_SCALES, ROUNDINGS
from thanos.recipe import METHODS
from thanos.errors import ThanosExportError

# Errors whose message names the fix: printed as one line. Anything else (a CUDA out-of-memory, a
# bug) keeps its traceback. A missing optional package is an ImportError with the install hint.
USER_ERRORS = (ThanosExportError, FileNotFoundError, ImportError)


class _Signalled(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame) -> None:
    raise _Signalled(signum)


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc)) from exc


class _Bars:
    """tqdm bars for the library's progress callbacks (layers; the linears solved in a layer; samples of
    a pass, or columns of a wide linear's solve, inside it)."""

    POSITIONS = dict(layers=0, linears=1)  # one line each; samples and columns share the third

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bars = {}
        # Redirected to a file, nested bars would fill it with cursor-movement escapes: one plain
        # line per finished layer instead.
        self.plain = not sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.plain:
            if stage == "layers":
                click.echo(f"layer {done}/{total} done", err=True)
            return
        from tqdm.auto import tqdm

        bar = self.bars.get(stage)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = self.bars[stage] = tqdm(total=total, desc=stage, leave=stage == "layers",
                                          position=self.POSITIONS.get(stage, 2), file=sys.stderr)
        bar.update(done - bar.n)

    def close(self):
        for bar in self.bars.values():
            bar.close()


@click.group(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("-v", "--verbose", is_flag=True, help="Log per-layer details.")
def main(verbose):
    """Prune LLMs with Thanos under hardware sparsity patterns (2:4, 4:8), export them to formats
    that inference engines accelerate, and measure the gain.

    \b
    Quick start (embedded SmolLM2-135M-Instruct, runs on a CPU):
      thanos-export prune --pattern 2:4 --out pruned/
      thanos-export eval pruned/
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        _quiet_transformers()


def _quiet_transformers() -> None:
    """transformers' own loading bars and notices drown our progress; -v brings them back."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


trust_option = click.option("--trust-remote-code", is_flag=True,
                            help="Allow the model directory's own Python code (auto_map in config.json) to run.")


@contextlib.contextmanager
def _stop_on_sigterm():
    """`timeout` and job schedulers stop with SIGTERM: end like Ctrl-C, so the command can say what it kept."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(exc: KeyboardInterrupt, kept: Path) -> None:
    """Say what an interrupted run keeps, and exit as the signal asked (130 for Ctrl-C, 143 for SIGTERM)."""
    _exit_stopped(exc, f"what was finished is kept in {kept}; run the same command again to resume from it"
                  if kept.is_dir() else "nothing was finished")


def _exit_stopped(exc: KeyboardInterrupt, said: str) -> None:
    click.echo(f"Stopped ({exc or 'SIGINT'}): {said}.", err=True)
    sys.exit(128 + getattr(exc, "signum", signal.SIGINT))


def prune_options(f):
    options = [
        click.option("--model", type=click.Path(), default=None,
                     help="Hugging Face model directory or .gguf file. Default: the embedded SmolLM2-135M-Instruct."),
        click.option("--method", type=click.Choice(METHODS), default=None, help="Solver (default: thanos)."),
        click.option("--pattern", default=None,
                     help="'n:m' (remove n of every m inputs: 2:4, 4:8), 'unstructured' or 'columns' (default: 2:4)."),
        click.option("--sparsity", type=float, default=None,
                     help="Fraction removed; n:m fixes it at n/m. Default 0.5 for unstructured/columns."),
        click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
                     help="Thanos recipe (default: default): " + "; ".join(f"{k}: {v.summary}" for k, v in PRESETS.items())
                          + ". Measured in docs/results/perplexity_cpu.md. The options below override its steps."),
        click.option("--recipe", type=click.Path(dir_okay=False), default=None,
                     help="Repeat a run: a thanos_report.json (its recipe) or a recipe JSON file; the options "
                          "below override its steps."),
        click.option("--block-size", type=int, default=None, help="Columns per block (default: the preset's)."),
        click.option("--refit-iterations", type=click.IntRange(min=0), default=None,
                     help="At most this many conjugate-gradient iterations refitting the kept weights on the "
                          "final mask (default: the preset's for thanos, 0 for the other methods)."),
        click.option("--refit-tolerance", type=click.FloatRange(min=0.0, max=1.0, max_open=True), default=None,
                     help="End the refit once an iteration lowers the layer's error by less than this share of "
                          "it; 0 runs every iteration (default: the preset's: 1e-4 for default, 0 for best)."),
        click.option("--mask-search-iterations", type=click.IntRange(min=0), default=None,
                     help="ADMM iterations moving mask and kept weights together before the refit, kept only "
                          "where they lower the layer's error (default: the preset's for thanos, 0 for the others)."),
        click.option("--permute-channels/--no-permute-channels", default=None,
                     help="Reorder the channels the model leaves free (gate/up rows with down_proj's inputs, "
                          "v_proj rows with o_proj's, within a head) so each n:m group drops less; the dense "
                          "model computes the same (default: the preset's for thanos, off for the others)."),
        click.option("--sequential/--no-sequential", default=None,
                     help="Solve each decoder layer's linears group by group (q/k/v, o, gate/up, down), each on "
                          "statistics gathered once the groups before it are pruned (and, with --quantize "
                          "unsmoothed, fp8's default, and no reconstruction, quantized), so each sees the inputs "
                          "the pruned layer gives it; costs up to three partial passes over the samples per layer "
                          "and, with --distributed, one group's solves at a time over the ranks (default: on with "
                          "--quantize for the default preset, off otherwise)."),
        click.option("--reconstruct-epochs", type=click.IntRange(min=0), default=None,
                     help="Passes of decoder-block reconstruction after each layer is pruned (default: the "
                          "preset's for thanos, 0 for the other methods)."),
        click.option("--reconstruct-target", type=click.Choice(["layer", "dense"]), default=None,
                     help="What the reconstruction aims at: the dense layer's outputs on the pruned inputs "
                          "(layer, the default), or the dense model's own activations (dense: one more pass over "
                          "the samples per layer)."),
        click.option("--alpha", type=float, default=None,
                     help="Fraction of outlier rows kept dense (Thanos; default 0). >0 breaks hardware 2:4."),
        click.option("--damp", type=float, default=None, help="Hessian damping, x mean(diag H) (default 0.01)."),
        click.option("--calib-file", type=click.Path(), default=None,
                     help=".txt or .jsonl ({'text': ...} per line). Default: Python's pydoc topics."),
        click.option("--calib-samples", type=click.IntRange(min=1), default=None,
                     help="Calibration windows (default 128 on GPU, 32 on CPU)."),
        click.option("--seqlen", type=click.IntRange(min=2), default=None,
                     help="Tokens per window (default 2048 on GPU, 512 on CPU; at most the model's context)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--include", multiple=True, default=("*",), show_default=True,
                     help="Prune only linears matching this name pattern (repeatable), e.g. '*.mlp.*'."),
        click.option("--exclude", multiple=True,
                     help="Leave linears matching this pattern dense (repeatable), e.g. '*.experts.*' for a mixture "
                          "of experts' experts (each named ...mlp.experts.E.gate_proj)."),
        click.option("--no-eval", is_flag=True, help="Skip the perplexity before and after."),
        click.option("--eval-windows", type=click.IntRange(min=0), default=None,
                     help="Held-out windows for perplexity (default: all on GPU, 16 on CPU; 0 = all)."),
        click.option("--offload-activations", is_flag=True, help="Keep calibration activations on the CPU."),
        trust_option,
        click.option("--overwrite", is_flag=True, help="Replace a finished pruned model (or build) in --out, once "
                                                      "the new one is complete."),
        click.option("--distributed", is_flag=True,
                     help="Under torchrun: shard calibration and solves over the ranks (rank 0 writes)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


class SmoothingStrength(click.ParamType):
    name = "ALPHA|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, float):
            return value
        try:
            alpha = float(value)
        except ValueError:
            alpha = -1.0
        if not 0.0 <= alpha <= 1.0:
            self.fail(f"{value!r} is neither a strength in [0, 1] nor 'auto'", param, ctx)
        return alpha


def quantize_options(f):
    options = [
        click.option("--quantize", type=click.Choice(list(FORMATS)), default=None,
                     help="After pruning, store the weights in 8 bits (one scale per output channel; fp8 is E4M3) "
                          "and give each linear's input a static scale from the calibration pass (or one per "
                          "token: --quantize-inputs). The saved "
                          "directory holds the dequantized weights (transformers loads it as before) and "
                          "thanos_quantization.safetensors with the scales; eval and generate then round every "
                          "linear's input as an 8-bit runtime does. Default: no quantization."),
        click.option("--quantize-rounding", type=click.Choice(list(ROUNDINGS)), default=None,
                     help="compensated (default): each column's rounding error is spread over the kept weights "
                          "after it through the inverse Hessian, kept only where it beats round-to-nearest; "
                          "nearest: every weight rounded on its own."),
        click.option("--quantize-smoothing", type=SmoothingStrength(), default=None,
                     help="Migration strength alpha of activation outliers into the weights before quantizing "
                          "(SmoothQuant: channel j of the input divided by amax(x_j)^alpha / amax(W_j)^(1-alpha), "
                          "folded into the norm or linear that produces it; pruned zeros stay zero), or 'auto' "
                          "(int8: each input's strength chosen from an estimate of the rounding error). Default: "
                          + ", ".join(f"{v} for {k}" for k, v in DEFAULT_SMOOTHING.items()) + "; 0 turns it off."),
        click.option("--quantize-inputs", type=click.Choice(list(INPUT_SCALES)), default=None,
                     help="static (default): one scale per linear input from calibration, which every target "
                          "carries. per-token: each token's input scaled by its own largest magnitude at run "
                          "time, closer to the unquantized model (README, 8-bit section) but carried by "
                          "--target torch and safetensors only (QDQ graphs hold constant scales)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def build_config(recipe, **options) -> PruneConfig:
    """The preset (or the recipe file) with the options given on the command line on top."""
    given = {name: value for name, value in options.items() if value is not None}
    if recipe is None:
        return PruneConfig(**given)
    if "preset" in given:
        raise click.BadParameter("--preset and --recipe both name the steps; pass one of them", param_hint="--recipe")
    try:
        data = json.loads(Path(recipe).read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{recipe} cannot be read as JSON ({exc})", param_hint="--recipe") from exc
    return PruneConfig.from_recipe(data.get("recipe", data) if isinstance(data, dict) else data, **given)


def build_job(out, model, method, pattern, sparsity, preset, recipe, block_size, refit_iterations,
              refit_tolerance, mask_search_iterations, permute_channels, sequential, reconstruct_epochs,
              reconstruct_target, alpha, damp, calib_file, calib_samples, seqlen, seed, device, include, exclude, no_eval, eval_windows,
              offload_activations, trust_remote_code, overwrite, distributed=False, quantize=None,
              quantize_rounding=None, quantize_smoothing=None, quantize_inputs=None):
    from thanos.pipeline import PruneJob

    config = build_config(recipe, method=method, pattern=pattern, sparsity=sparsity, preset=preset,
                          block_size=block_size, alpha=alpha, damp=damp, refit_iterations=refit_iterations,
                          refit_tolerance=refit_tolerance, mask_search_iterations=mask_search_iterations,
                          permute_channels=permute_channels, sequential=sequential,
                          reconstruct_epochs=reconstruct_epochs, reconstruct_target=reconstruct_target,
                          quantize=quantize, quantize_rounding=quantize_rounding,
                          quantize_smoothing=quantize_smoothing, quantize_inputs=quantize_inputs)
    return PruneJob(out=out, config=config, model=model, calib_file=calib_file, calib_samples=calib_samples,
                    seqlen=seqlen, seed=seed, device=device, include=tuple(include), exclude=tuple(exclude),
                    evaluate=not no_eval, eval_windows=_windows(eval_windows),
                    offload_activations=offload_activations, trust_remote_code=trust_remote_code, overwrite=overwrite,
                    distributed=distributed)


def _windows(option: "int | None") -> "int | None":
    """--eval-windows / --windows to the library's value: -1 the device's default, None all of them."""
    return -1 if option is None else (option or None)


def run_prune(job, quiet=False) -> dict:
    from thanos.pipeline import prune_to_directory

    bars = _Bars(enabled=not quiet)
    try:
        return prune_to_directory(job, progress=bars)
    finally:
        bars.close()


def echo_prune_summary(report: dict) -> None:
    cal = report["calibration"]
    click.echo(f"model      {report['model']}")
    click.echo(f"device     {report['device']}; calibration {cal['samples']} x {cal['seqlen']} tokens "
               f"from {cal['source']}")
    recipe = report["recipe"]
    solve = next(step for step in recipe["steps"] if step["step"] == "solve")
    preset = f"preset {recipe['preset']}: " if recipe.get("preset") else ""
    click.echo(f"method     {solve['method']} {recipe['pattern']} ({preset}{_steps_in_words(recipe['steps'])}), "
               f"overall sparsity {report['sparsity']:.3f}, {report['prune_seconds']:.0f}s")
    _echo_layer_table(report["layers"])
    errors = [r["error"] for r in report["layers"] if r["error"] is not None]
    if errors:
        worst = max(report["layers"], key=lambda r: r["error"] or 0)
        click.echo(f"rel. error mean {sum(errors) / len(errors):.4f}, worst {worst['error']:.4f} ({worst['name']})")
    thin = thin_statistics(report["layers"])
    if thin:
        click.echo(f"statistics {len(thin)} of {len(report['layers'])} linears summed fewer calibration tokens than "
                   "they have inputs (rank-deficient: their errors understate the loss; more --calib-samples)")
    escalations = sum(r["damp_escalations"] for r in report["layers"])
    if escalations:
        click.echo(f"damping    raised {escalations} times (see thanos_report.json)")
    quantized = [r["quantization"] for r in report["layers"] if r.get("quantization")]
    if quantized:
        compensated = sum(q["rounding"] == "compensated" for q in quantized)
        click.echo(f"8-bit      {quantized[0]['format']}: mean rel. error {_mean(q['error'] for q in quantized):.3g} "
                   f"(round-to-nearest {_mean(q['nearest_error'] for q in quantized):.3g}), compensation kept in "
                   f"{compensated} of {len(quantized)} linears; inputs rounded in the perplexity below")
    if "perplexity_before" in report:
        b, a = report["perplexity_before"], report["perplexity_after"]
        click.echo(f"perplexity {b['value']:.2f} -> {a['value']:.2f} (held-out, {a['windows']} windows of {a['seqlen']})")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _steps_in_words(steps: list[dict]) -> str:
    words = {"permute": lambda s: "channels permuted",
             "solve": lambda s: f"block {s['block_size']}" + (f", alpha {s['alpha']}" if s["alpha"] else ""),
             "mask_search": lambda s: f"mask search {s['iterations']}",
             "refit": lambda s: (f"refit up to {s['iterations']} (ends at gains below {s['tolerance']:g})"
                                 if s.get("tolerance") else f"refit {s['iterations']}"),
             "reconstruct": lambda s: f"reconstruction {s['epochs']} x towards the {s['target']} target",
             "quantize": lambda s: f"{s['format']} weights and inputs"
                                   + (" (per-token input scales)" if s.get("inputs") == "per-token" else "")
                                   + f", {s['rounding']} rounding"
                                   + (f", smoothing {s['smoothing']}" if s["smoothing"] else "")}
    return ", ".join(words[s["step"]](s) for s in steps)


def _echo_layer_table(layers: list[dict]) -> None:
    """One row per kind of linear (q_proj, down_proj, ...) over all decoder layers."""
    kinds: dict[str, list[dict]] = {}
    for r in layers:
        kinds.setdefault(r["name"].rsplit(".", 1)[-1], []).append(r)
    click.echo(f"{'linear':<12} {'count':>5} {'shape':>11} {'sparsity':>8} {'mean err':>9} {'max err':>9} {'seconds':>8}")
    for kind, rows in kinds.items():
        errors = [r["error"] for r in rows if r["error"] is not None] or [float("nan")]
        shape = "x".join(map(str, rows[0]["shape"]))
        click.echo(f"{kind:<12} {len(rows):>5} {shape:>11} {sum(r['sparsity'] for r in rows) / len(rows):>8.3f} "
                   f"{sum(errors) / len(errors):>9.4f} {max(errors):>9.4f} {sum(r['seconds'] for r in rows):>8.1f}")


@main.command()
@prune_options
@quantize_options
@click.option("--out", required=True, type=click.Path(), help="Directory for the pruned model and thanos_report.json.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def prune(out, quiet, **options):
    """Prune a causal LM layer by layer and save it where transformers can load it.

    \b
    Example:
      thanos-export prune --pattern 2:4 --calib-samples 32 --seqlen 512 --out smollm2-2of4/
      thanos-export prune --model ~/llama-2-7b --method sparsegpt --pattern 4:8 --out llama-4of8/
      thanos-export prune --recipe smollm2-2of4/thanos_report.json --model ~/llama-2-7b --out llama-2of4/
      thanos-export prune --pattern 2:4 --quantize fp8 --out smollm2-2of4-fp8/

    An interrupted run resumes from its last finished layer when rerun with the same options.
    """
    try:
        job = build_job(out, **options)
        with _stop_on_sigterm():
            report = run_prune(job, quiet)
    except USER_ERRORS as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        _stopped(exc, Path(out) / ".thanos_partial")
    finally:
        if options.get("distributed"):
            from thanos.parallel import shutdown

            shutdown()
    if report.get("ranks") and int(os.environ.get("RANK", "0")) != 0:
        return  # rank 0 speaks for the group
    echo_prune_summary(report)
    click.echo(f"saved      {out}")


@main.command("eval")
@click.argument("path", type=click.Path())
@click.option("--text-file", type=click.Path(), default=None, help="Evaluate on the held-out 10% of this file.")
@click.option("--seqlen", type=click.IntRange(min=2), default=None,
              help="Window length (default 2048 on GPU, 512 on CPU, at most the model's context).")
@click.option("--windows", type=click.IntRange(min=0), default=None,
              help="Windows to use (default: all on GPU, 16 on CPU; 0 = all).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@trust_option
def eval_cmd(path, text_file, seqlen, windows, device, as_json, trust_remote_code):
    """Held-out perplexity of a model directory (pruned, compact or dense), a .gguf file, or an
    exported model.onnx (run by onnxruntime, with the tokenizer saved beside it; an export's folder,
    onnx or genai, stands for its model.onnx).

    \b
    Examples:
      thanos-export eval smollm2-2of4/ --windows 0
      thanos-export eval build/onnx/                # the export itself, as a runtime runs it
    """
    from exporters.onnx_graph import evaluate_onnx, graph_in
    from thanos.pipeline import evaluate_directory

    windows = _windows(windows)
    try:
        graph = graph_in(path)  # an export's folder stands for the graph a runtime serves
        if graph is not None:
            result = evaluate_onnx(graph, text_file, seqlen, windows)
        else:
            result = evaluate_directory(path, text_file, seqlen, device, windows, trust_remote_code)
    except USER_ERRORS as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        click.echo(f"perplexity {result['perplexity']:.3f} on {result['text']} "
                   f"({result['windows']} windows of {result['seqlen']}, {result['device']})")


TARGETS = tuple(fmt.value for fmt in ExportFormat)


def export_options(f):
    options = [
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                     help="Precision of the exported weights (ONNX: float32 or float16). Default: float16 for "
                          "onnx, genai, tensorrt and torch (the summary reports the cast), but float32 for "
                          "genai folders of INT8 models (onnxruntime's CPU 8-bit kernels need it); the "
                          "model's own for safetensors, which is lossless."),
        click.option("--allow-dense", is_flag=True,
                     help="Hardware targets: build a dense model instead of refusing one that is not 2:4."),
        click.option("--no-validate", is_flag=True, help="Skip running the export against the pruned model."),
        click.option("--split-dense-rows", is_flag=True,
                     help="alpha > 0 models: run each layer's dense outlier rows as a separate dense product, "
                          "so the other rows stay 2:4 for sparse kernels."),
        click.option("--opset", type=int, default=18, show_default=True,
                     help="ONNX opset, 14 up to the highest this torch's exporter writes; 8-bit graphs are written "
                          "at 19 or above (QuantizeLinear on float16, FP8 types)."),
        click.option("--with-cache", is_flag=True,
                     help="ONNX: also write model_with_cache.onnx, with KV-cache inputs and outputs for decoding."),
        click.option("--trt-batch", default="1,1,4", show_default=True, help="TensorRT profile min,opt,max batch."),
        click.option("--trt-seqlen", default="1,128,512", show_default=True,
                     help="TensorRT profile min,opt,max sequence length."),
        click.option("--workspace-gib", type=float, default=4.0, show_default=True, help="TensorRT workspace."),
        click.option("--timing-cache", type=click.Path(), default=None, help="TensorRT timing cache file to reuse."),
        click.option("--backend", type=click.Choice(["auto", "cusparselt", "cutlass"]), default="auto",
                     show_default=True, help="torch semi-structured kernel backend."),
        click.option("--fused-int8", is_flag=True,
                     help="genai, INT8 models: let onnxruntime run each INT8 linear as its fused integer kernel "
                          "(faster decoding on the CPU), exact only on CPUs with VNNI (Intel since Cascade Lake, "
                          "AMD since Zen 4) or Arm; refused on a CPU without. The default folder runs on any CPU."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _triple(text: str, what: str) -> tuple[int, int, int]:
    try:
        low, opt, high = (int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{what} needs three integers min,opt,max such as 1,128,512") from None
    if not low <= opt <= high:
        raise click.BadParameter(f"{what} must satisfy min <= opt <= max, got {text}")
    return low, opt, high


def build_export_options(dtype, allow_dense, no_validate, split_dense_rows, opset, with_cache, trt_batch, trt_seqlen,
                         workspace_gib, timing_cache, backend, fused_int8=False, trust_remote_code=False):
    from exporters import ExportOptions

    return ExportOptions(dtype=dtype, allow_dense=allow_dense, validate=not no_validate, opset=opset,
                         with_cache=with_cache, split_dense_rows=split_dense_rows,
                         batch=_triple(trt_batch, "--trt-batch"), seqlen=_triple(trt_seqlen, "--trt-seqlen"),
                         workspace_gib=workspace_gib, timing_cache=timing_cache, backend=backend,
                         fused_int8=fused_int8, trust_remote_code=trust_remote_code)


def echo_export_summary(summary: dict) -> None:
    nested = summary.get("onnx_export", {})  # TensorRT: the ONNX export its engine was built from
    written = summary.get("engine") or summary.get("onnx")
    click.echo(f"exported   {summary['format']}" + (f" -> {written}" if written else ""))
    dtypes = summary.get("dtype") or {}
    if dtypes.get("source") and dtypes.get("export") and dtypes["source"] != dtypes["export"]:
        if summary.get("quantization") or nested.get("quantization"):  # the values are the 8-bit ones
            click.echo(f"cast       weights {dtypes['source']} -> {dtypes['export']}: their 8-bit values and scales "
                       f"kept, each dequantized anew in {dtypes['export']}")
        else:
            keep = lossless_dtype(summary["format"], dtypes["source"])
            click.echo(f"cast       weights {dtypes['source']} -> {dtypes['export']} (--dtype {keep} keeps their "
                       "values)")
    if dtypes.get("default"):
        click.echo(f"dtype      {dtypes['export']}, the default for {dtypes['default']}")
    if summary.get("ratio"):
        click.echo(f"compact    {summary['compact_layers']} n:m layers at {summary['ratio']:.4f}x their dense bytes; "
                   f"round trip {summary.get('round_trip', 'not checked')}")
    split = summary.get("split_rows") or nested.get("split_rows")
    if split:
        outliers = sum(v["outlier_rows"] for v in split.values())
        click.echo(f"split      {len(split)} linears into a 2:4 part and a dense part ({outliers} outlier rows in all)")
    qdq = summary.get("quantization") or nested.get("quantization")
    if qdq:
        rounded = (f"; scales rounded to {' / '.join(qdq['scale_dtypes'])} by up to {qdq['largest_scale_rounding']:.2g}"
                   if qdq["largest_scale_rounding"] else "")
        click.echo(f"8-bit      {qdq['format']}: {qdq['linears']} linears as QuantizeLinear / DequantizeLinear "
                   f"(opset {qdq['opset']}), {qdq['activation_quantizers']} input quantizers{rounded}")
    cached = summary.get("with_cache") or nested.get("with_cache")
    if cached:
        click.echo(f"exported   KV-cache graph -> {cached['onnx']}")
        if cached.get("quantized_linears"):
            _echo_qdq_check(cached["quantized_linears"])
        if cached.get("validation"):
            v = cached["validation"]
            verdict = (f"verified   prefill logit difference {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g})"
                       if "tolerance" in v else f"compared   prefill logit difference {v['max_abs_diff']:.3g}")
            click.echo(f"{verdict}; {v['greedy_tokens_agree']:.0%} of {v['greedy_steps']} greedy tokens as PyTorch")
    validation = summary.get("validation") or nested.get("validation")
    if validation and validation.get("quantized_linears"):
        _echo_qdq_check(validation["quantized_linears"])
        click.echo(f"compared   largest logit difference {validation['max_abs_diff']:.3g} from the 8-bit PyTorch model, "
                   f"top token the same at {validation['top_token_agrees']:.0%} of positions (not a pass/fail check: "
                   "rounding-boundary differences grow over the layers)")
    elif validation:
        click.echo(f"verified   largest logit difference {validation['max_abs_diff']:.3g} "
                   f"(tolerance {validation['tolerance']:.3g})")
    generation = summary.get("generation")
    if generation:
        quantized = generation.get("quantized_linears")
        if quantized:
            _echo_qdq_check(quantized)
        lengths = ", ".join(str(p["prompt_tokens"]) for p in generation["prompts"])
        agreement = ("the same greedy tokens as transformers" if generation["identical"] else
                     f"greedy tokens as transformers' up to new token {generation['first_divergence']}")
        rates = [p["genai_tokens_per_s"] for p in generation["prompts"] if p.get("genai_tokens_per_s")]
        rate = f", {min(rates):.1f}-{max(rates):.1f} tokens/s" if rates else ""
        click.echo(f"{'compared' if quantized else 'verified':<10} {generation['runtime']}: {agreement} on prompts "
                   f"of {lengths} tokens ({generation['prompts'][0]['new_tokens']} new tokens each{rate})"
                   + (" (not a pass/fail check: the 8-bit linears are checked above)" if quantized else ""))
        hint = _cpu_8bit_hint(qdq, dtypes.get("export"), generation["runtime"], summary.get("fused_int8"))
        if hint:
            click.echo(f"note       {hint}")
    for note in (summary.get("note"), (cached or {}).get("note")):
        if note:
            click.echo(f"note       {note}")
    if "eligible" in summary:
        click.echo(f"tensorrt   {len(summary['eligible'])} layers eligible for sparse math, "
                   f"{len(summary['sparse_implementation'])} given a sparse kernel")
    engine = summary.get("engine_check")
    if engine:
        click.echo(f"compared   the engine on {engine['prompts']} prompts: largest logit difference "
                   f"{engine['max_abs_diff']:.3g} from PyTorch (the ONNX check's bound {engine['onnx_bound']:.3g}), "
                   f"top token the same at {engine['top_token_agrees']:.0%} of positions")
    if "converted" in summary:
        click.echo(f"torch 2:4  {len(summary['converted'])} linears converted ({summary['backend']}), "
                   f"{len(summary['dense'])} kept dense")


def _cpu_8bit_hint(qdq: "dict | None", dtype: "str | None", runtime: str, fused: "bool | None" = None) -> str:
    """Why a GenAI folder of an 8-bit model decodes slowly on the CPU, where that applies (README, 8-bit)."""
    if not qdq or "(cpu)" not in runtime:
        return ""
    if qdq["format"] == "int8" and dtype == "float16":
        return ("onnxruntime's CPU provider has 8-bit kernels for INT8 in float32 graphs only; this float16 graph "
                "dequantizes every weight at every step: export with --dtype float32 to serve it on the CPU")
    if qdq["format"] == "int8" and fused is False:
        from exporters.onnx_qdq import fused_int8_is_exact

        if fused_int8_is_exact():
            return ("this folder runs on any CPU: onnxruntime dequantizes its INT8 weights once and runs float32 "
                    "products; on CPUs with VNNI (this one) or Arm, --fused-int8 runs them as integer kernels, faster")
    if qdq["format"] == "fp8":
        return ("onnxruntime's CPU provider has no FP8 kernels (every weight is dequantized at every step): this "
                "folder checks the FP8 model on the CPU; it is served fast by TensorRT on GPUs of compute "
                "capability 8.9+")
    return ""


def _echo_qdq_check(check: dict) -> None:
    click.echo(f"verified   {check['linears']} 8-bit linears one by one on onnxruntime's own inputs: 8-bit inputs "
               f"as QuantizeLinear defines them ({check['inputs_on_a_rounding_boundary']} of "
               f"{check['inputs_checked']} one step apart, on a rounding boundary), products within "
               f"{check['largest_error_over_bound']:.2g}x their round-off bound, also as sessions run the graph "
               "(fused 8-bit kernels included)")


@main.command("export")
@click.argument("model_dir", type=click.Path())
@click.option("--target", type=click.Choice(TARGETS), required=True, help="Output format.")
@click.option("--out", required=True, type=click.Path(), help="Directory for the exported files (new or empty).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in --out, once the new one is verified.")
@export_options
@trust_option
def export_cmd(model_dir, target, out, overwrite, trust_remote_code, **options):
    """Export a pruned model directory and check the export against it.

    \b
    Targets:
      onnx         model.onnx (input_ids, attention_mask -> logits), run by onnxruntime to verify
      genai        an ONNX Runtime GenAI folder (KV-cache graph, genai_config.json, tokenizer): the runtime
                   greedy-generates from real prompts and must give transformers' tokens
      tensorrt     a TensorRT engine with sparse weights (needs TensorRT and an NVIDIA GPU)
      torch        PyTorch semi-structured 2:4 weights (needs a CUDA GPU, compute capability 8.0+)
      safetensors  compact n:m checkpoint: kept values + 1-bit mask, bit-exact on reload
    \b
    Example:
      thanos-export export smollm2-2of4/ --target onnx --dtype float32 --out smollm2-onnx/
    """
    from exporters import export

    try:
        summary = export(target, model_dir, out, build_export_options(**options, trust_remote_code=trust_remote_code),
                         overwrite=overwrite)
    except USER_ERRORS as exc:
        _fail(exc)
    echo_export_summary(summary)


@main.command("generate")
@click.argument("target", type=click.Path())
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--compare", "dense", default=None,
              help="A second model to continue the same prompt (the dense one: a directory, a .gguf file, or "
                   "'default' for the embedded SmolLM2-135M-Instruct).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (GenAI folders: its CUDA provider).")
@trust_option
def generate_cmd(target, prompt, max_new_tokens, dense, device, trust_remote_code):
    """Stream a greedy continuation of --prompt from TARGET, and its tokens/s.

    TARGET is a pruned or compact model directory (run by transformers), a folder written by
    `export --target genai` (run by ONNX Runtime GenAI), an ONNX export (its folder or .onnx file,
    run by onnxruntime; the KV-cache graph where --with-cache wrote one), a .gguf file, or
    'default'. With
    --compare, the second model continues the same prompt below it, so the two can be read
    side by side. Decoding is greedy: the only difference between the two is the weights.

    \b
    Example:
      thanos-export generate build/genai --prompt "The import statement" --compare default
    """
    from runtime_bench.generate import generate_text, target_kind

    for source in (target, dense) if dense else (target,):
        try:
            click.echo(f"== {source} ({target_kind(source)})", err=True)
            click.echo(prompt, nl=False)
            result = generate_text(source, prompt, max_new_tokens, lambda text: click.echo(text, nl=False), device,
                                   trust_remote_code)
        except USER_ERRORS as exc:
            click.echo()
            _fail(exc)
        click.echo()
        click.echo(f"== {result.new_tokens} new tokens in {result.seconds:.2f} s: {result.tokens_per_s:.1f} tokens/s "
                   f"({result.runtime}, prompt {result.prompt_tokens} tokens, prefill included)", err=True)


@main.command("inspect")
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@trust_option
def inspect_cmd(path, as_json, trust_remote_code):
    """Per linear layer: shape, sparsity, the n:m pattern along K, 2:4 hardware eligibility; the 8-bit step if it ran.

    PATH is a pruned model directory, a compact checkpoint directory, an .onnx file, or an export's
    folder (onnx, tensorrt or genai: its model.onnx).

    \b
    Example:
      thanos-export inspect smollm2-2of4/ --json
    """
    from exporters.onnx_graph import graph_in, onnx_weight_patterns

    try:
        graph = graph_in(path)
        if graph is not None:
            layers = onnx_weight_patterns(graph)
        else:
            from exporters.source import directory_patterns

            layers = directory_patterns(Path(path), trust_remote_code)
    except USER_ERRORS as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps([l.to_json() for l in layers], indent=1))
        return
    width = max((len(l.name) for l in layers), default=4)
    click.echo(f"{'layer':<{width}}  {'shape':>11}  {'dtype':>8}  {'sparsity':>8}  {'n:m':>5}  2:4 hardware")
    for l in layers:
        shape = f"{l.shape[0]}x{l.shape[1]}"
        click.echo(f"{l.name:<{width}}  {shape:>11}  {l.dtype:>8}  {l.sparsity:>8.3f}  {l.pattern or '-':>5}  "
                   f"{'yes' if l.hardware_2to4 else 'no'}: {l.reason}")
    eligible = sum(l.hardware_2to4 for l in layers)
    click.echo(f"{eligible} of {len(layers)} linear layers qualify for 2:4 sparse tensor cores")
    from exporters.source import saved_quantization

    quantization = saved_quantization(Path(path))
    if quantization:
        click.echo(f"8-bit: {quantization['linears']} linears quantized to {quantization['format']} (weights per output "
                   f"channel, {quantization['inputs']} input scales); the dtype above is their dequantized values', "
                   "the exports and compact checkpoints carry the 8-bit values")


@main.command("prune-and-build")
@prune_options
@quantize_options
@click.option("--target", type=click.Choice(("auto",) + TARGETS), default="auto", show_default=True,
              help="auto: TensorRT where a GPU and TensorRT exist, else ONNX.")
@click.option("--out", required=True, type=click.Path(), help="Directory: pruned/ and the export go inside.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--bench", is_flag=True, help="Append a quick latency bench (OUT/bench/report.md).")
@export_options
def prune_and_build(target, out, quiet, bench, dtype, allow_dense, no_validate, split_dense_rows, opset, with_cache,
                    trt_batch, trt_seqlen, workspace_gib, timing_cache, backend, fused_int8, **prune_opts):
    """Prune, export, verify, and write a summary: the whole path to a servable sparse model.

    \b
    Example (embedded SmolLM2-135M-Instruct):
      thanos-export prune-and-build --pattern 2:4 --target tensorrt --out build/
    \b
    With --quantize fp8|int8 the export carries the 8-bit weights and activation scales:
    onnx, genai and tensorrt as QuantizeLinear / DequantizeLinear pairs around each linear,
    safetensors as 8-bit values, torch as 8-bit cuSPARSELt linears (CUDA GPU). Per-token input
    scales (--quantize-inputs per-token) go to torch and safetensors only.
    \b
    Writes OUT/pruned/ (transformers directory + thanos_report.json), OUT/<target>/ (the export
    with export_summary.json) and OUT/build_summary.json.
    """
    from runtime_bench.build import SUMMARY_NAME, BuildJob, prune_and_build as build_api

    bars = _Bars(enabled=not quiet)
    try:
        options = build_export_options(dtype, allow_dense, no_validate, split_dense_rows, opset, with_cache,
                                       trt_batch, trt_seqlen, workspace_gib, timing_cache, backend, fused_int8)
        job = BuildJob(out=out, prune=build_job(str(Path(out) / "pruned"), **prune_opts), target=target,
                       options=options, bench=bench)
        with _stop_on_sigterm():
            build = build_api(job, bars, on_pruned=lambda report: (bars.close(), echo_prune_summary(report)),
                              on_exported=echo_export_summary)
    except USER_ERRORS as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        bars.close()
        from thanos.outputs import staging_path

        _stopped(exc, staging_path(Path(out)))
    finally:
        bars.close()
        if prune_opts.get("distributed"):
            from thanos.parallel import shutdown

            shutdown()
    if "rank" in build:
        return  # rank 0 speaks for the group
    if build.get("bench"):
        click.echo(f"bench      {build['bench']}")
    click.echo(f"summary    {Path(out) / SUMMARY_NAME}")


@main.command("bench")
@click.argument("target")
@click.option("--out", required=True, type=click.Path(), help="Directory for report.json, report.md and plots.")
@click.option("--backends", default=",".join(ALL_BACKENDS), show_default=True,
              help="What a backend lacks here (a GPU, a package) is recorded as skipped, with the reason.")
@click.option("--tokens", default=",".join(map(str, DEFAULT_TOKENS)), show_default=True, help="GEMM token counts M.")
@click.option("--shapes", default="", help="Extra GEMM shape sets, comma-separated: llama2-7b, llama2-70b, "
                                          "smollm2-135m, or a model directory or config.json (its linears' shapes; "
                                          "its weights are not read).")
@click.option("--dtypes", default="", help="GEMM dtypes, comma-separated: float16, bfloat16, float32, float8_e4m3fn "
                                          "(FP8 weights and activations, bf16 out; compute capability 8.9+), int8 "
                                          "(INT8 weights and activations, int32 out). Default: "
                                          "float16,bfloat16 on a GPU, float32 on the CPU, where half-precision matmuls "
                                          "are no serving path.")
@click.option("--grid", default="1x128,1x512,4x512", show_default=True, help="Model-level prefill batch x seq.")
@click.option("--decode-steps", type=click.IntRange(min=1), default=16, show_default=True,
              help="Model-level decode: new tokens after a prompt of the grid's first length.")
@click.option("--quantize", type=click.Choice(["fp8", "int8"]), default=None,
              help="random: targets only: make the random model 8-bit (weights rounded per channel, one static "
                   "input scale per linear), to time the 8-bit runtimes at the model level. The format's GEMM "
                   "dtype joins the default --dtypes, as it does for a directory pruned with --quantize.")
@click.option("--levels", default="gemm,model", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", is_flag=True)
@trust_option
def bench_cmd(target, out, backends, tokens, shapes, dtypes, grid, decode_steps, quantize, levels, device, quiet,
              trust_remote_code):
    """Measure latency and memory, dense versus 2:4, as report.json + report.md + PNG plots.

    TARGET is a pruned model directory, or random:smollm2-135m / random:llama2-7b /
    random:llama2-70b for a model of real shapes with random 2:4 weights (kernel speed depends on
    shapes, dtype and pattern, not on the values; with --levels gemm the model is not built, so
    70B shapes need no 140 GB). Backends a machine lacks are reported as skipped, with the reason.
    A model pruned with --quantize is timed as each runtime serves it (onnxruntime, GenAI and
    TensorRT on its 8-bit graph, torch-2:4 on cuSPARSELt's 8-bit kernels; the precision column
    says what ran), torch-dense on the same weights in floating point.

    \b
    Examples:
      thanos-export bench build/pruned --shapes llama2-7b --out bench/
      thanos-export bench random:llama2-7b --quantize fp8 --levels model --backends torch-dense,torch-2:4 --out b8/
    """
    from runtime_bench.bench import BenchSettings, run_bench

    try:
        settings = BenchSettings(
            target=target, out=out, backends=_names(backends), tokens=_ints(tokens, "--tokens"),
            shapes=_names(shapes), dtypes=_names(dtypes), grid=_grid(grid), levels=_names(levels), device=device,
            decode_steps=decode_steps, quantize=quantize,
            trust_remote_code=trust_remote_code)
        bars = _Bars(enabled=not quiet)
        try:
            with _stop_on_sigterm():  # the partial report is written
                summary = run_bench(settings, bars)
        finally:
            bars.close()
    except USER_ERRORS as exc:
        _fail(exc)
    ok = sum(r["status"] == "ok" for r in summary["results"])
    skipped = sum(r["status"] == "skipped" for r in summary["results"])
    click.echo(f"measured   {ok} figures, {skipped} skipped (reasons in report.md)")
    for c in summary["crossovers"]:
        click.echo(f"crossover  {c['backend']} {c['dtype']} {c['shape'][0]}x{c['shape'][1]}: "
                   f"{c['crossover_tokens'] if c['crossover_tokens'] is not None else 'never'} tokens, "
                   f"best {c['best_speedup']:.2f}x")
    click.echo(f"report     {Path(out) / 'report.md'}")


@main.command("plan")
@click.option("--config", "name", default="llama2-70b", show_default=True,
              help=f"Real model shapes to plan for: {', '.join(RANDOM_CONFIGS)}, or your model's directory or "
                   "config.json (its weights are not read).")
@click.option("--device", default=None, help="cuda or cpu (default: cuda where a GPU is visible).")
@click.option("--ranks", default="1,8", show_default=True, help="Rank counts to plan for, comma-separated.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=None,
              help="Calibration windows (default 128 on GPU, 32 on CPU).")
@click.option("--seqlen", type=click.IntRange(min=1), default=None, help="Tokens per window (default 2048 on GPU, 512 on CPU).")
@click.option("--pattern", default="2:4", show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="thanos", show_default=True)
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="Thanos preset to time (its mask search, refit and reconstruction included; default: default).")
@click.option("--permute-channels/--no-permute-channels", default=None,
              help="Time the channel permutations or not (default: the preset's; they need scipy).")
@click.option("--sequential/--no-sequential", default=None,
              help="Time the group-by-group solves (their partial passes count as statistics; N ranks share out "
                   "one group at a time) or the one-pass ones (default: the preset's).")
@click.option("--quantize", type=click.Choice(["fp8", "int8"]), default=None,
              help="Time the 8-bit step too, as `prune --quantize` runs it (with the default preset, group by "
                   "group); the pass that feeds the next layer is not timed.")
@click.option("--count-only", is_flag=True,
              help="Count each step's flop and peak memory per linear instead of timing: a second, no device; "
                   "a GPU's time is the flop over its throughput.")
@click.option("--tf32/--no-tf32", default=False, show_default=True,
              help="Let the mask search's and refit's fp32 products round to TF32 on a GPU (faster tensor-core "
                   "products, 10 significant bits), to see what that saves and what it costs in layer error "
                   "(reported in full fp32 either way); no effect on the CPU. Pruning itself does not use it.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Write the measurements and plan.")
@click.option("--md-out", type=click.Path(dir_okay=False), default=None, help="Write the plan as Markdown.")
def plan_cmd(name, device, ranks, calib_samples, seqlen, pattern, method, preset, permute_channels, sequential,
             quantize, count_only, tf32, json_out, md_out):
    """Time and memory plan for pruning a big model, from one decoder layer measured here.

    Builds one random-weight decoder layer of the named config (one of each kind where its layers
    differ: dense MLP or experts, linear or full attention), times the driver's own steps on it
    (moving the layer to the device, the statistics pass, each solve with its mask search and
    refit, the reconstruction, the pruned pass), and multiplies out by each kind's layer count for
    1 process with layer offloading and for N torchrun ranks.

    \b
    Examples:
      thanos-export plan --config llama2-70b --device cuda --ranks 1,8 --md-out plan.md
      thanos-export plan --config llama2-70b --count-only      # flop and memory per linear
      thanos-export plan --config ~/Qwen3-8B/config.json --preset best --count-only
    """
    from runtime_bench.plan import run_plan

    logging.getLogger("thanos").setLevel(logging.INFO)  # each solve's time as it finishes
    try:
        with _stop_on_sigterm():  # the JSON keeps the solves timed so far
            text = run_plan(name, device, _ints(ranks, "--ranks"), calib_samples, seqlen, pattern, method, preset,
                            json_out, md_out, echo=lambda m: click.echo(m, err=True),
                            permute_channels=permute_channels, sequential=sequential, count_only=count_only,
                            quantize=quantize, tf32=tf32)
    except USER_ERRORS as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        _bench_stopped(exc, json_out)
    click.echo(text)


@main.command("bench-solvers")
@click.option("--shapes", default=",".join(SOLVER_SHAPES), show_default=True,
              help="Layer shapes ROWSxCOLS, comma-separated.")
@click.option("--methods", default=",".join(SOLVER_METHODS), show_default=True,
              help="Comma-separated: thanos, sparsegpt, wanda, magnitude (once per block size); thanos:PRESET (the "
                   f"preset's per-linear steps: {', '.join(PRESETS)}); thanos:PRESET+fp8 or +int8 (the same, then "
                   "the 8-bit step); sparsegpt:reference (SparseGPT by its "
                   "authors' route, the yardstick for time).")
@click.option("--patterns", default="2:4,4:8,unstructured", show_default=True)
@click.option("--block-sizes", default="64,128,512", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (the GPU where there is one), cpu or cuda.")
@click.option("--per-block/--no-per-block", default=True, show_default=True,
              help="Also time the paper's per-block re-inversion of the trailing Hessian (slow), the reference the "
                   "one-Cholesky route is checked against.")
@click.option("--per-block-up-to", type=click.IntRange(min=1), default=None,
              help="Widest layer (columns) to run the per-block reference on (default 4096 on a CPU, 16384 on a GPU).")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Time each solve this many times and keep the fastest (timings on a shared machine vary).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None,
              help="Write the machine and the records, after every record (a stopped run keeps them).")
def bench_solvers_cmd(shapes, methods, patterns, block_sizes, device, per_block, per_block_up_to, repeat, json_out):
    """Time one layer's pruning per method and print seconds and reconstruction error.

    Random layers of real shapes whose calibration activations have a few high-variance channels,
    as real LLM activations do; every row of one run sees the same layer.

    \b
    Examples:
      thanos-export bench-solvers --shapes 4096x4096 --patterns 2:4 --block-sizes 128
      thanos-export bench-solvers --shapes 4096x4096,4096x11008 --patterns 2:4 --no-per-block \\
          --methods sparsegpt:reference,thanos:fast,thanos:default --json-out solver.json
    """
    from runtime_bench.solver import bench

    try:
        with _stop_on_sigterm():
            bench(_names(shapes), _names(methods), _names(patterns), list(_ints(block_sizes, "--block-sizes")),
                  device, per_block=per_block, per_block_max_columns=per_block_up_to, repeat=repeat,
                  json_out=json_out, echo=click.echo)
    except USER_ERRORS as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        _bench_stopped(exc, json_out)


@main.command("bench-quality")
@click.option("--model", default=None, help="Model directory or .gguf (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--methods", default=",".join(QUALITY_METHODS), show_default=True,
              help="Comma-separated: magnitude, wanda, sparsegpt, modelopt-sparsegpt, thanos:PRESET, each optionally "
                   "/sequential or /one-pass (the solve order; default: the preset's), then +fp8 / +int8 (8-bit, "
                   "compensated rounding), +fp8-nearest (round-to-nearest) and @ALPHA (the smoothing strength, or "
                   "@auto); dense+fp8 / dense+int8 quantize the unpruned model. "
                   "The dense model is in every table.")
@click.option("--patterns", default="2:4,4:8,unstructured", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="Calibration seeds; each draws other windows.")
@click.option("--samples", type=click.IntRange(min=1), default=32, show_default=True, help="Calibration windows.")
@click.option("--seqlen", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per window.")
@click.option("--other-windows", type=click.IntRange(min=0), default=16, show_default=True,
              help="Windows of the other-kind text (0: all).")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", default=None, help="Write NAME.json, NAME.md and NAME.png (NAME without a suffix).")
@click.option("--carry", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="An earlier NAME.json (repeatable): its runs (pattern, method, seed) not made now join the table, "
                   "on the patterns run now (same model, calibration and texts required; only for methods whose "
                   "code has not changed since).")
@click.option("--join", "join", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Measure nothing: join these runs' NAME.json files (repeatable; same model, calibration and texts; "
                   "the first one's runs win) into one table, written with --out.")
def bench_quality_cmd(model, methods, patterns, seeds, samples, seqlen, other_windows, device, out, carry, join):
    """Whole-model quality: held-out perplexity and pruning time of each method, over calibration seeds.

    Every method sees the same calibration windows for a seed; the table gives the mean and the
    spread over seeds, on the held-out 10% of the calibration text and on a text of another kind
    (IDLE's change log, shipped with CPython).

    \b
    Examples:
      thanos-export bench-quality --patterns 2:4 --methods sparsegpt,thanos:default --seeds 0
      thanos-export bench-quality --patterns 2:4 --methods thanos:default+fp8,dense+fp8 --out fp8
    """
    from runtime_bench.perplexity import Comparison, join_tables, run_table

    try:
        if join:
            join_tables(list(join), out, echo=click.echo)
            return
        settings = Comparison(model=model, methods=_names(methods), patterns=_names(patterns),
                              seeds=_ints(seeds, "--seeds"), samples=samples, seqlen=seqlen,
                              other_windows=other_windows or None, device=device)
        with _stop_on_sigterm():
            run_table(settings, carry, out, echo=click.echo)
    except USER_ERRORS as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:  # each run's row is written as it is measured
        kept = Path(out).with_suffix(".json") if out else None
        _bench_stopped(exc, f"{kept} (and .md)" if kept and kept.exists() else None)


def _names(text: str) -> tuple[str, ...]:
    return tuple(n for n in text.split(",") if n)


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in _names(text))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=option) from None


def _grid(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        return tuple(tuple(int(v) for v in g.split("x")) for g in _names(text))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of BATCHxLENGTH (1x128,4x512)",
                                 param_hint="--grid") from None


def _bench_stopped(exc: KeyboardInterrupt, json_out) -> None:
    """Say what a stopped benchmark kept, and exit as the signal asked."""
    _exit_stopped(exc, f"the figures measured so far are in {json_out}" if json_out else "nothing was written")


if __name__ == "__main__":
    main()
