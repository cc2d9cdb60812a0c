"""The sequential driver on the 7 tiny architectures, padding, save/load, and the errors a user can cause."""
import json
import os

import pytest
import torch

from lmsqueeze import LmsqueezeError, compress, load_compressed, save_compressed
from lmsqueeze.compressor import GPTQConfig, MagnitudeConfig, RTNConfig, SparseGPTConfig, WandaConfig
from lmsqueeze.compressor.driver import find_decoder_layers, weight_of
from lmsqueeze.models import TINY, load_model

CONFIGS = {
    "magnitude": MagnitudeConfig(sparsity=0.5),
    "wanda": WandaConfig(sparsity="2:4"),
    "sparsegpt": SparseGPTConfig(sparsity="4:8", blocksize=32),
    "gptq": GPTQConfig(bits=4, group_size=16, act_order=True, blocksize=32),
    "rtn": RTNConfig(bits=3, group_size=32),
}


def calib(n=4, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t), generator=g)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("arch", TINY)
def test_every_method_on_every_architecture(arch, method):
    model, _ = load_model(arch)
    before = snapshot(model)
    cfg = CONFIGS[method]
    report = compress(model, cfg, calib(), batch_size=3)
    layers = find_decoder_layers(model)
    assert report.num_layers == len(layers) == 2
    names = {r.name for r in report.modules}
    mods = dict(model.named_modules())
    # every linear layer inside the decoder layers, nothing outside (embeddings, lm_head untouched)
    lin = {n for n, m in mods.items() if ".layers." in n or ".h." in n if isinstance(m, torch.nn.Linear)
           or type(m).__name__ == "Conv1D"}
    assert names == lin and len(names) >= 8
    after = model.state_dict()
    for k, v in before.items():
        if not any(k.startswith(n + ".") for n in names):
            assert torch.equal(after[k], v), f"{k} changed but was not selected"
    for rec in report.modules:
        W = weight_of(mods[rec.name])
        assert rec.recon_error is not None and 0 <= rec.recon_error < 1, rec
        if method == "magnitude":
            assert int((W == 0).sum()) == round(0.5 * W.numel()) == round(rec.sparsity * W.numel())
        elif method in ("wanda", "sparsegpt"):
            n, m = (2, 4) if method == "wanda" else (4, 8)
            assert bool(((W != 0).reshape(W.shape[0], -1, m).sum(-1) <= n).all())
            assert rec.sparsity == 0.5
        elif method == "rtn":
            for j in range(0, W.shape[1], 32):
                assert all(len(torch.unique(row)) <= 8 for row in W[:, j:j + 32])
        else:
            assert rec.sparsity is None and bool(torch.isfinite(W).all())
            assert not torch.equal(mods[rec.name].weight, before[rec.name + ".weight"])
    if method in ("wanda", "sparsegpt", "gptq") and arch not in ("tiny-phi3", "tiny-gpt2"):
        # q/k/v read one tensor: one statistic
        shared = {r.name.rsplit(".", 1)[-1]: r.shares_input_with for r in report.modules if ".0." in r.name}
        assert shared["k_proj"] is not None and shared["k_proj"].endswith("q_proj")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_padding_never_enters_the_statistics(method):
    cfg = WandaConfig(sparsity=0.5) if method == "wanda" else SparseGPTConfig(sparsity=0.5, blocksize=32)
    ids = calib(4, 32)
    # the same samples, right-padded with 16 random tokens each; padding is masked out
    pad = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(9))
    padded = {"input_ids": torch.cat([ids, pad], 1),
              "attention_mask": torch.cat([torch.ones(4, 32), torch.zeros(4, 16)], 1).long()}
    a, _ = load_model("tiny-llama")
    b, _ = load_model("tiny-llama")
    ra = compress(a, cfg, ids)
    rb = compress(b, cfg, padded)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va == 0, vb == 0), f"{ka}: padding changed the mask"
        # masks must agree exactly; the weights only to fp32 rounding, because the padded batch runs
        # attention and matmuls over 48 positions instead of 32 (another summation order)
        torch.testing.assert_close(va, vb, atol=1e-4, rtol=1e-4)
    assert rb.calibration["tokens"] == ra.calibration["tokens"] == 4 * 32


