"""Reading what an exporter starts from: the pruned model, its report, and its linear weights."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from exporters.base import ExportError
from exporters.patterns import LayerPattern, analyse
from thanos.errors import InputError
from thanos.linears import stores_transposed, weight_view
from thanos.experts import UnfusedExperts, expert_weights, input_tensor, unfuse_experts_
from thanos.model_config import auto_class, saved_config
from thanos.models import LayerSelection, load_model, prunable_linears
from thanos.quantized_model import QUANTIZATION_FILE, cast_model_, quantized_linears

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_report(model_dir: Path) -> Optional[dict]:
    path = Path(model_dir) / "thanos_report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def saved_dtype(model_dir: Path) -> Optional[str]:
    """The dtype a model directory's config declares for its weights ("float32", ...), if any."""
    data = saved_config(model_dir) or {}
    value = data.get("dtype") or data.get("torch_dtype")
    return str(value).replace("torch.", "") if value else None


def saved_quantization(model_dir: Path) -> Optional[dict]:
    """The 8-bit step's record in a pruned or compact directory's report, if it ran (None for a damaged
    report too: what reads the weights refuses it, or does without)."""
    try:
        report = read_report(model_dir) if Path(model_dir).is_dir() else None
    except ValueError:
        return None
    return (report or {}).get("quantization")


def saved_format(model_dir: Path) -> Optional[str]:
    """The 8-bit format ("fp8", "int8") a pruned or compact directory's report records, if any."""
    return (saved_quantization(model_dir) or {}).get("format")


def linear_weights(model) -> dict[str, torch.Tensor]:
    """{module name: (out, in) weight} for every linear inside the decoder layers."""
    return {name: weight_view(mod) for layer in prunable_linears(model, LayerSelection()).values()
            for name, mod in layer.items()}


def model_patterns(model) -> list[LayerPattern]:
    return [analyse(name, w) for name, w in linear_weights(model).items()]


