import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels import col_sq_norm_update, col_sq_norm_update_ref
from lmsqueeze.testing import TOLERANCES, assert_close
from tests.conftest import requires_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading shape, d): a single token, odd sizes, non-multiples of the 16/32-wide vector loop and 128 block
SHAPES = [((1,), 1), ((13,), 7), ((3, 257), 769), ((2, 5), 33), ((1024,), 576), ((4, 300), 1536)]


def _inputs(lead, d, dtype, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, d, generator=g) * 3).to(dtype)
    mask = (torch.rand(*lead, generator=g) > 0.3) if masked else None
    s0 = torch.rand(d, generator=g)
    return x, mask, s0


def _check_backend(backend, lead, d, dtype, masked):
    x, mask, s0 = _inputs(lead, d, dtype, masked)
    s_fast, s_ref = s0.clone(), s0.clone()
    n_fast = col_sq_norm_update(s_fast, x, 17, mask, backend=backend)
    n_ref = col_sq_norm_update_ref(s_ref, x, 17, mask)
    assert n_fast == n_ref
    atol, rtol = TOLERANCES[dtype]
    assert_close(s_fast, s_ref, atol=atol * float(s_ref.abs().max()), rtol=rtol, name=f"{backend} {dtype} {lead}x{d}")


def test_ref_hand_computed():
    s = torch.tensor([1.0, 4.0])
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [100.0, 100.0]])
    mask = torch.tensor([True, True, False])
    # old mean keeps weight 2/4, the two valid rows add (1 + 9, 4 + 0) / 4
    n = col_sq_norm_update_ref(s, x, 2, mask)
    assert n == 4
    assert s.tolist() == [1.0 * 0.5 + 10 / 4, 4.0 * 0.5 + 4 / 4]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_matches_ref(ext, lead, d, dtype, masked):
    _check_backend("cpu", lead, d, dtype, masked)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_fallback_isas_match_ref(ext, isa, dtype):
    prev = ext.set_isa_cap(isa)
    try:
        assert ext.active_isa() in (isa, "generic")
        _check_backend("cpu", (3, 257), 769, dtype, True)
    finally:
        ext.set_isa_cap(prev)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d", [((1,), 1), ((3, 257), 769), ((2100,), 130)])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_matches_ref(lead, d, dtype, masked):
    _check_backend("triton", lead, d, dtype, masked)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_strided_view(backend, ext):
    base = torch.randn(64, 300, dtype=torch.bfloat16)
    x = base[:, ::2]  # non-unit column stride
    s1, s2 = torch.zeros(150), torch.zeros(150)
    col_sq_norm_update(s1, x, 0, backend=backend)
    col_sq_norm_update_ref(s2, x.contiguous(), 0)
    assert_close(s1, s2, atol=1e-5 * float(s2.max()), rtol=1e-5)


def test_batches_equal_concatenation(ext):
    xs = [torch.randn(n, 96, dtype=torch.bfloat16) for n in (5, 64, 1, 33)]
    s_inc, n = torch.zeros(96), 0
    for x in xs:
        n = col_sq_norm_update(s_inc, x, n)
    s_all = torch.zeros(96)
    assert col_sq_norm_update(s_all, torch.cat(xs), 0) == n
    assert_close(s_inc, s_all, atol=1e-5 * float(s_all.max()), rtol=1e-5)


def test_all_padding_changes_nothing(ext):
    s = torch.rand(8)
    before = s.clone()
    assert col_sq_norm_update(s, torch.randn(4, 8), 3, torch.zeros(4, dtype=torch.bool)) == 3
    assert torch.equal(s, before)


def test_bad_input_is_one_clear_error():
    with pytest.raises(LmsqueezeError, match="last dimension"):
        col_sq_norm_update(torch.zeros(4), torch.randn(2, 5), 0)
    with pytest.raises(LmsqueezeError, match="float32, bfloat16 or float16"):
        col_sq_norm_update(torch.zeros(4), torch.ones(2, 4, dtype=torch.int32), 0)
    with pytest.raises(LmsqueezeError, match="mask has 3 entries"):
        col_sq_norm_update(torch.zeros(4), torch.randn(2, 4), 0, torch.ones(3, dtype=torch.bool), backend="ref")


def test_forced_backend_errors(monkeypatch):
    with pytest.raises(LmsqueezeError, match="unknown backend 'gpu'"):
        col_sq_norm_update(torch.zeros(4), torch.randn(2, 4), 0, backend="gpu")
    with pytest.raises(LmsqueezeError, match="cannot run col_sq_norm_update"):
        col_sq_norm_update(torch.zeros(4), torch.randn(2, 4), 0, backend="cuda")
    monkeypatch.setenv("LMSQUEEZE_BACKEND", "ref")
    s = torch.zeros(4)
    assert col_sq_norm_update(s, torch.ones(2, 4), 0) == 2


def test_auto_falls_back_to_ref_without_extension(monkeypatch):
    from lmsqueeze import _ext

    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "EXT_ERROR", "pretend not built")
    s = torch.zeros(4)
    assert col_sq_norm_update(s, torch.ones(3, 4), 0) == 3
    assert torch.equal(s, torch.ones(4))
    with pytest.raises(LmsqueezeError, match="pretend not built"):
        col_sq_norm_update(s, torch.ones(3, 4), 0, backend="cpu")


def test_per_op_backend_variable_wins_over_the_global_one(monkeypatch):
    from lmsqueeze.kernels._dispatch import choose_backend

    cpu = torch.device("cpu")  # (no backend here needs the extension: this also runs with LMSQUEEZE_NO_EXT=1)
    monkeypatch.setenv("LMSQUEEZE_BACKEND", "cuda")  # would refuse CPU tensors
    monkeypatch.setenv("LMSQUEEZE_BACKEND_HESSIAN_UPDATE", "ref")
    assert choose_backend("hessian_update", cpu, None, ("ref", "cpu", "cuda")) == "ref"
    with pytest.raises(LmsqueezeError, match="backend 'cuda' cannot run col_sq_norm_update"):
        choose_backend("col_sq_norm_update", cpu, None, ("ref", "cpu", "cuda"))  # other ops keep the global one
    monkeypatch.setenv("LMSQUEEZE_BACKEND_WANDA_MASK", "gpu")
    assert choose_backend("wanda_mask", cpu, "ref", ("ref", "cpu")) == "ref"  # an explicit argument wins
    with pytest.raises(LmsqueezeError, match="unknown backend 'gpu'"):
        choose_backend("wanda_mask", cpu, None, ("ref", "cpu"))
