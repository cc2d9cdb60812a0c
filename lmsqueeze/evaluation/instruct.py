"""Instruction following on Alpaca: greedy answers scored against the reference, and the reference's NLL.

Prompt: the user message "instruction\n\ninput" in the tokenizer's chat template (with the generation
prompt) when it has one, else the Alpaca template ("### Instruction: ... ### Response:").
Generation: batched greedy decoding with left padding, at most `max_new_tokens` new tokens, stopping
at the EOS token(s); scored with EM, token F1 (SQuAD normalisation), ROUGE-1 F and ROUGE-L F
(`scoring`). The reference answer is also scored as a continuation of the prompt (`loglik`): its NLL
per token and, against the base model, the per-token divergences on those tokens.
"""
from __future__ import annotations

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.scoring import score_all
from lmsqueeze.progress import progress

ALPACA_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_TEMPLATE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                         "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def prompt_ids(tokenizer, record: dict) -> list[int]:
    instruction, inp = record["instruction"], record.get("input") or ""
    if getattr(tokenizer, "chat_template", None):
        user = instruction + (f"\n\n{inp}" if inp else "")
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                             tokenize=False)
    else:
        tmpl = ALPACA_TEMPLATE_INPUT if inp else ALPACA_TEMPLATE
        text = tmpl.format(instruction=instruction, input=inp)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_requests(tokenizer, records: list[dict]) -> list[tuple[list[int], list[int]]]:
    reqs = []
    for i, r in enumerate(records):
        ref = tokenizer(r["output"], add_special_tokens=False)["input_ids"]
        if not ref:
            raise LmsqueezeError(f"alpaca record {i} has an empty reference output")
        reqs.append((prompt_ids(tokenizer, r), ref))
    return reqs


def _stop_ids(model, tokenizer) -> list[int]:
    ids = set()
    for src in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return sorted(ids)


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 128,
                    batch_tokens: int = 4096) -> list[str]:
    """Greedy completions of token prompts, batched by length under batch_tokens, left-padded."""
    if max_new_tokens < 1:
        raise LmsqueezeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    dev = next(model.parameters()).device
    stops = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * (len(prompts[cur[0]]) + max_new_tokens) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    out: list[str] = [""] * len(prompts)
    for batch in progress(batches, desc="generate", unit="batch"):
        T = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for b, i in enumerate(batch):
            ids[b, T - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[b, T - len(prompts[i]):] = 1
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stops or None, pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)
        for b, i in enumerate(batch):
            out[i] = tokenizer.decode(gen[b, T:].tolist(), skip_special_tokens=True).strip()
    return out


def score_generations(records: list[dict], generations: list[str]) -> dict:
    per = [{"item": i, "prediction": g, "reference": r["output"], **score_all(g, r["output"])}
           for i, (r, g) in enumerate(zip(records, generations))]
    n = len(per)
    summary = {k: sum(p[k] for p in per) / n for k in ("em", "f1", "rouge1", "rougeL")}
    summary["items"] = n
    return {"summary": summary, "items": per}
