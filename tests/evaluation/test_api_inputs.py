"""lmsqueeze.evaluate takes a model directory or a builtin name as well as loaded objects."""
import pytest

import lmsqueeze
from lmsqueeze.errors import LmsqueezeError

ARGS = {"tasks": "ppl:pydoc", "limit": 1, "seqlen": 16, "resamples": 20}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from lmsqueeze.models import load_model

    path = tmp_path_factory.mktemp("m") / "tiny"
    model, tok = load_model("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_directory_a_path_a_name_and_loaded_objects_give_one_result(saved):
    from transformers import AutoModelForCausalLM

    by_dir = lmsqueeze.evaluate(str(saved), **ARGS)
    by_path = lmsqueeze.evaluate(saved, **ARGS)  # a pathlib.Path
    loaded = AutoModelForCausalLM.from_pretrained(saved)
    no_tok = lmsqueeze.evaluate(loaded, **ARGS)  # the tokenizer comes from its name_or_path
    ppl = [r["results"][0]["summary"]["ppl"] for r in (by_dir, by_path, no_tok)]
    assert ppl[0] == ppl[1] == pytest.approx(ppl[2], rel=1e-6)
    assert by_dir["model"] == str(saved) and no_tok["model"] == str(saved)
    by_name = lmsqueeze.evaluate("tiny-llama", **ARGS)  # the same weights as a builtin name
    assert by_name["results"][0]["summary"]["ppl"] == pytest.approx(ppl[0], rel=1e-6)


def test_a_tasks_string_in_the_tokenizer_place_is_refused():
    with pytest.raises(LmsqueezeError, match="second argument is the tokenizer, got 'ppl:pydoc': give tasks="):
        lmsqueeze.evaluate("tiny-llama", "ppl:pydoc")
    from lmsqueeze.models import load_model

    model, _ = load_model("tiny-llama")  # built in memory: it names no checkpoint to take a tokenizer from
    with pytest.raises(LmsqueezeError, match="a loaded model needs its tokenizer"):
        lmsqueeze.evaluate(model, **ARGS)
