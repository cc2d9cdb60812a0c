"""The model interface every task uses: log-likelihoods, perplexity windows, generation, per-token rows.

`Backend(model, tokenizer)` answers, batched under a token budget and sharded under torchrun:
- `loglik(pairs)`: (context text, continuation text) -> summed log-prob, token count, greedy match;
- `loglik_tokens(requests)`: the same on token ids (perplexity windows, pre-tokenized items);
- `token_rows(requests, row_fn)`: per scored token, whatever `row_fn` computes from its logits (the
  base's top-k log-probs, the model's divergence from them), gathered in request order;
- `generate(prompts, ...)`: greedy or sampled (seeded, k per prompt) continuations.
Its method names follow lm-evaluation-harness's model interface too (`loglikelihood`,
`loglikelihood_rolling`, `generate_until`), so an adapter to or from it is a thin file.

The rules, once, for every task:
- context/continuation: trailing whitespace of the context moves to the start of the continuation
  ("Answer: " + "yes" scores as "Answer:" + " yes"); both are tokenized without special tokens and
  concatenated, so a continuation is the same tokens behind every context.
- the start token, put once in front of every raw-text context: the tokenizer's BOS, or its document
  separator when it has no BOS or its BOS is a chat-turn marker (a token the chat template writes, as
  SmolLM2's `<|im_start|>`, whose ~12 nats would dominate a 4-token sentence). Chat-formatted prompts
  carry whatever start the template writes.
- generation: a prompt longer than the model's positions minus the new tokens is left-truncated and
  counted (`GenerationResult.truncated`); new tokens at or above the positions is an error; it stops on
  every end-of-sequence id of the tokenizer, the model config and its generation config; instruction
  prompts go through the chat template when the model has one (`chat_template=False` turns it off).
- the model's ordinary top-level forward runs (see `loglik`), in `batch_tokens`-token batches; results
  do not depend on the batch size beyond float rounding.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmsqueeze import distributed as _ddp
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.loglik import LoglikResult
from lmsqueeze.evaluation.loglik import loglik as _loglik
from lmsqueeze.models import max_positions
from lmsqueeze.progress import progress

log = logging.getLogger("lmsqueeze")

# Document separators tried, in order, when BOS is missing or is a chat-turn marker.
DOC_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")

# row_fn(request index [n], position in continuation [n], logits [n, V], targets [n]) -> {name: tensor [n, ...]}
RowFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], dict]


def start_token(tokenizer) -> int | None:
    """The id put once before a raw-text context (see the module docstring); None if the tokenizer has none."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    bos = tokenizer.bos_token
    if bos is not None and tokenizer.bos_token_id is not None and bos not in template:
        return int(tokenizer.bos_token_id)
    vocab = tokenizer.get_vocab()
    for name in DOC_SEPARATORS:
        if name in vocab and name not in template:
            return int(vocab[name])
    eos = tokenizer.eos_token
    if eos is not None and tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None


