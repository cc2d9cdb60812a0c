"""lm-eval tasks on lmsqueeze's backend: a task defined by a local YAML and data file gives the same per-document
accuracy as lm-eval's own `hf` model, plus flips against a base; and lambada:FILE (greedy last word)."""
import json
import random

import pytest
import torch

from lmsqueeze import models
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.api import evaluate
from lmsqueeze.evaluation.backend import Backend
from lmsqueeze.evaluation.tasks.lambada import read_passages, split_last_word

YAML = """task: tiny_sum
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A tiny random Llama with the byte tokenizer saved as a Hugging Face directory, 16 items, the YAML."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("lmeval")
    tok = models.byte_tokenizer()
    tok.chat_template = None
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    rng = random.Random(0)
    items = []
    for _ in range(16):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        choices = [str(a + b), str(a + b + rng.randint(1, 5)), f"{a * b} or so"]
        rng.shuffle(choices)
        items.append({"question": f"What is {a} plus {b}?", "choices": choices, "label": choices.index(str(a + b))})
    (d / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (d / "tiny_sum.yaml").write_text(YAML.format(data=d / "items.jsonl"))
    return d


def test_same_accuracy_as_lm_eval_hf_model_and_flips(task_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'lmsqueeze[lmeval]')")
    from lm_eval.evaluator import evaluate as lm_eval_evaluate
    from lm_eval.models.huggingface import HFLM

    from lmsqueeze.evaluation.lmeval import load_task_dict

    yaml_path = task_dir / "tiny_sum.yaml"
    hf = HFLM(pretrained=str(task_dir / "model"), device="cpu", batch_size=8, add_bos_token=True)
    ref = lm_eval_evaluate(hf, load_task_dict(yaml_path), log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    ref_docs = sorted(ref["samples"]["tiny_sum"], key=lambda s: s["doc_id"])

    base, tok = models.load_model(str(task_dir / "model"))
    model, _ = models.load_model(str(task_dir / "model"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    rep = evaluate(model, tok, tasks=f"lmeval:{yaml_path}", base=base, base_tokenizer=tok, resamples=20,
                   cache_dir=str(tmp_path / "cache"))
    res = rep["results"][0]
    base_docs = res["base_items"]
    # the base run is lmsqueeze's backend on the unperturbed model: lm-eval's hf model, document by document
    assert [d["acc"] for d in base_docs] == [float(s["acc"]) for s in ref_docs]
    assert [d["acc_norm"] for d in base_docs] == [float(s["acc_norm"]) for s in ref_docs]
    assert res["metrics"]["acc"]["base"] == pytest.approx(ref["results"]["tiny_sum"]["acc,none"])
    flips = sum(d["acc"] != b["acc"] for d, b in zip(res["items"], base_docs))
    assert res["metrics"]["flips"]["value"] == pytest.approx(flips / 16) and res["metrics"]["flips"]["n"] == 16
    assert res["metrics"]["acc"]["interval"].startswith("wilson; paired delta: newcombe")


def test_lmeval_yaml_errors(tmp_path):
    from lmsqueeze.evaluation.lmeval import yaml_task_names

    with pytest.raises(LmsqueezeError, match="does not exist"):
        yaml_task_names(tmp_path / "none.yaml")
    (tmp_path / "x.yaml").write_text("dataset_path: json\n")
    with pytest.raises(LmsqueezeError, match="needs a 'task:'"):
        yaml_task_names(tmp_path / "x.yaml")
    (tmp_path / "y.yaml").write_text("task: t\nprocess_docs: !function utils.process\n")
    assert yaml_task_names(tmp_path / "y.yaml") == ["t"]


def test_lambada_greedy_last_word(tmp_path):
    assert split_last_word("he opened the door ") == ("he opened the", " door")
    with pytest.raises(LmsqueezeError, match="needs a context and a final word"):
        split_last_word("word")
    path = tmp_path / "lambada_test.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                            ["the cat sat on the mat", "she said hello to her friend", "aaaa aaaa aaaa aaaa"]))
    assert read_passages(path)[1] == "she said hello to her friend"
    model, tok = models.load_model("tiny-llama")
    rep = evaluate(model, tok, tasks=f"lambada:{path}", base=model, base_tokenizer=tok, resamples=20,
                   cache_dir=str(tmp_path / "cache"))
    res = rep["results"][0]
    # correct exactly when greedy decoding writes the target word after the context
    b = Backend(model, tok)
    for it in res["items"]:
        ctx, target = b.encode_pair(it["context"], " " + it["target"])
        out = b.generate([ctx], max_new_tokens=len(target)).texts[0][0]
        assert it["correct"] == float(out == " " + it["target"])
    assert res["metrics"]["flips"]["value"] == 0.0  # the base is the same model