def directory_patterns(model_dir: Path, trust_remote_code: bool = False) -> list[LayerPattern]:
    """Analyse a model directory's linears one tensor at a time, without loading the model.

    The model is built on the meta device (no memory) only to learn which tensors are decoder
    linears and which are stored transposed (GPT-2's Conv1D); the weights are then read lazily
    from the safetensors files, so a 70B checkpoint needs one tensor's memory, not the model's.
    Directories without safetensors (and compact or GGUF models) are loaded whole.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    from thanos.compact import is_compact_dir

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if not files or is_compact_dir(model_dir):
        return model_patterns(load_pruned(model_dir, trust_remote_code=trust_remote_code)[0])
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            skeleton = auto_class(config).from_config(config, trust_remote_code=trust_remote_code)
            unfuse_experts_(skeleton)  # each expert's linears, found below under their files' names
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise InputError(f"{model_dir} needs its own Python code to load (auto_map in config.json), which runs only "
                         "when allowed: read that code, then pass --trust-remote-code") from exc
    wanted = {f"{name}.weight": stores_transposed(mod)
              for layer in prunable_linears(skeleton, LayerSelection()).values() for name, mod in layer.items()}
    stored = {}  # tensor name in the files -> file
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                stored.update({key: file for key in f.keys()})
        except Exception as exc:  # safetensors' own error class for a truncated or foreign file
            raise InputError(f"{file} cannot be read ({type(exc).__name__}: {exc}); it may be truncated: copy or "
                             "export the model again") from exc
    names = _StoredNames(stored)
    fused = _fused_expert_tensors(skeleton, wanted, names)
    in_fused = {key for _, _, keys in fused.values() for key in keys}
    separate = _stored_names([key for key in wanted if key not in in_fused], names)
    if separate is None:  # names this reading cannot match: load the model as transformers maps them
        return model_patterns(load_pruned(model_dir, trust_remote_code=trust_remote_code)[0])
    found = {}
    for file in files:  # each file opened once, one tensor in memory at a time (a layer's experts' fused one)
        with safe_open(str(file), "pt") as f:
            for key, name in separate.items():
                if stored[name] == file:
                    tensor = f.get_tensor(name)
                    found[key] = analyse(key[: -len(".weight")], tensor.T if wanted[key] else tensor)
            for name, (module, tensor, keys) in fused.items():
                if stored[name] == file:
                    held = f.get_tensor(name)
                    for key, e in keys.items():
                        weight = expert_weights(module, tensor, held, e)[key.rsplit(".", 2)[-2]]
                        found[key] = analyse(key[: -len(".weight")], weight)
    return [found[key] for key in wanted]


# Mixtral's and Phi-3.5-MoE's files name each expert's projections w1 (gate), w3 (up), w2 (down)
_EXPERT_ALIASES = tuple((re.compile(rf"\.mlp\.experts\.(\d+)\.{projection}\.weight$"),
                         rf".block_sparse_moe.experts.\1.{stored}.weight")
                        for projection, stored in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")))


class _StoredNames:
    """Finds a module's tensor among the names the files store, exactly or, for vision-language
    checkpoints (Gemma 3 from 4B up, whose files say "language_model.model.layers.0...." for
    "model.language_model.layers.0...."; transformers maps them when it loads), by the name from
    the decoder layers on, where that is unique."""

    def __init__(self, stored: dict):
        self.stored = stored
        self.by_tail: dict[str, list[str]] = {}
        for name in stored:
            self.by_tail.setdefault(self._tail(name), []).append(name)

    @staticmethod
    def _tail(name: str) -> str:
        return name[name.index(".layers.") + 1:] if ".layers." in name else name

    def find(self, name: str) -> Optional[str]:
        matches = [name] if name in self.stored else self.by_tail.get(self._tail(name), [])
        return matches[0] if len(matches) == 1 else None


def _stored_names(wanted: list[str], names: _StoredNames) -> Optional[dict[str, str]]:
    """{module's tensor name: the name the files store it under}, or None where one is not found.
    Experts' linears stored one by one are matched under their files' names too (Mixtral's w1/w3/w2)."""
    found = {}
    for key in wanted:
        for candidate in [key, *(pattern.sub(alias, key) for pattern, alias in _EXPERT_ALIASES)]:
            match = names.find(candidate)
            if match is not None:
                found[key] = match
                break
        else:
            return None
    return found


# GraniteMoE's files hold its fused experts as input_linear (gate and up) and output_linear (down)
_FUSED_ALIASES = dict(gate_up_proj="input_linear.weight", down_proj="output_linear.weight")


def _fused_expert_tensors(skeleton, wanted: dict, names: _StoredNames) -> dict[str, tuple]:
    """{a fused experts tensor's name in the files: (its module, "gate_up_proj", "up_proj" or "down_proj",
    {wanted key: expert})} for the experts' linears the files do not hold one by one (GPT-OSS, GraniteMoE,
    Nemotron-H: 3-D tensors, read once per layer and projection)."""
    reads = {}
    for name, module in skeleton.named_modules():
        if not isinstance(module, UnfusedExperts):
            continue
        for tensor in (input_tensor(module.fused), "down_proj"):
            projections = ("gate_proj", "up_proj") if tensor == "gate_up_proj" else (tensor,)
            keys = {f"{name}.{e}.{projection}.weight": e for e in range(len(module)) for projection in projections}
            keys = {key: e for key, e in keys.items() if key in wanted and _stored_names([key], names) is None}
            alias = _FUSED_ALIASES.get(tensor)
            held = names.find(f"{name}.{tensor}") or (alias and names.find(f"{name.rsplit('.', 1)[0]}.{alias}"))
            if keys and held is not None:
                reads[held] = (module.fused, tensor, keys)
    return reads


def load_pruned(model_dir: Path, dtype: Optional[str] = None, split_dense_rows: bool = False,
                trust_remote_code: bool = False, source: Optional[tuple] = None):
    """(model, tokenizer, report) from a pruned or compact directory, optionally cast.

    `source`: the (model, tokenizer, report) the directory was saved from, still in memory, used
    instead of reading it back (the model is then cast and split in place: it passes to the export).
    `split_dense_rows` turns each linear with dense outlier rows (alpha > 0) into a 2:4 part and
    a dense part (exporters.row_split); the report then lists them under "split_rows". A model
    quantized to 8 bits comes with its scales attached (`thanos.quantized_model`).
    """
    if split_dense_rows and holds_8bit(model_dir, source):  # before the load
        raise InputError(f"{model_dir} holds 8-bit linears, and --split-dense-rows would replace them with "
                         "unquantized ones: prune with --alpha 0 for an 8-bit model, or drop --quantize")
    if source is not None:
        model, tokenizer, report = source
        report = json.loads(json.dumps(report, default=str))  # as the directory's thanos_report.json reads
    else:
        model, tokenizer = load_model(str(model_dir), trust_remote_code=trust_remote_code)
        report = read_report(model_dir)
    if dtype:
        check_range(model, DTYPES[dtype])
        cast_model_(model, DTYPES[dtype])  # 8-bit linears dequantized anew in the export's dtype
    if split_dense_rows:
        from exporters.row_split import split_dense_rows_

        report = dict(report or {}, split_rows=split_dense_rows_(model))
    return model, tokenizer, report


def check_range(model, dtype: torch.dtype) -> None:
    """Refuse a cast to `dtype` that would turn a weight into infinity (a float16 export of weights past
    65504): the export would compute something else, or nothing finite."""
    largest = torch.finfo(dtype).max
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and torch.finfo(tensor.dtype).max > largest:
            peak = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
            if peak > largest:
                raise ExportError(f"{name} holds {peak:.4g}, past {str(dtype)[6:]}'s largest value ({largest:.6g}): "
                                  "the cast would make it infinite; export with --dtype bfloat16 where the target "
                                  "has it, else float32")


def holds_8bit(model_dir: Path, source: Optional[tuple] = None) -> bool:
    """Whether the pruned model (in memory as `source`, or in `model_dir`) was quantized to 8 bits,
    without loading it."""
    from thanos.compact import compact_is_8bit, is_compact_dir

    if source is not None:
        return bool(quantized_linears(source[0]))
    model_dir = Path(model_dir)
    return (model_dir / QUANTIZATION_FILE).is_file() or (is_compact_dir(model_dir) and compact_is_8bit(model_dir))


def prompts(tokenizer, count: int = 2, length: int = 24) -> torch.Tensor:
    """Real text to check an export on: windows of the held-out default text, (count, length)."""
    from thanos.calibration import tokenize_split

    held_out = tokenize_split(tokenizer, None).evaluation
    return torch.stack([held_out[i * length : (i + 1) * length] for i in range(count)])
