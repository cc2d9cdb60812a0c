"""One harness for every benchmark.

Each case is validated against its reference before it is timed; the first (warm-up / compile)
calls are timed apart and reported separately; the timed repeats give a median and a spread. The
run prints a markdown table and writes JSON with the machine, CPU flags, GPU if any, versions, the
git commit and every case's parameters. Results go to bench/results/ (ignored by git) or --output.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class Case:
    """One timed thing.

    fn: the call that is timed. check: called once with fn's output before timing; returns None when
    the output agrees with the reference, else a message (the case then fails and is not timed).
    bytes / flops: work per call, for GB/s and GFLOP/s. baseline: name of the case that `speedup`
    is measured against (same group).
    """
    name: str
    group: str
    fn: Callable[[], Any]
    params: dict = field(default_factory=dict)
    check: Callable[[Any], str | None] | None = None
    bytes: float | None = None
    flops: float | None = None
    baseline: str | None = None
    setup: Callable[[], None] | None = None  # run before every call, untimed (e.g. reset an accumulator)


def _sync(device_used: bool) -> None:
    if device_used and torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_call(case: Case, cuda: bool) -> float:
    """Seconds one call of case.fn takes, its setup run (untimed) first."""
    if case.setup:
        case.setup()
    _sync(cuda)
    t = time.perf_counter()
    case.fn()
    _sync(cuda)
    return time.perf_counter() - t


def time_case(case: Case, warmup: int, repeat: int, min_seconds: float) -> dict:
    cuda = torch.cuda.is_available()
    if case.setup:
        case.setup()
    t0 = time.perf_counter()
    out = case.fn()
    _sync(cuda)
    first = time.perf_counter() - t0
    err = case.check(out) if case.check else None
    if err is not None:
        return {"name": case.name, "group": case.group, "params": case.params, "error": err}
    for _ in range(warmup):
        if case.setup:
            case.setup()
        case.fn()
    _sync(cuda)
    times = []
    start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start < min_seconds and len(times) < 1000):
        times.append(_timed_call(case, cuda))
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), med, max(times)]
    res = {"name": case.name, "group": case.group, "params": case.params, "first_call_s": first,
           "median_s": med, "min_s": min(times), "max_s": max(times), "iqr_s": q[2] - q[0], "repeats": len(times),
           "validated": case.check is not None}
    if case.bytes:
        res["GB_per_s"] = case.bytes / med / 1e9
    if case.flops:
        res["GFLOP_per_s"] = case.flops / med / 1e9
    return res


def paired_speedup(case: Case, base: Case, pairs: int) -> float:
    """Median over `pairs` back-to-back (baseline, case) calls of t_baseline / t_case.

    On a shared machine whose speed drifts by tens of percent over seconds, two cases timed one
    after the other can disagree by more than the effect measured; a ratio taken within each pair
    cancels the drift.
    """
    cuda = torch.cuda.is_available()
    return statistics.median(_timed_call(base, cuda) / _timed_call(case, cuda) for _ in range(pairs))


SCHEMA = "lmsqueeze.bench/1"  # every benchmark JSON: schema, title, machine, settings, results (docs/report-schema.md)


def machine_info() -> dict:
    from lmsqueeze.info import backend_report

    rep = backend_report()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    rep["git"] = {"commit": commit, "dirty": dirty}
    rep["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return rep


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def markdown(results: list[dict]) -> str:
    by_name = {(r["group"], r["name"]): r for r in results}
    lines = ["| group | case | params | median | IQR | first call | GB/s | GFLOP/s | speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        if "error" in r:
            lines.append(f"| {r['group']} | {r['name']} | {params} | FAILED: {r['error']} | | | | | |")
            continue
        base = by_name.get((r["group"], r.get("baseline"))) if r.get("baseline") else None
        speed = f"{base['median_s'] / r['median_s']:.2f}x vs {base['name']}" if base and "median_s" in base else ""
        if "paired_speedup" in r:
            speed += f" (paired: {r['paired_speedup']:.2f}x)"
        lines.append(f"| {r['group']} | {r['name']} | {params} | {_fmt_s(r['median_s'])} | {_fmt_s(r['iqr_s'])} | "
                     f"{_fmt_s(r['first_call_s'])} | {r.get('GB_per_s', 0):.1f} | {r.get('GFLOP_per_s', 0):.1f} | {speed} |")
    return "\n".join(lines)


def run(title: str, cases: list[Case], args) -> list[dict]:
    results = []
    for case in cases:
        r = time_case(case, warmup=args.warmup, repeat=args.repeat, min_seconds=args.min_seconds)
        r["baseline"] = case.baseline
        results.append(r)
        if not args.quiet:
            status = r.get("error") or _fmt_s(r["median_s"])
            print(f"  {case.group} / {case.name}: {status}", file=sys.stderr)
    if getattr(args, "paired", 0):
        by_name = {(c.group, c.name): c for c in cases}
        done = {(x["group"], x["name"]) for x in results if "error" not in x}
        for case, r in zip(cases, results):
            base = by_name.get((case.group, case.baseline)) if case.baseline else None
            if base and "error" not in r and (base.group, base.name) in done:
                r["paired_speedup"] = paired_speedup(case, base, args.paired)
    table = markdown(results)
    print(f"## {title}\n\n{table}\n")
    out = Path(args.output) if args.output else (
        ROOT / "bench" / "results" / f"{title}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"schema": SCHEMA, "title": title, "machine": machine_info(),
               "settings": {"warmup": args.warmup, "repeat": args.repeat, "paired": getattr(args, "paired", 0)},
               "results": results}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out)
    print(f"JSON: {out}", file=sys.stderr)
    if any("error" in r for r in results):
        raise SystemExit(f"{sum('error' in r for r in results)} case(s) failed validation")
    return results


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first (default 2)")
    p.add_argument("--repeat", type=int, default=7, help="timed calls at least (default 7)")
    p.add_argument("--min-seconds", type=float, default=0.5, help="keep timing until this long (default 0.5)")
    p.add_argument("--output", default=None, help="JSON path (default bench/results/<title>-<time>.json)")
    p.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    p.add_argument("--paired", type=int, default=0, metavar="N",
                   help="also time N back-to-back (baseline, case) pairs and report the median ratio: "
                        "robust to a machine whose speed drifts between cases (default off)")
    p.add_argument("--quiet", action="store_true")
    return p
