import json
import sys
import textwrap

import pytest

from lmsqueeze import evaluate
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation import task as task_mod
from lmsqueeze.evaluation.report import render_markdown
from lmsqueeze.evaluation.task import EvalOptions, parse_tasks, suite_tasks


def test_parse_tasks():
    ts = parse_tasks("ppl:wikitext2:test, divergence:pydoc,piqa,mc:x.jsonl,alpaca,bbq,dialect")
    assert [t.name for t in ts] == ["ppl:wikitext2:test", "divergence:pydoc", "piqa", "mc:x.jsonl", "alpaca", "bbq",
                                    "dialect"]
    assert [t.needs_base for t in ts] == [False, True, False, False, False, False, False]
    with pytest.raises(LmsqueezeError, match="unknown task 'bleu'; valid: .*ppl:SOURCE.*divergence:SOURCE.*piqa"):
        parse_tasks("ppl:pydoc,bleu")
    with pytest.raises(LmsqueezeError, match="task 'ppl' needs an argument: ppl:SOURCE"):
        parse_tasks("ppl")
    with pytest.raises(LmsqueezeError, match="task 'piqa' takes no argument"):
        parse_tasks("piqa:x")
    with pytest.raises(LmsqueezeError, match="no tasks given"):
        parse_tasks(" , ")
    with pytest.raises(LmsqueezeError, match="unknown suite 'nope'; valid: core, safety, full"):
        parse_tasks("", suite="nope")
    with pytest.raises(LmsqueezeError, match="seqlen must be >= 2"):
        EvalOptions(seqlen=1)


def test_suites_come_from_the_tasks():
    assert suite_tasks("core", has_base=False) == ["ppl:wikitext2:test", "piqa", "alpaca"]
    assert suite_tasks("core", has_base=True) == ["ppl:wikitext2:test", "divergence:wikitext2:test", "piqa",
                                                  "alpaca"]
    assert suite_tasks("safety", has_base=True) == ["bbq", "crows", "dialect", "bold"]
    assert suite_tasks("full", has_base=True) == suite_tasks("core", True) + suite_tasks("safety", True)


TOY = '''
"""A toy task for the registry test: the mean log-prob of one fixed continuation."""
import numpy as np

from lmsqueeze.evaluation.stats import estimate, mean_of
from lmsqueeze.evaluation.task import Headline, Task, register


@register("toy", suites=("core",))
class ToyTask(Task):
    headline = (Headline("score", "toy score", ".3f", "higher"),)

    def run(self, backend, base):
        res = backend.loglik([("The cat", " sat."), ("A dog", " ran.")], desc=self.name)
        items = [{"lp": r.logprob} for r in res]
        cols = {"lp": np.array([i["lp"] for i in items])}
        bcols = {"lp": np.array([i["lp"] for i in base["items"]])} if base is not None else None
        return {"summary": {"n": len(items)}, "metrics": {"score": estimate(mean_of("lp"), cols, bcols,
                                                                               resamples=20)}, "items": items}
'''


@pytest.fixture
def toy_task(tmp_path, monkeypatch):
    """A task module dropped into a directory on the tasks package's path: nothing else is edited."""
    import lmsqueeze.evaluation.tasks as pkg

    extra = tmp_path / "extra_tasks"
    extra.mkdir()
    (extra / "toy_task_module.py").write_text(textwrap.dedent(TOY))
    monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(extra)])
    yield
    task_mod._REGISTRY.pop("toy", None)
    sys.modules.pop("lmsqueeze.evaluation.tasks.toy_task_module", None)


def test_a_new_task_is_one_module(toy_task, tmp_path, capsys):
    from lmsqueeze.cli import main

    assert "toy" in suite_tasks("core", has_base=False)
    rep = evaluate("tiny-llama", tasks="toy", base="tiny-llama", cache_dir=str(tmp_path / "c"))
    m = rep["results"][0]["metrics"]["score"]
    assert m["n"] == 2 and m["delta"] == 0.0 and rep["results"][0]["base_cache"]["hit"] is False
    assert "| toy | score |" in render_markdown(rep)
    assert main(["eval", "--model", "tiny-llama", "--tasks", "toy", "--quiet"]) == 0
    assert "| toy | score |" in capsys.readouterr().out
    assert main(["tasks"]) == 0
    assert "toy" in capsys.readouterr().out
    # in a study: its headline metric is a column of the table and of the report
    from lmsqueeze.study import StudySpec, run_study, write_report
    from lmsqueeze.study.report import render_table

    spec = StudySpec(model="tiny-llama", methods=("magnitude",), sparsity=("0.5",), suite=None, tasks=("toy",),
                     dtype="fp32", cache_dir=str(tmp_path / "c"))
    recs = run_study(spec, tmp_path / "study")
    assert "toy score" in render_table(recs)
    report = write_report(tmp_path / "study", plots=True)
    assert "toy score" in report.read_text()
    assert (tmp_path / "study" / "plots" / "metrics_vs_sparsity.png").exists()


