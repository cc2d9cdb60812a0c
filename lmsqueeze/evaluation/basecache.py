"""The base model's per-token output, cached on disk, so base and compressed model are never loaded together.

For a list of loglik requests the base model is run once and, for every scored token, we keep

    top_logp [N, k] fp32   the k largest log-probabilities (sorted, descending)
    top_idx  [N, k] int32  their token ids
    log_tail [N]    fp32   log of the probability mass outside them (log-sum-exp, no cancellation)
    target_logp [N] fp32   log-probability of the reference (next) token

plus per request its summed log-probability and greedy match (`items.json`). N is the total number
of continuation tokens; `offsets[i]` is where request i's rows start. Divergences computed against
this are those of the base coarse-grained to its top k tokens plus one "other" bucket
(`kernels.token_divergence_topk`: a lower bound; JSD error <= (r_P + r_Q)/2 ln 2). Cost: 8k + 8 bytes
per token (k = 64: 520 B; 100k tokens: 52 MB).

A cache lives in one directory under LMSQUEEZE_CACHE/eval-base/, named by the base model, the task,
seqlen, limit and k, plus a hash of the base model's identity (path, config, a checksum of its
weights), its tokenizer, the exact request tokens and k; it is written to a temporary directory and
renamed, so an interrupted run leaves nothing half written, and reused whenever the key matches.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.loglik import loglik
from lmsqueeze.kernels.divergence import topk_summary

log = logging.getLogger("lmsqueeze")
FORMAT = 1


def model_identity(model) -> str:
    """A hash of what makes a model's outputs: its path/name, config and a checksum of every weight tensor
    (sum and sum of squares of its first 65536 elements), so a pruned copy never matches its base."""
    h = hashlib.sha256()
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.reshape(-1)[:65536].double()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{flat.sum().item():.10e}:{(flat * flat).sum().item():.10e}"
                     .encode())
    return h.hexdigest()


def tokenizer_identity(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def logit_count(model) -> int:
    """How many logits the model produces per token (its output vocabulary)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_same_tokenizer(tokenizer, base_tokenizer, model_name="model", base_name="base") -> None:
    """Divergence compares distributions token by token: both must use one vocabulary."""
    if tokenizer_identity(tokenizer) != tokenizer_identity(base_tokenizer):
        raise LmsqueezeError(f"'{model_name}' and base '{base_name}' use different tokenizers: divergence needs a "
                             f"model with the same tokenizer as its base")


def check_same_vocab(model_logits: int, base_logits: int, model_name="model", base_name="base") -> None:
    if model_logits != base_logits:
        raise LmsqueezeError(f"'{model_name}' has a vocabulary of {model_logits} logits but base '{base_name}' has "
                             f"{base_logits}: divergence needs a model with the same tokenizer as its base")


def requests_hash(requests) -> str:
    h = hashlib.sha256()
    for ctx, cont in requests:
        h.update(json.dumps([list(ctx), list(cont)]).encode())
    return h.hexdigest()


@dataclass
class BaseCache:
    path: Path
    meta: dict
    items: list[dict]            # per request: logprob, ntokens, greedy
    rows: dict[str, torch.Tensor] | None  # top_logp, top_idx, log_tail, target_logp, offsets

    def request_rows(self, i: int) -> slice:
        off = self.rows["offsets"]
        return slice(int(off[i]), int(off[i + 1]))


def cache_root() -> Path:
    from lmsqueeze.models import cache_dir

    return cache_dir() / "eval-base"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:60] or "x"


def cache_path(base_name: str, task: str, key: dict, root: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{_slug(Path(base_name).name or base_name)}-{_slug(task)}-s{key.get('seqlen')}-l{key.get('limit')}" \
           f"-k{key.get('k')}-{digest}"
    return (root or cache_root()) / name


def load_cache(path: Path) -> BaseCache | None:
    meta_p = path / "meta.json"
    if not meta_p.exists():
        return None
    meta = json.loads(meta_p.read_text())
    if meta.get("format") != FORMAT:
        return None
    items = json.loads((path / "items.json").read_text())
    rows = None
    if (path / "rows.safetensors").exists():
        from safetensors.torch import load_file

        rows = load_file(str(path / "rows.safetensors"))
    return BaseCache(path, meta, items, rows)


@torch.no_grad()
def build_cache(base, requests, path: Path, k: int | None, meta: dict, batch_tokens: int = 4096,
                desc: str = "base") -> BaseCache:
    """Run the base model over `requests` and write the cache at `path` (atomically). k=None: items only."""
    lens = [len(c) for _, c in requests]
    offsets = torch.zeros(len(requests) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(lens, dtype=torch.long).cumsum(0)
    n = int(offsets[-1])
    rows = None
    on_rows = None
    if k is not None:
        rows = {"top_logp": torch.empty(n, k), "top_idx": torch.empty(n, k, dtype=torch.int32),
                "log_tail": torch.empty(n), "target_logp": torch.empty(n), "offsets": offsets}

        def on_rows(owner, pos, logits, targets):
            at = offsets[owner] + pos
            top, idx, tail = topk_summary(logits, k)
            lf = logits.float()
            tl = lf.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(lf, dim=-1)
            rows["top_logp"][at] = top.cpu()
            rows["top_idx"][at] = idx.to(torch.int32).cpu()
            rows["log_tail"][at] = tail.cpu()
            rows["target_logp"][at] = tl.cpu()

    meta = {**meta, "logits": logit_count(base)}
    res = loglik(base, requests, batch_tokens=batch_tokens, on_rows=on_rows, desc=desc)
    items = [{"logprob": r.logprob, "ntokens": r.ntokens, "greedy": r.greedy} for r in res]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if rows is not None:
            from safetensors.torch import save_file

            save_file({a: t.contiguous() for a, t in rows.items()}, str(tmp / "rows.safetensors"))
        (tmp / "items.json").write_text(json.dumps(items))
        (tmp / "meta.json").write_text(json.dumps({**meta, "format": FORMAT, "tokens": n}, indent=2, default=str))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("base cache written: %s (%d requests, %d tokens)", path, len(requests), n)
    return BaseCache(path, meta, items, rows)
