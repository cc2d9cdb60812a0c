"""A study killed mid-cell resumes without redoing finished cells (tiny models, tiny limits)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lmsqueeze.study import StudySpec, expand_grid, read_results, run_study

ROOT = Path(__file__).resolve().parents[1]
# five cells: dense, magnitude 0.5, magnitude 2:4, wanda 0.5 pydoc, wanda 2:4 pydoc
FLAGS = {"model": "tiny-llama", "methods": "magnitude,wanda", "sparsity": "0.5,2:4", "calib": "pydoc",
         "nsamples": 2, "seqlen": 32, "tasks": "ppl:pydoc,divergence:pydoc", "limit": 2, "eval_seqlen": 32,
         "dtype": "fp32"}


def _argv(out: Path, cache: Path) -> list[str]:
    argv = [sys.executable, "-m", "lmsqueeze", "--quiet", "study", "--output-dir", str(out), "--cache-dir", str(cache),
            "--threads", "1"]
    for k, v in FLAGS.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    return argv


def _lines(out: Path) -> int:
    p = out / "results.jsonl"
    return p.read_bytes().count(b"\n") if p.exists() else 0


def test_killed_study_resumes_without_redoing_cells(tmp_path):
    out, cache = tmp_path / "study", tmp_path / "cache"
    spec = StudySpec(**{("calib_seqlen" if k == "seqlen" else k): v for k, v in FLAGS.items()}, cache_dir=str(cache))
    cells = expand_grid(spec)
    assert len(cells) == 5
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_argv(out, cache), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while _lines(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # the second cell is in progress: it is lost, nothing else is
    finally:
        proc.wait()
    first = read_results(out)
    assert 1 <= len(first) < len(cells)
    # a kill inside a write leaves a torn line; the resume cuts it and does the cell again
    with open(out / "results.jsonl", "ab") as f:
        f.write(b'{"key": "' + cells[len(first)].key(spec).encode() + b'", "label": "wan')

    done = []
    records = run_study(spec, out, on_cell=done.append)
    assert [r["key"] for r in records] == [c.key(spec) for c in cells]  # the whole grid, in order, once each
    assert records[:len(first)] == first  # finished cells untouched (same lines, same timestamps)
    assert [r["key"] for r in done] == [c.key(spec) for c in cells[len(first):]]  # only the rest was run
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(cells) and all(json.loads(line)["key"] for line in lines)

    # everything done: a third run does nothing
    again = []
    run_study(spec, out, on_cell=again.append)
    assert again == []

    dense, mag = records[0], records[1]
    assert dense["method"] == "dense" and mag["label"] == "magnitude 0.5"
    jsd, top1, ppl = "divergence:pydoc/jsd", "divergence:pydoc/top1", "ppl:pydoc/ppl"
    assert dense["metrics"][jsd]["value"] == 0.0 and dense["metrics"][top1]["value"] == 1.0
    assert mag["metrics"][jsd]["value"] > 0.0 and mag["compression"]["mean_sparsity"] is not None
    assert abs(mag["compression"]["mean_sparsity"] - 0.5) < 1e-3
    for rec in records:
        lo, hi = rec["metrics"][ppl]["ci"]
        assert lo <= rec["metrics"][ppl]["value"] <= hi and rec["metrics"][ppl]["n"] == 2
        # the base ran before the first cell (in the killed process); every cell read it from the cache
        assert rec["base_forwards"] == 0
    assert not (out / "models").exists()  # no checkpoints unless --keep-models
