"""The pairwise judge: verdict parsing, the win-rate formula with both orders and ties, the on-disk cache,
the request budget, and the endpoint path against a real OpenAI-compatible HTTP server on loopback."""
import os
import subprocess
import sys
import time

import pytest

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.judge import (
    EndpointJudge,
    Judge,
    judge_answers,
    judge_from_options,
    parse_verdict,
    summarize,
)


@pytest.mark.parametrize("reply,want", [
    ("Both are fine but A is more complete.\n[[A]]", "A"),
    ("[[A]] at first, on reflection [[ b ]]", "B"),
    ("They are the same. [[Tie]]", "tie"),
    ("Verdict: B", "B"),
    ("The better response is A.", "A"),
    ("B", "B"),
    ("Response A.", "A"),
    ("tie", "tie"),
    ("Response B answers the question; the other does not.", "B"),
    ("Response A and Response B are both weak", None),
    ("I cannot decide.", None),
    ("I prefer a response that is short.", None),
    ("Verdict: Response B", "B"),
    ("", None),
    # lenient fallbacks, with the markup and phrasings small and chat-tuned judges write
    ("A", "A"), ("a", "A"), ("(b)", "B"), ("Answer: B", "B"), ("answer: a", "A"),
    ("**A**", "A"), ("`B`", "B"), ("**Verdict:** **B**", "B"), ("Final verdict: **[[A]]**", "A"),
    ("## Verdict\nA", "A"), ("[B]", "B"), ("[tie]", "tie"), ("Tie", "tie"), ("It's a tie.", "tie"),
    ("Both responses are equally good.", "tie"), ("Neither response is better.", "tie"),
    ("Response A is better because it is correct.", "A"), ("I think response a is more helpful", "A"),
    ("Assistant B wins.", "B"), ("B is clearly better.", "B"),
    # contradictions and look-alikes are not verdicts
    ("A is better. No wait, B is better.", None), ("B is better, though they are equally good.", None),
    # the prompt's headers echoed back are not verdicts (SmolLM2-135M's replies, verbatim)
    ("[Response A]\n1. Marie Curie (189c)\n2. Marie Curie (1", None),
    ("You can\n\n[Response A]\n1. Burning of fossil fuels: The primary cause of climate change is the", None),
    ("[Response B]\nThe answer is 4.\n\nVerdict: [[B]]", "B"),
    ("Plan A is a good idea.", None), ("The answer is a list of items.", None), ("This is a better answer.", None),
])
def test_parse_verdict(reply, want):
    assert parse_verdict(reply) == want


def test_win_rate_both_orders_and_ties_by_hand():
    judged = [
        # model wins in both orders: score 1
        {"identical": False, "verdicts": {"model_second": "B", "model_first": "A"}},
        # the judge always picks position A: one win, one loss -> 0.5, inconsistent
        {"identical": False, "verdicts": {"model_second": "A", "model_first": "A"}},
        # a tie and a loss: (0.5 + 0) / 2 = 0.25
        {"identical": False, "verdicts": {"model_second": "tie", "model_first": "B"}},
        # identical answers: a tie without asking
        {"identical": True, "verdicts": {}},
        # one order unparsed: only the parsed one counts (model first, judge says A): 1
        {"identical": False, "verdicts": {"model_second": None, "model_first": "A"}},
        # nothing parsed: left out
        {"identical": False, "verdicts": {"model_second": None, "model_first": None}},
    ]
    out = summarize(judged, resamples=200)
    m, c = out["metrics"], out["counts"]
    assert m["win_rate"]["value"] == pytest.approx((1 + 0.5 + 0.25 + 0.5 + 1) / 5)
    assert m["win_rate"]["n"] == 5 and m["win_rate"]["ci"][0] <= m["win_rate"]["value"] <= m["win_rate"]["ci"][1]
    assert m["tie_rate"]["value"] == pytest.approx(1 / 5)  # only the identical item tied in every order
    # both orders parsed on items 1-4 (identical counts as consistent): consistent on items 1 and 4
    assert m["judge_consistency"]["value"] == pytest.approx(2 / 4)
    # decisive judgments: B, A, A, A, B, A -> 4 of 6 picked position A
    assert m["position_a_rate"]["value"] == pytest.approx(4 / 6) and m["position_a_rate"]["n"] == 6
    assert c == {"items": 6, "identical_answers": 1, "replies": 10, "unparsed_replies": 3,
                 "items_without_verdict": 1, "items_scored": 5}
    # 3 of the 10 replies (5 non-identical items x 2 orders) named no verdict: counted, not guessed
    assert m["unparsed_rate"]["value"] == pytest.approx(3 / 10) and m["unparsed_rate"]["n"] == 10


