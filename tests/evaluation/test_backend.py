"""The one model backend: tokenization rules, generation limits and stops, the model's own forward."""
import json

import pytest
import torch

from lmsqueeze import evaluate, models
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.backend import Backend, split_whitespace, start_token, stop_ids
from lmsqueeze.testing import assert_close

FP32_TOL = (1e-5, 1e-5)  # one fp32 model, other padding or batch composition


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("tiny-llama")


def direct_loglik(model, ids: list[int], start: int) -> float:
    """Summed log p(ids[t] | ids[:t]) for t >= start, one unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[t - 1, ids[t]] for t in range(start, len(ids))))


def test_trailing_whitespace_moves_to_the_continuation(tiny):
    model, tok = tiny
    b = Backend(model, tok)
    assert split_whitespace("Answer: ", "yes") == ("Answer:", " yes")
    assert split_whitespace("Q\n\n", "A") == ("Q", "\n\nA")
    assert b.encode_pair("Answer: ", "yes") == b.encode_pair("Answer:", " yes")
    got = b.loglik([("Answer: ", "yes"), ("Answer:", " yes"), ("", "Hello there"), ("The cat", " sat.")])
    assert got[0].logprob == pytest.approx(got[1].logprob, abs=1e-6) and got[0].ntokens == got[1].ntokens == 4
    # against one plain forward of start + context + continuation
    start = b.start
    for (ctx, cont), r in zip([("Answer:", " yes"), ("", "Hello there"), ("The cat", " sat.")], got[1:]):
        c = tok(ctx, add_special_tokens=False)["input_ids"] if ctx else []
        x = tok(cont, add_special_tokens=False)["input_ids"]
        assert r.ntokens == len(x)
        assert_close(torch.tensor([r.logprob]), torch.tensor([direct_loglik(model, [start] + c + x, 1 + len(c))]),
                     *FP32_TOL, name="loglik")


def test_start_token_is_never_a_chat_turn_marker():
    tok = models.byte_tokenizer()
    # its chat template writes <bos> and <eos> for every turn: both are turn markers here, so the document
    # separator falls back to the end-of-sequence token, never the turn-opening <bos>
    assert "<bos>" in tok.chat_template
    assert start_token(tok) == tok.eos_token_id != tok.bos_token_id
    tok.chat_template = None
    assert start_token(tok) == tok.bos_token_id  # no chat template: BOS is a plain document start


@pytest.mark.slow
def test_smollm2_starts_with_its_document_separator():
    tok = models.load_tokenizer(models.SMOLLM2) if hasattr(models, "load_tokenizer") else \
        models.load_model(models.SMOLLM2)[1]
    assert tok.bos_token == "<|im_start|>"  # the chat-turn marker SmolLM2 declares as BOS
    assert tok.convert_ids_to_tokens(start_token(tok)) == "<|endoftext|>"


def test_eos_only_in_the_generation_config_stops_generation(tiny):
    model, tok = tiny
    b = Backend(model, tok)
    prompt = b.text_prompt("Once upon a time")
    free = b.generate([prompt], max_new_tokens=8)
    assert free.new_tokens == [[8]]
    ids = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    stop = ids[3]
    assert stop not in (tok.eos_token_id, model.config.eos_token_id)
    old = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [stop]
        assert stop in stop_ids(model, tok)
        got = b.generate([prompt], max_new_tokens=8)
    finally:
        model.generation_config.eos_token_id = old
    assert got.new_tokens == [[ids.index(stop)]]
    assert got.texts[0][0] == tok.decode(ids[:ids.index(stop)], skip_special_tokens=True)


def test_new_tokens_must_leave_room_for_the_prompt():
    model, tok = models.load_model("tiny-gpt2")
    b = Backend(model, tok)
    limit = model.config.n_positions
    with pytest.raises(LmsqueezeError, match=f"max_new_tokens {limit} does not fit the model's {limit} positions"):
        b.generate([[1, 2]], max_new_tokens=limit)


def test_sampled_generation_is_seeded_and_k_per_prompt(tiny):
    model, tok = tiny
    b = Backend(model, tok)
    prompts = [b.text_prompt("a b c"), b.text_prompt("x")]
    one = b.generate(prompts, 5, sample=True, k=3, seed=11, temperature=1.5)
    two = b.generate(prompts, 5, sample=True, k=3, seed=11, temperature=1.5)
    assert one.texts == two.texts and [len(t) for t in one.texts] == [3, 3]
    assert len({t for texts in one.texts for t in texts}) > 1
    with pytest.raises(LmsqueezeError, match="1 for greedy decoding"):
        b.generate(prompts, 5, k=2)


def _long_data(tmp_path, words=600):
    long = " ".join(["word"] * words)
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "alpaca_5000.json").write_text(json.dumps(
        [{"instruction": "Summarise: " + long, "input": "", "output": "short"},
         {"instruction": "Say hi.", "input": "", "output": "hi"}]))
    (tmp_path / "bold").mkdir()
    (tmp_path / "bold" / "gender_prompt.json").write_text(json.dumps(
        {"American_actors": {"A": [long + " He is"]}, "American_actresses": {"B": ["She is a"]}}))
    return tmp_path


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-opt"])
def test_prompts_longer_than_the_positions_are_cut_and_counted(tmp_path, name):
    data = _long_data(tmp_path)
    model, tok = models.load_model(name)
    assert model.config.max_position_embeddings == 512 if name == "tiny-opt" else model.config.n_positions == 512
    rep = evaluate(model, tok, "alpaca,bold", data_dir=str(data), max_new_tokens=4, safety_new_tokens=4,
                   resamples=10)
    alpaca, bold = rep["results"]
    assert alpaca["summary"]["truncated_prompts"] == 1 and alpaca["summary"]["items"] == 2
    assert bold["summary"]["truncated_prompts"] == 1 and bold["summary"]["n_items"] == 2
    # the long prompt's own perplexity is taken over the first tokens that fit the 512 positions
    assert sorted(x["prompt_tokens"] for x in bold["items"])[-1] == 512


def test_a_checkpoint_whose_weights_appear_in_the_top_level_hook_evaluates(tiny):
    """The layout of llm-compressor (compressed-tensors) checkpoints: a linear layer has no `weight` until the
    top-level module's forward pre-hook decompresses it, and loses it again afterwards."""
    model, tok = models.load_model("tiny-llama")
    ref = evaluate(model, tok, "ppl:pydoc", seqlen=32, limit=2)["results"][0]["summary"]["ppl"]
    lin = model.model.layers[0].mlp.down_proj
    packed = lin._parameters.pop("weight")

    def decompress(module, args, kwargs):
        lin.weight = packed
        return None

    def compress_again(module, args, kwargs, output):
        lin._parameters.pop("weight")
        return output

    h1 = model.register_forward_pre_hook(decompress, with_kwargs=True)
    h2 = model.register_forward_hook(compress_again, with_kwargs=True)
    try:
        with pytest.raises(AttributeError, match="has no attribute 'weight'"):
            model.model(input_ids=torch.tensor([[1, 2, 3]]))  # what calling the decoder alone did
        got = evaluate(model, tok, "ppl:pydoc,alpaca", seqlen=32, limit=2, max_new_tokens=2)
    finally:
        h1.remove()
        h2.remove()
    assert got["results"][0]["summary"]["ppl"] == pytest.approx(ref, rel=1e-6)
