"""Whole-model comparison: held-out perplexity and pruning time of every method and preset.

Every method sees the same calibration windows for a given seed; each (pattern, method) pair runs
once per seed, so the table shows the mean and the spread over seeds. Perplexity is measured on
two texts: the held-out 10% of the calibration text (same kind), and a text of another kind
(IDLE's change log, `idlelib/NEWS.txt`, shipped with CPython), which is what a user's prompts
look like to a model calibrated on documentation.

    thanos-export bench-quality                      # embedded SmolLM2-135M-Instruct
    thanos-export bench-quality --patterns 2:4 --methods thanos:default,sparsegpt --seeds 0
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch

from exporters.patterns import nonzeros_per_group
from exporters.source import linear_weights
from thanos import PruneConfig
from thanos.calibration import sample_windows, tokenize_split
from thanos.config import PRESETS, Pattern
from thanos.driver import prune_model_
from thanos.evaluate import perplexity
from thanos.models import describe_source, load_model
from thanos.devices import device_description, resolve_device
from thanos.errors import InputError
from thanos.outputs import atomic_write_text
from thanos.pipeline import versions
from thanos.quantized_model import simulate_activations_

log = logging.getLogger(__name__)

# method names: "dense", "magnitude", "wanda", "sparsegpt", "modelopt-sparsegpt", "thanos:<preset>"
DEFAULT_METHODS = ("magnitude", "wanda", "sparsegpt", "modelopt-sparsegpt",
                   *(f"thanos:{name}" for name in PRESETS))
SEED_FREE = {"magnitude"}  # needs no calibration data: one run stands for every seed
# NVIDIA ModelOpt's quantization configs a TensorRT user would reach for: FP8 (per-tensor weights and
# inputs, max calibration) and INT8 with SmoothQuant (per-channel weights, per-tensor inputs).
MODELOPT_QUANTIZATION = {"modelopt-fp8": "FP8_DEFAULT_CFG", "modelopt-int8": "INT8_SMOOTHQUANT_CFG"}


def other_kind_text() -> Optional[Path]:
    """IDLE's change log from the running CPython: English prose about code, unlike pydoc topics."""
    import importlib.util

    spec = importlib.util.find_spec("idlelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "NEWS.txt"
    return path if path.is_file() else None


@dataclasses.dataclass(frozen=True)
class Comparison:
    model: Optional[str] = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    patterns: tuple[str, ...] = ("2:4", "4:8", "unstructured")
    seeds: tuple[int, ...] = (0, 1, 2)
    samples: int = 32
    seqlen: int = 512
    other_windows: Optional[int] = 16  # windows of the other-kind text (None: all)
    device: str = "auto"


# "/sequential" after a method's name solves each decoder layer's linears group by group, "/one-pass" on
# the dense layer's one pass (thanos.recipe.Solve); without either, the preset's (the method's) choice.
SOLVE_ORDERS = {"sequential": True, "one-pass": False}
PER_TOKEN = "per-token"  # the method-name suffix for per-token input scales


def method_config(method: str, pattern: str) -> PruneConfig:
    """A method name as the table writes it: "sparsegpt", "thanos:<preset>", each optionally followed by
    "/sequential" or "/one-pass" (`SOLVE_ORDERS`), then "+fp8" or "+int8" (8-bit, compensated rounding),
    "+fp8-nearest" (round-to-nearest), "-per-token" after either (per-token input scales, e.g.
    "+fp8-per-token", "+fp8-nearest-per-token"), and "@ALPHA" (the smoothing strength, or "@auto"; the format's
    default without); "dense+fp8" quantizes the unpruned model (nothing removed), the reference an
    8-bit user compares against. "+modelopt-fp8" / "+modelopt-int8": the pruned model quantized by
    NVIDIA ModelOpt instead (the config returned is the pruning's; `_modelopt_quantize_` adds the rest)."""
    base, _, quant = method.partition("+")
    base, _, order = base.partition("/")
    if order and order not in SOLVE_ORDERS:
        raise InputError(f"unknown solve order {order!r} in {method!r}; choose one of {', '.join(SOLVE_ORDERS)}")
    options = {} if not order else dict(sequential=SOLVE_ORDERS[order])
    if quant.startswith("modelopt-"):
        if quant not in MODELOPT_QUANTIZATION:
            raise InputError(f"unknown ModelOpt quantization {quant!r}; choose one of {', '.join(MODELOPT_QUANTIZATION)}")
        quant = ""
    if quant:
        quant, _, alpha = quant.partition("@")
        fmt, _, rounding = quant.partition("-")
        inputs = None
        if rounding == PER_TOKEN or rounding.endswith("-" + PER_TOKEN):
            inputs, rounding = PER_TOKEN, rounding[:-len(PER_TOKEN)].rstrip("-")
        options.update(quantize=fmt, quantize_rounding=rounding or None, quantize_inputs=inputs,
                        quantize_smoothing=(alpha if alpha == "auto" else float(alpha)) if alpha else None)
    if base == "dense":
        if order:
            raise InputError(f"{method!r}: the dense model solves nothing, so it has no solve order")
        if not quant:
            raise InputError("'dense' is measured in every table; name an 8-bit variant such as 'dense+fp8'")
        return PruneConfig("magnitude", "unstructured", 0.0, **options)
    sparsity = 0.5 if pattern == "unstructured" else None
    if base.startswith("thanos:"):
        return PruneConfig("thanos", pattern, sparsity, preset=base.split(":", 1)[1], **options)
    return PruneConfig(base, pattern, sparsity, **options)


def _is_dense(method: str) -> bool:
    return method.partition("+")[0] == "dense"


def compare(settings: Comparison, echo: Callable[[str], None] = print,
            measured: Optional[Callable[[dict], None]] = None) -> dict:
    """Prune a fresh copy of the model per (pattern, method, seed); returns settings and one row per run.

    `measured(result so far)` after each run: a table of hours keeps its runs when stopped.
    """
    for pattern in settings.patterns:  # a misspelt method is refused before the model loads
        for method in settings.methods:
            method_config(method, pattern)
    dev = resolve_device(settings.device)
    base, tokenizer = load_model(settings.model)
    text = tokenize_split(tokenizer, None)
    other_path = other_kind_text()
    other = None
    if other_path is not None:
        other = torch.tensor(tokenizer(other_path.read_text(encoding="utf-8"))["input_ids"], dtype=torch.long)
    info = dict(model=describe_source(settings.model), settings=dataclasses.asdict(settings),
                calibration=f"{settings.samples} x {settings.seqlen} tokens of {text.source}",
                held_out=dict(text=f"{text.source} (last 10%)", tokens=text.evaluation.numel()),
                other_text=dict(text=str(other_path), tokens=other.numel(), windows=settings.other_windows)
                if other is not None else "skipped: idlelib is not installed with this Python",
                device=device_description(dev), versions=versions())
    echo(json.dumps(info))

    def measure(model) -> dict:
        model.to(dev)
        try:
            values = dict(held_out=perplexity(model, text.evaluation, settings.seqlen, dev))
            if other is not None:
                values["other"] = perplexity(model, other, settings.seqlen, dev, settings.other_windows)
        finally:
            model.to("cpu")
        return values

    rows: list[dict] = []

    def add(row: dict, line: str) -> None:
        rows.append(row)
        if measured:
            measured(dict(settings=info, results=list(rows), summary=summarise(rows)))
        echo(line)

    dense = dict(method="dense", pattern="-", seed=None, seconds=0.0, **measure(base))
    add(dense, _row_line(dense))
    for pattern in settings.patterns:
        for method in settings.methods:
            for seed in (settings.seeds[:1] if method in SEED_FREE else settings.seeds):
                row = dict(method=method, pattern="-" if _is_dense(method) else pattern, seed=seed)
                try:
                    model, seconds, config = _prune(base, method, pattern, text.calibration, settings, seed, dev)
                except _Skipped as exc:
                    row.update(status="skipped", reason=str(exc))
                    add(row, f"| {method} | {pattern} | skipped: {exc} |")
                    break
                row.update(status="ok", seconds=seconds, config=config, **measure(model))
                if not _is_dense(method):
                    row["pattern_violations"] = pattern_violations(model, pattern)
                add(row, _row_line(row))
                del model
    return dict(settings=info, results=rows, summary=summarise(rows))


class _Skipped(Exception):
    pass


def _prune(base, method, pattern, calibration, settings: Comparison, seed: int, dev):
    samples = sample_windows(calibration, settings.samples, settings.seqlen, seed)
    model = copy.deepcopy(base)
    start = time.perf_counter()
    if method == "modelopt-sparsegpt":
        config = _modelopt_sparsegpt_(model, samples, pattern, dev)
    else:
        prune_config = method_config(method, pattern)
        prune_model_(model, samples, prune_config, dev)
        simulate_activations_(model)  # a quantized model is measured as the 8-bit runtime computes
        config = prune_config.to_json()
        quant = method.partition("+")[2]
        if quant in MODELOPT_QUANTIZATION:
            config = dict(config, modelopt_quantization=_modelopt_quantize_(model, samples, quant, dev))
    return model, time.perf_counter() - start, config


def _modelopt_quantize_(model, samples, quant: str, dev) -> dict:
    """NVIDIA ModelOpt's 8-bit quantization of the pruned model (fake-quantized, as it measures it),
    calibrated on the same samples (optional dependency)."""
    try:
        import modelopt
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise _Skipped(f"nvidia-modelopt is not installed ({exc}); `pip install nvidia-modelopt` adds it") from exc
    name = MODELOPT_QUANTIZATION[quant]
    model.to(dev)

    def calibrate(m):
        with torch.no_grad():
            for s in samples:
                m(s[None].to(dev), use_cache=False)

    try:
        mtq.quantize(model, getattr(mtq, name), calibrate)
    except Exception as exc:  # a failure inside a third-party tool is reported, not fatal
        raise _Skipped(f"ModelOpt's {name} failed here: {type(exc).__name__}: {exc}") from exc
    finally:
        model.to("cpu")
    return dict(config=name, modelopt=modelopt.__version__)


def _modelopt_sparsegpt_(model, samples, pattern: str, dev) -> dict:
    """NVIDIA ModelOpt's SparseGPT, as a TensorRT user would run it (optional dependency)."""
    try:
        import modelopt.torch.sparsity as mts
    except ImportError as exc:
        raise _Skipped(f"nvidia-modelopt is not installed ({exc}); `pip install nvidia-modelopt` adds it") from exc
    if pattern != "2:4":
        raise _Skipped(f"ModelOpt's SparseGPT prunes to 2:4 only, not {pattern}")
    model.to(dev)
    loader = [dict(input_ids=s[None].to(dev)) for s in samples]
    try:
        mts.sparsify(model, "sparsegpt", config={"data_loader": loader, "collect_func": lambda batch: batch})
        mts.export(model)
    except Exception as exc:  # a failure inside a third-party tool is reported, not fatal
        raise _Skipped(f"ModelOpt's SparseGPT failed here: {type(exc).__name__}: {exc}") from exc
    finally:
        model.to("cpu")
    import modelopt

    return dict(method="modelopt-sparsegpt", pattern=pattern, modelopt=modelopt.__version__)


def check_carry(settings: dict, earlier: dict, source: str) -> None:
    """Raise InputError unless `earlier` was measured on the same model, calibration and texts.

    `settings` may be partial (only the model is known before a run): what it lacks is not compared.
    The model is compared by file or folder name, as reports before the embedded model was named
    by its package gave this machine's path to it.
    """
    mismatched = [key for key in ("model", "calibration", "held_out", "other_text")
                  if key in settings and _comparable(key, settings[key]) != _comparable(key, earlier["settings"].get(key))]
    if mismatched:
        raise InputError(f"{source} was measured with another {', '.join(mismatched)}; it cannot share a table "
                         f"with this run{_python_hint(settings, earlier['settings'])}")


def _python_hint(settings: dict, earlier: dict) -> str:
    """Why texts differ where the Pythons do: the default texts are each Python's own documentation."""
    mine, theirs = (".".join(str(s.get("versions", {}).get("python", "")).split(".")[:2]) for s in (settings, earlier))
    if not mine or not theirs or mine == theirs:
        return ""
    return f" (Python {theirs} against {mine}: the default texts are each Python's own documentation)"


def _comparable(key: str, value):
    return Path(value).name if key == "model" and isinstance(value, str) else value


def carry_rows(result: dict, earlier: dict, source: str, every_pattern: bool = False) -> dict:
    """`result` with the runs of `earlier` it did not make itself, on the patterns it ran (or all).

    A run is a (pattern, method, seed): an earlier run of the same triple is replaced by this one's,
    the others stand beside it, so later seeds can be added to an earlier table, or methods whose
    code did not change carried unmeasured; `every_pattern` joins tables of other patterns into
    one. Refused unless both were measured on the same model, calibration and texts. Carried rows
    name `source`.
    """
    check_carry(result["settings"], earlier, source)
    ran = {_run_key(r) for r in result["results"]}
    patterns = {r["pattern"] for r in result["results"]}
    # each run keeps the device it ran on: the table's header names only the first file's
    own = [dict(r, device=r.get("device", result["settings"].get("device"))) for r in result["results"]]
    carried = [dict(r, carried_from=r.get("carried_from", source),
                    device=r.get("device", earlier["settings"].get("device")))
               for r in earlier["results"] if (every_pattern or r["pattern"] in patterns) and _run_key(r) not in ran]
    rows = own + carried
    return dict(result, results=rows, summary=summarise(rows))


def _run_key(row: dict) -> tuple:
    return row["pattern"], row["method"], row.get("seed")


def pattern_violations(model, pattern: str) -> int:
    """Groups of m inputs holding more than m - n non-zeros, over every prunable linear (0: exact n:m)."""
    parsed = Pattern.parse(pattern)
    if not parsed.is_nm:
        return 0
    return sum(int((nonzeros_per_group(w, parsed.m) > parsed.m - parsed.n).sum()) for w in linear_weights(model).values())


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread (sample standard deviation) over seeds, per (pattern, method)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row.get("status", "ok") == "ok":
            groups.setdefault((row["pattern"], row["method"]), []).append(row)
    out = []
    for (pattern, method), runs in groups.items():
        entry = dict(pattern=pattern, method=method, runs=len(runs),
                     seconds=statistics.fmean(r["seconds"] for r in runs))
        for key in ("held_out", "other"):
            values = [r[key] for r in runs if key in r]
            if values:
                entry[key] = statistics.fmean(values)
                entry[f"{key}_spread"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def markdown(result: dict) -> str:
    s = result["settings"]
    other = s["other_text"]
    lines = [f"Model {s['model']}, calibration {s['calibration']}, {s['device']}, torch "
             f"{s['versions']['torch']}, transformers {s['versions']['transformers']}.",
             f"Held-out: {s['held_out']['text']}, {s['held_out']['tokens']} tokens. Other kind: "
             + (f"{Path(other['text']).name}, {other['windows'] or 'all'} windows." if isinstance(other, dict) else other),
             "Perplexity: mean ± sample standard deviation over the calibration seeds (runs); seconds: whole-model "
             "pruning wall time, calibration passes included.", "",
             *(["Stopped before the end: the runs measured so far (`--carry` this NAME.json into a run of the rest "
                "to complete the table).", ""] if result.get("complete") is False else []),
             "| pattern | method | runs | held-out perplexity | other-kind perplexity | prune seconds |",
             "|---|---|---|---|---|---|"]
    for e in result["summary"]:
        cells = []
        for key in ("held_out", "other"):
            cells.append(f"{e[key]:.2f} ± {e[key + '_spread']:.2f}" if key in e else "-")
        lines.append(f"| {e['pattern']} | {e['method']} | {e['runs']} | {cells[0]} | {cells[1]} | {e['seconds']:.0f} |")
    for row in result["results"]:
        if row.get("status") == "skipped":
            lines.append(f"| {row['pattern']} | {row['method']} | 0 | skipped: {row['reason']} | | |")
    carried = Counter(row["carried_from"] for row in result["results"] if row.get("carried_from"))
    if carried:
        lines += ["", "Runs carried from earlier files (same model, calibration and texts): "
                  + ", ".join(f"{count} from {source}" for source, count in sorted(carried.items())) + "."]
    devices = Counter(row["device"] for row in result["results"] if row.get("device"))
    if len(devices) > 1:  # the mask search turns a machine's round-off into other masks
        lines += ["", "Runs from more than one machine (compare rows measured on one): "
                  + ", ".join(f"{count} on {device}" for device, count in sorted(devices.items())) + "."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Optional[Path]:
    """Perplexity (other-kind text, else held-out) against pruning time: one panel per pattern."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summary = [e for e in result["summary"] if e["pattern"] != "-" and e["method"] != "magnitude"]
    patterns = sorted({e["pattern"] for e in summary})
    if not patterns:
        return None
    key = "other" if all("other" in e for e in summary) else "held_out"
    fig, axes = plt.subplots(1, len(patterns), figsize=(5 * len(patterns), 4.2), squeeze=False)
    for ax, pattern in zip(axes[0], patterns):
        for e in (e for e in summary if e["pattern"] == pattern):
            ax.errorbar(e["seconds"], e[key], yerr=e[f"{key}_spread"], marker="o", capsize=3, label=e["method"])
            ax.annotate(e["method"], (e["seconds"], e[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(f"{pattern}")
        ax.set_xlabel("whole-model pruning seconds")
        ax.set_ylabel(f"perplexity ({'other-kind' if key == 'other' else 'held-out'} text)")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _row_line(row: dict) -> str:
    other = f"{row['other']:.2f}" if "other" in row else "-"
    seed = "-" if row.get("seed") is None else row["seed"]
    return (f"| {row['method']} | {row['pattern']} | seed {seed} | held-out {row['held_out']:.2f} | "
            f"other {other} | {row['seconds']:.1f} s |")


def run_table(settings: Comparison, carry: tuple[str, ...] = (), out: Optional[str] = None, echo=print) -> dict:
    """`compare`, then join the runs of the earlier tables in `carry` (NAME.json files) that this run did
    not make, print the table and, with `out`, write NAME.json, NAME.md and NAME.png."""
    earlier = {source: json.loads(Path(source).read_text()) for source in carry}
    for source, rows in earlier.items():  # checked before any work, as far as the settings are known
        check_carry(dict(model=describe_source(settings.model)), rows, source)
    result = compare(settings, echo=echo, measured=(lambda so_far: _write(dict(so_far, complete=False), out))
                     if out else None)
    for source, rows in earlier.items():
        try:
            result = carry_rows(result, rows, source)
        except ValueError as exc:  # keep this run's rows: write them without the earlier ones
            echo(f"not carried: {exc}")
    result = dict(result, complete=True)
    echo(markdown(result))
    _write(result, out, plots=True)
    return result


def join_tables(sources: list[str], out: Optional[str] = None, echo=print) -> dict:
    """Measure nothing: join earlier runs' NAME.json files (same model, calibration and texts; the
    first one's runs win) into one table, printed and, with `out`, written."""
    result = json.loads(Path(sources[0]).read_text())
    for source in sources[1:]:
        result = carry_rows(result, json.loads(Path(source).read_text()), source, every_pattern=True)
    echo(markdown(result))
    _write(result, out, plots=True)
    return result


def _write(result: dict, out: Optional[str], plots: bool = False) -> None:
    """With `out`, write NAME.json and NAME.md (each replaced whole) and, with `plots`, NAME.png."""
    if out:
        stem = Path(out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stem.with_suffix(".json"), json.dumps(result, indent=1, default=str))
        atomic_write_text(stem.with_suffix(".md"), markdown(result))
        if plots:
            plot(result, stem.with_suffix(".png"))
