"""Intervals for every metric: Wilson for proportions, bootstrap for the rest, paired deltas against the base.

Every metric with per-item values is reported as

    {"value", "ci", "n", "base", "delta", "delta_ci", "interval"}

`base`/`delta`/`delta_ci` only when the base model's values on the same items are given; `interval`
names the method. A statistic is a function of per-item columns, `stat(cols) -> value`, where `cols`
maps a name to an array whose last axis runs over items; written with sums and means over the last
axis, one function evaluates the data ([n]) and a batch of resamples ([resamples, n]) alike.

Methods (95% two-sided by default):
- a proportion (the mean of a 0/1 column, `proportion(name)`): the Wilson score interval
  (scipy.stats.binomtest(...).proportion_ci(method="wilson")). It keeps its width at small n where a
  bootstrap collapses (3 of 3 correct: Wilson [0.44, 1], bootstrap [1, 1]).
- the paired difference of two proportions on the same items: Newcombe's hybrid score interval for
  paired data (Newcombe 1998, Stat. Med. 17:2635, method 10), from the two Wilson intervals and the phi
  correlation of the pairs; it too keeps its width when no item changed.
- anything else (means, ratios of sums, exp of means): the percentile bootstrap over items, resampled
  by scipy.stats.bootstrap (paired: the same resampled items for model and base, so the delta's interval
  reflects only how the two differ on the items). With `strata`, items are resampled within their
  stratum (scipy has no stratified resampling; the percentile rule is the same). Resamples where the
  statistic is undefined (a ratio with a zero denominator) are left out of the interval.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats as _sps

from lmsqueeze.errors import LmsqueezeError

Stat = Callable[[dict], np.ndarray]
RESAMPLES = 1000
RESAMPLE_CHUNK = 200  # resamples evaluated per chunk: memory chunk x n per column


class _ColumnMean:
    """mean over items of one column; `binary` marks a 0/1 column (a proportion: Wilson interval)."""

    def __init__(self, column: str, binary: bool):
        self.column, self.binary = column, binary

    def __call__(self, c):
        return np.mean(c[self.column], axis=-1)


def mean_of(column: str) -> Stat:
    """The mean of a per-item column (bootstrap interval)."""
    return _ColumnMean(column, binary=False)


def proportion(column: str) -> Stat:
    """The share of items whose 0/1 column is 1 (Wilson interval; Newcombe for the paired delta)."""
    return _ColumnMean(column, binary=True)


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def wilson(successes: int, n: int, confidence: float = 0.95) -> list[float | None]:
    """Wilson score interval of successes/n; [None, None] for n = 0."""
    if n == 0:
        return [None, None]
    ci = _sps.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


def newcombe_paired(x: np.ndarray, y: np.ndarray, confidence: float = 0.95) -> list[float | None]:
    """Interval of mean(x) - mean(y) for paired 0/1 items (Newcombe 1998, method 10)."""
    x, y = np.asarray(x, dtype=bool), np.asarray(y, dtype=bool)
    n = x.size
    if n == 0:
        return [None, None]
    a, b = int(np.sum(x & y)), int(np.sum(x & ~y))
    c, d = int(np.sum(~x & y)), int(np.sum(~x & ~y))
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, confidence)
    l2, u2 = wilson(a + c, n, confidence)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(den) if den > 0 else 0.0
    delta = p1 - p2
    dl = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    du = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return [max(-1.0, delta - dl), min(1.0, delta + du)]


def _is_binary(v) -> bool:
    v = np.asarray(v)
    return v.size > 0 and bool(np.all((v == 0) | (v == 1)))


def _percentile(samples: np.ndarray, alpha: float) -> list[float | None]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [None, None]
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]


def _stratified_indices(strata: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    n = strata.size
    idx = np.empty((resamples, n), dtype=np.int64)
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        idx[:, members] = members[rng.integers(0, members.size, size=(resamples, members.size))]
    return idx


def _take(cols: dict, idx: np.ndarray) -> dict:
    return {k: np.asarray(v)[idx] for k, v in cols.items()}


def _bootstrap(stat: Stat, cols: dict, base_cols: dict | None, strata, resamples: int, seed: int,
               alpha: float) -> tuple[list, list | None]:
    """(ci of stat, ci of stat - base stat) by the percentile bootstrap over items."""
    n = len(next(iter(cols.values())))
    samples, deltas = [], []

    def one_chunk(idx):
        s = np.asarray(stat(_take(cols, idx)), dtype=np.float64)
        samples.append(s)
        if base_cols is not None:
            deltas.append(s - np.asarray(stat(_take(base_cols, idx)), dtype=np.float64))

    if strata is None:
        # scipy draws the resamples (of item indices, so one statistic may use several columns and the
        # base sees the same items); the percentile rule is applied below to drop undefined resamples
        def on_indices(i, axis=-1):
            i = np.asarray(i, dtype=np.int64)
            if i.ndim == 1:  # scipy also evaluates the statistic on the data itself: not a resample
                return stat(_take(cols, i))
            one_chunk(i)
            return samples[-1]

        for start in range(0, resamples, RESAMPLE_CHUNK):
            k = min(RESAMPLE_CHUNK, resamples - start)
            _sps.bootstrap((np.arange(n),), on_indices, n_resamples=k, vectorized=True, method="percentile",
                           random_state=np.random.default_rng([seed, start]), confidence_level=1 - alpha)
    else:
        rng = np.random.default_rng(seed)
        strata = np.asarray(strata)
        for start in range(0, resamples, RESAMPLE_CHUNK):
            one_chunk(_stratified_indices(strata, min(RESAMPLE_CHUNK, resamples - start), rng))
    ci = _percentile(np.concatenate(samples).reshape(-1), alpha)
    dci = _percentile(np.concatenate(deltas).reshape(-1), alpha) if base_cols is not None else None
    return ci, dci


def estimate(stat: Stat, cols: dict, base_cols: dict | None = None, strata: Sequence | None = None,
             resamples: int = RESAMPLES, seed: int = 0, alpha: float = 0.05) -> dict:
    """{value, ci, n, interval} and, with base columns over the same items, {base, delta, delta_ci}.

    Undefined values (a ratio with a zero denominator) come out as None.
    """
    if not cols:
        raise LmsqueezeError("a metric needs at least one per-item column")
    n = len(next(iter(cols.values())))
    if base_cols is not None and len(next(iter(base_cols.values()))) != n:
        raise LmsqueezeError(f"model and base results cover different items ({n} vs "
                             f"{len(next(iter(base_cols.values())))}); they must be paired")
    with np.errstate(divide="ignore", invalid="ignore"):
        arr = {k: np.asarray(v) for k, v in cols.items()}
        value = stat(arr)
        out = {"value": _finite_or_none(value), "ci": [None, None], "n": n}
        base = None
        if base_cols is not None:
            base = stat({k: np.asarray(v) for k, v in base_cols.items()})
            out.update(base=_finite_or_none(base), delta=_finite_or_none(value - base), delta_ci=[None, None])
        if n == 0 or resamples < 1:
            out["interval"] = "none"
            return out
        binary = isinstance(stat, _ColumnMean) and stat.binary and _is_binary(arr[stat.column])
        if binary and (base_cols is None or _is_binary(base_cols[stat.column])):
            out["ci"] = wilson(int(np.sum(arr[stat.column])), n, 1 - alpha)
            if base_cols is not None:
                out["delta_ci"] = newcombe_paired(arr[stat.column], base_cols[stat.column], 1 - alpha)
            out["interval"] = "wilson" + ("; paired delta: newcombe" if base_cols is not None else "")
            return out
        if n < 2:  # one item: no spread to resample (a proportion still has its Wilson interval above)
            out["interval"] = "none (one item)"
            return out
        ci, dci = _bootstrap(stat, arr, base_cols, strata, resamples, seed, alpha)
        out["ci"] = ci
        if base_cols is not None:
            out["delta_ci"] = dci
        out["interval"] = "percentile bootstrap" + (" (stratified)" if strata is not None else "") + \
            ("; paired delta" if base_cols is not None else "")
    return out


def stratified_sample(items: list, key: Callable, limit: int | None, seed: int = 0,
                      allocation: str = "proportional") -> list:
    """At most `limit` items spread over the strata given by `key`, drawn at random with `seed`
    inside each stratum; the chosen items keep their original order.

    allocation "proportional": stratum shares follow their sizes (largest remainders; a stratum left
    with none gets one, from the largest), so overall numbers estimate the full data set.
    "equal": strata get the same count (smaller strata give what they have), so per-stratum numbers
    are equally precise. With fewer slots than strata, a seeded choice of strata gets one item each.
    """
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise LmsqueezeError(f"limit must be >= 1, got {limit}")
    if allocation not in ("proportional", "equal"):
        raise LmsqueezeError(f"unknown allocation '{allocation}'; valid: proportional, equal")
    groups: dict = defaultdict(list)
    for i, item in enumerate(items):
        groups[key(item)].append(i)
    names = sorted(groups, key=str)
    if limit < len(names):
        chosen = set(random.Random(seed).sample(names, limit))
        quota = {g: int(g in chosen) for g in names}
    elif allocation == "equal":
        quota = dict.fromkeys(names, 0)
        order = list(names)
        random.Random(seed).shuffle(order)  # which strata get the leftover items is seeded, not alphabetical
        left = limit
        while left > 0:  # fill round by round; strata that run out drop out
            open_ = [g for g in order if quota[g] < len(groups[g])]
            share = max(1, left // len(open_))
            for g in open_:
                take = min(share, len(groups[g]) - quota[g], left)
                quota[g] += take
                left -= take
                if left == 0:
                    break
    else:
        shares = {g: limit * len(groups[g]) / len(items) for g in names}
        quota = {g: int(shares[g]) for g in names}
        left = limit - sum(quota.values())
        for g in sorted(names, key=lambda g: (-(shares[g] - quota[g]), str(g)))[:left]:
            quota[g] += 1
        for g in names:  # every stratum is represented: take one from the largest quota
            if quota[g] == 0:
                quota[max(names, key=lambda h: quota[h])] -= 1
                quota[g] = 1
    rng = random.Random(seed)
    picked = []
    for g in names:
        picked.extend(rng.sample(groups[g], quota[g]))
    return [items[i] for i in sorted(picked)]
