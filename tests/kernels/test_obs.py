"""The blocked OBS sweep: hand-computed cases, the OBS error identity, blocking invariance, the grid."""
import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels import (
    PruneSpec,
    QuantSpec,
    find_params,
    obs_update,
    obs_update_ref,
    quantize,
    quantize_rtn,
)
from lmsqueeze.testing import assert_close

# fp32 sweep: one tolerance, relative to the largest magnitude involved
TOL = 1e-4


def hinv_of(H: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(damped H, upper Cholesky factor of its inverse), the way the methods build it."""
    Hd = H + damp * torch.diag(H).mean() * torch.eye(H.shape[0])
    return Hd, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)


def random_problem(rows, cols, tokens=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    # correlated inputs, as in a real layer: X = Z A with a random mixing matrix
    Z = torch.randn(tokens or 4 * cols, cols, generator=g)
    X = Z @ (torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / cols ** 0.5)
    H = 2 * X.T @ X / X.shape[0]
    return W, H, X


def test_diagonal_hessian_prunes_by_w2_h_without_updates():
    # H = diag(1, 4, 1, 16): Hinv's Cholesky factor is diag(1/sqrt(h)), no cross terms, so no update;
    # the saliency w^2 / [Hinv]_jj^2 = w^2 h is (1, 16, 9, 4): the 1 and the 0.5 go.
    W = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    Hinv = torch.diag(torch.tensor([1.0, 4.0, 1.0, 16.0]) ** -0.5)
    Wn, mask, losses = obs_update(W, Hinv, prune=PruneSpec(sparsity=0.5))
    assert Wn.tolist() == [[0.0, -2.0, 3.0, 0.0]]
    assert mask.tolist() == [[False, True, True, False]]
    assert_close(losses, torch.tensor([(1 * 1 + 0.25 * 16) / 2]), atol=1e-6, rtol=1e-6, name="losses")


def test_diagonal_hessian_quantization_is_round_to_nearest():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(13, 64, generator=g)
    Hinv = torch.diag(torch.rand(64, generator=g) + 0.5)
    spec = QuantSpec(bits=3, group_size=16)
    Wn, mask, _ = obs_update(W, Hinv, blocksize=32, quant=spec)
    assert mask is None
    assert_close(Wn, quantize_rtn(W, spec), atol=0, rtol=0, name="gptq with diagonal H == rtn")


@pytest.mark.parametrize("mode", ["unstructured", "2:4", "quant", "joint"])
@pytest.mark.parametrize("rows,cols", [(1, 16), (13, 64), (31, 40)])
def test_losses_equal_the_layer_error(mode, rows, cols):
    """OBS identity: sum of the per-step losses = (1/2) dW Hd dW^T row by row, for any mask or grid."""
    W, H, _ = random_problem(rows, cols)
    Hd, Hinv = hinv_of(H)
    prune = {"unstructured": PruneSpec(sparsity=0.5), "2:4": PruneSpec(n=2, m=4), "quant": None,
             "joint": PruneSpec(n=2, m=4)}[mode]
    quant = QuantSpec(bits=3, group_size=8) if mode in ("quant", "joint") else None
    Wn, mask, losses = obs_update(W, Hinv, blocksize=8, prune=prune, quant=quant)
    dW = W - Wn
    expected = 0.5 * ((dW @ Hd) * dW).sum(dim=1)
    assert_close(losses, expected, atol=TOL * float(expected.abs().max()), rtol=TOL, name="OBS losses")


@pytest.mark.parametrize("rows,cols", [(1, 32), (13, 64), (37, 96)])
def test_exact_sparsity_and_nm_pattern(rows, cols):
    W, H, _ = random_problem(rows, cols)
    _, Hinv = hinv_of(H)
    for s in (0.3, 0.5, 0.7):
        Wn, mask, _ = obs_update(W, Hinv, blocksize=16, prune=PruneSpec(sparsity=s))
        assert int((~mask).sum()) == round(s * rows * cols)
        assert bool((Wn[~mask] == 0).all())
    for n, m in ((2, 4), (4, 8), (1, 4)):
        Wn, mask, _ = obs_update(W, Hinv, blocksize=16, prune=PruneSpec(n=n, m=m))
        assert bool((mask.reshape(rows, -1, m).sum(-1) == n).all())
        assert bool(((Wn != 0).reshape(rows, -1, m).sum(-1) <= n).all())


def test_blocking_does_not_change_nm_or_quant_result():
    """N:M and GPTQ decisions are per column: the block size only changes when updates are applied."""
    W, H, _ = random_problem(13, 64, seed=3)
    _, Hinv = hinv_of(H)
    for kw in ({"prune": PruneSpec(n=2, m=4)}, {"quant": QuantSpec(bits=4, group_size=-1)}):
        a = obs_update(W, Hinv, blocksize=4, **kw)[0]
        b = obs_update(W, Hinv, blocksize=64, **kw)[0]
        assert_close(a, b, atol=TOL * float(W.abs().max()), rtol=TOL, name=f"blocksize 4 vs 64 {kw}")


def test_joint_keeps_zeros_exact_and_values_on_grid():
    W, H, _ = random_problem(13, 64, seed=4)
    _, Hinv = hinv_of(H)
    spec = QuantSpec(bits=4, group_size=-1)
    Wn, mask, _ = obs_update(W, Hinv, prune=PruneSpec(n=2, m=4), quant=spec)
    assert bool((Wn[~mask] == 0).all())
    assert bool((mask.reshape(13, -1, 4).sum(-1) == 2).all())
    # per-channel grid (group -1) is computed once from the dense W: every output lies on it
    scale, zero = find_params(W, spec)
    levels = Wn / scale + zero
    assert_close(levels, levels.round(), atol=1e-3, rtol=0, name="on the grid")
    assert int(((levels.round() < 0) | (levels.round() > spec.maxq)).sum()) == 0


def test_grid_zero_is_exact_and_sym_is_centred():
    w = torch.tensor([[-1.0, 0.0, 0.3, 2.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.1, 0.2, 0.3]])
    for sym in (False, True):
        spec = QuantSpec(bits=3, sym=sym)
        scale, zero = find_params(w, spec)
        q = quantize(w, scale, zero, spec.maxq)
        assert bool((q[w == 0] == 0).all())
        assert bool((q[1] == 0).all())
        if sym:
            assert zero.flatten().tolist() == [4.0, 4.0, 4.0]
    # asymmetric 2-bit on [-1, 2]: scale 1, zero 1, levels -1, 0, 1, 2
    q = quantize(torch.tensor([[-1.0, 0.4, 0.6, 2.0]]), torch.tensor([[1.0]]), torch.tensor([[1.0]]), 3)
    assert q.tolist() == [[-1.0, 0.0, 1.0, 2.0]]


def test_ref_and_dispatcher_agree_and_bad_input_is_clear():
    W, H, _ = random_problem(5, 16)
    _, Hinv = hinv_of(H)
    a = obs_update(W, Hinv, prune=PruneSpec(sparsity=0.5), backend="ref")
    b = obs_update_ref(W, Hinv, prune=PruneSpec(sparsity=0.5))
    assert torch.equal(a[0], b[0])
    with pytest.raises(LmsqueezeError, match="needs prune, quant or both"):
        obs_update(W, Hinv)
    with pytest.raises(LmsqueezeError, match="multiple of 4"):
        obs_update(W[:, :14].contiguous(), Hinv[:14, :14].contiguous(), prune=PruneSpec(n=2, m=4))
    with pytest.raises(LmsqueezeError, match="has no 'cuda' backend"):
        obs_update(W, Hinv, prune=PruneSpec(sparsity=0.5), backend="cuda")
    with pytest.raises(LmsqueezeError, match="bits 5"):
        QuantSpec(bits=5)
    with pytest.raises(LmsqueezeError, match="0 < N < M"):
        PruneSpec(n=3, m=2)


def test_strided_weight_view():
    W, H, _ = random_problem(13, 64, seed=5)
    _, Hinv = hinv_of(H)
    Wt = W.t().contiguous().t()  # a transposed (non-contiguous) view, like GPT-2's Conv1D weight
    assert not Wt.is_contiguous()
    a = obs_update(Wt, Hinv, prune=PruneSpec(n=2, m=4), quant=QuantSpec(bits=4, group_size=16))
    b = obs_update(W, Hinv, prune=PruneSpec(n=2, m=4), quant=QuantSpec(bits=4, group_size=16))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
