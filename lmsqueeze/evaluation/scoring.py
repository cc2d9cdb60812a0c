"""Text scorers for generated answers against a reference, implemented here (no external packages).

- Exact Match and token F1 use SQuAD's normalisation: lower-case, drop punctuation, drop the
  articles a/an/the, collapse whitespace. F1 is the harmonic mean of token precision and recall
  over the multiset of shared tokens; two empty strings score 1.
- ROUGE-1 F and ROUGE-L F tokenise like the reference ROUGE scorer does by default: lower-case,
  every run of characters other than a-z and 0-9 is a separator, no stemming. ROUGE-1 F is the F1
  of unigram overlap (clipped counts); ROUGE-L F uses the longest common subsequence:
  P = LCS/len(pred), R = LCS/len(ref), F = 2PR/(P+R). Empty against empty scores 1, empty against
  non-empty 0.
"""
from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_ROUGE_SPLIT = re.compile(r"[^a-z0-9]+")


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def _f1(pred: list[str], ref: list[str]) -> float:
    if not pred and not ref:
        return 1.0
    if not pred or not ref:
        return 0.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def token_f1(pred: str, ref: str) -> float:
    return _f1(normalize_answer(pred).split(), normalize_answer(ref).split())


def rouge_tokens(s: str) -> list[str]:
    return [t for t in _ROUGE_SPLIT.split(s.lower()) if t]


def rouge1(pred: str, ref: str) -> float:
    return _f1(rouge_tokens(pred), rouge_tokens(ref))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    p_t, r_t = rouge_tokens(pred), rouge_tokens(ref)
    if not p_t and not r_t:
        return 1.0
    lcs = lcs_length(p_t, r_t)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(p_t), lcs / len(r_t)
    return 2 * p * r / (p + r)


def score_all(pred: str, ref: str) -> dict:
    return {"em": exact_match(pred, ref), "f1": token_f1(pred, ref), "rouge1": rouge1(pred, ref),
            "rougeL": rouge_l(pred, ref)}
