"""instruct:FILE: flat and Unnatural Instructions layouts, the seeded sample, and one end-to-end run with the
alpaca metrics, the local judge (both orders) and sample records."""
import json

import pytest
import torch

from lmsqueeze import models
from lmsqueeze.data import instruction_records as read_instructions
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.api import evaluate
from lmsqueeze.evaluation.tasks.instruct import sample

UNNATURAL = {"instruction": "You are given a sentence. Tell whether it is a question.",
             "instances": [{"instruction_with_input": "You are given a sentence. Tell whether it is a question.\n"
                                                      "Is it raining?",
                            "input": "Is it raining?", "constraints": "The output should be 'Yes' or 'No'.",
                            "output": "Yes"},
                           {"instruction_with_input": "", "input": "It rains.", "constraints": "",
                            "output": "No"}],
             "reformulations": []}


def test_layouts(tmp_path):
    ui = tmp_path / "core.jsonl"
    ui.write_text(json.dumps(UNNATURAL) + "\n\n" + json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    items = read_instructions(ui)
    assert items == [
        {"instruction": "You are given a sentence. Tell whether it is a question.\nIs it raining?\n"
                        "The output should be 'Yes' or 'No'.", "input": "", "output": "Yes"},
        {"instruction": "You are given a sentence. Tell whether it is a question.", "input": "It rains.",
         "output": "No"},
        {"instruction": "Say hi.", "input": "", "output": "hi"}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x", "completion": "y"}]))
    with pytest.raises(LmsqueezeError, match=r"record 0 has fields \['completion', 'prompt'\]"):
        read_instructions(bad)
    bad.write_text(json.dumps([{"instruction": "x", "output": 3}]))
    with pytest.raises(LmsqueezeError, match="'output' must be a non-empty string, got 3"):
        read_instructions(bad)
    bad.write_text(json.dumps([{"instruction": "x", "output": ""}, {"instruction": "y", "output": "z"}]))
    assert read_instructions(bad) == [{"instruction": "y", "input": "", "output": "z"}]  # nothing to score
    with pytest.raises(LmsqueezeError, match="valid: alpaca, or a .json, .jsonl"):
        read_instructions(tmp_path / "x.csv")


def test_seeded_sample_keeps_file_order():
    items = list(range(100))
    a, b = sample(items, 10, seed=3), sample(items, 10, seed=3)
    assert a == b == sorted(a) and len(set(a)) == 10 and a != sample(items, 10, seed=4)
    assert sample(items, None, 0) == items and sample(items, 500, 0) == items


def test_instruct_with_local_judge_end_to_end(tmp_path):
    path = tmp_path / "inst.json"
    path.write_text(json.dumps([{"instruction": f"Repeat {w}.", "input": "", "output": w}
                                for w in ("apple", "pear", "plum", "fig")]))
    base, tok = models.load_model("tiny-llama")
    model, _ = models.load_model("tiny-llama")
    with torch.no_grad():  # a "compressed" model: the same weights, perturbed, so its answers differ
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    rep = evaluate(model, tok, tasks=f"instruct:{path}", base=base, base_tokenizer=tok, limit=2,
                   max_new_tokens=4, resamples=20, cache_dir=str(tmp_path / "cache"),
                   extra={"judge": "tiny-llama", "judge_max_tokens": 4, "judge_cache": str(tmp_path / "judge")})
    res = rep["results"][0]
    assert res["metrics"]["f1"]["n"] == 2 and "reference_jsd" in res["metrics"]
    j = res["summary"]["judge"]
    assert j["counts"]["items"] == 2 and j["requests"] == 2 * (2 - j["counts"]["identical_answers"])
    assert j["prompt"].startswith("You are an impartial judge")
    if "win_rate" in res["metrics"]:  # the random judge may give no parsable verdict at all
        assert 0 <= res["metrics"]["win_rate"]["value"] <= 1
    recs = res["samples"]
    assert len(recs) == 2 and all("judge" in r and r["base_output"] is not None for r in recs)
    scored = [r["metrics"]["judge_scored"] for r in recs]
    assert sum(scored) == res["metrics"].get("win_rate", {"n": 0})["n"]
