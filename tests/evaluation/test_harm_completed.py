"""Representational harm completed: BBQ few-shot and categories from a user folder; BOLD per-group prompt
perplexity (hand-made items on a scripted backend)."""
import json
import math

import pytest

from lmsqueeze.data import bbq_user_items
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.tasks import bbq
from lmsqueeze.evaluation.tasks import bold as harm
from tests.evaluation.safety_fakes import ScriptedBackend
from tests.evaluation.test_safety_bbq import AGE, item


def test_bbq_fewshot_draws_other_items_seeded():
    pool = [item(i, "disambig", "neg", i % 2, AGE, ["old"]) for i in range(6)]
    pool[5]["context"] = pool[0]["context"]  # shares item 0's context: never its shot
    items = [dict(pool[0]), dict(pool[1])]
    bbq.add_fewshot(items, pool, k=2, seed=7)
    again = [dict(pool[0]), dict(pool[1])]
    bbq.add_fewshot(again, pool, k=2, seed=7)
    assert [i["_fewshot"] for i in items] == [i["_fewshot"] for i in again]
    shots0 = items[0]["_fewshot"].split("\n\n")[:-1]
    assert len(shots0) == 2 and "Context 0." not in items[0]["_fewshot"]
    for shot in shots0:  # "<prompt> <right answer>"
        n = int(shot.split("Context ")[1].split(".")[0])
        assert shot == bbq.TEMPLATE.format(context=f"Context {n}.", question=f"Question {n}?") + " " + \
            AGE[n % 2][0]
    reqs = bbq.requests(items)
    assert reqs[0][0].startswith(items[0]["_fewshot"]) and reqs[0][0].endswith("Question 0?\nAnswer:")
    with pytest.raises(LmsqueezeError, match="3 shots asked but only 2"):
        bbq.add_fewshot([dict(pool[0])], pool[:3], k=3)


def test_bbq_categories_from_a_user_folder(tmp_path):
    shipped = tmp_path / "data" / "bbq"
    shipped.mkdir(parents=True)
    (shipped / "Age.jsonl").write_text(json.dumps(item(1, "ambig", "neg", 2, AGE, ["old"])) + "\n")
    (shipped / "Race_ethnicity.jsonl").write_text(json.dumps(item(2, "ambig", "neg", 2, AGE, ["old"])) + "\n")
    user = tmp_path / "mine"
    user.mkdir()
    gi = item(3, "ambig", "neg", 2, [("The man", "M"), ("The woman", "F"), ("Unknown", "unknown")], ["F"],
              category="Gender_identity")
    (user / "Gender_identity.jsonl").write_text(json.dumps(gi) + "\n")
    (user / "Race_ethnicity.jsonl").write_text(json.dumps(item(4, "ambig", "neg", 2, AGE, ["old"])) + "\n")
    got = bbq_user_items(user, data_dir=tmp_path / "data")
    assert sorted((x["category"], x["example_id"]) for x in got) == [
        ("Age", 1), ("Age", 4), ("Gender_identity", 3)]  # the user's Race_ethnicity file wins (its item says Age)
    (user / "Bad.jsonl").write_text(json.dumps({"context": "x"}) + "\n")
    with pytest.raises(LmsqueezeError, match=r"Bad.jsonl:1: expected a BBQ record"):
        bbq_user_items(user, data_dir=tmp_path / "data")
    with pytest.raises(LmsqueezeError, match="does not exist"):
        bbq_user_items(tmp_path / "nope")


def test_bold_prompt_perplexity_per_group(monkeypatch):
    prompts = [{"domain": "race", "group": "A", "page": "p", "prompt": "Alice is a"},
               {"domain": "race", "group": "A", "page": "p", "prompt": "Ann was a"},
               {"domain": "race", "group": "B", "page": "p", "prompt": "Bob is a"}]
    table = {("", "Alice is a"): (-6.0, 3), ("", "Ann was a"): (-2.0, 2), ("", "Bob is a"): (-9.0, 3)}
    model = ScriptedBackend(table, generations={p["prompt"]: " ok." for p in prompts})

    class NoScorers:
        def offensive(self, texts):
            return [0.0] * len(texts)

        def sentiment(self, texts):
            return [0.0] * len(texts)

    res, _ = harm.score(model, prompts, NoScorers())
    out = harm.summarize(res, resamples=50)
    assert out["by_group"]["race/A"]["metrics"]["prompt_ppl"]["value"] == pytest.approx(math.exp(8 / 5))
    assert out["by_group"]["race/B"]["metrics"]["prompt_ppl"]["value"] == pytest.approx(math.exp(3))
    assert out["metrics"]["prompt_ppl"]["value"] == pytest.approx(math.exp(17 / 8))
    # the gap compares group means of the per-token prompt NLL: A (2 + 1) / 2 = 1.5, B 3
    assert out["by_domain"]["race"]["group_gap"]["prompt_nll"]["value"] == pytest.approx(1.5)
