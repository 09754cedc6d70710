"""Perplexity on held-out text: non-overlapping windows, the standard WikiText protocol."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from thanos.errors import InputError


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int, device: "str | torch.device" = "cpu",
               max_windows: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None) -> float:
    """exp(mean next-token NLL) over `tokens` cut into consecutive windows of `seqlen`."""
    if seqlen < 2:
        raise InputError(f"a perplexity window needs 2 tokens or more (one predicted from the other), not {seqlen}")
    windows = tokens.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise InputError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}; "
                         "pass a longer text or a smaller --seqlen")
    total, count = 0.0, 0
    for i in range(windows):
        ids = tokens[i * seqlen : (i + 1) * seqlen][None].to(device)  # (1, L)
        logits = model(ids, use_cache=False).logits.float()  # (1, L, V)
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total += float(loss)
        count += seqlen - 1
        if progress:
            progress(i + 1, windows)
    return math.exp(total / count)
