"""compress(model, config, calibration): source names, texts, Datasets and token tensors, tokenized for the user."""
import pytest
import torch

import lmsqueeze
from lmsqueeze.compressor.calibration import calibration_tokens
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models import byte_tokenizer, load_model


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_a_source_name_is_drawn_into_windows(tok):
    ids, info = calibration_tokens("pydoc", tokenizer=tok, nsamples=3, seqlen=20, seed=1)
    assert ids.shape == (3, 20) and ids.dtype == torch.long
    assert info == {"source": "pydoc", "nsamples": 3, "seqlen": 20, "seed": 1}
    again, _ = calibration_tokens("pydoc", tokenizer=tok, nsamples=3, seqlen=20, seed=1)
    assert torch.equal(ids, again)


def test_texts_are_one_sample_each_cut_and_padded_with_a_mask(tok):
    out, info = calibration_tokens(["abcdef", "xy", ""], tokenizer=tok, seqlen=4)
    ids, mask = out["input_ids"], out["attention_mask"]
    expect = tok(["abcdef", "xy"], add_special_tokens=False)["input_ids"]
    assert ids.shape == (2, 4)  # the empty text is left out, the long one cut to seqlen
    assert ids[0].tolist() == expect[0][:4] and ids[1, :2].tolist() == expect[1]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert info["source"] == "list of texts" and info["given"] == 3


def test_more_texts_than_nsamples_are_drawn_with_the_seed(tok):
    texts = [f"text number {i}" for i in range(50)]
    a, _ = calibration_tokens(texts, tokenizer=tok, nsamples=5, seed=3)
    b, _ = calibration_tokens(texts, tokenizer=tok, nsamples=5, seed=3)
    c, _ = calibration_tokens(texts, tokenizer=tok, nsamples=5, seed=4)
    assert a["input_ids"].shape[0] == 5 and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], c["input_ids"])


def test_a_dataset_text_column_or_input_ids(tok):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["hello there", "general"], "label": [0, 1]})
    out, info = calibration_tokens(ds, tokenizer=tok)
    assert out["input_ids"].shape == (2, 11) and info["source"] == "datasets.Dataset (text)"
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8]]})
    out, _ = calibration_tokens(ds)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]] and out["attention_mask"].tolist() == [[1, 1, 1],
                                                                                                       [1, 0, 0]]
    with pytest.raises(LmsqueezeError, match="no 'text' column; columns: prompt"):
        calibration_tokens(datasets.Dataset.from_dict({"prompt": ["a"]}), tokenizer=tok)


def test_token_tensors_pass_and_are_cut(tok):
    ids = torch.arange(24).reshape(4, 6)
    out, info = calibration_tokens(ids, nsamples=2, seqlen=3)
    assert out.tolist() == [[0, 1, 2], [6, 7, 8]] and info == {"source": "token tensor"}
    out, _ = calibration_tokens({"input_ids": ids, "attention_mask": torch.ones(4, 6)}, seqlen=5)
    assert out["input_ids"].shape == (4, 5) and out["attention_mask"].shape == (4, 5)
    out, _ = calibration_tokens([torch.tensor([1, 2, 3]), [4, 5]])
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]


@pytest.mark.parametrize("bad,message", [
    (3.5, "calibration of type float is not understood; give a source name"),
    ([], "the calibration list is empty"),
    (["a", 1], "only strings or only 1-D token sequences, got int, str"),
    (["", ""], "the calibration list of texts holds no tokens"),
])
def test_bad_calibration_is_one_clear_error(tok, bad, message):
    with pytest.raises(LmsqueezeError, match=message):
        calibration_tokens(bad, tokenizer=tok)


def test_bad_sizes_and_a_missing_tokenizer(tok):
    with pytest.raises(LmsqueezeError, match="nsamples must be a positive integer, got 0"):
        calibration_tokens("pydoc", tokenizer=tok, nsamples=0)
    with pytest.raises(LmsqueezeError, match="seqlen must be >= 2, got 1"):
        calibration_tokens("pydoc", tokenizer=tok, seqlen=1)
    model, _ = load_model("tiny-llama")  # random tiny models do not say where they came from
    with pytest.raises(LmsqueezeError, match="calibration text needs a tokenizer.*pass tokenizer="):
        calibration_tokens(["some text"], model)


def test_compress_tokenizes_texts_for_the_user(tok):
    model, _ = load_model("tiny-llama")
    texts = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs, please."]
    rep = lmsqueeze.compress(model, lmsqueeze.WandaConfig(sparsity=0.5), texts, tokenizer=tok, seqlen=32)
    assert rep.calibration["source"] == "list of texts" and rep.calibration["nsamples"] == 2
    assert rep.calibration["tokens"] == sum(min(len(t), 32) for t in texts)  # padding is not counted
    same, _ = load_model("tiny-llama")
    out, _ = calibration_tokens(texts, tokenizer=tok, seqlen=32)
    ref = lmsqueeze.compress(same, lmsqueeze.WandaConfig(sparsity=0.5), out)
    for a, b in zip(model.parameters(), same.parameters()):
        assert torch.equal(a, b)  # identical to tokenizing by hand
    assert rep.mean("sparsity") == pytest.approx(0.5) and ref.mean("sparsity") == pytest.approx(0.5)
