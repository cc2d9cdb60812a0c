import json

import pytest

from lmsqueeze import evaluate, models
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.report import render_markdown
from lmsqueeze.evaluation.tasks import _REGISTRY, EvalOptions, Task, parse_tasks, register


def test_parse_tasks():
    ts = parse_tasks("ppl:wikitext2:test, divergence:pydoc,piqa,mc:x.jsonl,alpaca")
    assert [t.name for t in ts] == ["ppl:wikitext2:test", "divergence:pydoc", "piqa", "mc:x.jsonl", "alpaca"]
    assert [t.uses_base for t in ts] == [False, True, True, True, True]
    with pytest.raises(LmsqueezeError, match="unknown task 'bleu'; valid: ppl:SOURCE, divergence:SOURCE, piqa"):
        parse_tasks("ppl:pydoc,bleu")
    with pytest.raises(LmsqueezeError, match="task 'ppl' needs an argument: ppl:SOURCE"):
        parse_tasks("ppl")
    with pytest.raises(LmsqueezeError, match="task 'piqa' takes no argument"):
        parse_tasks("piqa:x")
    with pytest.raises(LmsqueezeError, match="no tasks given"):
        parse_tasks(" , ")
    with pytest.raises(LmsqueezeError, match="seqlen must be >= 2"):
        EvalOptions(seqlen=1)


def test_a_new_task_is_one_class_and_one_register_line():
    from lmsqueeze.evaluation.loglik import loglik

    class EchoTask(Task):
        kind = "echo-test"

        def build_requests(self, tokenizer):
            return [([1], [2, 3])]

        def run(self, model, tokenizer, base_cache):
            r = loglik(model, self.requests(tokenizer))[0]
            return {"summary": {"logprob": r.logprob}, "items": [{"ntokens": r.ntokens}]}

    register("echo-test", EchoTask, "echo-test")
    model, tok = models.load_model("tiny-llama")
    try:
        rep = evaluate(model, tok, "echo-test")
    finally:
        _REGISTRY.pop("echo-test")
    assert rep["results"][0]["items"] == [{"ntokens": 2}]
    assert "| echo-test | logprob |" in render_markdown(rep)


def test_markdown_is_rendered_from_the_json():
    rep = {"model": "m", "base": "b", "results": [
        {"task": "ppl:pydoc", "summary": {"ppl": 12.3456, "tokens": 10, "windows": 1}, "items": []},
        {"task": "piqa", "summary": {"acc": 0.5, "acc_norm": 0.75, "items": 4}, "items": []},
        {"task": "divergence:pydoc", "summary": {"jsd": {"mean": 0.00001, "p99": 0.5}, "top1_agreement": 1.0},
         "items": []}]}
    md = render_markdown(json.loads(json.dumps(rep)))
    assert md.splitlines()[0] == "model: m   base: b"
    assert "| ppl:pydoc | ppl | 12.3456 |" in md and "| ppl:pydoc | tokens | 10 |" in md
    assert "| piqa | acc_norm | 0.7500 |" in md and "base_acc" not in md
    assert "| divergence:pydoc | jsd.mean | 1.000e-05 |" in md and "| divergence:pydoc | top1_agreement | 1.0000 |" in md


def test_alpaca_end_to_end_with_base(tmp_path):
    model, tok = models.load_model("tiny-llama")
    rep = evaluate(model, tok, "alpaca", base=model, base_tokenizer=tok, limit=2, max_new_tokens=4,
                   cache_dir=str(tmp_path))
    r = rep["results"][0]
    assert r["summary"]["items"] == 2 and set(r["items"][0]) >= {"prediction", "reference", "em", "f1", "rouge1",
                                                                  "rougeL", "reference_nll", "reference_jsd_mean"}
    assert abs(r["summary"]["reference_divergence"]["jsd"]["mean"]) < 1e-6
    assert r["summary"]["reference_nll"] > 0
