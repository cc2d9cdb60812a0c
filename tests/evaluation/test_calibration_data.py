"""Calibration from any file: C4-layout gzip JSON-lines shards, chat-templated instruction data (Alpaca as
the study used it), weighted mixtures."""
import gzip
import json

import pytest
import torch

from lmsqueeze import data, models
from lmsqueeze.errors import LmsqueezeError


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("tiny-llama")  # byte-level, with a chat template


def _c4_shard(path, texts):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"}) + "\n")


def _is_window_of(window, tokens):
    """Whether `window` occurs in `tokens` (as int32 bytes, at an element boundary)."""
    w, t = window.numpy().astype("<i4").tobytes(), tokens.numpy().astype("<i4").tobytes()
    at = t.find(w)
    while at != -1 and at % 4:
        at = t.find(w, at + 1)
    return at != -1


def test_c4_json_gz_shards(tok, tmp_path):
    a, b = tmp_path / "c4-train.00000-of-01024.json.gz", tmp_path / "c4-train.00001-of-01024.json.gz"
    _c4_shard(a, ["First document of the shard.", "Second one, a little longer than the first."])
    _c4_shard(b, ["Another shard's only document."])
    assert data.load_text(str(a)) == "First document of the shard.\n\nSecond one, a little longer than the first."
    both = data.load_text(str(tmp_path / "c4-train.*-of-01024.json.gz"))
    assert both.endswith("Another shard's only document.")
    batches = data.calibration_batches(tok, str(a), nsamples=3, seqlen=16, seed=1)
    tokens = data.tokenize_text(tok, data.load_text(str(a)))
    assert batches.shape == (3, 16) and all(_is_window_of(w, tokens) for w in batches)
    bad = tmp_path / "bad.json.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(LmsqueezeError, match="bad.json.gz' is not a readable gzip file"):
        data.load_text(str(bad))
    with gzip.open(bad, "wt") as f:
        f.write('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(LmsqueezeError, match=r"bad.json.gz:2: not valid JSON"):
        data.load_text(str(bad))


def test_chat_templated_alpaca_calibration(tok, tmp_path):
    records = [{"instruction": "Name a fruit.", "input": "", "output": "An apple."},
               {"instruction": "Translate to French.", "input": "cat", "output": "chat"}] * 20
    path = tmp_path / "alpaca_like.json"
    path.write_text(json.dumps(records))
    stream = data.chat_tokens(tok, str(path))
    first = tok.apply_chat_template([{"role": "user", "content": "Name a fruit."},
                                     {"role": "assistant", "content": "An apple."}], tokenize=False)
    assert tok.decode(stream).startswith(first + first.replace("Name a fruit.", "Translate to French.\n\ncat")
                                         .replace("An apple.", "chat"))
    assert "user: Translate to French.\n\ncat" in tok.decode(stream)
    batches = data.calibration_batches(tok, f"chat:{path}", nsamples=4, seqlen=32, seed=0)
    assert batches.shape == (4, 32) and all(_is_window_of(w, stream) for w in batches)
    # "alpaca" by name: the data set in the data directory (here a small one in the shipped layout)
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "alpaca_5000.json").write_text(json.dumps(records))
    named = data.calibration_batches(tok, "chat:alpaca", nsamples=4, seqlen=32, seed=0, data_dir=tmp_path)
    assert torch.equal(named, batches)


def test_chat_without_template_uses_the_alpaca_format(tok, tmp_path):
    path = tmp_path / "i.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    plain = models.load_tokenizer("tiny-llama")
    plain.chat_template = None
    text = plain.decode(data.chat_tokens(plain, str(path)))
    assert "### Instruction:\nSay hi.\n\n### Response:\nhi" in text


def test_mixture(tok, tmp_path):
    (tmp_path / "a.txt").write_text("a" * 400)
    (tmp_path / "b.txt").write_text("b" * 400)
    assert data.parse_mixture(f"mix:{tmp_path}/a.txt@3+{tmp_path}/b.txt@1") == [
        (f"{tmp_path}/a.txt", 3.0), (f"{tmp_path}/b.txt", 1.0)]
    assert data.mixture_counts([3, 1], 8) == [6, 2]
    assert data.mixture_counts([1, 1, 1], 4) == [2, 1, 1]
    assert data.mixture_counts([100, 1], 2) == [1, 1]  # every part gets a window
    got = data.calibration_batches(tok, f"mix:{tmp_path}/a.txt@3+{tmp_path}/b.txt@1", nsamples=4, seqlen=8)
    letters = [set(tok.decode(w)) for w in got]
    assert letters == [{"a"}, {"a"}, {"a"}, {"b"}]
    for bad, msg in [("mix:pydoc", "needs a weight"), ("mix:pydoc@x+pydoc@1", "'x' of 'pydoc@x' is not a number"),
                     ("mix:pydoc@0+pydoc@1", "must be a positive number, got 0"),
                     ("mix:pydoc@1", "a mixture of one source")]:
        with pytest.raises(LmsqueezeError, match=msg):
            data.parse_mixture(bad)
    with pytest.raises(LmsqueezeError, match="nsamples >= 2"):
        data.calibration_batches(tok, f"mix:{tmp_path}/a.txt@3+{tmp_path}/b.txt@1", nsamples=1, seqlen=8)
