"""Text from a model, streamed as it is generated, with its speed: what pruning did, read by a person.

A pruned or compact directory, a dense directory or .gguf file runs through transformers; an ONNX
Runtime GenAI folder (`export --target genai`) runs through `onnxruntime_genai`; an ONNX export
through onnxruntime (its KV-cache graph where the export wrote one). Decoding is greedy, so two
models given the same prompt differ only by their weights.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

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
    graph = _onnx_graph(source)
    if graph is not None:
        return _onnx(graph, prompt, max_new_tokens, on_text, device)
    return _transformers(source, prompt, max_new_tokens, on_text, str(resolve_device(device)), trust_remote_code)


def _onnx_graph(source: str) -> "Path | None":
    """The graph an ONNX export decodes on: its KV-cache graph beside model.onnx where there is one."""
    from exporters.onnx_cache import WITH_CACHE_FILE
    from exporters.onnx_graph import graph_in

    graph = graph_in(source)
    if graph is not None and graph.name == "model.onnx" and (graph.parent / WITH_CACHE_FILE).is_file():
        return graph.parent / WITH_CACHE_FILE
    return graph


def _onnx(graph: Path, prompt: str, max_new_tokens: int, on_text, device: str) -> Generation:
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from exporters.onnx_cache import OnnxDecoder

    if not graph.is_file():
        raise InputError(f"{graph} does not exist; pass the folder or model.onnx an export wrote")
    try:
        tokenizer = AutoTokenizer.from_pretrained(graph.parent)
    except (OSError, ValueError) as exc:
        raise InputError(f"no tokenizer beside {graph} ({exc}); pass the folder an export wrote, which holds one") \
            from exc
    cuda = device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
    decoder = OnnxDecoder(graph, ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else None)
    ids = np.array([tokenizer(prompt)["input_ids"]], dtype=np.int64)
    steps = _limit(None, ids[0].tolist(), max_new_tokens) - ids.shape[1]
    stops = {tokenizer.eos_token_id} - {None}
    new: list[int] = []
    shown = ""
    start = time.perf_counter()
    for _, (token, _logits) in zip(range(steps), decoder.stream(ids, np.ones_like(ids))):
        new.append(int(token[0, 0]))
        shown = _show(tokenizer, new, shown, on_text)
        if new[-1] in stops:
            break
    seconds = time.perf_counter() - start
    return Generation(str(graph), f"onnxruntime {decoder.session.get_providers()[0]}", ids.shape[1], len(new),
                      seconds, tokenizer.decode(new, skip_special_tokens=True))


def _show(tokenizer, new: list[int], shown: str, on_text) -> str:
    """Pass on the text the new tokens add, once whole: the continuation is decoded as a whole each
    time, since a byte-level token may be half a character. Returns the text shown so far."""
    text = tokenizer.decode(new, skip_special_tokens=True)
    if text.endswith("\ufffd"):
        return shown
    on_text(text[len(shown):])
    return text


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
    from thanos.models import cache_after, context_length

    model, tokenizer = load_model(None if source == DEFAULT_SOURCE else source, trust_remote_code=trust_remote_code)
    model.to(device)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    context = context_length(model)
    steps = _limit(context, ids[0].tolist(), max_new_tokens) - ids.shape[1] if context else max_new_tokens
    stops = _stop_tokens(model, tokenizer)
    cache = {}  # the model's own, from its first call
    new: list[int] = []
    shown = ""
    start = time.perf_counter()
    step_input = ids
    for _ in range(steps):
        output = model(step_input, use_cache=True, **cache)
        cache = cache_after(model, output)
        token = int(output.logits[0, -1].argmax())
        new.append(token)
        shown = _show(tokenizer, new, shown, on_text)
        if token in stops:
            break
        step_input = torch.tensor([[token]], device=device)
    seconds = time.perf_counter() - start
    return Generation(describe_source(None if source == DEFAULT_SOURCE else source), f"transformers ({device})",
                      ids.shape[1], len(new), seconds, tokenizer.decode(new, skip_special_tokens=True))


def _limit(context: Optional[int], ids: list, max_new_tokens: int) -> int:
    """Total length to generate to: the prompt plus `max_new_tokens`, within the context (if known)."""
    if not ids:
        raise InputError("--prompt gives no tokens with this model's tokenizer; give the text it should continue")
    if context is None:
        return len(ids) + max_new_tokens
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
    graph = _onnx_graph(source)
    if graph is not None:
        return f"ONNX export, {graph.name} through onnxruntime"
    return ("compact checkpoint" if is_compact_dir(Path(source)) else "model") + ", through transformers"
