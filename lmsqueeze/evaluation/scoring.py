"""Text scorers for generated answers against a reference.

- Exact Match and token F1 use SQuAD's normalisation: lower-case, drop punctuation, drop the
  articles a/an/the, collapse whitespace. F1 is the harmonic mean of token precision and recall
  over the multiset of shared tokens; two empty strings score 1.
- ROUGE-1 F and ROUGE-L F come from Google's `rouge-score` package (the reference implementation;
  default tokenizer: lower-case, every run of characters other than a-z and 0-9 separates, no
  stemming): ROUGE-1 F is the F1 of clipped unigram overlap, ROUGE-L F that of the longest common
  subsequence. Empty against empty scores 1 here (the package says 0), empty against non-empty 0.
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


_ROUGE = None


def _rouge():
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    return _ROUGE


def rouge(pred: str, ref: str) -> tuple[float, float]:
    """(ROUGE-1 F, ROUGE-L F) of a prediction against its reference."""
    scores = _rouge().score(ref, pred)
    if not scores["rouge1"].precision and not scores["rouge1"].recall and not _ROUGE_SPLIT.sub("", (pred + ref).lower()):
        return 1.0, 1.0  # both empty (no tokens): the same answer
    return scores["rouge1"].fmeasure, scores["rougeL"].fmeasure


def score_all(pred: str, ref: str) -> dict:
    r1, rl = rouge(pred, ref)
    return {"em": exact_match(pred, ref), "f1": token_f1(pred, ref), "rouge1": r1, "rougeL": rl}
