import torch

from lmsqueeze import models
from lmsqueeze.evaluation.backend import Backend
from lmsqueeze.evaluation.scoring import score_all
from lmsqueeze.evaluation.tasks.alpaca import prompt_ids, reference_requests

RECORDS = [{"instruction": "Say hi.", "input": "", "output": "hi"},
           {"instruction": "Repeat the word.", "input": "banana", "output": "banana"},
           {"instruction": "Count to three, please, slowly and clearly.", "input": "", "output": "1 2 3"}]


def test_prompt_uses_the_chat_template():
    model, tok = models.load_model("tiny-llama")  # the byte tokenizer has a chat template
    text = tok.decode(prompt_ids(Backend(model, tok), RECORDS[1]))
    assert text == "<bos>user: Repeat the word.\n\nbanana<eos>\n<bos>assistant: "
    plain = tok.decode(prompt_ids(Backend(model, tok, chat_template=False), RECORDS[1]))
    assert plain.startswith("<eos>Below is an instruction") and plain.endswith("### Input:\nbanana\n\n### Response:\n")


def test_batched_left_padded_greedy_equals_one_by_one():
    model, tok = models.load_model("tiny-llama")
    prompts = [c for c, _ in reference_requests(Backend(model, tok), RECORDS)]
    batched = Backend(model, tok, batch_tokens=10_000).generate(prompts, max_new_tokens=6).texts
    single = Backend(model, tok, batch_tokens=1).generate(prompts, max_new_tokens=6).texts
    assert batched == single
    # and the same as a plain greedy loop on the unpadded prompt
    seq = list(prompts[0])
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            seq.append(nxt)
    assert batched[0] == [tok.decode(seq[len(prompts[0]):], skip_special_tokens=True)]


def test_score_generations():
    out = [score_all(g, r["output"]) for r, g in zip(RECORDS, ["hi", "Banana!", "1 2 4"])]
    assert [o["em"] for o in out] == [1.0, 1.0, 0.0]
    assert out[2]["rougeL"] == 2 / 3 and out[2]["f1"] == 2 / 3
