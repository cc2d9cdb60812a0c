import math

import pytest
import torch

from lmsqueeze import models
from lmsqueeze.data import load_text, tokenize_text
from lmsqueeze.evaluation import perplexity
from lmsqueeze.evaluation.tasks.perplexity import covered_text, summarize_ppl, text_units, windows


def test_windows_keep_the_remainder():
    w = windows(torch.arange(11), 4)
    assert [x.tolist() for x in w] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [x.tolist() for x in windows(torch.arange(9), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 1 token left: dropped


def test_summary_hand_computed():
    s = summarize_ppl([6.0, 2.0], [3, 1], words=2, nbytes=8)
    assert s["ppl"] == pytest.approx(math.exp(2.0)) and s["tokens"] == 4
    assert s["word_ppl"] == pytest.approx(math.exp(4.0))
    assert s["byte_ppl"] == pytest.approx(math.exp(1.0))
    assert s["bits_per_byte"] == pytest.approx(1 / math.log(2))


def test_matches_hf_loss_and_batch_size_invariant():
    model, tok = models.load_model("tiny-qwen2")
    r1 = perplexity(model, tok, "pydoc", seqlen=32, limit=5, batch_tokens=1)
    r3 = perplexity(model, tok, "pydoc", seqlen=32, limit=5, batch_tokens=96)
    assert r1["ppl"] == pytest.approx(r3["ppl"], rel=1e-5)
    ids = tokenize_text(tok, load_text("pydoc"))[:160].view(5, 32)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert r1["ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert r1["tokens"] == 5 * 31 and len(r1["items"]) == 5
    # byte tokenizer: one token per byte, so bytes = the 160 bytes the windows cover
    assert r1["bytes"] == 160
    assert r1["metrics"]["ppl"]["value"] == pytest.approx(r1["ppl"]) and r1["metrics"]["ppl"]["n"] == 5


def test_remainder_window_is_token_weighted(tmp_path):
    model, tok = models.load_model("tiny-llama")
    f = tmp_path / "t.txt"
    f.write_text("abcdefghij" * 7)  # 70 bytes = 70 tokens: windows of 32, 32 and a remainder of 6
    r = perplexity(model, tok, str(f), seqlen=32)
    assert r["windows"] == 3 and r["tokens"] == 31 + 31 + 5
    assert r["nll"] == pytest.approx(sum(i["nll"] for i in r["items"]) / r["tokens"])


@pytest.mark.slow
def test_smollm2_wikitext2_matches_plain_hf_loss():
    """Our ppl on the first 3 windows of wikitext2:test against HF's own loss on the same windows: within 0.1%."""
    model, tok = models.load_model("smollm2-135m", dtype="fp32")
    seqlen, n = 256, 3
    ours = perplexity(model, tok, "wikitext2:test", seqlen=seqlen, limit=n, batch_tokens=2 * seqlen)
    ids = tokenize_text(tok, load_text("wikitext2:test"))[:seqlen * n].view(n, seqlen)
    with torch.no_grad():
        losses = [model(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss.item() for i in range(n)]
    hf = math.exp(sum(losses) / n)
    assert ours["ppl"] == pytest.approx(hf, rel=1e-3)


def test_alpaca_responses_source():
    from lmsqueeze.data import alpaca_records
    from lmsqueeze.evaluation.tasks.perplexity import source_text

    recs = alpaca_records()
    assert source_text("alpaca:responses").startswith(recs[0]["output"] + "\n\n" + recs[1]["output"])
    model, tok = models.load_model("tiny-llama")
    assert perplexity(model, tok, "alpaca:responses", seqlen=32, limit=1)["tokens"] == 31


TEXT = "北京是中国的首都。🙂 Grüße aus Köln! 東京タワー🗼と富士山🗻。 plain ascii words here. " * 3


@pytest.mark.parametrize("seqlen", [2, 3, 5, 7, 16, 64, 1000])
def test_bytes_and_words_come_from_the_source_text(tmp_path, seqlen):
    """CJK and emoji: a window edge inside a multi-byte character adds no bytes (decoded windows would
    add a replacement character, 3 bytes, at every cut)."""
    model, tok = models.load_model("tiny-llama")  # byte tokenizer: characters span several tokens
    f = tmp_path / "cjk.txt"
    f.write_text(TEXT, encoding="utf-8")
    r = perplexity(model, tok, str(f), seqlen=seqlen)
    total = len(TEXT.encode("utf-8"))
    dropped = 1 if total % seqlen == 1 else 0  # a single trailing token makes no window
    assert r["bytes"] == total - dropped
    assert r["words"] == len(TEXT.split())


def test_covered_text_stops_inside_the_text():
    _, tok = models.load_model("tiny-llama")
    assert covered_text(tok, "héllo", 3) == "hé"          # h, then the two bytes of é
    assert covered_text(tok, "héllo", 2) == "hé"          # a cut inside é: the character is counted once
    assert text_units("hé llo") == (2, 7)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_a_window_longer_than_the_positions_fails_before_any_weights_load(name, monkeypatch):
    from lmsqueeze import evaluate
    from lmsqueeze.errors import LmsqueezeError

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before the check")

    monkeypatch.setattr(models, "load_model", no_load)
    with pytest.raises(LmsqueezeError, match=r"ppl:pydoc: the window \(--eval-seqlen\) is 1024 tokens but the model "
                                              r"\(\w+\) has 512 positions"):
        evaluate(name, tasks="ppl:pydoc", seqlen=1024)


def test_head_tokens_tokenizes_only_the_beginning_and_checks_the_cut():
    from lmsqueeze.evaluation.tasks.perplexity import head_tokens

    tok = models.load_tokenizer("smollm2-135m")
    text = load_text("pydoc") * 3
    full = tokenize_text(tok, text)
    tokens, part = head_tokens(tok, text, 1500)
    assert len(part) < len(text) / 4 and part.endswith("\n") and text.startswith(part)
    assert tokens.numel() >= 1500 + 64 and torch.equal(tokens[:1500], full[:1500])
    assert covered_text(tok, part, 1500) == covered_text(tok, text, 1500)

    class CutSensitive:  # its first token says how long the text was: every cut changes it
        def __call__(self, text, **kw):
            return {"input_ids": [len(text) % 251] + list(text.encode())}

    tokens, part = head_tokens(CutSensitive(), text, 1500)
    assert part == text and tokens.numel() == len(text.encode()) + 1  # the check failed: the whole text
    short = "a few words\n"
    tokens, part = head_tokens(tok, short, 1500)
    assert part == short and torch.equal(tokens, tokenize_text(tok, short))
