"""Perplexity over disjoint windows.

The text is tokenized once (no special tokens) and cut into consecutive windows of `seqlen` tokens;
the last, shorter window is kept when it holds at least two tokens, so every token of the text after
the first of each window is scored exactly once. Perplexity is token-weighted:
exp(sum of NLL / number of predicted tokens). Log-softmax runs in fp32 over row chunks, so no
[batch, time, vocab] fp32 copy is held beside the logits.
"""
from __future__ import annotations

import math

import torch

from lmsqueeze.data import load_text, tokenize_text
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.progress import progress

ROW_CHUNK = 1024


def windows(tokens: torch.Tensor, seqlen: int, limit: int | None = None) -> list[torch.Tensor]:
    if seqlen < 2:
        raise LmsqueezeError(f"seqlen must be >= 2, got {seqlen}")
    out = [tokens[i:i + seqlen] for i in range(0, tokens.numel(), seqlen)]
    out = [w for w in out if w.numel() >= 2]
    return out[:limit] if limit is not None else out


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed -log p(target) over rows; logits [rows, vocab] any dtype, log-softmax in fp32 chunks."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, logits.shape[0], ROW_CHUNK):
        lp = torch.log_softmax(logits[i:i + ROW_CHUNK].float(), dim=-1)
        total += -lp.gather(1, targets[i:i + ROW_CHUNK, None]).sum().double().cpu()
    return total


@torch.no_grad()
def perplexity(model, tokenizer, source: str, seqlen: int = 512, limit: int | None = None, batch_size: int = 1,
               data_dir=None) -> dict:
    """Token-weighted perplexity of `model` on a text source; returns ppl, nll, tokens, windows."""
    if batch_size < 1:
        raise LmsqueezeError(f"batch size must be >= 1, got {batch_size}")
    tokens = tokenize_text(tokenizer, load_text(source, data_dir))
    wins = windows(tokens, seqlen, limit)
    if not wins:
        raise LmsqueezeError(f"'{source}' has {tokens.numel()} tokens: too few for one window")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    # full windows batch together; the shorter last window runs alone
    groups = [[w] for w in wins] if batch_size == 1 else _batches(wins, batch_size)
    for group in progress(groups, desc=f"ppl:{source}", unit="batch"):
        ids = torch.stack(group).to(device)
        logits = model(input_ids=ids).logits  # [b, t, vocab]
        shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
        total_nll += float(nll_sum(shifted, ids[:, 1:].reshape(-1)))
        total_tokens += ids[:, 1:].numel()
    nll = total_nll / total_tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": total_tokens, "windows": len(wins), "seqlen": seqlen,
            "source": source}


def _batches(wins, batch_size):
    full = [w for w in wins if w.numel() == wins[0].numel()]
    rest = [w for w in wins if w.numel() != wins[0].numel()]
    out = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    return out + [[w] for w in rest]
