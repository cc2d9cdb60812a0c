import json
import math

import pytest

from lmsqueeze import evaluate, models
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.loglik import loglik
from lmsqueeze.evaluation.multiple_choice import MCItem, load_jsonl, mc_requests, piqa_items, score


def test_score_hand_computed():
    items = [MCItem("q1", ["a", "bbbb"], 1), MCItem("q2", ["xx", "y"], 0)]
    where = [(0, 0), (0, 1), (1, 0), (1, 1)]
    # item 0: raw picks choice 0 (-1 > -2); per byte: -1/1 < -2/4 -> picks choice 1
    # item 1: raw picks choice 1; per byte -3/2 vs -1/1 -> choice 1
    model_lps = [-1.0, -2.0, -3.0, -1.0]
    base_lps = [-2.0, -1.0, -3.0, -1.0]
    out = score(items, where, model_lps, base_lps)
    s = out["summary"]
    assert s["acc"] == 0.0 and s["acc_norm"] == 0.5 and s["base_acc"] == 0.5
    assert s["flips"] == 0.5 and s["flips_count"] == 1
    # item 0: P_base = softmax(-2, -1), P_model = softmax(-1, -2): KL = (e-1)/(e+1) * 1 ... computed exactly:
    pb = [1 / (1 + math.e), math.e / (1 + math.e)]
    pm = pb[::-1]
    kl0 = sum(a * math.log(a / b) for a, b in zip(pb, pm))
    assert out["items"][0]["choice_kl"] == pytest.approx(kl0)
    assert out["items"][1]["choice_kl"] == pytest.approx(0.0, abs=1e-12)
    assert s["choice_kl_mean"] == pytest.approx(kl0 / 2)


def _write(tmp_path, lines):
    p = tmp_path / "mc.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_errors_name_the_line(tmp_path):
    good = json.dumps({"context": "2+2=", "choices": ["4", "5"], "label": 0})
    assert len(load_jsonl(_write(tmp_path, [good, "", good]))) == 2
    with pytest.raises(LmsqueezeError, match=r"mc.jsonl:2: not valid JSON"):
        load_jsonl(_write(tmp_path, [good, "{oops"]))
    with pytest.raises(LmsqueezeError, match=r"mc.jsonl:3: missing label"):
        load_jsonl(_write(tmp_path, [good, good, json.dumps({"context": "a", "choices": ["b", "c"]})]))
    with pytest.raises(LmsqueezeError, match=r"mc.jsonl:1: label must be an integer in 0..1, got 2"):
        load_jsonl(_write(tmp_path, [json.dumps({"context": "a", "choices": ["b", "c"], "label": 2})]))
    with pytest.raises(LmsqueezeError, match=r"mc.jsonl:1: choices must be a list of at least 2"):
        load_jsonl(_write(tmp_path, [json.dumps({"context": "a", "choices": ["b"], "label": 0})]))
    with pytest.raises(LmsqueezeError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_piqa_items_and_batch_size_invariance():
    items = piqa_items()[:6]
    assert len(piqa_items()) == 1838 and items[0].context.startswith("Question: ")
    model, tok = models.load_model("tiny-qwen2")
    reqs, where = mc_requests(tok, items)
    assert len(reqs) == 12 and where[:2] == [(0, 0), (0, 1)]
    one = [r.logprob for r in loglik(model, reqs, batch_tokens=1, shared_context=False)]
    many = [r.logprob for r in loglik(model, reqs, batch_tokens=10_000, shared_context=True)]
    assert many == pytest.approx(one, abs=1e-4)
    assert score(items, where, one)["summary"] == score(items, where, many)["summary"]


def test_jsonl_task_end_to_end(tmp_path):
    lines = [json.dumps({"context": f"{i} plus one is", "choices": [str(i + 1), str(i + 7)], "label": 0})
             for i in range(5)]
    path = _write(tmp_path, lines)
    model, tok = models.load_model("tiny-llama")
    rep = evaluate(model, tok, f"mc:{path}", base=model, base_tokenizer=tok, cache_dir=str(tmp_path / "c"))
    r = rep["results"][0]
    assert r["task"] == f"mc:{path}" and r["summary"]["items"] == 5 and len(r["items"]) == 5
    assert r["summary"]["flips"] == 0.0
    assert r["summary"]["acc"] == sum(i["correct"] for i in r["items"]) / 5