def test_markdown_is_rendered_from_the_json():
    m = {"value": 12.3456, "ci": [11.0, 14.0], "n": 3, "base": 12.0, "delta": 0.3456, "delta_ci": [0.1, 0.5]}
    rep = {"model": "m", "base": "b", "results": [
        {"task": "ppl:pydoc", "kind": "ppl", "summary": {"ppl": 12.3456, "tokens": 10, "windows": 1, "bytes": 40},
         "metrics": {"ppl": m}},
        {"task": "piqa", "kind": "piqa", "summary": {"acc": 0.5, "acc_norm_unit": "characters"},
         "metrics": {"acc": {"value": 0.5, "ci": [0.1, 0.9], "n": 4}}},
        {"task": "bold", "kind": "bold", "skipped": "the bold task needs: pip install ..."}]}
    md = render_markdown(json.loads(json.dumps(rep)))
    assert md.splitlines()[0] == "model: m   base: b"
    assert "| ppl:pydoc | ppl | 12.3456 [11.0000, 14.0000] | 3 | 12.0000 | 0.3456 [0.1000, 0.5000] |" in md
    assert "| piqa | acc | 0.5000 [0.1000, 0.9000] | 4 | | |" in md
    assert "| ppl:pydoc | bytes | 40 |" in md
    assert "- bold: skipped: the bold task needs: pip install ..." in md
    assert "- piqa: acc_norm divides by the characters of each choice" in md


def test_eval_report_states_what_the_numbers_rest_on(tmp_path):
    m = {"value": 30.0, "ci": [28.0, 32.0], "n": 40}
    rep = {"model": str(tmp_path / "sparse"), "base": "smollm2-135m", "settings": {"seqlen": 256}, "results": [
        {"task": "ppl:wikitext2", "kind": "ppl", "summary": {}, "metrics": {"ppl": m, "nll": m}},
        {"task": "piqa", "kind": "piqa", "summary": {}, "metrics": {"acc": {"value": 0.5, "n": 100},
                                                                      "flips": {"value": 0.1, "n": 100}}}]}
    (tmp_path / "sparse").mkdir()
    (tmp_path / "sparse" / "lmsqueeze.json").write_text(json.dumps({"model": "smollm2-135m"}))
    md = render_markdown(rep)
    rest = md[md.index("What these numbers rest on:"):].splitlines()
    assert rest[1].startswith(f"- model: `{tmp_path / 'sparse'}`: an lmsqueeze checkpoint compressed from smollm2-135m")
    assert "dequantized 4-bit GGUF" in rest[1] and "dequantized 4-bit GGUF" in rest[2]  # the base, and so the model
    assert "- window: 256 tokens per perplexity/divergence window (ppl:wikitext2)" in md
    assert "WikiText-2 test split, tokenized variant" in md and "not comparable with papers" in md
    assert rest[-1] == "- n, the windows or items behind each metric: ppl:wikitext2 40; piqa 100"
    rep["model"], rep["base"] = "tiny-llama", None
    md = render_markdown(rep)
    assert "GGUF" not in md and "a tiny randomly initialised test model" in md


def test_alpaca_end_to_end_with_base(tmp_path):
    from lmsqueeze import models

    model, tok = models.load_model("tiny-llama")
    rep = evaluate(model, tok, "alpaca", base=model, base_tokenizer=tok, limit=2, max_new_tokens=4,
                   cache_dir=str(tmp_path))
    r = rep["results"][0]
    assert r["summary"]["items"] == 2 and set(r["items"][0]) >= {"prediction", "reference", "em", "f1", "rouge1",
                                                                  "rougeL", "reference_nll_sum", "reference_jsd_mean"}
    assert abs(r["summary"]["reference_divergence"]["jsd"]["mean"]) < 1e-6
    assert r["summary"]["reference_nll"] > 0 and r["metrics"]["f1"]["delta"] == 0.0
    assert r["summary"]["truncated_prompts"] == 0 and r["summary"]["chat_template"] is True
