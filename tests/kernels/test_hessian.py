import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels import hessian_finalize, hessian_update, hessian_update_ref
from lmsqueeze.testing import TOLERANCES, assert_close
from tests.conftest import requires_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading shape, d): one token, odd sizes, non-multiples of the 16-lane panel, the 8 x 48 micro-tile,
# the 128 x 192 macro tile and the Triton block; 513 tokens = an odd pair count past two k-blocks
SHAPES = [((1,), 1), ((13,), 7), ((3, 171), 769), ((2, 5), 33), ((513,), 200), ((4, 70), 257)]


def _inputs(lead, d, dtype, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, d, generator=g) * 3).to(dtype)
    mask = (torch.rand(*lead, generator=g) > 0.3) if masked else None
    H0 = torch.rand(d, d, generator=g)
    return x, mask, H0 + H0.T


def _check_backend(backend, lead, d, dtype, masked):
    x, mask, H0 = _inputs(lead, d, dtype, masked)
    H_fast, H_ref = H0.clone(), H0.clone()
    n_fast = hessian_update(H_fast, x, 17, mask, backend=backend)
    n_ref = hessian_update_ref(H_ref, x, 17, mask)
    assert n_fast == n_ref
    hessian_finalize(H_fast)
    atol, rtol = TOLERANCES[dtype]
    assert_close(H_fast, H_ref, atol=atol * float(H_ref.abs().max()), rtol=rtol, name=f"{backend} {dtype} {lead}x{d}")
    assert torch.equal(H_fast, H_fast.T)


