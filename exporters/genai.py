"""`--target genai`: a folder that ONNX Runtime GenAI loads and generates text from.

ONNX Runtime GenAI (`onnxruntime-genai`; `onnxruntime-genai-cuda` on NVIDIA GPUs) is the ONNX
serving runtime for LLMs: it runs a KV-cache decoder graph with its own cache management, search
and batching. Its folder holds:

* `model.onnx` (+ `model.onnx.data` past 2 GB): the KV-cache graph of `onnx_cache`, with the
  cache tensors named as GenAI's configs name them (`past_key_values.<i>.key` in,
  `present.<i>.key` out); the pruned linears stay n:m in its initializers;
* `genai_config.json`: the architecture, the special tokens and the search defaults, filled from
  the model's config and generation config;
* the tokenizer files (`tokenizer.json`, `tokenizer_config.json`), which GenAI reads itself.

The export ends by loading the folder in `onnxruntime_genai` and greedy-generating from real
prompts: the tokens must equal transformers' on the pruned model (float32), or agree at least
over the first `FP16_AGREEING` tokens (float16, where rounding may flip a near tie later on).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from exporters.base import (ONNX_DTYPES, BackendMissingError, ExportError, ExportFormat, ExportOptions, register,
                            release)
from exporters.onnx_cache import GENAI_NAMES, write_onnx_with_cache
from exporters.onnx_export import validation_prompts
from exporters.onnx_graph import TWO_GIB, cached_decoding_note, check_patterns_kept, prefill_feed, require_onnx
from exporters.onnx_qdq import fused_int8_is_exact, session_entries, validate_qdq
from exporters.source import load_pruned, model_patterns, saved_format
from thanos.errors import InputError
from thanos.models import context_length
from thanos.quantized_model import model_format, quantized_linears

log = logging.getLogger(__name__)

CONFIG_FILE = "genai_config.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
NEW_TOKENS = 32  # per verification prompt
FP16_AGREEING = 8  # float16 exports must match transformers' greedy tokens at least this far
PROMPT_LENGTHS = (16, 64, 384)  # tokens of held-out text; the last is cut to what the context allows


def require_genai():
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        raise BackendMissingError(f"the genai target needs onnxruntime-genai ({exc}); pip install "
                                  "'thanos-export[genai]' (or onnxruntime-genai-cuda on an NVIDIA GPU)") from exc


def is_genai_folder(path: "str | Path") -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


# GenAI's names for decoder-only families whose folders the tests serve (tests/exporters/test_genai.py);
# any other family is written as GenAI's generic "decoder": our graph holds the whole model, so the
# type only picks GenAI's runner (its "gpt2" one expects another graph's inputs, OPT it does not know)
GENAI_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "granite"}


def genai_config(model, fused_int8: bool = False) -> dict:
    """`genai_config.json` for `model` (a transformers causal LM), exported by `write_genai_folder`;
    `fused_int8`: INT8 linears left to onnxruntime's fused kernel (the export checked it is exact here)."""
    config, generation = model.config, getattr(model, "generation_config", None)
    heads = config.num_attention_heads
    context = context_length(model)
    if context is None:
        raise ExportError(f"{type(model).__name__}'s config gives no context length (max_position_embeddings); "
                          "GenAI needs one")

    def setting(name, default=None):
        value = getattr(generation, name, None) if generation is not None else None
        value = getattr(config, name, None) if value is None else value
        return default if value is None else value

    eos = setting("eos_token_id")
    pad = setting("pad_token_id", eos[0] if isinstance(eos, list) else eos)
    inputs = dict(input_ids="input_ids", attention_mask="attention_mask", position_ids="position_ids",
                  past_key_names=GENAI_NAMES.past_key, past_value_names=GENAI_NAMES.past_value)
    outputs = dict(logits="logits", present_key_names=GENAI_NAMES.present_key,
                   present_value_names=GENAI_NAMES.present_value)
    # what the 8-bit graph needs on whichever CPU serves the folder (exporters.onnx_qdq), or on this
    # one and those like it with `fused_int8`
    session = dict(log_id="onnxruntime-genai", provider_options=[],
                   **session_entries({model_format(model)} - {None}, this_cpu=fused_int8))
    decoder = dict(session_options=session, filename=MODEL_FILE,
                   head_size=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   hidden_size=config.hidden_size, inputs=inputs, outputs=outputs, num_attention_heads=heads,
                   num_hidden_layers=config.num_hidden_layers,
                   num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads)
    search = dict(do_sample=bool(setting("do_sample", False)), temperature=float(setting("temperature", 1.0)),
                  top_k=int(setting("top_k", 50)), top_p=float(setting("top_p", 1.0)),
                  repetition_penalty=float(setting("repetition_penalty", 1.0)), num_beams=1, num_return_sequences=1,
                  min_length=0, max_length=int(context), length_penalty=1.0, no_repeat_ngram_size=0,
                  diversity_penalty=0.0, early_stopping=True,
                  past_present_share_buffer=False)  # the graph's past and present differ in length
    return dict(model=dict(bos_token_id=setting("bos_token_id"), eos_token_id=eos, pad_token_id=pad,
                           context_length=int(context), decoder=decoder,
                           type=config.model_type if config.model_type in GENAI_TYPES else "decoder",
                           vocab_size=config.vocab_size), search=search)


