import math

import pytest
import torch

from lmsqueeze import models
from lmsqueeze.evaluation.perplexity import nll_sum, perplexity, windows


def test_windows_keep_the_remainder():
    w = windows(torch.arange(11), 4)
    assert [x.tolist() for x in w] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [x.tolist() for x in windows(torch.arange(9), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 1 token left: dropped


def test_nll_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    nll = nll_sum(logits, torch.tensor([1, 0]))
    assert nll.item() == pytest.approx(math.log(2) + math.log(4 / 3))


def test_matches_hf_loss_and_batch_size_invariant():
    model, tok = models.load_model("tiny-qwen2")
    r1 = perplexity(model, tok, "pydoc", seqlen=32, limit=5, batch_size=1)
    r3 = perplexity(model, tok, "pydoc", seqlen=32, limit=5, batch_size=3)
    assert r1["ppl"] == pytest.approx(r3["ppl"], rel=1e-5)
    from lmsqueeze.data import load_text, tokenize_text

    ids = tokenize_text(tok, load_text("pydoc"))[:160].view(5, 32)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert r1["ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
