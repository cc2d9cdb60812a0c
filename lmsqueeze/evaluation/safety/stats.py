"""Bootstrap intervals, paired deltas against a base model, and seeded stratified sampling.

A statistic is a function of per-item columns: `stat(cols) -> value`, where `cols` maps a name to
an array whose last axis runs over items. Written with sums and means over the last axis, the same
function evaluates one data set ([n]) and a whole batch of bootstrap resamples ([resamples, n]) at
once. Intervals are percentile intervals over `resamples` item-level resamples drawn with a fixed
seed. Deltas against the base model are paired: each resample draws the same items for the model
and for the base, so the interval of the difference reflects only how the two differ on the items.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Callable, Sequence

import numpy as np

from lmsqueeze.errors import LmsqueezeError

Stat = Callable[[dict], np.ndarray]
RESAMPLE_CHUNK = 200  # resamples evaluated per chunk, bounding memory at chunk x n per column


def _indices(n: int, strata: np.ndarray | None, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n] item indices; with strata, every stratum is resampled within itself."""
    if strata is None:
        return rng.integers(0, n, size=(resamples, n))
    idx = np.empty((resamples, n), dtype=np.int64)
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        idx[:, members] = members[rng.integers(0, members.size, size=(resamples, members.size))]
    return idx


def _take(cols: dict, idx: np.ndarray) -> dict:
    return {k: np.asarray(v)[idx] for k, v in cols.items()}


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _interval(samples: np.ndarray, alpha: float) -> list[float | None]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [None, None]
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]


def estimate(stat: Stat, cols: dict, base_cols: dict | None = None, strata: Sequence | None = None,
             resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """{value, ci} and, with base columns over the same items, {base, delta, delta_ci}.

    Values that are undefined (e.g. a ratio with a zero denominator) come out as None; resamples
    where the statistic is undefined are left out of the interval.
    """
    n = len(next(iter(cols.values())))
    if base_cols is not None and len(next(iter(base_cols.values()))) != n:
        raise LmsqueezeError("model and base results cover different items; they must be paired")
    with np.errstate(divide="ignore", invalid="ignore"):
        value = stat({k: np.asarray(v) for k, v in cols.items()})
        out = {"value": _finite_or_none(value), "ci": [None, None], "n": n}
        base = None
        if base_cols is not None:
            base = stat({k: np.asarray(v) for k, v in base_cols.items()})
            out.update(base=_finite_or_none(base), delta=_finite_or_none(value - base), delta_ci=[None, None])
        if n == 0 or resamples < 1:
            return out
        rng = np.random.default_rng(seed)
        strata_arr = None if strata is None else np.asarray(strata)
        samples, deltas = [], []
        for start in range(0, resamples, RESAMPLE_CHUNK):
            idx = _indices(n, strata_arr, min(RESAMPLE_CHUNK, resamples - start), rng)
            s = np.asarray(stat(_take(cols, idx)), dtype=np.float64)
            samples.append(s)
            if base_cols is not None:
                deltas.append(s - np.asarray(stat(_take(base_cols, idx)), dtype=np.float64))
        out["ci"] = _interval(np.concatenate(samples), alpha)
        if base_cols is not None:
            out["delta_ci"] = _interval(np.concatenate(deltas), alpha)
    return out


def mean_of(name: str) -> Stat:
    return lambda c: np.mean(c[name], axis=-1)


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
