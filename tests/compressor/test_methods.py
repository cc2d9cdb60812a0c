"""Per-layer method math: hand-computed cases, invariants, and who beats whom on the same layer."""
import logging

import pytest
import torch

from lmsqueeze.compressor.config import GPTQConfig, MagnitudeConfig, RTNConfig, SparseGPTConfig, WandaConfig
from lmsqueeze.compressor.methods import gptq, magnitude, prepare_hessian, rtn, sparsegpt, wanda
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.testing import assert_close


def layer_problem(rows=32, cols=64, tokens=512, seed=0):
    """A layer with outlier input features (what makes Wanda and SparseGPT beat magnitude)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    scale = torch.ones(cols)
    scale[torch.randperm(cols, generator=g)[: cols // 8]] = 8.0
    Z = torch.randn(tokens, cols, generator=g)
    X = (Z @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols ** 0.5)) * scale
    H = 2 * X.T @ X / tokens
    col_sq = (X * X).mean(0)
    return W, X, H, col_sq


def rel_err(W, Wn, X):
    return float(((X @ (W - Wn).T) ** 2).sum() / ((X @ W.T) ** 2).sum())


def test_wanda_one_row_by_hand():
    # scores |w| * ||x||: (1*1, 2*0.1, 3*1, 4*0.1, 0.5*4, 6*1, 7*0.01, 8*1) = (1, .2, 3, .4, 2, 6, .07, 8)
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0, 0.5, 6.0, -7.0, 8.0]])
    col_sq = torch.tensor([1.0, 0.01, 1.0, 0.01, 16.0, 1.0, 0.0001, 1.0])
    res = wanda(W, col_sq, WandaConfig(sparsity=0.5))
    assert res.W.tolist() == [[0.0, 0.0, 3.0, 0.0, 0.5, 6.0, 0.0, 8.0]]
    # 2:4: each group of 4 keeps its two largest scores: (1, .2, 3, .4) -> 1 and 3; (2, 6, .07, 8) -> 6 and 8
    res = wanda(W, col_sq, WandaConfig(sparsity="2:4"))
    assert res.W.tolist() == [[1.0, 0.0, 3.0, 0.0, 0.0, 6.0, 0.0, 8.0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_wanda_reads_the_layer_in_its_own_dtype(dtype):
    # the mask kernel takes bf16 / fp16 W as it is (an exact upcast inside), fp64 after .float():
    # the same result as on the fp32 copy, and always fp32 weights out
    W, _, _, col_sq = layer_problem(rows=8, cols=1040)
    W = W.to(dtype)
    for sparsity in (0.5, "2:4"):
        cfg = WandaConfig(sparsity=sparsity)
        res, ref = wanda(W, col_sq, cfg), wanda(W.float(), col_sq, cfg)
        assert res.W.dtype == torch.float32
        assert torch.equal(res.mask, ref.mask) and torch.equal(res.W, ref.W)


def test_magnitude_by_hand_layer_and_row_scope():
    W = torch.tensor([[1.0, -5.0, 2.0, 0.1], [9.0, 8.0, -7.0, 6.0]])
    # over the layer the 4 smallest |w| (0.1, 1, 2, 5) all sit in row 0; per row each row loses its 2 smallest
    assert magnitude(W, MagnitudeConfig(sparsity=0.5)).W.tolist() == [[0.0, 0.0, 0.0, 0.0], [9.0, 8.0, -7.0, 6.0]]
    assert magnitude(W, MagnitudeConfig(sparsity=0.5, scope="row")).W.tolist() == [[0.0, -5.0, 2.0, 0.0],
                                                                                 [9.0, 8.0, 0.0, 0.0]]


def test_sparsegpt_diagonal_hessian_is_wanda_without_update():
    W = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    H = torch.diag(torch.tensor([1.0, 4.0, 1.0, 16.0]))
    res = sparsegpt(W, H, SparseGPTConfig(sparsity=0.5, percdamp=0.0))
    assert res.W.tolist() == [[0.0, -2.0, 3.0, 0.0]]


@pytest.mark.parametrize("sparsity", [0.5, "2:4", "4:8"])
def test_exact_sparsity_nm_and_idempotence(sparsity):
    W, X, H, col_sq = layer_problem(rows=13, cols=64)
    for cfg, run in ((MagnitudeConfig(sparsity=sparsity), lambda W, c: magnitude(W, c)),
                     (WandaConfig(sparsity=sparsity), lambda W, c: wanda(W, col_sq, c)),
                     (SparseGPTConfig(sparsity=sparsity, blocksize=16), lambda W, c: sparsegpt(W, H, c))):
        res = run(W, cfg)
        pruned = ~res.mask
        if isinstance(sparsity, float):
            assert int(pruned.sum()) == round(sparsity * W.numel()), cfg
        else:
            n, m = map(int, sparsity.split(":"))
            assert bool(((res.W != 0).reshape(13, -1, m).sum(-1) == n).all()), cfg
        assert bool((res.W[pruned] == 0).all())
        again = run(res.W, cfg)
        assert torch.equal(again.mask, res.mask), f"{cfg.method}: pruning twice changed the mask"
        assert_close(again.W, res.W, atol=1e-5 * float(res.W.abs().max()), rtol=1e-5, name=f"{cfg.method} twice")


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude_on_reconstruction(sparsity):
    W, X, H, col_sq = layer_problem()
    e_mag = rel_err(W, magnitude(W, MagnitudeConfig(sparsity=sparsity)).W, X)
    e_wanda = rel_err(W, wanda(W, col_sq, WandaConfig(sparsity=sparsity)).W, X)
    e_sgpt = rel_err(W, sparsegpt(W, H, SparseGPTConfig(sparsity=sparsity)).W, X)
    assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_same_grid(act_order):
    W, X, H, _ = layer_problem()
    cfg = dict(bits=3, group_size=16)
    e_rtn = rel_err(W, rtn(W, RTNConfig(**cfg)).W, X)
    e_gptq = rel_err(W, gptq(W, H, GPTQConfig(**cfg, act_order=act_order)).W, X)
    assert e_gptq < e_rtn, (e_gptq, e_rtn)


def test_rtn_values_on_grid_and_levels_bounded():
    W, *_ = layer_problem(rows=7, cols=40)
    out = rtn(W, RTNConfig(bits=2, group_size=16)).W
    for j in range(0, 40, 16):
        assert all(len(torch.unique(row)) <= 4 for row in out[:, j:j + 16])


def test_joint_sparse_quant_keeps_nm_zeros():
    W, X, H, _ = layer_problem()
    res = sparsegpt(W, H, SparseGPTConfig(sparsity="2:4", bits=4, group_size=16))
    assert bool(((res.W != 0).reshape(32, -1, 4).sum(-1) <= 2).all())
    assert bool((res.W[~res.mask] == 0).all())
    assert bool((res.mask.reshape(32, -1, 4).sum(-1) == 2).all())


def test_dead_inputs_zeroed_and_handled():
    W, X, H, _ = layer_problem(rows=8, cols=32)
    H = H.clone()
    H[5, :] = 0
    H[:, 5] = 0
    res = gptq(W, H, GPTQConfig(bits=4, group_size=-1))
    assert res.dead == 1 and bool((res.W[:, 5] == 0).all()) and bool(torch.isfinite(res.W).all())
    res = sparsegpt(W, H, SparseGPTConfig(sparsity=0.5))
    assert res.dead == 1 and bool((res.W[:, 5] == 0).all())


def test_cholesky_failure_retries_with_more_damping_and_logs(caplog):
    # rank-deficient H (2 tokens, 16 inputs) with no damping: the first factorization fails
    x = torch.randn(2, 16)
    H = 2 * x.T @ x / 2
    W = torch.randn(4, 16)
    with caplog.at_level(logging.WARNING, logger="lmsqueeze"):
        _, Hinv, pd, _ = prepare_hessian(W, H, percdamp=0.0)
    assert pd > 0 and bool(torch.isfinite(Hinv).all())
    assert "retrying" in caplog.text


def test_nm_needs_width_multiple_of_m():
    W = torch.randn(4, 10)
    with pytest.raises(LmsqueezeError, match="multiple of 4; this layer has 10"):
        wanda(W, torch.ones(10), WandaConfig(sparsity="2:4"))