def split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the start of the continuation."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def stop_ids(model, tokenizer) -> list[int]:
    """Every end-of-sequence id the tokenizer, the model config and its generation config declare."""
    ids = set()
    gen = getattr(model, "generation_config", None)
    for src in (tokenizer.eos_token_id, getattr(model.config, "eos_token_id", None),
                getattr(gen, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src if x is not None)
    return sorted(ids)


@dataclass
class GenerationResult:
    """texts[i][j]: sample j of prompt i (the new text only); truncated: prompts cut from the left to fit."""
    texts: list[list[str]]
    truncated: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    new_tokens: list[list[int]] = field(default_factory=list)


class Backend:
    """A Hugging Face causal LM and its tokenizer behind the interface above.

    batch_tokens: token budget of one forward (batch x padded length). chat_template: format instruction
    prompts with the tokenizer's chat template when it has one.
    """

    def __init__(self, model, tokenizer, batch_tokens: int = 4096, chat_template: bool = True, name: str = ""):
        if batch_tokens < 1:
            raise LmsqueezeError(f"batch_tokens must be >= 1, got {batch_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_tokens, self.chat_template, self.name = batch_tokens, chat_template, name
        self.start = start_token(tokenizer)
        self.max_len = max_positions(model)
        self.forwards = 0  # batches run through the model (the study counts base forwards with it)

    # ---- tokenization -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(start + context ids, continuation ids) under the whitespace and start-token rules."""
        context, continuation = split_whitespace(context, continuation)
        cont = self.encode(continuation)
        if not cont:
            raise LmsqueezeError(f"continuation {continuation!r} has no tokens: nothing to score")
        ctx = ([self.start] if self.start is not None else []) + self.encode(context)
        if not ctx:  # no start token and no context: the first token is given, the rest scored
            if len(cont) < 2:
                raise LmsqueezeError(f"{continuation!r} is one token and the tokenizer has no start token to "
                                     f"predict it from")
            ctx, cont = cont[:1], cont[1:]
        return ctx, cont

    def has_chat_template(self) -> bool:
        return self.chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def instruction_prompt(self, user: str, fallback: str | None = None) -> list[int]:
        """Token ids of an instruction prompt: the user turn in the chat template (with the generation
        prompt) when the model has one and chat_template is on; else `fallback` (default: the text) after
        the start token."""
        if self.has_chat_template():
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                                      add_generation_prompt=True, tokenize=False)
            return self.encode(text)
        return ([self.start] if self.start is not None else []) + self.encode(fallback if fallback is not None
                                                                              else user)

    def text_prompt(self, text: str) -> list[int]:
        """Token ids of a raw text to continue: start token + text."""
        return ([self.start] if self.start is not None else []) + self.encode(text)

    # ---- log-likelihood ---------------------------------------------------------------------------

    def loglik(self, pairs: list[tuple[str, str]], desc: str = "loglik") -> list[LoglikResult]:
        return self.loglik_tokens([self.encode_pair(c, x) for c, x in pairs], desc=desc)

    def loglik_tokens(self, requests, desc: str = "loglik", token_logprobs: bool = False) -> list[LoglikResult]:
        """Sharded under torchrun inside `loglik` (contiguous blocks, gathered in order)."""
        return _loglik(self.model, requests, batch_tokens=self.batch_tokens, token_logprobs=token_logprobs,
                       desc=self._desc(desc), on_forward=self._count)

    def token_rows(self, requests, row_fn: RowFn, desc: str = "rows") -> tuple[list[LoglikResult], dict]:
        """(loglik results, {name: tensor [N, ...]}) with N the continuation tokens of all requests in order
        (request i's rows start at the cumulative sum of the earlier continuation lengths)."""
        requests = [(list(c), list(x)) for c, x in requests]
        start, stop = _ddp.shard_bounds(len(requests)) if _ddp.active() else (0, len(requests))
        mine = requests[start:stop]
        lens = torch.tensor([len(x) for _, x in mine], dtype=torch.long)
        offsets = torch.zeros(len(mine) + 1, dtype=torch.long)
        offsets[1:] = lens.cumsum(0)
        rows: dict[str, torch.Tensor] = {}

        def on_rows(owner, pos, logits, targets):
            got = row_fn(owner + start, pos, logits, targets)
            at = offsets[owner] + pos
            for name, t in got.items():
                if name not in rows:
                    rows[name] = torch.zeros((int(offsets[-1]),) + tuple(t.shape[1:]), dtype=t.dtype)
                rows[name][at] = t.cpu()

        with _ddp.local():
            res = _loglik(self.model, mine, batch_tokens=self.batch_tokens, on_rows=on_rows,
                          desc=self._desc(desc), on_forward=self._count) if mine else []
        if not _ddp.active():
            return res, rows
        per_req = [{name: t[int(offsets[i]):int(offsets[i + 1])] for name, t in rows.items()}
                   for i in range(len(mine))]
        res = _ddp.gather_concat(res, what=f"gather of {desc} results")
        per_req = _ddp.gather_concat(per_req, what=f"gather of {desc} rows")
        names = next((list(p) for p in per_req if p), [])
        return res, {n: torch.cat([p[n] for p in per_req]) for n in names}

    # ---- generation -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, k: int = 1, seed: int = 0,
                 desc: str = "generate") -> GenerationResult:
        """k continuations of each token prompt (greedy: k must be 1), the new text only.

        Sampled generation is seeded per batch (seed + the index of the batch's first prompt), so the same
        prompts, settings and budget give the same texts. Sharded under torchrun by prompt blocks.
        """
        if max_new_tokens < 1:
            raise LmsqueezeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if k < 1 or (k > 1 and not sample):
            raise LmsqueezeError(f"k samples per prompt must be >= 1, and 1 for greedy decoding; got {k}")
        if sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise LmsqueezeError(f"sampling needs temperature > 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
        limit = self.max_len
        if limit is not None and max_new_tokens >= limit:
            raise LmsqueezeError(f"max_new_tokens {max_new_tokens} does not fit the model's {limit} positions "
                                 f"(need fewer than {limit}, leaving room for the prompt)")
        keep = None if limit is None else limit - max_new_tokens
        fitted, truncated = [], 0
        for p in prompts:
            p = list(p)
            if not p:
                raise LmsqueezeError("an empty prompt: generation needs at least one token (the start token)")
            if keep is not None and len(p) > keep:
                p, truncated = p[-keep:], truncated + 1
            fitted.append(p)
        if truncated:
            log.warning("%s: %d of %d prompts longer than the model's %d positions minus %d new tokens were cut "
                        "from the left", desc, truncated, len(prompts), limit, max_new_tokens)
        start, stop = _ddp.shard_bounds(len(fitted)) if _ddp.active() else (0, len(fitted))
        texts, new_ids = self._generate_block(fitted[start:stop], start, max_new_tokens, sample, temperature,
                                              top_p, k, seed, desc)
        if _ddp.active():
            texts = _ddp.gather_concat(texts, what=f"gather of {desc} texts")
            new_ids = _ddp.gather_concat(new_ids, what=f"gather of {desc} tokens")
        return GenerationResult(texts, truncated, [len(p) for p in fitted], new_ids)

    def _generate_block(self, prompts, first, max_new_tokens, sample, temperature, top_p, k, seed, desc):
        dev = next(self.model.parameters()).device
        stops = stop_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (stops[0] if stops else 0)
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        batches, cur = [], []
        for i in order:
            if cur and (len(cur) + 1) * k * (len(prompts[cur[0]]) + max_new_tokens) > self.batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        texts: list[list[str]] = [[] for _ in prompts]
        new_ids: list[list[int]] = [[] for _ in prompts]
        opts = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        for batch in progress(batches, desc=self._desc(desc), unit="batch"):
            T = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), T), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for b, i in enumerate(batch):  # left padding: every prompt ends at the same column
                ids[b, T - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[b, T - len(prompts[i]):] = 1
            if sample:
                torch.manual_seed(seed + first + min(batch))
            gen = self.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), num_beams=1,
                                      max_new_tokens=max_new_tokens, eos_token_id=stops or None, pad_token_id=pad,
                                      num_return_sequences=k, **opts)
            self._count()
            for b, i in enumerate(batch):
                for j in range(k):
                    new = gen[b * k + j, T:].tolist()
                    cut = next((n for n, t in enumerate(new) if t in stops), len(new))
                    new_ids[i].append(cut)
                    texts[i].append(self.tokenizer.decode(new[:cut], skip_special_tokens=True))
        return texts, new_ids

    # ---- lm-evaluation-harness's interface ----------------------------------------------------------

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """[(sum log p(continuation | context), greedy match)] per (context, continuation)."""
        return [(r.logprob, r.greedy) for r in self.loglik(requests, desc="loglikelihood")]

    def loglikelihood_rolling(self, texts: list[str], seqlen: int | None = None) -> list[float]:
        """Summed log-likelihood of each whole text, over disjoint windows (the start token is the first
        window's context; each later window is conditioned on its own first token, as in perplexity)."""
        seqlen = seqlen or self.max_len or 2048
        reqs, owner = [], []
        for i, text in enumerate(texts):
            ids = self.text_prompt(text)
            for s in range(0, len(ids) - 1, seqlen - 1):
                w = ids[s:s + seqlen]
                if len(w) >= 2:
                    reqs.append((w[:1], w[1:]))
                    owner.append(i)
        out = [0.0] * len(texts)
        for i, r in zip(owner, self.loglik_tokens(reqs, desc="loglikelihood_rolling")):
            out[i] += r.logprob
        return out

    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        """Greedy continuation of each (context, {"until": [str], "max_gen_toks": int}), cut at the first stop
        string."""
        out = []
        for ctx, kw in requests:
            gen = self.generate([self.text_prompt(ctx)], int(kw.get("max_gen_toks", 256)))
            text = gen.texts[0][0]
            for s in kw.get("until") or []:
                if s and s in text:
                    text = text[:text.index(s)]
            out.append(text)
        return out

    # ---- internals --------------------------------------------------------------------------------

    def _count(self) -> None:
        self.forwards += 1

    def _desc(self, what: str) -> str:
        return f"{what} [{self.name}]" if self.name else what
