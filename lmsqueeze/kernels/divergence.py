"""Per-token divergence between two next-token distributions given as logits.

For rows i (tokens) with P = softmax(logits_p[i]) (the base model) and Q = softmax(logits_q[i]):

    KL(P||Q) = sum_v P_v (log P_v - log Q_v)            KL(Q||P) likewise
    JSD      = 1/2 KL(P||M) + 1/2 KL(Q||M),  M = (P+Q)/2,   0 <= JSD <= ln 2
    top1     = argmax P == argmax Q

All in fp32 (the reference in fp64), computed over row chunks so that no [batch, time, vocab] fp32
tensor exists beside the logits: at most CHUNK_ROWS x vocab fp32 per distribution at a time.

Backends (one dispatcher, `token_divergence`):
- "ref": fp64, whole tensor at once, written to be read; the oracle.
- "cpu": the same math in fp32 torch ops over row chunks. ATen's log_softmax/exp/sum are already
  AVX-512 vectorised and multithreaded, so a C++ kernel would only save the temporaries of one chunk
  (CHUNK_ROWS x V x 4 bytes, cache-sized work); not written.
- "triton": one program per tile of rows streaming over the vocabulary twice (online max / sum-exp
  for both distributions, then the sums), fp32; see lmsqueeze/kernels/triton/divergence.py.

`token_divergence_topk` is the variant against a cached base model kept as its top-k log-probs
plus the log of the mass outside them (see its docstring for the approximation and its error).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels._dispatch import choose_backend

IMPLEMENTED = ("ref", "cpu", "triton")
CHUNK_ROWS = 256  # 256 x 49152 fp32 = 48 MiB per temporary on SmolLM2
LN2 = math.log(2.0)


@dataclass
class Divergence:
    """Per-token results, each shaped like the leading dimensions of the logits; 0 where mask is False."""
    kl_pq: torch.Tensor   # KL(P||Q), fp32
    kl_qp: torch.Tensor   # KL(Q||P), fp32
    jsd: torch.Tensor     # Jensen-Shannon divergence (nats), fp32
    top1: torch.Tensor    # bool: argmax P == argmax Q
    # top-k variant only: the largest amount JSD can be under the true value, (r_P + r_Q)/2 ln 2
    jsd_slack: torch.Tensor | None = None


def _flatten(logits_p, logits_q, mask):
    if logits_p.shape != logits_q.shape:
        raise LmsqueezeError(f"logits_p {tuple(logits_p.shape)} and logits_q {tuple(logits_q.shape)} differ in shape "
                             f"(a different vocabulary? divergence needs models with the same tokenizer)")
    if logits_p.dim() < 1:
        raise LmsqueezeError("logits must have a vocabulary dimension")
    lead = logits_p.shape[:-1]
    p2 = logits_p.reshape(-1, logits_p.shape[-1])
    q2 = logits_q.reshape(-1, logits_q.shape[-1])
    if mask is None:
        rows = None
    else:
        if tuple(mask.shape) != tuple(lead):
            raise LmsqueezeError(f"mask {tuple(mask.shape)} must match the logits' leading dimensions {tuple(lead)}")
        rows = mask.reshape(-1).to(torch.bool).nonzero().squeeze(1)
    return lead, p2, q2, rows


def _scatter(lead, n, rows, vals: list[torch.Tensor], device) -> Divergence:
    outs = []
    for v in vals:
        full = torch.zeros(n, dtype=v.dtype, device=device)
        if rows is None:
            full = v
        else:
            full[rows] = v
        outs.append(full.reshape(lead))
    return Divergence(*outs)


def token_divergence_ref(logits_p, logits_q, mask=None) -> Divergence:
    """Reference: fp64 log-softmax of both, the four formulas as written above."""
    lead, p2, q2, rows = _flatten(logits_p, logits_q, mask)
    n = p2.shape[0]
    if rows is not None:
        p2, q2 = p2[rows], q2[rows]
    lp = torch.log_softmax(p2.double(), dim=-1)
    lq = torch.log_softmax(q2.double(), dim=-1)
    p, q = lp.exp(), lq.exp()
    kl_pq = (p * (lp - lq)).sum(-1)
    kl_qp = (q * (lq - lp)).sum(-1)
    lm = torch.log((p + q) / 2)
    jsd = 0.5 * (p * (lp - lm)).sum(-1) + 0.5 * (q * (lq - lm)).sum(-1)
    top1 = p2.argmax(-1) == q2.argmax(-1)
    return _scatter(lead, n, rows, [kl_pq.float(), kl_qp.float(), jsd.float(), top1], logits_p.device)


def _rows_cpu(p, q):
    """fp32 divergences of one chunk of rows [n, V]."""
    lp = torch.log_softmax(p.float(), dim=-1)
    lq = torch.log_softmax(q.float(), dim=-1)
    pe, qe = lp.exp(), lq.exp()
    d = lp - lq
    kl_pq = (pe * d).sum(-1)
    kl_qp = -(qe * d).sum(-1)
    # log M = logaddexp(lp, lq) - ln 2; JSD = 1/2 sum p (lp - lm) + 1/2 sum q (lq - lm)
    lm = torch.logaddexp(lp, lq).sub_(LN2)
    jsd = 0.5 * ((pe * (lp - lm)).sum(-1) + (qe * (lq - lm)).sum(-1))
    return kl_pq.clamp_min_(0), kl_qp.clamp_min_(0), jsd.clamp_(0, LN2), p.argmax(-1) == q.argmax(-1)


def token_divergence_cpu(logits_p, logits_q, mask=None, chunk_rows: int = CHUNK_ROWS) -> Divergence:
    """fp32 torch ops over chunks of chunk_rows rows (only valid rows are computed)."""
    lead, p2, q2, rows = _flatten(logits_p, logits_q, mask)
    n = p2.shape[0]
    idx = rows if rows is not None else torch.arange(n, device=p2.device)
    parts = [[], [], [], []]
    for i in range(0, idx.numel(), chunk_rows):
        r = idx[i:i + chunk_rows]
        for acc, v in zip(parts, _rows_cpu(p2[r], q2[r])):
            acc.append(v)
    if idx.numel() == 0:
        vals = [torch.zeros(0, device=p2.device)] * 3 + [torch.zeros(0, dtype=torch.bool, device=p2.device)]
    else:
        vals = [torch.cat(a) for a in parts]
    return _scatter(lead, n, rows, vals, p2.device)


def _choose(device: torch.device, backend: str | None) -> str:
    # The "cpu" backend here is torch code, not an op of lmsqueeze._C, so it is always available for
    # CPU tensors; the shared dispatcher decides everything else (triton on CUDA, forced backends).
    forced = backend or os.environ.get("LMSQUEEZE_BACKEND") or None
    if forced == "cpu" or (forced is None and device.type == "cpu"):
        if device.type != "cpu":
            raise LmsqueezeError(f"backend 'cpu' cannot run token_divergence: tensors are on {device.type}")
        return "cpu"
    return choose_backend("token_divergence", device, backend, ("ref", "triton"))


def token_divergence(logits_p, logits_q, mask=None, backend: str | None = None) -> Divergence:
    """Per-token KL(P||Q), KL(Q||P), JSD and top-1 agreement of logits [..., V] (any float dtype).

    mask: [...] bool, True for tokens to compute (others read 0 / False).
    backend: None (auto: cpu for CPU tensors, triton for CUDA), "ref", "cpu" or "triton".
    """
    chosen = _choose(logits_p.device, backend)
    if chosen == "ref":
        return token_divergence_ref(logits_p, logits_q, mask)
    if chosen == "cpu":
        return token_divergence_cpu(logits_p, logits_q, mask)
    from lmsqueeze.kernels.triton.divergence import token_divergence_triton

    lead, p2, q2, rows = _flatten(logits_p, logits_q, mask)
    n = p2.shape[0]
    if rows is not None:
        p2, q2 = p2[rows], q2[rows]
    return _scatter(lead, n, rows, list(token_divergence_triton(p2, q2)), logits_p.device)


# ---- the top-k base representation ------------------------------------------------------------------

def topk_summary(logits: torch.Tensor, k: int):
    """(top-k log-probs [n, k] fp32, their token ids [n, k] int64, log of the mass outside them [n] fp32)
    of logits [n, V], in fp32. The tail is a log-sum-exp over the tokens not kept (no 1 - sum cancellation)."""
    if not 1 <= k < logits.shape[-1]:
        raise LmsqueezeError(f"top-k size must be in 1..{logits.shape[-1] - 1} (vocabulary {logits.shape[-1]}), got {k}")
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = lp.topk(k, dim=-1)
    lp.scatter_(1, idx, float("-inf"))
    return vals, idx, torch.logsumexp(lp, dim=-1)


def _coarse_rows(p_top, p_tail, lq, q_top_idx):
    """Divergences between P and Q on the partition {k kept tokens one by one, everything else}."""
    q_top = lq.gather(1, q_top_idx)
    lq.scatter_(1, q_top_idx, float("-inf"))
    q_tail = torch.logsumexp(lq, dim=-1, keepdim=True)
    lp = torch.cat([p_top, p_tail[:, None]], dim=1)
    lqq = torch.cat([q_top, q_tail], dim=1)
    p, q = lp.exp(), lqq.exp()
    # 0 * log 0 = 0 for an empty tail
    d = torch.where((p > 0) | (q > 0), lp - lqq, torch.zeros_like(lp)).nan_to_num(0.0)
    kl_pq = torch.where(p > 0, p * d, torch.zeros_like(p)).sum(-1)
    kl_qp = torch.where(q > 0, -q * d, torch.zeros_like(q)).sum(-1)
    lm = torch.logaddexp(lp, lqq) - LN2
    tp = torch.where(p > 0, p * (lp - lm), torch.zeros_like(p))
    tq = torch.where(q > 0, q * (lqq - lm), torch.zeros_like(q))
    jsd = 0.5 * (tp + tq).sum(-1)
    slack = (p[:, -1] + q[:, -1]) * (0.5 * LN2)
    return kl_pq.clamp_min(0), kl_qp.clamp_min(0), jsd.clamp(0, LN2), slack


def token_divergence_topk(p_top: torch.Tensor, p_idx: torch.Tensor, p_log_tail: torch.Tensor,
                          logits_q: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> Divergence:
    """Divergences of Q = softmax(logits_q [n, V]) from a base P known only by its top-k log-probs
    p_top [n, k] (sorted, descending), their ids p_idx [n, k] and log_tail [n] = log(1 - sum exp p_top).

    Approximation: both distributions are coarse-grained to the same k+1 outcomes (the base's k kept
    tokens, and "any other token" carrying P's tail mass r_P and Q's mass r_Q outside those tokens),
    and the divergences are computed exactly on that partition. By the chain rule,

        KL(P||Q) = KL_k(P||Q) + r_P * KL(P_tail/r_P || Q_tail/r_Q)     (likewise KL(Q||P) with r_Q)

    so the cached value is a lower bound (data-processing inequality; the same for JSD, an
    f-divergence), exact when the tails agree in shape or vanish. For JSD the error is bounded:
    each token contributes at most (p_v + q_v)/2 * ln 2, so

        0 <= JSD - JSD_k <= (r_P + r_Q)/2 * ln 2.

    The KL error has no bound from the top-k alone (it is r_P times an unknown tail KL); it is
    measured on SmolLM2 in the report. top1 is exact: the base argmax is the lowest id among the
    top-k entries tied with p_top[:, 0].
    The result's jsd_slack holds (r_P + r_Q)/2 ln 2 per token, so [jsd, jsd + jsd_slack] brackets the truth.
    """
    n = logits_q.shape[0]
    if p_top.shape[0] != n or p_idx.shape != p_top.shape or p_log_tail.shape != (n,):
        raise LmsqueezeError(f"top-k cache rows {tuple(p_top.shape)}/{tuple(p_idx.shape)}/{tuple(p_log_tail.shape)} "
                             f"do not match {n} model rows")
    outs = [[], [], [], [], []]
    for i in range(0, n, chunk_rows):
        sl = slice(i, i + chunk_rows)
        lq = torch.log_softmax(logits_q[sl].float(), dim=-1)
        # the base argmax in torch.argmax's sense: the lowest id among tokens tied at the top (topk
        # orders tied values arbitrarily, and bf16 logits tie often: 2% of SmolLM2 tokens)
        tied = p_top[sl] == p_top[sl, :1]
        base_arg = torch.where(tied, p_idx[sl], torch.full_like(p_idx[sl], torch.iinfo(p_idx.dtype).max)).min(-1).values
        top1 = lq.argmax(-1) == base_arg
        idx = p_idx[sl].long()
        kl_pq, kl_qp, jsd, slack = _coarse_rows(p_top[sl].float(), p_log_tail[sl].float(), lq, idx)
        for acc, v in zip(outs, (kl_pq, kl_qp, jsd, top1, slack)):
            acc.append(v)
    if n == 0:
        z = torch.zeros(0, device=logits_q.device)
        return Divergence(z, z, z, torch.zeros(0, dtype=torch.bool, device=logits_q.device), z)
    return Divergence(*[torch.cat(a) for a in outs])
