"""Perplexity over disjoint windows, a reduction of `loglik`.

Windows: the text is tokenized once (no special tokens) and cut into consecutive, disjoint windows
of `seqlen` tokens. The remainder (the last, shorter window) is kept when it holds at least two
tokens and dropped otherwise, so every token after the first of each window is scored exactly once;
the first token of a window has no context and is not scored. Each window is one loglik request
(context = its first token, continuation = the rest).

Perplexity is token-weighted: exp(sum of NLL / number of scored tokens), so a short remainder
counts for its tokens only. When the source text is known, word- and byte-level perplexities divide
the same total NLL by the number of whitespace-separated words and of UTF-8 bytes in the decoded
windows instead (comparable across tokenizers): exp(NLL / words), exp(NLL / bytes).
"""
from __future__ import annotations

import math

import torch

from lmsqueeze.data import load_text, tokenize_text
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.loglik import loglik

ROW_CHUNK = 1024


def windows(tokens: torch.Tensor, seqlen: int, limit: int | None = None) -> list[torch.Tensor]:
    """Disjoint windows of seqlen tokens; a remainder of >= 2 tokens is kept, a single token dropped."""
    if seqlen < 2:
        raise LmsqueezeError(f"seqlen must be >= 2, got {seqlen}")
    if limit is not None and limit < 1:
        raise LmsqueezeError(f"limit must be >= 1, got {limit}")
    out = [tokens[i:i + seqlen] for i in range(0, tokens.numel(), seqlen)]
    out = [w for w in out if w.numel() >= 2]
    return out[:limit] if limit is not None else out


def source_text(source: str, data_dir=None) -> str:
    """The text of a source: any `lmsqueeze.data.load_text` source, plus `alpaca:responses` (the
    reference responses alone, the text an instruction-tuned model is trained to produce)."""
    if source == "alpaca:responses":
        from lmsqueeze.data import alpaca_records

        return "\n\n".join(r["output"] for r in alpaca_records(data_dir))
    return load_text(source, data_dir)


def source_windows(tokenizer, source: str, seqlen: int, limit: int | None = None, data_dir=None) -> list[torch.Tensor]:
    tokens = tokenize_text(tokenizer, source_text(source, data_dir))
    wins = windows(tokens, seqlen, limit)
    if not wins:
        raise LmsqueezeError(f"'{source}' has {tokens.numel()} tokens: too few for one window")
    return wins


def window_requests(wins: list[torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    return [(w[:1].tolist(), w[1:].tolist()) for w in wins]


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed -log p(target) over rows; logits [rows, vocab] any dtype, log-softmax in fp32 chunks."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, logits.shape[0], ROW_CHUNK):
        lp = torch.log_softmax(logits[i:i + ROW_CHUNK].float(), dim=-1)
        total += -lp.gather(1, targets[i:i + ROW_CHUNK, None]).sum().double().cpu()
    return total


def text_units(tokenizer, wins: list[torch.Tensor]) -> tuple[int, int]:
    """(words, UTF-8 bytes) of the decoded windows."""
    words = nbytes = 0
    for w in wins:
        text = tokenizer.decode(w.tolist())
        words += len(text.split())
        nbytes += len(text.encode("utf-8"))
    return words, nbytes


def summarize_ppl(nlls: list[float], ntokens: list[int], words: int | None, nbytes: int | None) -> dict:
    total = float(sum(nlls))
    tokens = int(sum(ntokens))
    out = {"ppl": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens}
    if words:
        out["word_ppl"] = math.exp(total / words)
        out["words"] = words
    if nbytes:
        out["byte_ppl"] = math.exp(total / nbytes)
        out["bits_per_byte"] = total / nbytes / math.log(2)
        out["bytes"] = nbytes
    return out


@torch.no_grad()
def perplexity(model, tokenizer, source: str, seqlen: int = 512, limit: int | None = None,
               batch_tokens: int = 4096, data_dir=None) -> dict:
    """Token-, word- and byte-level perplexity of `model` on a text source, with per-window results."""
    wins = source_windows(tokenizer, source, seqlen, limit, data_dir)
    res = loglik(model, window_requests(wins), batch_tokens=batch_tokens, shared_context=False,
                 desc=f"ppl:{source}")
    words, nbytes = text_units(tokenizer, wins)
    out = summarize_ppl([-r.logprob for r in res], [r.ntokens for r in res], words, nbytes)
    out.update(windows=len(wins), seqlen=seqlen, source=source,
               items=[{"window": i, "nll": -r.logprob, "tokens": r.ntokens} for i, r in enumerate(res)])
    return out
