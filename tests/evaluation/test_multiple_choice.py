import json
import math

import pytest

from lmsqueeze import evaluate, models
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.backend import Backend
from lmsqueeze.evaluation.tasks.multiple_choice import MCItem, load_jsonl, piqa_items, score


def test_score_hand_computed():
    items = [MCItem("q1", ["a", "bbbb"], 1), MCItem("q2", ["xx", "y"], 0)]
    # item 0: raw picks choice 0 (-1 > -2); per character: -1/1 < -2/4 -> picks choice 1
    # item 1: raw picks choice 1; per character -3/2 vs -1/1 -> choice 1
    model_lps = [[-1.0, -2.0], [-3.0, -1.0]]
    base = score(items, [[-2.0, -1.0], [-3.0, -1.0]], None, 100, 0)
    out = score(items, model_lps, base["items"], 100, 0)
    s = out["summary"]
    assert s["acc"] == 0.0 and s["acc_norm"] == 0.5 and s["base_acc"] == 0.5 and s["acc_norm_unit"] == "characters"
    assert s["flips"] == 0.5 and s["flips_count"] == 1
    pb = [1 / (1 + math.e), math.e / (1 + math.e)]
    pm = pb[::-1]
    kl0 = sum(a * math.log(a / b) for a, b in zip(pb, pm))
    assert out["items"][0]["choice_kl"] == pytest.approx(kl0)
    assert out["items"][1]["choice_kl"] == pytest.approx(0.0, abs=1e-12)
    assert s["choice_kl_mean"] == pytest.approx(kl0 / 2)
    acc = out["metrics"]["acc"]
    assert (acc["value"], acc["base"], acc["delta"], acc["n"]) == (0.0, 0.5, -0.5, 2)
    assert acc["ci"][0] == 0.0 and acc["ci"][1] > 0.5  # Wilson: 0 of 2 is far from certain
    assert acc["delta_ci"][0] < -0.5 < acc["delta_ci"][1] and "newcombe" in acc["interval"]


def test_characters_not_bytes_normalise():
    # "café" is 4 characters but 5 UTF-8 bytes: per character, -4.4/4 = -1.1 loses to -1.0; per byte it would win
    items = [MCItem("q", ["café", "x"], 0)]
    assert score(items, [[-4.4, -1.0]], None, 10, 0)["items"][0]["pred_norm"] == 1


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
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(good.encode() + b"\n" + json.dumps({"context": "caf\u00e9", "choices": ["a", "b"],
                                                         "label": 0}, ensure_ascii=False).encode("cp1252") + b"\n")
    with pytest.raises(LmsqueezeError, match=r"latin1.jsonl:2: multiple-choice file is not UTF-8: byte\(s\) e9"):
        load_jsonl(bad)


def test_bad_file_fails_before_the_model_loads(tmp_path):
    bad = _write(tmp_path, ["{oops"])
    with pytest.raises(LmsqueezeError, match="mc.jsonl:1: not valid JSON"):
        evaluate("no/such/model/dir", tasks=f"mc:{bad}")


def test_piqa_items_and_batch_size_invariance():
    items = piqa_items()[:6]
    assert len(piqa_items()) == 1838 and items[0].context.startswith("Question: ")
    model, tok = models.load_model("tiny-qwen2")
    pairs = [(it.context, " " + ch) for it in items for ch in it.choices]
    one = [r.logprob for r in Backend(model, tok, batch_tokens=1).loglik(pairs)]
    many = [r.logprob for r in Backend(model, tok, batch_tokens=10_000).loglik(pairs)]
    assert many == pytest.approx(one, abs=1e-4)
    lp = lambda xs: [xs[2 * i:2 * i + 2] for i in range(6)]  # noqa: E731
    assert score(items, lp(one), None, 10, 0)["summary"] == score(items, lp(many), None, 10, 0)["summary"]


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