class _Scripted(Judge):
    """A judge that answers from a list (for the cache and budget bookkeeping only)."""

    def __init__(self, replies, tmp_path, budget=None):
        super().__init__("scripted", tmp_path, budget)
        self.replies, self.asked = list(replies), 0

    def _complete(self, batch):
        self.asked += len(batch)
        return [self.replies.pop(0) for _ in batch]


RECORDS = [{"instruction": "Name a colour.", "input": ""}, {"instruction": "Add 2 and 2.", "input": ""},
           {"instruction": "Say hello.", "input": ""}]


def test_cache_and_budget(tmp_path):
    base, model = ["red", "4", "hello"], ["blue", "five", "hello"]
    j = _Scripted(["[[B]]", "[[A]]", "[[A]]", "[[A]]"], tmp_path)
    out = judge_answers(j, RECORDS, base, model, resamples=50)
    assert j.asked == 4 and out["counts"]["identical_answers"] == 1  # the identical third item was not asked
    assert out["metrics"]["win_rate"]["value"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    again = _Scripted([], tmp_path)  # a new process: every judgment comes from the disk cache
    out2 = judge_answers(again, RECORDS, base, model, resamples=50)
    assert again.asked == 0 and again.cache_hits == 4 and out2["metrics"] == out["metrics"]
    tight = _Scripted(["[[tie]]"], tmp_path / "other", budget=1)
    out3 = judge_answers(tight, RECORDS, base, model, resamples=50)
    assert tight.asked == 1 and tight.over_budget == 3
    assert out3["counts"]["items_scored"] == 2  # the budgeted item and the identical one


def test_bad_judge_options():
    with pytest.raises(LmsqueezeError, match="give one judge"):
        judge_from_options({"judge": "tiny-llama", "judge_url": "http://127.0.0.1:1/v1"})
    with pytest.raises(LmsqueezeError, match="must start with http"):
        judge_from_options({"judge_url": "127.0.0.1:8000"})
    assert judge_from_options({}) is None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m lmsqueeze.evaluation.serve` on tiny-llama, a real aiohttp server on a free loopback port."""
    pytest.importorskip("aiohttp")
    pytest.importorskip("openai")
    port_file = tmp_path_factory.mktemp("serve") / "port"
    env = {**os.environ, "LMSQUEEZE_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmsqueeze.evaluation.serve", "--model", "tiny-llama", "--port",
                             "0", "--port-file", str(port_file), "--max-tokens", "8"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port_file.read_text()}/v1"
    proc.terminate()
    proc.wait(timeout=30)


def test_endpoint_judge_against_a_real_server(server, tmp_path):
    import openai

    client = openai.OpenAI(base_url=server, api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny-llama", messages=[])
    j = EndpointJudge(server, model="tiny-llama", cache_dir=tmp_path, retries=0)
    j.settings = {**j.settings, "max_tokens": 8}
    out = judge_answers(j, RECORDS, ["red", "4", "hello"], ["blue", "five", "hello"], resamples=50)
    assert j.requests == 4 and len(j.cache) == 4
    # the random tiny model names no verdict: every reply is kept, counted as unparsed, nothing is guessed
    replies = [r for it in out["items"] for r in it["replies"].values()]
    assert len(replies) == 4 and all(isinstance(r, str) for r in replies)
    assert out["counts"]["unparsed_replies"] == sum(parse_verdict(r) is None for r in replies)
    j2 = EndpointJudge(server, model="tiny-llama", cache_dir=tmp_path, retries=0)
    j2.settings = dict(j.settings)
    judge_answers(j2, RECORDS, ["red", "4", "hello"], ["blue", "five", "hello"], resamples=50)
    assert j2.requests == 0 and j2.cache_hits == 4


def test_endpoint_unreachable_says_where(tmp_path):
    pytest.importorskip("openai")
    j = EndpointJudge("http://127.0.0.1:9/v1", cache_dir=tmp_path, retries=1, timeout=5)
    with pytest.raises(LmsqueezeError, match=r"127\.0\.0\.1:9/v1 unreachable after retries"):
        j.ask([[{"role": "user", "content": "hi"}]])


def test_cli_judge_flags_reach_the_task(capsys, tmp_path):
    from lmsqueeze.cli import main

    path = tmp_path / "i.json"
    path.write_text('[{"instruction": "Say hi.", "output": "hi"}]')
    assert main(["eval", "--model", "tiny-llama", "--tasks", f"instruct:{path}", "--judge-url", "127.0.0.1:8000"]) == 2
    assert "judge URL '127.0.0.1:8000' must start with http://" in capsys.readouterr().err
