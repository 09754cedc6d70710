"""Text from a model, streamed as it is generated, with its speed: what pruning did, read by a person.

A pruned or compact directory, a dense directory or .gguf file runs through transformers; an ONNX
Runtime GenAI folder (`export --target genai`) runs through `onnxruntime_genai`. Decoding is
greedy, so two models given the same prompt differ only by their weights.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch

from exporters.genai import GenaiModel, is_genai_folder
from thanos.errors import InputError
from thanos.models import describe_source, load_model
from thanos.devices import resolve_device

DEFAULT_SOURCE = "default"  # names the embedded default model where a path is expected


@dataclasses.dataclass
class Generation:
    source: str
    runtime: str
    prompt_tokens: int
    new_tokens: int
    seconds: float  # prefill and every new token
    text: str

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def generate_text(source: str, prompt: str, max_new_tokens: int, on_text: Callable[[str], None] = lambda _: None,
                  device: str = "cpu", trust_remote_code: bool = False) -> Generation:
    """Greedy continuation of `prompt` by the model at `source`; `on_text` gets each new piece of text."""
    if not prompt.strip():
        raise InputError("--prompt is empty; give the text the model should continue")
    if is_genai_folder(source):
        return _genai(source, prompt, max_new_tokens, on_text, device)
    return _transformers(source, prompt, max_new_tokens, on_text, str(resolve_device(device)), trust_remote_code)


def _genai(source: str, prompt: str, max_new_tokens: int, on_text, device: str) -> Generation:
    runtime = GenaiModel(source, "cuda" if device.startswith("cuda") else "cpu")
    tokenizer = runtime.tokenizer()
    stream = tokenizer.create_stream()
    ids = [int(i) for i in tokenizer.encode(prompt)]
    start = time.perf_counter()
    new = runtime.generate(ids, max_new_tokens, lambda token: on_text(stream.decode(token)),
                           max_length=_limit(runtime.config["model"]["context_length"], ids, max_new_tokens))
    seconds = time.perf_counter() - start
    return Generation(source, f"onnxruntime-genai {runtime.version} ({runtime.provider})", len(ids), len(new), seconds,
                      tokenizer.decode(new))


@torch.no_grad()
def _transformers(source: str, prompt: str, max_new_tokens: int, on_text, device: str,
                  trust_remote_code: bool) -> Generation:
    from transformers import DynamicCache

    from thanos.models import cache_argument, context_length

    model, tokenizer = load_model(None if source == DEFAULT_SOURCE else source, trust_remote_code=trust_remote_code)
    model.to(device)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    context = context_length(model)
    steps = _limit(context, ids[0].tolist(), max_new_tokens) - ids.shape[1] if context else max_new_tokens
    stops = _stop_tokens(model, tokenizer)
    cache, argument = DynamicCache(config=model.config), cache_argument(model)
    new: list[int] = []
    shown = ""
    start = time.perf_counter()
    step_input = ids
    for _ in range(steps):
        logits = model(step_input, use_cache=True, **{argument: cache}).logits
        token = int(logits[0, -1].argmax())
        new.append(token)
        # Decode the whole continuation each time: a byte-level token may be half a character.
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            on_text(text[len(shown):])
            shown = text
        if token in stops:
            break
        step_input = torch.tensor([[token]], device=device)
    seconds = time.perf_counter() - start
    return Generation(describe_source(None if source == DEFAULT_SOURCE else source), f"transformers ({device})",
                      ids.shape[1], len(new), seconds, tokenizer.decode(new, skip_special_tokens=True))


def _limit(context: int, ids: list, max_new_tokens: int) -> int:
    """Total length to generate to: the prompt plus `max_new_tokens`, within the context."""
    if not ids:
        raise InputError("--prompt gives no tokens with this model's tokenizer; give the text it should continue")
    if len(ids) >= context:
        raise InputError(f"the prompt is {len(ids)} tokens, at or past the model's context of {context}; "
                         "shorten --prompt")
    return min(context, len(ids) + max_new_tokens)


def _stop_tokens(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def target_kind(source: str) -> str:
    """What `generate_text` will run `source` as, in words."""
    from thanos.compact import is_compact_dir

    if source == DEFAULT_SOURCE:
        return "the embedded default model, through transformers"
    if is_genai_folder(source):
        return "ONNX Runtime GenAI folder"
    return ("compact checkpoint" if is_compact_dir(Path(source)) else "model") + ", through transformers"
