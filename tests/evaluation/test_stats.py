from collections import Counter

import numpy as np
import pytest

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.stats import estimate, mean_of, stratified_sample


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    x = np.random.default_rng(0).normal(size=257)
    a = estimate(mean_of("x"), {"x": x}, resamples=1000, seed=3)
    b = estimate(mean_of("x"), {"x": x}, resamples=1000, seed=3)
    assert a == b and a["n"] == 257
    assert a["value"] == pytest.approx(x.mean())
    lo, hi = a["ci"]
    se = x.std(ddof=1) / np.sqrt(x.size)  # percentile interval ~ mean +- 1.96 se for a mean of 257 normals
    assert lo < x.mean() < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_paired_delta_sees_only_the_difference():
    rng = np.random.default_rng(1)
    base = rng.normal(size=13) * 10  # large item-to-item spread
    model = base + 0.5               # but a constant shift against the base
    out = estimate(mean_of("x"), {"x": model}, {"x": base}, resamples=300)
    assert out["delta"] == pytest.approx(0.5)
    assert out["delta_ci"] == pytest.approx([0.5, 0.5])  # paired: the spread cancels
    assert out["ci"][1] - out["ci"][0] > 5


def test_undefined_statistic_is_none_and_dropped_from_interval():
    def ratio(c):
        return np.sum(c["a"], -1) / np.sum(c["b"], -1)
    out = estimate(ratio, {"a": np.array([1.0]), "b": np.array([0.0])}, resamples=10)
    assert out["value"] is None and out["ci"] == [None, None]


def test_strata_keep_their_sizes_in_every_resample():
    # one stratum of 1s, one of 0s: the mean of a within-strata resample never moves
    x = np.array([1.0] * 5 + [0.0] * 8)
    out = estimate(mean_of("x"), {"x": x}, strata=["a"] * 5 + ["b"] * 8, resamples=100)
    assert out["ci"] == pytest.approx([5 / 13, 5 / 13])


def test_paired_inputs_must_match():
    with pytest.raises(LmsqueezeError, match="different items"):
        estimate(mean_of("x"), {"x": np.zeros(3)}, {"x": np.zeros(4)})


ITEMS = [{"id": i, "g": "a" if i < 60 else ("b" if i < 90 else "c")} for i in range(100)]


def test_proportional_sampling():
    got = stratified_sample(ITEMS, lambda r: r["g"], 20, seed=0)
    assert Counter(r["g"] for r in got) == {"a": 12, "b": 6, "c": 2}
    assert [r["id"] for r in got] == sorted(r["id"] for r in got)  # original order kept
    assert got == stratified_sample(ITEMS, lambda r: r["g"], 20, seed=0)
    assert got != stratified_sample(ITEMS, lambda r: r["g"], 20, seed=1)
    assert stratified_sample(ITEMS, lambda r: r["g"], None) == ITEMS
    assert stratified_sample(ITEMS, lambda r: r["g"], 1000) == ITEMS


def test_equal_sampling_and_fewer_slots_than_strata():
    got = stratified_sample(ITEMS, lambda r: r["g"], 31, seed=0, allocation="equal")
    counts = Counter(r["g"] for r in got)
    assert sum(counts.values()) == 31 and sorted(counts.values()) == [10, 10, 11]
    small = [{"g": "x", "i": 0}] + [{"g": "y", "i": i} for i in range(1, 50)]
    got = stratified_sample(small, lambda r: r["g"], 7, allocation="equal")
    assert Counter(r["g"] for r in got) == {"x": 1, "y": 6}  # x gives what it has
    one_each = stratified_sample(ITEMS, lambda r: r["g"], 2, seed=5)
    assert len({r["g"] for r in one_each}) == 2
    with pytest.raises(LmsqueezeError, match="limit must be >= 1"):
        stratified_sample(ITEMS, lambda r: r["g"], 0)
