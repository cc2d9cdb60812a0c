import time

from bench.harness import Case, paired_speedup


def test_paired_speedup_is_the_ratio_within_each_pair():
    calls = []
    slow = Case("slow", "g", lambda: time.sleep(0.004), setup=lambda: calls.append("setup"))
    fast = Case("fast", "g", lambda: time.sleep(0.001))
    ratio = paired_speedup(fast, slow, pairs=5)
    assert 2.0 < ratio < 8.0  # ~4x: the baseline sleeps 4 ms, the case 1 ms
    assert calls == ["setup"] * 5  # the baseline's setup runs before each of its calls
