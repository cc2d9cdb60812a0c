import torch

from lmsqueeze import models
from lmsqueeze.evaluation.instruct import generate_greedy, prompt_ids, reference_requests, score_generations

RECORDS = [{"instruction": "Say hi.", "input": "", "output": "hi"},
           {"instruction": "Repeat the word.", "input": "banana", "output": "banana"},
           {"instruction": "Count to three, please, slowly and clearly.", "input": "", "output": "1 2 3"}]


def test_prompt_uses_the_chat_template():
    _, tok = models.load_model("tiny-llama")  # the byte tokenizer has a chat template
    text = tok.decode(prompt_ids(tok, RECORDS[1]))
    assert text == "<bos>user: Repeat the word.\n\nbanana<eos>\n<bos>assistant: "
    tok.chat_template = None
    assert "### Input:\nbanana\n\n### Response:\n" in tok.decode(prompt_ids(tok, RECORDS[1]))


def test_batched_left_padded_greedy_equals_one_by_one():
    model, tok = models.load_model("tiny-llama")
    prompts = [c for c, _ in reference_requests(tok, RECORDS)]
    batched = generate_greedy(model, tok, prompts, max_new_tokens=6, batch_tokens=10_000)
    single = generate_greedy(model, tok, prompts, max_new_tokens=6, batch_tokens=1)
    assert batched == single
    # and the same as a plain greedy loop on the unpadded prompt
    seq = list(prompts[0])
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            seq.append(nxt)
    assert batched[0] == tok.decode(seq[len(prompts[0]):], skip_special_tokens=True).strip()


def test_score_generations():
    out = score_generations(RECORDS, ["hi", "Banana!", "1 2 4"])
    assert out["summary"]["em"] == 2 / 3
    assert out["items"][2]["rougeL"] == 2 / 3 and out["items"][2]["f1"] == 2 / 3
