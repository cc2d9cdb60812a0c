import math

import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels import token_divergence, token_divergence_ref, token_divergence_topk, topk_summary
from lmsqueeze.kernels.divergence import token_divergence_cpu
from lmsqueeze.testing import assert_close
from tests.conftest import requires_triton

# fp32 paths against the fp64 reference: per-token divergences are sums of V terms of size <= ~1e-7 * |log p|.
TOL = {torch.float32: (2e-6, 1e-4), torch.bfloat16: (2e-6, 1e-4)}


def _pair(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(*shape, generator=g) * scale).to(dtype)
    q = (p.float() + torch.randn(*shape, generator=g)).to(dtype)
    return p, q


def _check(got, want, mask=None):
    for name in ("kl_pq", "kl_qp", "jsd"):
        atol, rtol = TOL[torch.float32]
        assert_close(getattr(got, name), getattr(want, name), atol, rtol, name)
    assert torch.equal(got.top1, want.top1)


def test_hand_computed_two_token_case():
    # P = (1/2, 1/2), Q = (1/4, 3/4)
    p = torch.tensor([[0.0, 0.0]])
    q = torch.log(torch.tensor([[0.25, 0.75]]))
    d = token_divergence_ref(p, q)
    kl_pq = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_qp = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    m = (0.375, 0.625)
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) \
        + 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert d.kl_pq.item() == pytest.approx(kl_pq, rel=1e-6)
    assert d.kl_qp.item() == pytest.approx(kl_qp, rel=1e-6)
    assert d.jsd.item() == pytest.approx(jsd, rel=1e-6)
    assert d.top1.tolist() == [False]  # argmax P is 0 (first of a tie), argmax Q is 1
    for backend in ("cpu",):
        _check(token_divergence(p, q, backend=backend), d)