def test_save_load_round_trip_exact_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = load_model("tiny-qwen2")
    report = compress(model, SparseGPTConfig(sparsity="2:4", bits=4, group_size=16), calib(),
                      calibration_info={"source": "random", "seed": 0})
    target = tmp_path / "out"
    save_compressed(model, tok, target, report, model_name="tiny-qwen2")
    save_compressed(model, tok, target, report, model_name="tiny-qwen2")  # replacing works, atomically
    assert sorted(os.listdir(tmp_path)) == ["out"], "temporary directories were left behind"
    m2, tok2, meta = load_compressed(target)
    plain = AutoModelForCausalLM.from_pretrained(target).eval()
    ids = calib(2, 24, seed=3)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert torch.equal(m2(input_ids=ids).logits, ref)
        assert torch.equal(plain(input_ids=ids).logits, ref)
    assert tok2 is not None and tok2("hi")["input_ids"] == tok("hi")["input_ids"]
    on_disk = json.loads((target / "lmsqueeze.json").read_text())
    assert on_disk == meta
    assert meta["method"] == "sparsegpt" and meta["config"]["sparsity"] == "2:4" and meta["config"]["bits"] == 4
    assert meta["calibration"] == {"source": "random", "seed": 0, "nsamples": 4, "seqlen": 32, "tokens": 128}
    assert {"forward", "statistics", "solve", "propagate", "save"} <= set(meta["timings"])
    assert len(meta["modules"]) == 14 and all(m["sparsity"] == 0.5 for m in meta["modules"])
    assert meta["versions"]["torch"] == torch.__version__
    for name, mod in m2.named_modules():
        if name.endswith("proj") and ".layers." in name:
            assert bool(((mod.weight != 0).reshape(mod.weight.shape[0], -1, 4).sum(-1) <= 2).all())


def test_include_exclude_and_data_free_without_calibration():
    model, _ = load_model("tiny-llama")
    before = snapshot(model)
    report = compress(model, MagnitudeConfig(sparsity=0.5, exclude=("*.mlp.*",)), None, measure_error=False)
    assert {r.name.split(".")[-2] for r in report.modules} == {"self_attn"}
    for k, v in model.state_dict().items():
        if ".mlp." in k:
            assert torch.equal(v, before[k])


def test_not_a_causal_lm_is_one_clear_error():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64))
    with pytest.raises(LmsqueezeError, match="BertForMaskedLM is not a decoder-only causal language model"):
        compress(bert, WandaConfig(), calib())


def test_nm_on_a_width_that_does_not_divide():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=130, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    with pytest.raises(LmsqueezeError, match=r"2:4 needs a width that is a multiple of 4; "
                                             r"model.layers.0.mlp.down_proj has 130 input columns"):
        compress(model, WandaConfig(sparsity="2:4"), calib())


def test_bad_calibration_and_device():
    model, _ = load_model("tiny-llama")
    with pytest.raises(LmsqueezeError, match=r"\[nsamples, seqlen\] integer token tensor"):
        compress(model, WandaConfig(), torch.randn(4, 32))
    with pytest.raises(LmsqueezeError, match="needs calibration data"):
        compress(model, WandaConfig(), None)
    with pytest.raises(LmsqueezeError, match="masks every calibration token"):
        compress(model, WandaConfig(), {"input_ids": calib(), "attention_mask": torch.zeros(4, 32)})
    if not torch.cuda.is_available():
        with pytest.raises(LmsqueezeError, match="torch sees no CUDA device"):
            compress(model, WandaConfig(), calib(), device="cuda")


def test_bf16_model_statistics_in_fp32_and_result_in_bf16():
    model, _ = load_model("tiny-mistral", dtype="bf16")
    report = compress(model, SparseGPTConfig(sparsity=0.5, blocksize=32), calib())
    assert report.dtype == "bfloat16"
    w = model.model.layers[0].mlp.down_proj.weight
    assert w.dtype == torch.bfloat16 and int((w == 0).sum()) == w.numel() // 2


@pytest.mark.slow
def test_smollm2_wanda_24_exact_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    from lmsqueeze.data import calibration_batches

    model, tok = load_model("smollm2-135m", dtype="bf16")
    ids = calibration_batches(tok, "pydoc", 2, 64, seed=0)  # few tokens: bf16 GEMMs are slow on AVX2-only CPUs
    report = compress(model, WandaConfig(sparsity="2:4"), ids, measure_error=False)
    assert len(report.modules) == 30 * 7 and all(r.sparsity == 0.5 for r in report.modules)
    save_compressed(model, tok, tmp_path / "smol", report)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "smol", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids[:1, :32]).logits, model(input_ids=ids[:1, :32]).logits)
    for name, mod in plain.named_modules():
        if name.endswith("proj"):
            assert bool(((mod.weight != 0).reshape(mod.weight.shape[0], -1, 4).sum(-1) <= 2).all()), name


