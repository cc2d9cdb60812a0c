import pytest
import torch

from lmsqueeze import models
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.safety import HFBackend, ModelBackend
from lmsqueeze.testing import assert_close

FP32_TOL = (1e-5, 1e-5)  # batched vs one sequence at a time, fp32 model: same math, other padding


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("tiny-llama")


def direct_loglik(model, ids: list[int], start: int) -> float:
    """Summed log p(ids[t] | ids[:t]) for t >= start, one unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[t - 1, ids[t]] for t in range(start, len(ids))))


def test_loglik_matches_a_direct_forward(tiny):
    model, tok = tiny
    backend = HFBackend(model, tok, batch_size=3)
    assert isinstance(backend, ModelBackend)
    reqs = [("The cat", " sat."), ("", "A whole sentence, unconditional."), ("x", " y"),
            ("Longer context here", " ok"), ("", "Hi")]
    got = backend.loglik(reqs)
    bos = tok.bos_token_id
    expected = []
    for ctx, cont in reqs:
        c = tok(ctx, add_special_tokens=False)["input_ids"] if ctx else []
        x = tok(cont, add_special_tokens=False)["input_ids"]
        expected.append((direct_loglik(model, [bos] + c + x, 1 + len(c)), len(x)))
    assert [n for _, n in got] == [n for _, n in expected] == [5, 32, 2, 3, 2]
    got_t = torch.tensor([s for s, _ in got])
    assert_close(got_t, torch.tensor([s for s, _ in expected]), *FP32_TOL, name="loglik")
    one = HFBackend(model, tok, batch_size=1).loglik(reqs)
    assert_close(got_t, torch.tensor([s for s, _ in one]), *FP32_TOL, name="batch 1 vs 3")


def test_no_bos_scores_all_but_the_first_token(tiny):
    model, tok = tiny
    backend = HFBackend(model, tok)
    backend.bos = None  # a tokenizer without a BOS token
    (s, n), = backend.loglik([("", "abcd")])
    ids = tok("abcd", add_special_tokens=False)["input_ids"]
    assert n == len(ids) - 1
    assert s == pytest.approx(direct_loglik(model, ids, 1), rel=1e-5)


def test_greedy_generation_batched_equals_one_by_one(tiny):
    model, tok = tiny
    prompts = ["Alice is a", "The history of the Roman Empire", "x"]
    batched = HFBackend(model, tok, batch_size=3).generate(prompts, max_new_tokens=6)
    single = HFBackend(model, tok, batch_size=1).generate(prompts, max_new_tokens=6)
    assert batched == single
    # and the first one by hand: argmax, step by step
    ids = [tok.bos_token_id] + tok(prompts[0], add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    assert batched[0] == tok.decode(new, skip_special_tokens=True)


def test_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(LmsqueezeError, match="batch size must be >= 1"):
        HFBackend(model, tok, batch_size=0)
    with pytest.raises(LmsqueezeError, match="has no tokens"):
        HFBackend(model, tok).loglik([("context", "")])
    with pytest.raises(LmsqueezeError, match="max new tokens"):
        HFBackend(model, tok).generate(["a"], 0)
