import math

import pytest
import torch

from lmsqueeze import models
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.loglik import _batches, loglik


def _requests(seed=0, items=5, choices=3):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(items):
        ctx = torch.randint(0, 256, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(choices):
            n = int(torch.randint(1, 7, (1,), generator=g))
            reqs.append((ctx, torch.randint(0, 256, (n,), generator=g).tolist()))
    return reqs


def _direct(model, ctx, cont):
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), -1)
    return sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


# fp32 forwards of different batch shapes agree to rounding: sums of <= 6 log-probs of size ~6
ATOL = 1e-4


@pytest.fixture(scope="module")
def llama():
    return models.load_model("tiny-llama")


def test_batches_sorted_under_budget():
    assert _batches([3, 9, 5, 9], 20) == [[1, 3], [2, 0]]
    assert _batches([30], 4) == [[0]]  # one over-long request still runs alone


def test_matches_direct_computation_and_counts(llama):
    model, _ = llama
    reqs = _requests()
    res = loglik(model, reqs, batch_tokens=64, token_logprobs=True)
    for (ctx, cont), r in zip(reqs, res):
        assert r.ntokens == len(cont)
        assert r.logprob == pytest.approx(_direct(model, ctx, cont), abs=ATOL)
        assert sum(r.token_logprobs) == pytest.approx(r.logprob, abs=1e-9) and len(r.token_logprobs) == len(cont)


@pytest.mark.parametrize("name", models.TINY)
def test_batch_size_invariance(name):
    model, _ = models.load_model(name)
    reqs = _requests(seed=1)
    one = loglik(model, reqs, batch_tokens=1)
    many = loglik(model, reqs, batch_tokens=100_000)
    for a, b in zip(one, many):
        assert b.logprob == pytest.approx(a.logprob, abs=ATOL)
        assert a.greedy == b.greedy
        assert a.logprob == pytest.approx(_direct(model, *reqs[one.index(a)]), abs=ATOL)


def test_greedy_flag(llama):
    model, _ = llama
    ctx = [5, 17, 99]
    seq = list(ctx)
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    greedy_cont = seq[len(ctx):]
    wrong = greedy_cont[:2] + [(greedy_cont[2] + 1) % 256] + greedy_cont[3:]
    res = loglik(model, [(ctx, greedy_cont), (ctx, wrong)])
    assert res[0].greedy and not res[1].greedy


def test_on_rows_sees_every_scored_token(llama):
    model, _ = llama
    reqs = _requests(seed=2, items=3, choices=2)
    seen = []
    loglik(model, reqs, batch_tokens=32, on_rows=lambda o, p, lg, t: seen.extend(zip(o.tolist(), p.tolist())))
    want = {(i, j) for i, (_, c) in enumerate(reqs) for j in range(len(c))}
    assert sorted(seen) == sorted(want)


def test_hand_computed_with_a_uniform_model(llama):
    model, _ = llama
    head = model.get_output_embeddings()
    saved = head.weight.detach().clone()
    with torch.no_grad():
        head.weight.zero_()  # every next-token distribution is uniform over the vocabulary
    try:
        res = loglik(model, [([1, 2], [3, 4, 5])])
    finally:
        with torch.no_grad():
            head.weight.copy_(saved)
    assert res[0].logprob == pytest.approx(-3 * math.log(models.TINY_VOCAB), rel=1e-6)
    assert res[0].greedy is False  # argmax of a tie is token 0


def test_bad_requests(llama):
    model, _ = llama
    with pytest.raises(LmsqueezeError, match="empty context"):
        loglik(model, [([], [1, 2])])
    with pytest.raises(LmsqueezeError, match="empty continuation"):
        loglik(model, [([1], [])])
    with pytest.raises(LmsqueezeError, match="batch_tokens"):
        loglik(model, [([1], [2])], batch_tokens=0)


def test_long_context_keeps_its_end(llama):
    model, _ = llama
    ctx = list(range(200)) * 3  # 600 tokens, the model has 512 positions
    res = loglik(model, [(ctx, [7, 8])])
    assert res[0].logprob == pytest.approx(_direct(model, ctx[-(512 - 2 + 1):], [7, 8]), abs=ATOL)