# ---- non-finite values (issue 16, item 2): every method stops and names the layer and module -----------------

def _overflowing_fp16_llama():
    """tiny-llama in fp16 with one row of layer 0's down_proj at 6e4: its output overflows to inf, so the
    inputs of layer 1 hold inf."""
    model, _ = load_model("tiny-llama", dtype="fp16")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3].fill_(6e4)
    return model


@pytest.mark.parametrize("method", list(CONFIGS))
def test_non_finite_activations_stop_every_method(method):
    """Wanda and magnitude used to finish with recon_error == 0.0 for every layer-1 module (nan > 0 is False)."""
    model = _overflowing_fp16_llama()
    with pytest.raises(LmsqueezeError) as e:
        compress(model, CONFIGS[method], calib(2, 16))
    msg = str(e.value)
    assert "model.layers.0" in msg and ("nan" in msg or "inf" in msg) and "bf16" in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "gptq"])
def test_non_finite_activations_without_error_measurement(method):
    """measure_error=False: no error hook sees the overflow; the statistic of layer 1's inputs (or layer 0's
    propagated outputs) must. (Data-free methods run no forward then: there is nothing to see.)"""
    model = _overflowing_fp16_llama()
    with pytest.raises(LmsqueezeError, match=r"model\.layers\.[01]\b.*(nan|inf)") as e:
        compress(model, CONFIGS[method], calib(2, 16), measure_error=False)
    assert "bf16" in str(e.value)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_names_the_module(method, value):
    model, _ = load_model("tiny-qwen2")
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 5] = value
    with pytest.raises(LmsqueezeError, match=r"the weights of model\.layers\.1\.self_attn\.k_proj hold 1 non-finite "
                                             r"value \((nan|inf)\)"):
        compress(model, CONFIGS[method], calib(2, 16), measure_error=False)



def _errors_by_hand(model, before, after, ids, mask):
    """sum ||(W - W') x||^2 / sum ||W x||^2 per module, W = before[name], W' = after[name], x = the module's input
    when `model` runs the calibration tokens, valid tokens only. With `model` the compressed model, x is what the
    driver's propagation feeds the module (every layer before it and the layer's own modules compressed).
    Independent of the driver: one plain forward with hooks, in fp64."""
    mods = dict(model.named_modules())
    num, den, handles = {}, {}, []
    for name in before:
        def hook(mod, inputs, output, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            if mask is not None:
                x = x[mask.reshape(-1)]
            W0, W1 = before[name].double(), after[name].double()
            num[name] = num.get(name, 0.0) + float(((x @ (W0 - W1).T) ** 2).sum())
            den[name] = den.get(name, 0.0) + float(((x @ W0.T) ** 2).sum())
        handles.append(mods[name].register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=None if mask is None else mask.long(), use_cache=False)
    for h in handles:
        h.remove()
    return {n: num[n] / den[n] for n in before}


@pytest.mark.parametrize("padded", [False, True])
def test_error_is_measured_against_the_dense_weights_on_the_propagated_inputs(padded):
    """The error the propagation measures equals the hand-computed one; the wrong references (inputs of the dense
    model, i.e. of the statistics pass, instead of the propagated ones; padding counted) are far off, so this
    test tells them apart."""
    model, _ = load_model("tiny-llama")
    ids = calib(4, 32)
    mask = None
    if padded:
        mask = torch.ones(4, 32, dtype=torch.bool)
        mask[1, 20:] = False
        mask[3, 9:] = False
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    before = {n: weight_of(dict(model.named_modules())[n]).detach().clone() for n in names}
    report = compress(model, SparseGPTConfig(sparsity=0.5, blocksize=32), ids if mask is None else
                      {"input_ids": ids, "attention_mask": mask.long()}, batch_size=3, error_samples=None)
    after = {n: weight_of(dict(model.named_modules())[n]).detach().clone() for n in names}
    got = {r.name: r.recon_error for r in report.modules}
    want = _errors_by_hand(model, before, after, ids, mask)
    for n in names:
        assert got[n] == pytest.approx(want[n], rel=1e-4), n
    dense, _ = load_model("tiny-llama")
    wrong = _errors_by_hand(dense, before, after, ids, mask)
    assert max(abs(wrong[n] - got[n]) / got[n] for n in names) > 1e-2, "the test cannot tell the references apart"
    if padded:
        counted = _errors_by_hand(model, before, after, ids, None)
        assert max(abs(counted[n] - got[n]) / got[n] for n in names) > 1e-2