def test_ref_hand_computed():
    # x^T x over the two valid rows is diag(1 + 9, 4); the padding row must not count
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [50.0, 50.0]])
    mask = torch.tensor([True, True, True, False])
    H = torch.eye(2)
    assert hessian_update_ref(H, x, 1, mask) == 4
    # old H keeps weight 1/4, the sum enters with 2/4
    assert H.tolist() == [[0.25 + 10 * 0.5, 0.0], [0.0, 0.25 + 4 * 0.5]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_matches_ref(ext, lead, d, dtype, masked):
    _check_backend("cpu", lead, d, dtype, masked)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_cpu_without_avx512_bf16_matches_ref(ext, isa):
    prev = ext.set_isa_cap(isa)
    try:
        _check_backend("cpu", (3, 171), 769, torch.bfloat16, True)
    finally:
        ext.set_isa_cap(prev)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d", [((1,), 1), ((2, 37), 70)])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_matches_ref(lead, d, dtype, masked):
    _check_backend("triton", lead, d, dtype, masked)


def test_cpu_bf16_error_against_fp64_at_calibration_length(ext):
    # 4096 tokens of real-scale activations: bf16 products are exact, fp32 sums stay within 1e-5
    x = (torch.randn(4096, 320, generator=torch.Generator().manual_seed(1)) * 2).to(torch.bfloat16)
    H = torch.zeros(320, 320)
    hessian_update(H, x, 0, backend="cpu")
    hessian_finalize(H)
    xd = x.double()
    H64 = xd.T @ xd * (2.0 / 4096)
    assert float((H.double() - H64).abs().max() / H64.abs().max()) <= 1e-5


@pytest.mark.parametrize("backend", ["ref", "cpu", pytest.param("triton", marks=requires_triton)])
def test_batches_equal_concatenation(backend, ext):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 48, generator=g).to(torch.bfloat16) for n in (5, 64, 1, 33)]
    masks = [torch.rand(n, generator=g) > 0.2 for n in (5, 64, 1, 33)]
    H_inc, n = torch.zeros(48, 48), 0
    for x, mk in zip(xs, masks):
        n = hessian_update(H_inc, x, n, mk, backend=backend)
    hessian_finalize(H_inc)
    H_all = torch.zeros(48, 48)
    assert hessian_update(H_all, torch.cat(xs), 0, torch.cat(masks), backend=backend) == n
    hessian_finalize(H_all)
    assert_close(H_inc, H_all, atol=1e-5 * float(H_all.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_strided_view(backend, ext):
    base = torch.randn(64, 300, dtype=torch.bfloat16)
    x = base[:, ::2]  # non-unit column stride
    H1, H2 = torch.zeros(150, 150), torch.zeros(150, 150)
    hessian_update(H1, x, 0, backend=backend)
    hessian_finalize(H1)
    hessian_update_ref(H2, x.contiguous(), 0)
    assert_close(H1, H2, atol=1e-5 * float(H2.abs().max()), rtol=1e-5)


def test_fast_paths_leave_upper_triangle_to_finalize(ext):
    x = torch.randn(40, 20, dtype=torch.bfloat16)
    H = torch.triu(torch.full((20, 20), 7.0), 1)  # stale upper triangle, zero lower one
    hessian_update(H, x, 0, backend="cpu")
    if ext.active_isa() == "avx512" and dict(ext.cpu_features())["avx512_bf16"]:
        # the AVX-512-BF16 kernel computes the lower triangle only; the blocked fp32 fallback (AVX2 machines)
        # also fills the upper half of its diagonal blocks, which finalize then overwrites
        assert torch.equal(torch.triu(H, 1), torch.triu(torch.full((20, 20), 7.0), 1))  # upper untouched
    hessian_finalize(H)
    expected = torch.zeros(20, 20)
    hessian_update_ref(expected, x, 0)
    assert_close(H, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)


def test_finalize_torch_path_matches_cpp(ext, monkeypatch):
    H = torch.randn(131, 131)
    H_cpp = hessian_finalize(H.clone())
    from lmsqueeze import _ext

    monkeypatch.setattr(_ext, "_C", None)
    H_torch = hessian_finalize(H.clone())
    assert torch.equal(H_cpp, H_torch)
    assert torch.equal(H_cpp, H_cpp.T)
    assert torch.equal(torch.tril(H_cpp), torch.tril(H))


def test_finalize_of_a_view_is_symmetric_and_keeps_lower():
    H = torch.randn(9, 9)
    view = H.clone().T  # not contiguous: always the torch path
    hessian_finalize(view)
    assert torch.equal(view, view.T) and torch.equal(torch.tril(view), torch.tril(H.T))


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_all_padding_changes_nothing(backend, ext):
    H = torch.rand(8, 8)
    before = H.clone()
    assert hessian_update(H, torch.randn(4, 8), 3, torch.zeros(4, dtype=torch.bool), backend=backend) == 3
    assert torch.equal(H, before)


def test_bad_input_is_one_clear_error():
    with pytest.raises(LmsqueezeError, match="last dimension"):
        hessian_update(torch.zeros(4, 4), torch.randn(2, 5), 0)
    with pytest.raises(LmsqueezeError, match="square float32"):
        hessian_update(torch.zeros(4, 4, dtype=torch.float64), torch.randn(2, 4), 0)
    with pytest.raises(LmsqueezeError, match="float32, bfloat16 or float16"):
        hessian_update(torch.zeros(4, 4), torch.ones(2, 4, dtype=torch.int32), 0)
    with pytest.raises(LmsqueezeError, match="mask has 3 entries"):
        hessian_update(torch.zeros(4, 4), torch.randn(2, 4), 0, torch.ones(3, dtype=torch.bool), backend="ref")
    with pytest.raises(LmsqueezeError, match="has no 'cuda' backend"):
        hessian_update(torch.zeros(4, 4), torch.randn(2, 4), 0, backend="cuda")


def test_non_contiguous_H_is_refused_by_fast_paths(ext):
    H = torch.zeros(8, 16)[:, ::2]
    with pytest.raises(LmsqueezeError, match="contiguous"):
        hessian_update(H, torch.randn(3, 8), 0, backend="cpu")


def test_auto_falls_back_to_ref_without_extension(monkeypatch):
    from lmsqueeze import _ext

    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "EXT_ERROR", "pretend not built")
    H = torch.zeros(4, 4)
    assert hessian_update(H, torch.ones(3, 4), 0) == 3
    assert torch.equal(H, torch.full((4, 4), 2.0))
    with pytest.raises(LmsqueezeError, match="pretend not built"):
        hessian_update(H, torch.ones(3, 4), 0, backend="cpu")



_COMPILE_HESSIAN = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lmsqueeze.kernels.triton.hessian import _hessian_tril_kernel
sig = {"x_ptr": "*bf16", "mask_ptr": "*u8", "h_ptr": "*fp32", "rows": "i32", "d": "i32", "a": "fp32", "b": "fp32",
       "stride_xt": "i32", "stride_xd": "i32", "stride_h": "i32", "HAS_MASK": "constexpr", "UPCAST": "constexpr",
       "IEEE": "constexpr", "BLOCK": "constexpr", "BLOCK_K": "constexpr"}
consts = {"HAS_MASK": True, "UPCAST": False, "IEEE": False, "BLOCK": 128, "BLOCK_K": 32}
k = triton.compile(ASTSource(fn=_hessian_tril_kernel, signature=sig, constexprs=consts),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
assert "mma" in k.asm["ptx"], "bf16 operands did not reach the tensor cores"
"""


@requires_triton
def test_triton_gpu_path_compiles_for_sm90():
    # The interpreter upcasts bf16 before tl.dot; this compiles the real bf16 tensor-core path to PTX
    # with triton's bundled ptxas (no GPU needed), in a process without TRITON_INTERPRET.
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_HESSIAN], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# The AMX path (csrc/cpu/hessian.cpp, AmxTiles) with its tile instructions emulated in scalar C++: its packing
# (pair panels and feature rows, padded to 16 pairs and 32 features), 32 x 32 blocking and fold into H are
# what this checks; the tile instructions themselves run only on a CPU with AMX. 600 tokens: 300 pairs, past
# two 128-pair folds with a padded tail; d = 64: whole blocks; d = 1, 7, 33, 257, 769: partial ones.
@pytest.mark.parametrize("lead,d", SHAPES + [((600,), 64)])
@pytest.mark.parametrize("masked", [False, True])
def test_amx_path_emulated_matches_ref(ext, lead, d, masked):
    x, mask, H0 = _inputs(lead, d, torch.bfloat16, masked)
    H_fast, H_ref = H0.clone(), H0.clone()
    upper = torch.triu(H_fast, 1).clone()
    assert ext.hessian_update_tiles_emulated_cpu(H_fast, x, 17, mask) == hessian_update_ref(H_ref, x, 17, mask)
    assert torch.equal(torch.triu(H_fast, 1), upper), "the AMX path wrote above the diagonal"
    hessian_finalize(H_fast)
    atol, rtol = TOLERANCES[torch.bfloat16]
    assert_close(H_fast, H_ref, atol=atol * float(H_ref.abs().max()), rtol=rtol, name=f"amx-emulated {lead}x{d}")


def test_amx_path_emulated_strided_and_batched(ext):
    base = torch.randn(70, 300, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    x = base[:, ::3]  # 100 columns, column stride 3
    H_inc, n = torch.zeros(100, 100), 0
    for part in (x[:33], x[33:34], x[34:]):
        n = ext.hessian_update_tiles_emulated_cpu(H_inc, part, n)
    hessian_finalize(H_inc)
    H_all = torch.zeros(100, 100)
    hessian_update_ref(H_all, x.contiguous(), 0)
    assert n == 70
    assert_close(H_inc, H_all, atol=1e-5 * float(H_all.abs().max()), rtol=1e-5)


def test_amx_is_chosen_only_where_usable(ext):
    feats = dict(ext.cpu_features())
    with open("/proc/cpuinfo") as f:
        has_amx = " amx_bf16" in f.read()
    path = ext.hessian_update_cpu_path("bfloat16")
    if not has_amx:  # AMD and older Intel: never the AMX path, and `lmsqueeze info` says why
        assert not feats["amx_usable"] and path != "amx" and ext.amx_why_not()
    else:
        assert (path == "amx") == feats["amx_usable"]
    assert ext.hessian_update_cpu_path("float32") == "fp32-gemm"
    prev = ext.set_isa_cap("avx2")
    try:  # the ISA cap the other tests use to reach fallbacks turns AMX off too
        assert ext.hessian_update_cpu_path("bfloat16") == "fp32-gemm"
    finally:
        ext.set_isa_cap(prev)
