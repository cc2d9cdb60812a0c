"""AWQ, NF4, LLM.int8 and OWL: hand-computed cases, the properties each promises, and the study grid."""
import copy

import pytest
import torch

from lmsqueeze.compressor import compress, make_config, save_compressed
from lmsqueeze.compressor.config import RTNConfig, WandaConfig
from lmsqueeze.compressor.driver import weight_of
from lmsqueeze.compressor.methods import compress_weight, rtn
from lmsqueeze.compressor.methods.awq import AWQConfig, awq_group
from lmsqueeze.compressor.methods.llm_int8 import LLMInt8Config, llm_int8
from lmsqueeze.compressor.methods.nf4 import NF4Config, nf4, nf4_levels
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models import load_model
from tests.compressor.test_methods import layer_problem


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny layers: one thread (two threads on a shared 2-core box made a 2-layer compress 10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# QLoRA, appendix E: the NF4 data type's 16 values
NF4_PAPER = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_nf4_levels_are_the_papers():
    assert nf4_levels().tolist() == pytest.approx(NF4_PAPER, abs=1e-6)


def test_nf4_blocks_with_known_absmax():
    # block 1: absmax 2 -> w / 2 = (0.25, -1, 0.5, 0): nearest levels 0.2461123, -1, 0.4407098 (0.5 is 0.0593 from
    # it, 0.0626 from 0.5626170), 0; block 2: absmax 3 -> (1, 0.1, -0.3, 0.2): 1, 0.0795803, -0.2844414, 0.1609302
    W = torch.tensor([[0.5, -2.0, 1.0, 0.0, 3.0, 0.3, -0.9, 0.6]])
    got = nf4(W, NF4Config(block_size=4)).W
    want = [2 * 0.24611230194568634, -2.0, 2 * 0.44070982933044434, 0.0,
            3.0, 3 * 0.07958029955625534, 3 * -0.28444138169288635, 3 * 0.16093020141124725]
    assert got[0].tolist() == pytest.approx(want, abs=1e-6)


def test_nf4_invariants_partial_block_and_double_quant():
    W, _, _, _ = layer_problem(rows=5, cols=150)  # 150 = 2 blocks of 64 + one of 22 per row
    res = nf4(W, NF4Config())
    levels = nf4_levels()
    for j in range(0, 150, 64):
        block = W[:, j:j + 64]
        m = block.abs().amax(1, keepdim=True)
        q = res.W[:, j:j + 64]
        assert torch.equal(q.abs().amax(1, keepdim=True), m)  # each block's largest weight is exact
        ratio = q / m
        assert bool((ratio[..., None] - levels).abs().amin(-1).lt(1e-6).all())  # on the grid
    assert torch.equal(nf4(res.W, NF4Config()).W, res.W)  # quantizing twice changes nothing
    dq = nf4(W, NF4Config(double_quant=True, dq_block_size=4))
    assert 0 < dq.info["absmax_change"] < 1e-2 and not torch.equal(dq.W, res.W)
    with pytest.raises(LmsqueezeError, match="nf4 block_size 0 is invalid"):
        NF4Config(block_size=0)


def test_llm_int8_outlier_column_stays_exact():
    # input 1 peaks at 7 > 6: its weights stay as they are; the rest is int8 with scale = row absmax / 127
    W = torch.tensor([[0.5, 123.456, -1.27, 0.301], [2.54, -7.77, 0.0, 1.01]])
    res = llm_int8(W, torch.tensor([1.0, 7.0, 2.0, 0.5]), LLMInt8Config())
    assert res.W[:, 1].tolist() == W[:, 1].tolist()
    # row 0: scale 1.27 / 127 = 0.01 -> 0.5, -1.27, 0.301 -> 30 steps = 0.30; row 1: scale 0.02, 1.01 -> 50 steps
    assert res.W[0, [0, 2, 3]].tolist() == pytest.approx([0.5, -1.27, 0.30], abs=1e-6)
    assert res.W[1, [0, 2, 3]].tolist() == pytest.approx([2.54, 0.0, 1.0], abs=1e-6)
    assert res.info == {"outlier_columns": 1, "outlier_share": 0.25}
    # below the threshold everywhere: plain per-row int8; row 0's step is then 123.456 / 127 and 0.5 is one step
    plain = llm_int8(W, torch.ones(4), LLMInt8Config())
    assert plain.W[0, :2].tolist() == pytest.approx([123.456 / 127, 123.456], rel=1e-6)
    assert plain.info["outlier_columns"] == 0
    with pytest.raises(LmsqueezeError, match="threshold -1 is invalid"):
        LLMInt8Config(threshold=-1)


def _awq_stats(X):
    return {"hessian": 2 * X.T @ X / X.shape[0], "act_absmean": X.abs().mean(0)}


def test_awq_without_scales_or_clipping_is_rtn_bit_for_bit():
    W, X, _, _ = layer_problem(rows=24, cols=100)  # 100: a ragged last group of 36
    cfg = AWQConfig(bits=3, group_size=64, grid=1, clip=False)
    got = awq_group({"w": W}, _awq_stats(X), cfg, keep_grid=True)["w"]
    want = rtn(W, RTNConfig(bits=3, group_size=64), keep_grid=True)
    assert torch.equal(got.W, want.W) and torch.equal(got.grid.codes, want.grid.codes)
    assert got.info["alpha"] == 0.0


def test_awq_beats_rtn_and_its_folded_weights_are_on_the_grid():
    W, X, _, _ = layer_problem(rows=32, cols=128, tokens=1024)
    stats = _awq_stats(X)
    base = float(((X @ W.T) ** 2).sum())

    def err(Wn, x=X):
        return float(((x @ Wn.T - X @ W.T) ** 2).sum()) / base

    cfg = AWQConfig(bits=3, group_size=32)
    e_rtn = err(rtn(W, RTNConfig(bits=3, group_size=32)).W)
    explicit = compress_weight(W, stats, cfg)  # scale kept explicit: acts on x itself
    assert explicit.input_scale is None and err(explicit.W) < 0.8 * e_rtn
    folded = awq_group({"w": W}, stats, cfg, keep_grid=True, scalable=True)["w"]
    s = folded.input_scale
    assert s is not None and folded.info["alpha"] > 0
    assert torch.equal(folded.grid.dequantize(), folded.W)  # what a packed checkpoint stores, exactly
    assert err(folded.W, X / s) == pytest.approx(err(explicit.W), rel=1e-4)
    # a packed format and nowhere to fold: no scale (alpha 0), only clipping, still on the grid
    packed = awq_group({"w": W}, stats, cfg, keep_grid=True, scalable=False)["w"]
    assert packed.info["alpha"] == 0.0 and torch.equal(packed.grid.dequantize(), packed.W)
    assert err(packed.W) <= e_rtn


def test_awq_through_the_driver_folds_into_the_norms(tmp_path):
    torch.manual_seed(0)
    model, _ = load_model("tiny-llama")
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    grids = {}
    cfg = AWQConfig(bits=4, group_size=16, sym=True, grid=5, clip_grid=5)
    rep = compress(model, cfg, ids, batch_size=4, grids=grids)
    mods = dict(model.named_modules())
    info = {r.name.split(".", 3)[-1]: r.info for r in rep.modules if ".layers.0." in r.name}
    assert info["self_attn.q_proj"]["scale_folded_into"].endswith("input_layernorm")
    assert info["mlp.up_proj"]["scale_folded_into"].endswith("post_attention_layernorm")
    assert "scale_folded_into" not in info["mlp.down_proj"]
    assert info["mlp.down_proj"]["alpha"] == 0.0  # packed (grids kept) and unfoldable: no scale
    assert set(grids) == {r.name for r in rep.modules}
    for name, g in grids.items():
        assert torch.equal(g.dequantize(), weight_of(mods[name]).detach().float()), name
    assert any(r.info["alpha"] > 0 for r in rep.modules if "scale_folded_into" in r.info)  # something was folded
    # the same grid without AWQ (RTN on the dense weights) is further from the dense model's logits
    rtn_model = copy.deepcopy(dense)
    for rec in rep.modules:
        W = weight_of(dict(rtn_model.named_modules())[rec.name])
        W.data.copy_(rtn(W.detach(), RTNConfig(bits=4, group_size=16, sym=True)).W)
    with torch.no_grad():
        ref = dense(ids).logits
        e_awq, e_rtn = ((m(ids).logits - ref).abs().mean() for m in (model, rtn_model))
    assert e_awq < e_rtn  # (a wrong fold would be off by far more than the grid)
    # the packed checkpoint (codes of Q(W diag(s)), folded norms) loads in plain transformers to the same logits
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    save_compressed(model, None, tmp_path / "ckpt", rep, format="compressed-tensors", grids=grids)
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.allclose(packed(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_awq_on_gemma3_folds_into_the_sandwich_norms_exactly():
    """Gemma 3 (the second real model's family): four norms per layer, (1 + w) weights. q/k/v read
    input_layernorm and gate/up read pre_feedforward_layernorm (post_attention_layernorm normalises the
    attention output before the residual: a scale folded there would change the model). The folded model
    must compute what the same quantized weights with the scale kept explicit compute."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           max_position_embeddings=512, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # norm weights away from their zero init, so that 1 + w is not 1
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.5)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    rep = compress(model, AWQConfig(bits=4, group_size=16, grid=5, clip_grid=5), ids, batch_size=4)
    folded = {r.name: r.info["scale_folded_into"] for r in rep.modules if "scale_folded_into" in r.info}
    for i in range(2):
        want = {f"model.layers.{i}.self_attn.{m}": "input_layernorm" for m in ("q_proj", "k_proj", "v_proj")}
        want |= {f"model.layers.{i}.mlp.{m}": "pre_feedforward_layernorm" for m in ("gate_proj", "up_proj")}
        assert {k: v for k, v in folded.items() if f".layers.{i}." in k} == want
    # the same quantized weights acting on the unscaled input: W_q / s, s = (1 + w_dense) / (1 + w_folded)
    explicit = copy.deepcopy(dense)
    mods, ex = dict(model.named_modules()), dict(explicit.named_modules())
    for r in rep.modules:
        W = weight_of(mods[r.name]).detach()
        if r.name in folded:
            norm = r.name.rsplit(".", 2)[0] + "." + folded[r.name]
            s = (1 + weight_of(ex[norm]).detach()) / (1 + weight_of(mods[norm]).detach())
            assert not torch.allclose(s, torch.ones_like(s))  # a scale was folded
            W = W / s
        weight_of(ex[r.name]).data.copy_(W)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, explicit(ids).logits, atol=1e-4, rtol=1e-4)


def test_llm_int8_and_nf4_through_the_driver():
    torch.manual_seed(0)
    model, _ = load_model("tiny-gpt2")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    rep = compress(model, LLMInt8Config(threshold=0.5), ids, batch_size=2)  # low threshold: some outliers
    assert sum(r.info["outlier_columns"] for r in rep.modules) > 0
    rep = compress(model, NF4Config(), None, measure_error=False)
    assert rep.method == "nf4" and all(r.info is not None for r in rep.modules)


def test_owl_ratios_average_to_the_target_and_follow_the_outliers():
    torch.manual_seed(0)
    model, _ = load_model("tiny-llama")
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = WandaConfig(sparsity=0.6, layer_sparsity="owl", owl_lambda=0.1)
    rep = compress(model, cfg, ids, batch_size=2)
    owl = rep.to_dict()["layer_sparsity"]
    assert owl["mode"] == "owl" and owl["mean"] == pytest.approx(0.6, abs=1e-6)
    r, d = owl["ratios"], owl["outlier_ratios"]
    assert len(r) == 2 and abs(r[0] - r[1]) == pytest.approx(0.2, abs=1e-6)  # two layers: s +- lambda
    assert (r[0] < r[1]) == (d[0] > d[1])  # more outliers, less pruning
    for rec in rep.modules:
        layer = int(rec.name.split(".")[2])
        assert rec.sparsity == pytest.approx(r[layer], abs=1 / 64)  # per row: round(s * in) of each row
    assert cfg.to_dict()["layer_sparsity"] == "owl" and "owl_lambda" not in WandaConfig().to_dict()


@pytest.mark.parametrize("kwargs,message", [
    (dict(sparsity="2:4", layer_sparsity="owl"), "N:M 2:4 fixes every layer's ratio"),
    (dict(sparsity=0.7, layer_sparsity="owl", owl_lambda=0.2), "owl_lambda 0.2 is out of range for sparsity 0.7"),
    (dict(sparsity=0.5, layer_sparsity="random"), "layer sparsity 'random' is invalid; valid: uniform, owl"),
])
def test_owl_bad_settings(kwargs, message):
    with pytest.raises(LmsqueezeError, match=message):
        make_config("wanda", **kwargs)


def test_awq_config_checks():
    with pytest.raises(LmsqueezeError, match="bits 5 is not supported"):
        make_config("awq", bits=5)
    with pytest.raises(LmsqueezeError, match="max_shrink 0 is out of range"):
        AWQConfig(max_shrink=0)
    with pytest.raises(LmsqueezeError, match="method 'nf4' does not take --bits"):
        make_config("nf4", bits=4)
    cfg = AWQConfig(bits=3, group_size=64, clip=False)
    assert AWQConfig.from_dict(cfg.to_dict()) == cfg and cfg.describe() == "awq 3-bit g64 no-clip"
