"""Perplexity over disjoint windows (`ppl:SOURCE`).

Windows: the text is tokenized once (no special tokens) and cut into consecutive, disjoint windows of
`seqlen` tokens. The remainder (the last, shorter window) is kept when it holds at least two tokens and
dropped otherwise; the first token of a window is its context and is not scored, every other token is
scored exactly once. Each window is one log-likelihood request.

Perplexity is token-weighted: exp(sum of NLL / scored tokens). Word- and byte-level perplexities divide
the same total NLL by the whitespace-separated words and the UTF-8 bytes of the source text that the
windows cover (from the first window's first character to the last window's last, found from the
tokenizer's offsets), never of decoded windows: a window edge inside a multi-byte character adds no
bytes. Comparable across tokenizers: exp(NLL / words), exp(NLL / bytes), bits per byte.
Interval: percentile bootstrap over windows; paired against the base on the same windows.
Sample records: one per window; prompt = its first token (the unscored context), reference = the scored
rest, metrics {nll: mean NLL per scored token, tokens}; ppl = exp(token-weighted mean nll).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from lmsqueeze.data import load_text, tokenize_text
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.stats import estimate
from lmsqueeze.evaluation.task import Headline, SampleMetric, Task, digest, register, sample


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


def covered_text(tokenizer, text: str, ntokens: int) -> str:
    """The part of `text` that its first `ntokens` tokens cover (from the tokenizer's character offsets;
    a tokenizer without offsets: the decoded tokens, exact except at a cut inside a character)."""
    if ntokens <= 0:
        return ""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except NotImplementedError:  # a Python (slow) tokenizer has no offsets
        ids = tokenize_text(tokenizer, text)[:ntokens]
        return tokenizer.decode(ids.tolist())
    if ntokens >= len(offsets):
        return text
    end = max(e for _, e in offsets[:ntokens])
    return text[:end]


def head_tokens(tokenizer, text: str, need: int) -> tuple[torch.Tensor, str]:
    """(tokens, the text they are of): at least need + 64 tokens of a line-aligned beginning of `text`, or
    all of it, whose first `need` tokens are those of the whole text.

    Tokenizing a whole corpus for a few windows (`--limit`) costs seconds to minutes; the beginning
    suffices, as long as where it is cut cannot change the tokens used. That is checked, not assumed:
    the first `need` tokens of the beginning must equal those of a beginning twice as long, else the
    whole text is tokenized.
    """
    size = max(8 * need, 4096)  # characters; a token is 1 to 6 characters in most text
    while size < len(text):
        cut = text.find("\n", size)
        if cut < 0:
            break
        part = text[:cut + 1]
        tokens = tokenize_text(tokenizer, part)
        if tokens.numel() >= need + 64:
            cut2 = text.find("\n", 2 * cut + 2)
            longer = tokenize_text(tokenizer, text if cut2 < 0 else text[:cut2 + 1])
            if torch.equal(longer[:need], tokens[:need]):
                return tokens, part
            break
        size *= 2
    return tokenize_text(tokenizer, text), text


def text_units(text: str) -> tuple[int, int]:
    """(whitespace-separated words, UTF-8 bytes) of a text."""
    return len(text.split()), len(text.encode("utf-8"))


def summarize_ppl(nlls, ntokens, words: int | None, nbytes: int | None) -> dict:
    total, tokens = float(sum(nlls)), int(sum(ntokens))
    out = {"ppl": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens}
    if words:
        out.update(word_ppl=math.exp(total / words), words=words)
    if nbytes:
        out.update(byte_ppl=math.exp(total / nbytes), bits_per_byte=total / nbytes / math.log(2), bytes=nbytes)
    return out


def window_ppl(c):
    return np.exp(np.sum(c["nll"], -1) / np.sum(c["tokens"], -1))


def window_nll(c):
    return np.sum(c["nll"], -1) / np.sum(c["tokens"], -1)


@register("ppl", usage="ppl:SOURCE", suites=("core",))
class PerplexityTask(Task):
    order = 10
    suite_arg = "ppl:wikitext2:test"
    option_keys = ("limit", "seqlen")
    headline = (Headline("ppl", "ppl", ".2f", "lower"),)
    sample_metrics = {"ppl": SampleMetric("nll", "tokens", exp=True), "nll": SampleMetric("nll", "tokens")}

    def load(self):
        self.text = source_text(self.arg, self.opts.data_dir)
        if not self.text.strip():
            raise LmsqueezeError(f"'{self.arg}' holds no text")

    def fingerprint(self) -> str:
        return digest([len(self.text), self.text[:4096], self.text[-4096:]])

    def check_model(self, model_or_config) -> None:
        from lmsqueeze.models import check_sequence_length

        check_sequence_length(model_or_config, self.opts.seqlen, f"{self.name}: the window (--eval-seqlen)")

    def windows(self, tokenizer):
        # run() and samples() both cut the text; tokenizing a long text twice costs seconds
        return self._cut(tokenizer)[0]

    def _cut(self, tokenizer):
        """(windows, the beginning of the text they were cut from), once per tokenizer: with --limit only
        the beginning of the text that the windows need is tokenized (head_tokens)."""
        memo = getattr(self, "_windows_memo", None)
        if memo is not None and memo[0] is tokenizer:
            return memo[1]
        if self.opts.limit is not None:
            tokens, text = head_tokens(tokenizer, self.text, self.opts.limit * self.opts.seqlen)
        else:
            tokens, text = tokenize_text(tokenizer, self.text), self.text
        wins = windows(tokens, self.opts.seqlen, self.opts.limit)
        if not wins:
            raise LmsqueezeError(f"'{self.arg}' has {tokens.numel()} tokens: too few for one window of "
                                 f"{self.opts.seqlen}")
        self._windows_memo = (tokenizer, (wins, text))
        return wins, text

    def requests(self, tokenizer):
        return [(w[:1].tolist(), w[1:].tolist()) for w in self.windows(tokenizer)]

    def run(self, backend, base):
        wins, text = self._cut(backend.tokenizer)
        res = backend.loglik_tokens([(w[:1].tolist(), w[1:].tolist()) for w in wins], desc=self.name)
        words, nbytes = text_units(covered_text(backend.tokenizer, text, sum(w.numel() for w in wins)))
        items = [{"window": i, "nll": -r.logprob, "tokens": r.ntokens} for i, r in enumerate(res)]
        summary = summarize_ppl([-r.logprob for r in res], [r.ntokens for r in res], words, nbytes)
        summary.update(windows=len(wins), seqlen=self.opts.seqlen, source=self.arg,
                       units="bytes and words of the source text the windows cover")
        cols = _cols(items)
        bcols = _cols(base["items"]) if base is not None else None
        metrics = {"ppl": estimate(window_ppl, cols, bcols, resamples=self.opts.resamples, seed=self.opts.seed),
                   "nll": estimate(window_nll, cols, bcols, resamples=self.opts.resamples, seed=self.opts.seed)}
        return {"summary": summary, "metrics": metrics, "items": items}

    def window_metrics(self, item: dict) -> dict:
        return {"nll": item["nll"] / item["tokens"], "tokens": item["tokens"]}

    def samples(self, result, base, backend):
        tok, base_items = backend.tokenizer, (base["items"] if base is not None else None)
        return [sample(i, prompt=tok.decode(w[:1].tolist()), reference=tok.decode(w[1:].tolist()),
                       metrics=self.window_metrics(it),
                       base_metrics=self.window_metrics(base_items[i]) if base_items else None)
                for i, (w, it) in enumerate(zip(self.windows(tok), result["items"]))]


def _cols(items):
    return {"nll": np.array([i["nll"] for i in items], dtype=np.float64),
            "tokens": np.array([i["tokens"] for i in items], dtype=np.float64)}
