"""--log-samples: every task's per-item records, and every reported number traced back to them.

For each metric a task declares in `sample_metrics`, recomputing it from the records (`aggregate`) must
give the reported value and, against the base, the reported base value, exactly (to rounding).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from lmsqueeze.evaluation.task import SampleMetric, aggregate, parse_tasks
from tests.evaluation.safety_fakes import ScriptedBackend

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared" / "data"
SAMPLE_KEYS = {"doc_id", "prompt", "reference", "output", "base_output", "metrics", "base_metrics"}


def check_traceable(result: dict, samples: list[dict], rules: dict) -> None:
    """Every declared metric (and its base value) recomputed from the records equals the reported one."""
    assert rules, result["task"] if "task" in result else "a task declares no sample metrics"
    for name, rule in rules.items():
        rule = SampleMetric(**rule) if isinstance(rule, dict) else rule
        m = result["metrics"][name]
        assert math.isclose(aggregate(samples, rule), m["value"], rel_tol=1e-9, abs_tol=1e-12), name
        if m.get("base") is not None:
            assert math.isclose(aggregate(samples, rule, "base_metrics"), m["base"], rel_tol=1e-9, abs_tol=1e-12)
        if m.get("n") is not None:
            assert m["n"] == len(samples), name


def _data(tmp_path: Path) -> Path:
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "alpaca_5000.json").write_text(json.dumps(
        [{"instruction": "Name a colour.", "input": "", "output": "Blue"},
         {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
         {"instruction": "Say hello.", "input": "", "output": "Hello there"}]))
    (tmp_path / "text.txt").write_text(" ".join(f"Sentence {i} says something about item {i % 7}." for i in range(40)))
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"context": f"Question {i}: which?", "choices": ["one", "two words", "three"],
                                      "label": i % 3}) + "\n" for i in range(4)))
    return mc


def test_eval_samples_trace_every_metric_to_items(tmp_path):
    from lmsqueeze import evaluate, models
    from lmsqueeze.evaluation.api import write_samples
    from lmsqueeze.evaluation.report import render_markdown

    mc = _data(tmp_path)
    model, tok = models.load_model("tiny-llama", seed=1)
    base, btok = models.load_model("tiny-llama", seed=0)
    text = tmp_path / "text.txt"
    rep = evaluate(model, tok, f"ppl:{text},divergence:{text},mc:{mc},alpaca", base=base, base_tokenizer=btok,
                   data_dir=str(tmp_path), limit=3, seqlen=16, max_new_tokens=2, resamples=10,
                   cache_dir=str(tmp_path / "cache"))
    by_task = {r["task"]: r for r in rep["results"]}
    for r in rep["results"]:
        assert len(r["samples"]) == len(r["items"]) == 3 and set(r["samples"][0]) >= SAMPLE_KEYS
        check_traceable(r, r["samples"], r["sample_metrics"])
    ppl = by_task[f"ppl:{text}"]["samples"]
    assert ppl[0]["prompt"] and len(tok.encode(ppl[0]["reference"], add_special_tokens=False)) >= 10
    mcs = by_task[f"mc:{mc}"]["samples"]
    assert [s["reference"] for s in mcs] == ["one", "two words", "three"]
    assert all(s["output"] in s["choices"] and s["base_output"] in s["choices"] for s in mcs)
    assert all(s["metrics"]["flip"] == int(s["metrics"]["correct"] != s["base_metrics"]["correct"]) for s in mcs)
    alp = by_task["alpaca"]
    assert [s["reference"] for s in alp["samples"]] == ["Blue", "5", "Hello there"]
    assert "Add the numbers." in alp["samples"][1]["prompt"] and "2 and 3" in alp["samples"][1]["prompt"]
    assert [s["output"] for s in alp["samples"]] == [i["prediction"] for i in alp["items"]]
    assert [s["base_output"] for s in alp["samples"]] == [i["prediction"] for i in alp["base_items"]]

    written = write_samples(rep, tmp_path / "out")
    names = {t: Path(p).name for t, p in written.items()}
    assert names["alpaca"] == "samples_alpaca.jsonl" and len(set(names.values())) == 4
    assert names[f"mc:{mc}"] == "samples_mc_" + str(mc).strip("/").replace("/", "_") + ".jsonl"
    assert all(Path(p).parent == tmp_path / "out" for p in written.values())
    for r in rep["results"]:
        assert "samples" not in r and Path(r["samples_file"]).exists()
        lines = [json.loads(line) for line in Path(r["samples_file"]).read_text().splitlines()]
        assert [x["task"] for x in lines] == [r["task"]] * 3
        check_traceable(r, lines, r["sample_metrics"])  # the file alone reproduces the numbers
    assert "per-item sample records: " in render_markdown(rep)


class HashedBackend(ScriptedBackend):
    """Log-likelihoods and continuations that differ per request and per `salt` (a model), reproducibly."""

    def __init__(self, salt: str):
        super().__init__()
        self.salt = salt

    def _u(self, text: str) -> float:
        return int(hashlib.sha256((self.salt + text).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    def loglik(self, requests, desc=None):
        from lmsqueeze.evaluation.loglik import LoglikResult

        return [LoglikResult(-1 - 20 * self._u(repr(r)), 1 + int(6 * self._u("n" + repr(r))), greedy=False)
                for r in requests]

    def generate(self, prompts, max_new_tokens, desc=None, **kw):
        from lmsqueeze.evaluation.backend import GenerationResult

        words = ["good", "awful", "the", "terrible", "fine", "happy", "", "hate"]
        return GenerationResult([[" ".join(words[int(8 * self._u(p + str(k)))] for k in range(3)).strip()]
                                 for p in prompts])


@pytest.mark.skipif(not (SHARED / "bbq").exists(), reason="../shared/data is not beside the repository")
@pytest.mark.parametrize("name", ["bbq", "crows", "dialect", "bold"])
def test_safety_samples_trace_their_metrics(name):
    from lmsqueeze.evaluation.task import EvalOptions

    if name == "bold":
        pytest.importorskip("vaderSentiment")
        pytest.importorskip("profanity_check")
    (task,) = parse_tasks(name, EvalOptions(limit=24, data_dir=str(SHARED), resamples=10))
    task.ensure_loaded()
    base = task.run(HashedBackend("base"), None)
    model = HashedBackend("model")
    result = task.run(model, base)
    samples = task.samples(result, base, model)
    assert len(samples) == len(result["items"]) and set(samples[0]) >= SAMPLE_KEYS
    check_traceable(result, samples, task.sample_metrics)
    assert any(s["output"] != s["base_output"] for s in samples)  # the two sides really differ
    json.dumps(samples)  # JSON-serialisable as written


def test_cli_eval_log_samples_writes_files_beside_the_report(tmp_path, capsys):
    from lmsqueeze.cli import main

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"Line {i} of a short text." for i in range(30)))
    out = tmp_path / "out" / "report.json"
    common = ["eval", "--model", "tiny-llama", "--base", "tiny-llama", "--tasks", f"ppl:{text}", "--limit", "2",
              "--eval-seqlen", "16", "--resamples", "10", "--cache-dir", str(tmp_path / "cache")]
    assert main(common + ["--log-samples"]) == 2
    assert "--log-samples" in capsys.readouterr().err and not out.parent.exists()  # fails before any work
    assert main(common + ["--output", str(out), "--log-samples"]) == 0
    shown = capsys.readouterr().out
    samples = out.parent / ("samples_ppl_" + str(text).strip("/").replace("/", "_") + ".jsonl")
    assert f"per-item sample records: {samples}" in shown and "What these numbers rest on:" in shown
    report = json.loads(out.read_text())
    (r,) = report["results"]
    assert r["samples_file"] == str(samples) and "samples" not in r
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["reference"]
    check_traceable(r, lines, r["sample_metrics"])


def test_study_log_samples_per_cell(tmp_path):
    from lmsqueeze.study import StudySpec, run_study

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"Line {i} of a short text." for i in range(30)))
    spec = StudySpec(model="tiny-llama", methods="magnitude", sparsity="0.5", suite=None, tasks=f"ppl:{text}",
                     limit=2, eval_seqlen=16, resamples=10, dense=False, dtype="fp32",
                     cache_dir=str(tmp_path / "cache"))
    (rec,) = run_study(spec, tmp_path / "study", log_samples=True)
    (task, rel), = rec["samples"].items()
    path = tmp_path / "study" / rel
    assert task == f"ppl:{text}" and path.parent == tmp_path / "study" / "samples" / rec["key"]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    rule = SampleMetric("nll", "tokens", exp=True)
    assert math.isclose(aggregate(lines, rule), rec["metrics"][f"{task}/ppl"]["value"], rel_tol=1e-9)
    assert math.isclose(aggregate(lines, rule, "base_metrics"), rec["metrics"][f"{task}/ppl"]["base"], rel_tol=1e-9)
