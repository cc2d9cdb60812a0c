"""The model interface the safety tasks reduce over, and a plain Hugging Face implementation of it.

Every safety task is a pure reduction over two calls:

- `loglik(requests)`: for each (context, continuation), the summed log-probability of the
  continuation's tokens given the context, and how many tokens that is.
- `generate(prompts, max_new_tokens)`: greedy continuations, the new text only.

Tokenization rules of `HFBackend` (kept by whatever replaces its internals):
- context and continuation are tokenized separately, without special tokens, and concatenated; so a
  continuation is the same token sequence behind every context (multiple-choice options compete on
  equal terms). Templates put the separating space at the start of the continuation (" answer").
- the sequence starts with the tokenizer's BOS token when it has one (`tokenizer.bos_token_id`).
- an empty context scores the sentence unconditionally: every continuation token after the BOS;
  without a BOS the first token has nothing to be predicted from, so all tokens but the first are
  scored (and the count says so).
- sequences longer than the model's context drop tokens from the left of the context.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.progress import progress


@runtime_checkable
class ModelBackend(Protocol):
    def loglik(self, requests: list[tuple[str, str]]) -> list[tuple[float, int]]:
        """(summed log p(continuation | context), continuation token count) per request."""

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuation text (prompt not included) per prompt."""


class HFBackend:
    """`ModelBackend` over a Hugging Face causal LM and its tokenizer.

    loglik: requests sorted by length (longest first) into right-padded batches of `batch_size`;
    fp32 log-softmax only over the continuation positions, so no [batch, time, vocab] fp32 tensor is
    held. generate: left-padded batches through `model.generate` with greedy decoding.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, desc: str = ""):
        if batch_size < 1:
            raise LmsqueezeError(f"batch size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size, self.desc = model, tokenizer, batch_size, desc
        self.device = next(model.parameters()).device
        self.bos = tokenizer.bos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad is None:
            self.pad = 0  # padded positions are masked out and never read
        self.max_len = int(getattr(model.config, "max_position_embeddings", 0) or 2048)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _sequence(self, context: str, continuation: str) -> tuple[list[int], int]:
        """(token ids, index of the first scored token)."""
        prefix = ([self.bos] if self.bos is not None else []) + self._encode(context)
        cont = self._encode(continuation)
        if not cont:
            raise LmsqueezeError(f"continuation {continuation!r} has no tokens")
        if not prefix:  # no BOS and no context: the first token is given, the rest scored
            prefix, cont = cont[:1], cont[1:]
        ids = prefix + cont
        start = len(prefix)
        if len(ids) > self.max_len:  # drop context tokens from the left
            cut = len(ids) - self.max_len
            ids, start = ids[cut:], max(1, start - cut)
        return ids, start

    @torch.no_grad()
    def loglik(self, requests: list[tuple[str, str]]) -> list[tuple[float, int]]:
        seqs = [self._sequence(c, x) for c, x in requests]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in progress(batches, desc=f"loglik{self.desc}", unit="batch"):
            width = len(seqs[batch[0]][0])
            ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = seqs[i][0]
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, i in enumerate(batch):
                seq, start = seqs[i]
                # position t predicts token t+1: continuation tokens [start, len) come from [start-1, len-1)
                lp = torch.log_softmax(logits[row, start - 1:len(seq) - 1].float(), dim=-1)
                target = torch.tensor(seq[start:], device=lp.device)
                out[i] = (float(lp.gather(1, target[:, None]).sum()), len(seq) - start)
        return out

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        if max_new_tokens < 1:
            raise LmsqueezeError(f"max new tokens must be >= 1, got {max_new_tokens}")
        prefix = [self.bos] if self.bos is not None else []
        encoded = [(prefix + self._encode(p))[-(self.max_len - max_new_tokens):] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        out = [""] * len(prompts)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        eos = self.tokenizer.eos_token_id
        for batch in progress(batches, desc=f"generate{self.desc}", unit="batch"):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends at the same column
                seq = encoded[i]
                ids[row, width - len(seq):] = torch.tensor(seq)
                mask[row, width - len(seq):] = 1
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      pad_token_id=self.pad, eos_token_id=eos, temperature=None, top_p=None,
                                      top_k=None)
            for row, i in enumerate(batch):
                new = gen[row, width:].tolist()
                if eos is not None and eos in new:
                    new = new[:new.index(eos)]
                out[i] = self.tokenizer.decode(new, skip_special_tokens=True)
        return out
