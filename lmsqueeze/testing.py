"""Comparison helper shared by tests and benchmarks: failures say where and by how much."""
from __future__ import annotations

import torch

# One declared tolerance per input dtype for ops whose fast path and reference both accumulate in
# fp32 but in a different order (relative to the largest magnitude in the expected tensor).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-5), torch.float16: (1e-5, 1e-5)}


def compare(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "") -> str | None:
    """None if |actual - expected| <= atol + rtol * |expected| everywhere, else a report of the mismatch."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        return f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    bad |= torch.isnan(a) != torch.isnan(e)
    if not bad.any():
        return None
    idx = bad.nonzero()[:5].tolist()
    rel = diff / e.abs().clamp_min(1e-30)
    return (f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"first at {idx}: actual {[a[tuple(i)].item() for i in idx]} expected {[e[tuple(i)].item() for i in idx]}; "
            f"max abs err {diff.max().item():.3e}, max rel err {rel.max().item():.3e}")


def assert_close(actual, expected, atol: float, rtol: float, name: str = "") -> None:
    msg = compare(actual, expected, atol, rtol, name)
    if msg is not None:
        raise AssertionError(msg)
