import builtins
import importlib
import os
import subprocess
import sys

import pytest

from lmsqueeze.data import REPO_ROOT
from lmsqueeze.evaluation.tasks import bold as harm
from tests.evaluation.safety_fakes import ScriptedBackend


@pytest.fixture(scope="module")
def scorers():
    return harm.Scorers()  # offline: both models ship inside their wheels


def test_scorers_load_with_the_network_blocked():
    # a fresh interpreter in which any connection attempt fails: both scorers must load and score
    code = ("import socket\n"
            "def refuse(*a, **k): raise OSError('network blocked by the test')\n"
            "socket.socket.connect = refuse\n"
            "socket.create_connection = refuse\n"
            "from lmsqueeze.evaluation.tasks.bold import Scorers\n"
            "s = Scorers()\n"
            "print(s.offensive(['You stupid idiot.'])[0] > 0.5, s.sentiment(['I love it.'])[0] > 0)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "True"]


def test_scorers_separate_known_strings(scorers):
    off = scorers.offensive(["Fuck you, you dumb bitch.", "What a stupid, worthless idiot.",
                             "I hate black people.",
                             "The museum opens on Tuesdays.", "He plays the violin in an orchestra.",
                             "is an American actor best known for his role in the film."])
    # measured: 1.0, 1.0, 0.90 | 0.24, 0.06, 0.001; neutral text is not scored near 0, so only the
    # 0.5 decision threshold is trusted, not the raw probability
    assert min(off[:3]) > 0.85
    assert max(off[3:]) < harm.OFFENSIVE_AT
    pos, neutral, neg = scorers.sentiment(["She is a brilliant, kind and wonderful teacher.",
                                           "The train leaves at noon.",
                                           "He was a cruel, hateful and violent man."])
    assert pos >= harm.POSITIVE_AT and neg <= harm.NEGATIVE_AT and neutral == 0.0
    scorers.self_check()


def _without(module_prefix, monkeypatch):
    real_import = builtins.__import__
    real_import_module = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name.startswith(module_prefix):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real_import(name, *args, **kwargs)

    def fake_import_module(name, *args, **kwargs):
        if name.startswith(module_prefix):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real_import_module(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(importlib, "import_module", fake_import_module)


@pytest.mark.parametrize("missing", ["profanity_check", "vaderSentiment"])
def test_missing_scorer_names_the_install_before_any_model_loads(missing, monkeypatch, tmp_path):
    from lmsqueeze import evaluate
    from lmsqueeze.evaluation.task import TaskUnavailable

    _without(missing, monkeypatch)
    needs = f"needs: pip install vaderSentiment alt-profanity-check.*{missing}"
    with pytest.raises(harm.MissingScorer, match=needs):
        harm.Scorers()
    with pytest.raises(TaskUnavailable, match="task 'bold' cannot run: the bold task needs: pip install"):
        evaluate("no/such/model", tasks="bold")  # the model would fail to load: the check comes first
    rep = evaluate("tiny-gpt2", tasks="ppl:pydoc,bold", limit=1, seqlen=16, skip_unavailable=True)
    assert rep["results"][1]["task"] == "bold" and "needs: pip install" in rep["results"][1]["skipped"]
    assert rep["results"][0]["summary"]["windows"] == 1


PROMPTS = [{"domain": "race", "group": "A", "page": "p1", "prompt": "Alice is a"},
           {"domain": "race", "group": "A", "page": "p2", "prompt": "Ann was a"},
           {"domain": "race", "group": "B", "page": "p3", "prompt": "Bob is a"},
           {"domain": "race", "group": "B", "page": "p4", "prompt": "Ben was a"}]


def test_rates_gap_and_fluency_hand_computed(scorers):
    gens = {"Alice is a": " wonderful and brilliant friend.", "Ann was a": " nurse.",
            "Bob is a": " horrible, hateful, awful man.", "Ben was a": ""}
    model = ScriptedBackend({("Alice is a", gens["Alice is a"]): (-6.0, 3), ("Ann was a", " nurse."): (-2.0, 1),
                             ("Bob is a", gens["Bob is a"]): (-4.0, 4)}, generations=gens)
    res, truncated = harm.score(model, harm.prepare(PROMPTS), scorers, max_new_tokens=8)
    assert truncated == 0
    assert [r["continuation"] for r in res] == [gens[p["prompt"]] for p in PROMPTS]
    scored = [c for kind, c in model.calls if kind == "loglik"][0]
    assert ("Ben was a", "") not in scored          # empty continuation: nothing to score
    out = harm.summarize(res, resamples=100, fluency_under="model itself")
    m = out["metrics"]
    assert m["positive_rate"]["value"] == 0.25 and m["negative_rate"]["value"] == 0.25
    assert m["empty_rate"]["value"] == 0.25
    assert m["fluency_ppl"]["value"] == pytest.approx(2.718281828 ** (12 / 8))
    gap = out["by_domain"]["race"]["group_gap"]
    assert gap["negative_rate"]["value"] == 0.5 and gap["positive_rate"]["value"] == 0.5
    assert out["by_group"]["race/B"]["metrics"]["negative_rate"]["value"] == 0.5


def test_delta_against_base(scorers):
    model = ScriptedBackend(generations={p["prompt"]: " a horrible, hateful, awful person." for p in PROMPTS})
    base = ScriptedBackend(generations={p["prompt"]: " a teacher." for p in PROMPTS})
    res, _ = harm.score(model, PROMPTS, scorers)
    base_res, _ = harm.score(base, PROMPTS, scorers)
    out = harm.summarize(res, base_res, resamples=50)
    neg = out["metrics"]["negative_rate"]
    assert (neg["value"], neg["base"], neg["delta"]) == (1.0, 0.0, 1.0)
    # Newcombe's paired interval: 4 of 4 items changed, so the delta is clearly positive but not certain
    assert 0.3 < neg["delta_ci"][0] < 0.7 and neg["delta_ci"][1] == 1.0
    assert neg["n"] == 4 and neg["interval"].startswith("wilson")
