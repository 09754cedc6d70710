"""Calibration and evaluation text: the embedded default or a user's .txt/.jsonl file.

The text is tokenised once and split by position: the first 90% of the tokens calibrate, the
last 10% evaluate, so calibration windows never overlap the held-out text.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from thanos.errors import ThanosExportError

HELD_OUT_FRACTION = 0.1


class CalibrationError(ThanosExportError, ValueError):
    """Calibration text that cannot be used; the message names the fix."""


def default_text() -> str:
    """Python's own documentation topics (`pydoc_data.topics`), shipped with every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(path: Optional[str]) -> str:
    if path is None:
        return default_text()
    file = Path(path)
    if file.is_dir():
        raise CalibrationError(f"text file {file} is a directory; pass a .txt or .jsonl file")
    if not file.is_file():
        raise CalibrationError(f"text file {file} does not exist; pass a .txt or .jsonl file")
    try:
        raw = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{file} is not UTF-8 text ({exc}); convert it or pass another file") from exc
    if file.suffix == ".jsonl":
        parts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{file}:{number} is not JSON ({exc.msg}); each line must be an object "
                                       'with a "text" field, or a string') from exc
            text = record.get("text") if isinstance(record, dict) else record
            if not isinstance(text, str):
                raise CalibrationError(f'{file}:{number} has no "text" string field')
            parts.append(text)
        raw = "\n\n".join(parts)
    if not raw.strip():
        raise CalibrationError(f"{file} holds no text")
    return raw


@dataclasses.dataclass
class TextSplit:
    source: str
    calibration: torch.Tensor  # (n_cal,) token ids
    evaluation: torch.Tensor  # (n_eval,) token ids, after the calibration part


# (tokenizer, text) digests -> token ids: a command reads its text up to four times (calibration,
# evaluation, each export's checks), and one long string is tokenised on one thread
_TOKENIZED: dict[tuple[str, str], torch.Tensor] = {}
_TOKENIZED_KEPT = 4


def tokenize_split(tokenizer, path: Optional[str]) -> TextSplit:
    text = read_text(path)
    key = _tokenizer_digest(tokenizer), hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    ids = _TOKENIZED.get(key) if key[0] else None
    if ids is None:
        ids = torch.tensor(tokenizer(text, return_attention_mask=False)["input_ids"], dtype=torch.long)
        if key[0]:
            while len(_TOKENIZED) >= _TOKENIZED_KEPT:
                del _TOKENIZED[next(iter(_TOKENIZED))]  # the oldest
            _TOKENIZED[key] = ids
    cut = int(len(ids) * (1 - HELD_OUT_FRACTION))
    return TextSplit(path or "pydoc_data.topics", ids[:cut].clone(), ids[cut:].clone())


def _tokenizer_digest(tokenizer) -> str:
    """What decides a fast tokenizer's ids (its whole serialised pipeline: vocabulary, normaliser,
    pre-tokeniser, special tokens and the post-processor that adds them; and the one switch kept
    outside it); "" for other tokenizers, whose results are not kept."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return ""
    settings = f"{type(tokenizer).__qualname__}|{getattr(tokenizer, 'split_special_tokens', None)}|"
    return hashlib.sha256((settings + backend.to_str()).encode("utf-8", "surrogatepass")).hexdigest()


def sample_windows(tokens: torch.Tensor, count: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`count` random windows of `seqlen` tokens, reproducibly: (count, seqlen)."""
    if count <= 0 or seqlen <= 0:
        raise CalibrationError(f"need a positive number of samples and sequence length, got {count} x {seqlen}")
    if tokens.numel() <= seqlen:
        raise CalibrationError(
            f"the calibration text has {tokens.numel()} tokens, not more than one window of {seqlen}; "
            "pass a longer --calib-file or a smaller --seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (count,), generator=g)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])