def test_disjoint_supports_reach_ln2():
    p = torch.tensor([[30.0, -30.0]])
    q = torch.tensor([[-30.0, 30.0]])
    d = token_divergence(p, q)
    assert d.jsd.item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("shape", [(1, 13), (3, 257), (2, 5, 769)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_matches_ref_and_invariants(shape, dtype):
    p, q = _pair(shape, dtype)
    want = token_divergence_ref(p, q)
    got = token_divergence_cpu(p, q, chunk_rows=2)
    _check(got, want)
    assert (want.jsd <= math.log(2) + 1e-7).all() and (want.jsd >= 0).all()
    same = token_divergence(p, p)
    assert same.kl_pq.abs().max() < 1e-6 and same.kl_qp.abs().max() < 1e-6 and same.jsd.abs().max() < 1e-6
    assert same.top1.all()


def test_mask_and_strided_view():
    p, q = _pair((4, 9, 257), torch.float32)
    pv, qv = p[:, ::2], q[:, ::2]  # a strided view
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    want = token_divergence_ref(pv, qv, mask)
    got = token_divergence(pv, qv, mask)
    _check(got, want)
    assert (got.kl_pq[~mask] == 0).all() and not got.top1[~mask].any()


def test_bad_shapes_are_clear():
    with pytest.raises(LmsqueezeError, match="same tokenizer"):
        token_divergence(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(LmsqueezeError, match="mask"):
        token_divergence(torch.zeros(2, 5), torch.zeros(2, 5), torch.ones(3, dtype=torch.bool))


@requires_triton
@pytest.mark.parametrize("shape", [(1, 13), (5, 257), (2, 3, 769), (3, 2100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_ref(shape, dtype):
    p, q = _pair(shape, dtype, seed=2)
    want = token_divergence_ref(p, q)
    got = token_divergence(p, q, backend="triton")
    _check(got, want)


@requires_triton
def test_triton_strided_and_masked():
    p, q = _pair((3, 8, 300), torch.float32, seed=3)
    mask = torch.tensor([[True, False, True, True]] * 3)
    _check(token_divergence(p[:, ::2], q[:, ::2], mask, backend="triton"), token_divergence_ref(p[:, ::2], q[:, ::2], mask))


# ---- top-k representation ---------------------------------------------------------------------------

def _coarse_ref(p_logits, q_logits, k):
    """The partition {top-k of P, rest} computed in fp64 from full distributions."""
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    idx = lp.topk(k, -1).indices
    P = torch.cat([lp.exp().gather(1, idx), (1 - lp.exp().gather(1, idx).sum(1, keepdim=True))], 1)
    Q = torch.cat([lq.exp().gather(1, idx), (1 - lq.exp().gather(1, idx).sum(1, keepdim=True))], 1)
    M = (P + Q) / 2
    kl = lambda a, b: (a * (a / b).log()).sum(1)  # noqa: E731
    return kl(P, Q), kl(Q, P), 0.5 * kl(P, M) + 0.5 * kl(Q, M)


def test_topk_summary_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top, idx, tail = topk_summary(logits, 2)
    assert idx.tolist() == [[0, 1]]
    assert_close(top.exp(), torch.tensor([[0.5, 0.3]]), 1e-6, 1e-6, "top")
    assert tail.exp().item() == pytest.approx(0.2, rel=1e-6)


@pytest.mark.parametrize("k", [1, 8, 64])
def test_topk_is_the_coarse_grained_divergence_and_a_lower_bound(k):
    p, q = _pair((13, 257), torch.float32, seed=4)
    top, idx, tail = topk_summary(p, k)
    got = token_divergence_topk(top, idx, tail, q, chunk_rows=5)
    kl_pq, kl_qp, jsd = _coarse_ref(p, q, k)
    assert_close(got.kl_pq, kl_pq, 2e-6, 1e-4, "kl_pq")
    assert_close(got.kl_qp, kl_qp, 2e-6, 1e-4, "kl_qp")
    assert_close(got.jsd, jsd, 2e-6, 1e-4, "jsd")
    full = token_divergence_ref(p, q)
    assert torch.equal(got.top1, full.top1)
    slack = 1e-5
    assert (got.kl_pq <= full.kl_pq + slack).all() and (got.jsd <= full.jsd + slack).all()
    # the stated JSD bound: error <= (r_P + r_Q)/2 * ln 2
    lq = torch.log_softmax(q.double(), -1)
    r_q = 1 - lq.exp().gather(1, idx).sum(1)
    bound = (tail.double().exp() + r_q) / 2 * math.log(2)
    assert ((full.jsd.double() - got.jsd.double()) <= bound + slack).all()
    assert_close(got.jsd_slack, bound.float(), 2e-6, 1e-4, "jsd_slack")


def test_topk_against_itself_is_zero():
    p, _ = _pair((7, 769), torch.bfloat16, seed=5)
    top, idx, tail = topk_summary(p, 16)
    d = token_divergence_topk(top, idx, tail, p)
    assert d.kl_pq.abs().max() < 1e-6 and d.kl_qp.abs().max() < 1e-6 and d.jsd.abs().max() < 1e-6 and d.top1.all()


def test_topk_top1_agrees_with_argmax_when_the_top_is_tied():
    # coarse bf16-like logits: many rows whose maximum is shared by several tokens; topk may list the
    # tied tokens in any order, top-1 must still mean torch.argmax on both sides
    g = torch.Generator().manual_seed(11)
    base = torch.randint(0, 100, (400, 300), generator=g).float()  # about 3 tokens share each row's top
    model = base.clone()
    model[::3] += torch.randint(0, 2, (134, 300), generator=g).float()  # other rows disagree now and then
    top, idx, tail = topk_summary(base, 16)
    assert (top[:, 1] == top[:, 0]).float().mean() > 0.8  # the top is tied in most rows
    assert (top[:, -1] < top[:, 0]).all()  # but every tie fits in the top-k
    got = token_divergence_topk(top, idx, tail, model)
    assert torch.equal(got.top1, base.argmax(-1) == model.argmax(-1))
    assert got.top1[1::3].all()  # identical rows always agree
