import math

import pytest
import torch

from lmsqueeze import evaluate, models
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.backend import Backend
from lmsqueeze.evaluation.tasks.divergence import base_rows, describe, summarize, token_divergences
from lmsqueeze.kernels import token_divergence_ref


def _perturbed(name="tiny-llama", scale=0.05):
    model, tok = models.load_model(name)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return model, tok


def test_describe_hand_computed():
    d = describe(torch.arange(1.0, 101.0))  # 1..100
    assert d["mean"] == pytest.approx(50.5) and d["median"] == pytest.approx(50.5)
    assert d["p95"] == pytest.approx(95.05) and d["p99"] == pytest.approx(99.01)


def test_summarize_hand_computed():
    per = {"kl_base_model": torch.tensor([0.0, 2.0]), "kl_model_base": torch.tensor([1.0, 1.0]),
           "jsd": torch.tensor([0.1, 0.3]), "dp_ref": torch.tensor([-0.2, 0.4]), "top1": torch.tensor([True, False]),
           "jsd_slack": torch.tensor([0.0, 0.0])}
    s = summarize(per)
    assert s["kl_base_model"]["mean"] == 1.0 and s["jsd"]["mean"] == pytest.approx(0.2)
    assert s["top1_agreement"] == 0.5 and s["abs_dp_ref_mean"] == pytest.approx(0.3) and s["tokens"] == 2


def test_model_against_itself_is_zero(tmp_path):
    model, tok = models.load_model("tiny-llama")
    rep = evaluate(model, tok, "divergence:pydoc,piqa", base=model, base_tokenizer=tok, seqlen=48, limit=3,
                   topk=16, cache_dir=str(tmp_path))
    div, mc = rep["results"]
    for m in ("kl_base_model", "kl_model_base", "jsd"):
        assert abs(div["summary"][m]["mean"]) < 1e-6 and abs(div["summary"][m]["p99"]) < 1e-6
    assert div["summary"]["top1_agreement"] == 1.0 and abs(div["summary"]["dp_ref"]["mean"]) < 1e-6
    assert mc["summary"]["flips"] == 0 and mc["summary"]["choice_kl_mean"] < 1e-9
    assert div["metrics"]["jsd"]["value"] < 1e-6 and div["metrics"]["top1"]["value"] == 1.0
    assert div["metrics"]["jsd"]["n"] == 3


def test_against_exact_full_vocabulary_divergence(tmp_path):
    """The cached top-k path against token_divergence_ref on the full distributions of both models."""
    base, tok = models.load_model("tiny-llama")
    model, _ = _perturbed()
    reqs = [(list(range(10, 11)), list(range(11, 40))), ([65, 66], [67, 68, 69, 70])]
    k = 32
    _, rows = base_rows(Backend(base, tok), reqs, k, "base")
    per, _ = token_divergences(Backend(model, tok), reqs, {"rows": rows}, "model")
    offsets = [0, len(reqs[0][1]), len(reqs[0][1]) + len(reqs[1][1])]
    with torch.no_grad():
        for i, (ctx, cont) in enumerate(reqs):
            ids = torch.tensor([ctx + cont])
            lb, lm = base(input_ids=ids).logits[0], model(input_ids=ids).logits[0]
            rows = slice(len(ctx) - 1, len(ctx) - 1 + len(cont))
            full = token_divergence_ref(lb[rows], lm[rows])
            sl = slice(offsets[i], offsets[i + 1])
            got_jsd, got_kl = per["jsd"][sl], per["kl_base_model"][sl]
            # a lower bound, within the stated JSD bound (r_P + r_Q)/2 ln 2
            lpb = torch.log_softmax(lb[rows].double(), -1)
            lpm = torch.log_softmax(lm[rows].double(), -1)
            idx = lpb.topk(k, -1).indices
            r_p = 1 - lpb.exp().gather(1, idx).sum(1)
            r_q = 1 - lpm.exp().gather(1, idx).sum(1)
            err = full.jsd.double() - got_jsd.double()
            assert (err >= -1e-5).all() and (err <= (r_p + r_q) / 2 * math.log(2) + 1e-5).all()
            assert (got_kl <= full.kl_pq + 1e-5).all()
            assert torch.equal(per["top1"][sl], full.top1)
            tgt = torch.tensor(cont)
            dp = lpm.exp()[torch.arange(len(cont)), tgt] - lpb.exp()[torch.arange(len(cont)), tgt]
            assert torch.allclose(per["dp_ref"][sl].double(), dp, atol=1e-5)
    assert per["jsd"].mean() > 1e-4  # the perturbation shows


def test_cache_is_reused_and_keyed(tmp_path):
    base, tok = models.load_model("tiny-llama")
    kw = dict(seqlen=32, limit=2, topk=8, cache_dir=str(tmp_path))
    rep1 = evaluate(base, tok, "divergence:pydoc", base="tiny-llama", **kw)
    path = rep1["results"][0]["base_cache"]["path"]
    assert rep1["results"][0]["base_cache"]["hit"] is False and rep1["base_forwards"] > 0
    mtime = (tmp_path / path.split("/")[-1] / "meta.json").stat().st_mtime_ns
    rep2 = evaluate(base, tok, "divergence:pydoc", base="tiny-llama", **kw)
    assert rep2["results"][0]["base_cache"]["path"] == path and rep2["results"][0]["base_cache"]["hit"]
    assert rep2["base_forwards"] == 0
    assert (tmp_path / path.split("/")[-1] / "meta.json").stat().st_mtime_ns == mtime
    assert rep2["results"][0]["metrics"] == rep1["results"][0]["metrics"]
    rep3 = evaluate(base, tok, "divergence:pydoc", base="tiny-llama", **{**kw, "topk": 4})
    assert rep3["results"][0]["base_cache"]["path"] != path
    assert len(list(tmp_path.iterdir())) == 2  # no temporary directories left behind


def test_different_tokenizer_is_refused(tmp_path):
    model, tok = models.load_model("tiny-llama")
    base, btok = models.load_model("tiny-llama")
    btok.add_tokens(["<extra>"])
    with pytest.raises(LmsqueezeError, match="different tokenizers"):
        evaluate(model, tok, "divergence:pydoc", base=base, base_tokenizer=btok, seqlen=16, limit=1,
                 cache_dir=str(tmp_path))
    with torch.no_grad():
        base.resize_token_embeddings(models.TINY_VOCAB + 16)
    with pytest.raises(LmsqueezeError, match="vocabulary of 272 logits but base"):
        evaluate(model, tok, "divergence:pydoc", base=base, base_tokenizer=tok, seqlen=16, limit=1,
                 cache_dir=str(tmp_path))


def test_divergence_needs_a_base():
    model, tok = models.load_model("tiny-llama")
    with pytest.raises(LmsqueezeError, match="needs|compares with a base model"):
        evaluate(model, tok, "divergence:pydoc")


def test_a_gguf_base_is_identified_by_its_file(tmp_path):
    """dir::file.gguf names a file: rewriting it must change the base identity (and so the cache key)."""
    import os

    from lmsqueeze.evaluation.api import identity_of_name

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 8)
    a = identity_of_name(f"{tmp_path}::m.gguf", "fp32")
    f.write_bytes(b"GGUF" + b"\1" * 16)
    os.utime(f, ns=(1, 2))
    assert identity_of_name(f"{tmp_path}::m.gguf", "fp32") != a