def write_genai_folder(model, tokenizer, out: Path, opset: int = 18,
                       external_data_threshold: int = TWO_GIB, fused_int8: bool = False) -> Optional[dict]:
    """Write the graph, `genai_config.json` and the tokenizer files for `model` (on the CPU, export dtype);
    returns what the graph's 8-bit linears became (`exporters.onnx_qdq`), None without any.

    `tokenizer=None` leaves the tokenizer out: the runtime then generates from token ids only (the bench).
    `fused_int8`: see `genai_config`.
    """
    qdq = write_onnx_with_cache(model, out / MODEL_FILE, opset, external_data_threshold, names=GENAI_NAMES)
    (out / CONFIG_FILE).write_text(json.dumps(genai_config(model, fused_int8), indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return qdq


def _inside(folder: Path, name: str, config_path: Path) -> Path:
    """`folder / name`, refused before anything is opened when it would lead outside the folder."""
    if not isinstance(name, str) or not name:
        raise InputError(f"{config_path} names no decoder file; export the folder again")
    path = (folder / name).resolve()
    if folder.resolve() not in path.parents:
        raise InputError(f"{config_path} names the file {name!r}, which lies outside {folder}; a GenAI folder "
                         "only reads its own files: export the folder again")
    return path


def check_genai_folder(folder: "str | Path", tokenizer: bool = True) -> dict:
    """The folder's `genai_config.json`, after checking that its files exist and its names match the graph.

    Raises InputError naming the missing or mismatched file (GenAI's own messages name neither).
    `tokenizer=False` accepts a folder without tokenizer files.
    """
    import onnx

    folder = Path(folder)
    again = "export the folder again with `thanos-export export MODEL --target genai --out DIR`"
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"{folder} has no {CONFIG_FILE}, so it is not an ONNX Runtime GenAI folder; {again}")
    try:
        config = json.loads(config_path.read_text())
        decoder = config["model"]["decoder"]
        layers = int(decoder["num_hidden_layers"])
        name = decoder["filename"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{config_path} is not a readable GenAI config ({type(exc).__name__}: {exc}); {again}") from exc
    graph_file = _inside(folder, name, config_path)
    for needed in (graph_file, folder / TOKENIZER_FILE) if tokenizer else (graph_file,):
        if not needed.is_file():
            raise InputError(f"{needed} is missing ({config_path.name} needs it); {again}")
    try:
        graph = onnx.load(str(graph_file), load_external_data=False).graph
    except Exception as exc:  # protobuf's DecodeError for a truncated or foreign file
        raise InputError(f"{graph_file} is not a readable ONNX model ({type(exc).__name__}: {exc}); {again}") from exc
    have = dict(inputs={i.name for i in graph.input}, outputs={o.name for o in graph.output})
    for role in ("inputs", "outputs"):
        for key, name in decoder.get(role, {}).items():
            names = [name % i for i in range(layers)] if key.endswith("_names") else [name]
            missing = [n for n in names if n not in have[role]]
            if missing:
                raise InputError(f"{config_path.name} names the graph {role[:-1]} {missing[0]!r} ({key}), which "
                                 f"{graph_file.name} does not have (its {role}: {', '.join(sorted(have[role])[:6])}, "
                                 f"...); the two files do not belong together: {again}")
    return config


class GenaiModel:
    """A GenAI folder loaded in `onnxruntime_genai`, for greedy generation from token ids."""

    def __init__(self, folder: "str | Path", provider: str = "cpu", tokenizer: bool = True):
        require_genai()
        import onnxruntime_genai as og

        self.folder = Path(folder)
        self.config = check_genai_folder(self.folder, tokenizer)
        settings = og.Config(str(self.folder))
        settings.clear_providers()
        if provider != "cpu":
            settings.append_provider(provider)
        try:
            self.model = og.Model(settings)
        except Exception as exc:  # onnxruntime_genai raises plain RuntimeErrors
            raise ExportError(f"onnxruntime-genai {og.__version__} cannot load {self.folder} ({exc}); its model type "
                              f"is {self.config['model'].get('type')!r}") from exc
        self.provider = provider
        self.version = og.__version__

    def tokenizer(self):
        import onnxruntime_genai as og

        return og.Tokenizer(self.model)

    def generate(self, ids: list[int], max_new_tokens: int, on_token: Optional[Callable[[int], None]] = None,
                 max_length: Optional[int] = None) -> list[int]:
        """Greedy continuation of `ids`; stops after `max_new_tokens` or at an end-of-sequence token."""
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, num_beams=1, repetition_penalty=1.0, min_length=0,
                                  max_length=max_length or len(ids) + max_new_tokens)
        generator = og.Generator(self.model, params)
        generator.append_tokens([int(i) for i in ids])
        new: list[int] = []
        while not generator.is_done() and len(new) < max_new_tokens:
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
            if on_token:
                on_token(new[-1])
        return new


def transformers_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy search (its `generate`), with the stopping tokens GenAI is given."""
    from transformers import GenerationConfig

    config = genai_config(model)["model"]
    settings = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                eos_token_id=config["eos_token_id"], pad_token_id=config["pad_token_id"])
    input_ids = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=settings)
    return out[0, len(ids):].tolist()


def verification_prompts(tokenizer, context: int) -> list[str]:
    """Real text: held-out windows of the default calibration text, the longest cut to fit the context."""
    from thanos.calibration import tokenize_split

    held_out = tokenize_split(tokenizer, None).evaluation.tolist()
    texts, start = [], 0
    for length in PROMPT_LENGTHS:
        length = min(length, context - NEW_TOKENS - 8)
        texts.append(tokenizer.decode(held_out[start : start + length]))
        start += length
    return texts


def verify_folder(model, tokenizer, folder: Path, dtype: str) -> dict:
    """Greedy tokens of GenAI on `folder` against transformers on `model` (the pruned model, in float32).

    A graph with 8-bit linears is checked linear by linear instead (`exporters.onnx_qdq.validate_qdq`),
    and where its tokens first differ is reported only (`onnx_export.validate_onnx` says why)."""
    runtime = GenaiModel(folder)
    genai_tokenizer = runtime.tokenizer()
    export_dtype = next(model.parameters()).dtype
    quantized = None
    if quantized_linears(model):
        ids, mask = validation_prompts(tokenizer)
        quantized = validate_qdq(folder / MODEL_FILE, model, lambda s: prefill_feed(s, ids.numpy(), mask.numpy()),
                                 dtype)
    model.float()
    results = []
    try:
        for text in verification_prompts(tokenizer, genai_config(model)["model"]["context_length"]):
            ids = tokenizer(text)["input_ids"]
            theirs = [int(i) for i in genai_tokenizer.encode(text)]
            if theirs != ids:
                raise ExportError(f"GenAI's tokenizer reads {folder / TOKENIZER_FILE} differently from transformers' "
                                  f"({len(theirs)} tokens against {len(ids)} for a {len(text)}-character prompt); "
                                  "the folder would serve other token ids than the model was pruned on"
                                  + _tokenizer_hint())
            start = time.perf_counter()
            got = runtime.generate(ids, NEW_TOKENS)
            seconds = time.perf_counter() - start
            expected = transformers_greedy(model, ids, NEW_TOKENS)
            divergence = first_divergence(got, expected)
            results.append(dict(prompt_tokens=len(ids), new_tokens=len(got), first_divergence=divergence,
                                genai_tokens_per_s=len(got) / seconds if seconds > 0 else None))
    finally:
        model.to(export_dtype)
    worst = min((r["first_divergence"] for r in results if r["first_divergence"] is not None), default=None)
    checked = dict(runtime=f"onnxruntime-genai {runtime.version} ({runtime.provider})", reference="transformers float32",
                   prompts=results, identical=worst is None, first_divergence=worst)
    if quantized:
        return dict(checked, quantized_linears=quantized)
    if dtype == "float32" and worst is not None:
        raise ExportError(f"GenAI's greedy tokens (float32) differ from transformers' at new token {worst}; "
                          "they must be identical: please report this with the model's config")
    if worst is not None and worst < FP16_AGREEING:
        raise ExportError(f"GenAI's greedy tokens ({dtype}) differ from transformers' at new token {worst}, within "
                          f"the first {FP16_AGREEING}; export with --dtype float32, or report this")
    return checked


def _tokenizer_hint() -> str:
    """Where the cause is known: transformers 5.16 and 5.17 wrote a GGUF model's tokenizer.json with
    SentencePiece-style byte fallback beside its byte-level BPE, which GenAI reads differently (the
    default model's prompts: 50 tokens for 16); 5.18 and later write it as the GGUF file has it."""
    import transformers

    if release(transformers.__version__) >= (5, 18):
        return ""
    return (f"; transformers {transformers.__version__} writes such tokenizers in a form GenAI misreads: "
            "pip install -U 'transformers>=5.18' and export again")


def first_divergence(got: list[int], expected: list[int]) -> Optional[int]:
    """Index of the first token that differs (a shorter list differs where it ends); None if equal."""
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            return i
    return None if len(got) == len(expected) else min(len(got), len(expected))


def check_fused_int8(fmt: Optional[str], dtype: Optional[str]) -> None:
    """Refuse, before any work, --fused-int8 where it does not apply or would compute another model here."""
    if fmt != "int8":
        raise ExportError(f"--fused-int8 applies to models pruned with --quantize int8; this one is "
                          f"{fmt + ' (no fused kernel)' if fmt else 'not quantized'}: drop it")
    if dtype != "float32":
        raise ExportError(f"--fused-int8 needs --dtype float32: onnxruntime's CPU provider fuses INT8 linears in "
                          f"float32 graphs only, not {dtype}")
    if not fused_int8_is_exact():
        raise ExportError("--fused-int8: this CPU has no VNNI (AVX-512 VNNI or AVX-VNNI), and there onnxruntime's "
                          "fused INT8 kernel sums pairs of products in 16 bits and saturates: the folder would compute "
                          "another model; export without it (the default folder runs on any CPU)")


@register(ExportFormat.GENAI)
def export_genai(model_dir: Path, out: Path, options: ExportOptions, source: Optional[tuple] = None) -> dict:
    require_onnx()
    require_genai()
    if options.dtype not in ONNX_DTYPES:
        raise ExportError(f"the genai target supports {' and '.join(ONNX_DTYPES)}, not {options.dtype}")
    if options.fused_int8:
        check_fused_int8(saved_format(model_dir) if source is None else model_format(source[0]), options.dtype)
    model, tokenizer, report = load_pruned(model_dir, options.dtype, options.split_dense_rows,
                                           options.trust_remote_code, source)
    qdq = write_genai_folder(model, tokenizer, out, options.opset, fused_int8=options.fused_int8)
    summary = dict(genai=str(out), onnx=str(out / MODEL_FILE), files=sorted(p.name for p in out.iterdir()),
                   **check_patterns_kept(model_patterns(model), out / MODEL_FILE))
    if qdq:
        summary.update(quantization=qdq, fused_int8=options.fused_int8)
    note = cached_decoding_note(model)
    if note:
        summary["note"] = note
    if options.split_dense_rows:
        summary["split_rows"] = report["split_rows"]
    if options.validate:
        summary["generation"] = verify_folder(model, tokenizer, out, options.dtype)  # loading checks the folder
    else:
        check_genai_folder(out)
    return summary

