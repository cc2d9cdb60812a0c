"""The one model-side primitive: log-likelihood of continuations given contexts.

    loglik(model, [(context_tokens, continuation_tokens), ...]) -> [LoglikResult(logprob, ntokens, greedy)]

logprob is sum_j log p(cont[j] | context, cont[:j]); greedy says whether argmax decoding reproduces
the whole continuation. Perplexity, divergence from the base model, multiple choice and instruction
NLL are reductions of it (an `on_rows` callback sees every scored row's logits).

How it runs:
- Requests are sorted by length (longest first) and packed into right-padded batches of at most
  `batch_tokens` tokens (batch size x longest sequence), so padding stays small and the first batch
  shows at once whether memory suffices.
- The decoder runs without its output head; the head is applied only to the rows that are scored,
  in chunks of `CHUNK_ROWS`, and log-softmax is taken in fp32 per chunk: no [batch, time, vocab]
  tensor is ever built (on SmolLM2, 4096 tokens x 49152 x 4 bytes would be 800 MB).
- Every request runs as one full sequence. (A path that ran shared multiple-choice contexts once with a
  KV cache was removed: on SmolLM2 / PIQA, contexts ~10 tokens and choices ~25, it saved little, and in
  bf16 it rounded differently from full sequences and flipped a near-tie.)
- Results do not depend on the batch size beyond float rounding (padding is masked, positions are
  explicit); the tests check batch 1 against large batches.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmsqueeze import distributed as _ddp
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.progress import progress

log = logging.getLogger("lmsqueeze")

CHUNK_ROWS = 512
# Models whose logits are not head(last hidden state) (soft-capping or scaling after the head).
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")

# on_rows(owner [n], position [n], logits [n, V] (model dtype), targets [n]): owner is the request
# index, position the index of the token within its continuation.
RowsCallback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class LoglikResult:
    logprob: float
    ntokens: int
    greedy: bool
    token_logprobs: list[float] | None = field(default=None, repr=False)


def _as_list(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


class _Scorer:
    """Applies the output head to chosen hidden rows in chunks; accumulates per-request sums."""

    def __init__(self, model, n: int, keep_tokens: bool, on_rows: RowsCallback | None):
        self.model = model
        self.head = _head(model)
        self.sums = torch.zeros(n, dtype=torch.float64)
        self.greedy = torch.ones(n, dtype=torch.bool)
        self.tokens: list[list[float]] | None = [[] for _ in range(n)] if keep_tokens else None
        self.on_rows = on_rows

    def score(self, rows: torch.Tensor, targets: torch.Tensor, owner: torch.Tensor, pos: torch.Tensor) -> None:
        """rows [n, H] hidden states (or [n, V] logits when the head cannot be split off)."""
        for i in range(0, rows.shape[0], CHUNK_ROWS):
            sl = slice(i, i + CHUNK_ROWS)
            logits = self.head(rows[sl])
            lf = logits.float()
            tgt = targets[sl].to(lf.device)
            lp = (lf.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(lf, dim=-1)).double().cpu()
            hit = (lf.argmax(dim=-1) == tgt).cpu()
            o = owner[sl]
            self.sums.index_add_(0, o, lp)
            self.greedy[o[~hit]] = False
            if self.tokens is not None:
                for own, p, v in zip(o.tolist(), pos[sl].tolist(), lp.tolist()):
                    self.tokens[own].append((p, v))
            if self.on_rows is not None:
                self.on_rows(o, pos[sl], logits, tgt)

    def results(self, requests) -> list[LoglikResult]:
        out = []
        for i, (_, cont) in enumerate(requests):
            toks = None
            if self.tokens is not None:
                toks = [v for _, v in sorted(self.tokens[i])]
            out.append(LoglikResult(float(self.sums[i]), len(cont), bool(self.greedy[i]), toks))
        return out


def _head(model):
    """rows -> logits: the output embedding applied to final hidden states, or identity when the model's
    logits are more than that (then the rows given are full logits already)."""
    cfg = model.config
    if any(getattr(cfg, a, None) for a in _HEAD_EXTRAS) or model.get_output_embeddings() is None:
        return lambda rows: rows
    return model.get_output_embeddings()


def _split_ok(model) -> bool:
    cfg = model.config
    return not any(getattr(cfg, a, None) for a in _HEAD_EXTRAS) and model.get_output_embeddings() is not None


def _forward_rows(model, ids, mask, **kw):
    """Final hidden states [B, T, H] when the head can be split off, else full logits; plus the output.

    Always the model's own top-level forward, so that hooks a loader put on it run (compressed-tensors
    checkpoints decompress their weights in a forward pre-hook of the top-level module). A pre-hook on the
    output head takes the final hidden states it is given and hands it one position instead, so the head
    never builds [B, T, V] logits that would be thrown away (the scorer applies it to the scored rows).
    """
    if not _split_ok(model):
        out = model(input_ids=ids, attention_mask=mask, **kw)
        return out.logits, out
    captured = {}

    def grab(module, args):
        captured["h"] = args[0]
        return (args[0][..., :1, :],) + tuple(args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(grab)
    try:
        out = model(input_ids=ids, attention_mask=mask, **kw)
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError(f"{type(model).__name__}'s forward did not call its output embeddings; cannot split the "
                           f"head off (report this model type)")
    return captured["h"], out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_requests(model, requests) -> list[tuple[list[int], list[int]]]:
    reqs = []
    from lmsqueeze.models import max_positions

    limit = max_positions(model)
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = _as_list(ctx), _as_list(cont)
        if not ctx:
            raise LmsqueezeError(f"request {i} has an empty context: the first continuation token needs at least "
                                 f"one token before it (prepend BOS)")
        if not cont:
            raise LmsqueezeError(f"request {i} has an empty continuation: nothing to score")
        if limit is not None and len(ctx) + len(cont) - 1 > limit:
            if len(cont) >= limit:
                raise LmsqueezeError(f"request {i}: continuation of {len(cont)} tokens does not fit the model's "
                                     f"{limit} positions")
            ctx = ctx[-(limit - len(cont) + 1):]  # keep the end of the context, as a sliding window would
        reqs.append((ctx, cont))
    return reqs


def _batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length, longest first, cut so that len(batch) * longest <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > batch_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def loglik(model, requests, batch_tokens: int = 4096, token_logprobs: bool = False,
           on_rows: RowsCallback | None = None, desc: str = "loglik",
           on_forward: Callable[[], None] | None = None) -> list[LoglikResult]:
    """Summed log-probability, token count and greedy match of each continuation given its context.

    requests: [(context token ids, continuation token ids)], lists or 1-D tensors.
    batch_tokens: the token budget of one forward (batch size x padded length).
    token_logprobs: also return each continuation token's log-probability.
    on_rows: called with every chunk of scored rows (see RowsCallback).
    on_forward: called after every forward pass (counts them).
    """
    if batch_tokens < 1:
        raise LmsqueezeError(f"batch_tokens must be >= 1, got {batch_tokens}")
    reqs = _check_requests(model, requests)
    if on_rows is None and _ddp.active():
        # data parallel (torchrun): each rank scores its contiguous block of requests; the results are
        # gathered in rank order, so every rank returns the single-process list
        start, stop = _ddp.shard_bounds(len(reqs))
        with _ddp.local():
            mine = loglik(model, reqs[start:stop], batch_tokens, token_logprobs, None, desc, on_forward)
        return _ddp.gather_concat(mine, what=f"gather of {desc} results")
    scorer = _Scorer(model, len(reqs), token_logprobs, on_rows)
    if not reqs:
        return []
    _run_full(model, reqs, scorer, batch_tokens, desc, on_forward)
    return scorer.results(reqs)


def _pad_id(model) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if isinstance(pad, int) and pad >= 0 else 0


def _run_full(model, reqs, scorer: _Scorer, batch_tokens: int, desc: str, on_forward=None) -> None:
    """Each request as one sequence ctx + cont[:-1]; cont[j] is predicted at position len(ctx) - 1 + j."""
    dev = _device(model)
    lengths = [len(c) + len(x) - 1 for c, x in reqs]
    pad = _pad_id(model)
    for batch in progress(_batches(lengths, batch_tokens), desc=desc, unit="batch"):
        T = lengths[batch[0]]
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        bi, ti, tg, ow, ps = [], [], [], [], []
        for b, r in enumerate(batch):
            ctx, cont = reqs[r]
            seq = (ctx + cont)[:-1]
            ids[b, :len(seq)] = torch.tensor(seq)
            mask[b, :len(seq)] = 1
            n = len(cont)
            bi += [b] * n
            ti += range(len(ctx) - 1, len(ctx) - 1 + n)
            tg += cont
            ow += [r] * n
            ps += range(n)
        hidden, _ = _forward_rows(model, ids.to(dev), mask.to(dev))
        if on_forward is not None:
            on_forward()
        rows = hidden[torch.tensor(bi, device=dev), torch.tensor(ti, device=dev)]
        scorer.score(rows, torch.tensor(tg), torch.tensor(ow), torch.tensor(ps))
