"""The fast OBS sweeps (C++ CPU, Triton) against obs_update_ref: same mask, same weights.

Tolerance, weights: atol = 1e-5 * max|W_ref| (+ rtol 1e-5). The C++ path performs the reference's
fp32 operations in the reference's order (product then difference in the rank-1 steps, IEEE
division, round half to even, the same at::matmul for the trailing update), so on this machine it
is in fact bit-identical; the margin only covers what is allowed to differ: the summation order
of a BLAS call with a different memory alignment or thread split (one GEMM per block, error
~ sqrt(blocksize) * 2^-24 * max|W| * max|Hinv| relative, well under 1e-5). Masks are compared
exactly: with identical intermediate weights the saliencies are identical and ties are broken the
same way (lower row-major index / lower column first, what the reference's stable sort does).
The test matrices are random normals: a saliency tie needs two equal fp32 products, which the
tie-breaking tests below create on purpose. Losses: rtol 1e-5 (the per-row sum of up to `cols`
nonnegative terms is accumulated in another order).
"""
import os

import pytest
import torch

from lmsqueeze import _ext
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels import PruneSpec, QuantSpec, obs_update, obs_update_ref
from lmsqueeze.kernels._dispatch import triton_available
from lmsqueeze.testing import assert_close

W_TOL = 1e-5
LOSS_RTOL = 1e-5

needs_ext = pytest.mark.skipif(
    not _ext.has_op("obs_update_cpu"),
    reason=f"C++ extension not built: {_ext.EXT_ERROR}" if _ext.ext() is None
    else "lmsqueeze._C has no obs_update_cpu (stale build: python setup.py build_ext --inplace)")
needs_triton = pytest.mark.skipif(not triton_available() or os.environ.get("TRITON_INTERPRET") != "1"
                                  and not torch.cuda.is_available(),
                                  reason="triton needs a GPU or TRITON_INTERPRET=1")

MODES = {
    "unstructured-0.5": (PruneSpec(sparsity=0.5), None),
    "2:4": (PruneSpec(n=2, m=4), None),
    "4:8": (PruneSpec(n=4, m=8), None),
    "gptq-4b-g16": (None, QuantSpec(bits=4, group_size=16)),
    "gptq-3b-sym-row": (None, QuantSpec(bits=3, group_size=-1, sym=True)),
    "joint-2:4-4b-g8": (PruneSpec(n=2, m=4), QuantSpec(bits=4, group_size=8)),
    "joint-0.3-8b-g24": (PruneSpec(sparsity=0.3), QuantSpec(bits=8, group_size=24)),
}


def problem(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(2 * cols + 8, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
                                                        / cols ** 0.5)
    H = 2 * X.T @ X / X.shape[0]
    H += 0.01 * torch.diag(H).mean() * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    return W, Hinv


def check_same(W, Hinv, backend, blocksize, prune, quant):
    ref = obs_update_ref(W, Hinv, blocksize=blocksize, prune=prune, quant=quant)
    got = obs_update(W, Hinv, blocksize=blocksize, prune=prune, quant=quant, backend=backend)
    if prune is None:
        assert got[1] is None
    else:
        assert got[1].dtype == torch.bool
        assert torch.equal(got[1], ref[1]), f"masks differ in {int((got[1] != ref[1]).sum())} places"
    assert_close(got[0], ref[0], atol=W_TOL * float(ref[0].abs().max()), rtol=W_TOL, name=f"{backend} weights")
    assert_close(got[2], ref[2], atol=LOSS_RTOL * float(ref[2].abs().max()), rtol=LOSS_RTOL, name=f"{backend} losses")
    return got


@needs_ext
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("rows,cols,blocksize", [(1, 64, 16), (13, 96, 32), (37, 256, 128), (257, 200, 64),
                                                  (96, 136, 128)])
def test_cpu_matches_reference(mode, rows, cols, blocksize):
    prune, quant = MODES[mode]
    W, Hinv = problem(rows, cols)
    check_same(W, Hinv, "cpu", blocksize, prune, quant)


@needs_ext
def test_cpu_generic_isa_matches_reference():
    """The generic C++ path (no AVX-512), reached through the ISA cap, gives the same result."""
    C = _ext.ext()
    prev = C.set_isa_cap("generic")
    try:
        assert C.active_isa() == "generic"
        W, Hinv = problem(29, 96)
        for mode in ("unstructured-0.5", "2:4", "joint-2:4-4b-g8"):
            check_same(W, Hinv, "cpu", 32, *MODES[mode])
    finally:
        C.set_isa_cap(prev)


@needs_ext
def test_cpu_strided_view_and_thread_counts():
    W_big, Hinv = problem(40, 128)
    W = W_big[::2]  # a strided view: not contiguous
    assert not W.is_contiguous()
    n = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            check_same(W, Hinv, "cpu", 32, *MODES["unstructured-0.5"])
            check_same(W, Hinv, "cpu", 32, *MODES["gptq-4b-g16"])
    finally:
        torch.set_num_threads(n)


@needs_ext
@pytest.mark.parametrize("mode", ["unstructured-0.5", "2:4"])
def test_cpu_ties_are_broken_like_a_stable_sort(mode):
    """Equal saliencies everywhere (identity Hinv, |w| all equal): the lower index is pruned first."""
    W = torch.ones(6, 16)
    W[::2] *= -1  # sign does not change w^2
    Hinv = torch.eye(16)
    prune, _ = MODES[mode]
    got = check_same(W, Hinv, "cpu", 8, prune, None)
    if mode == "2:4":
        assert got[1][0, :4].tolist() == [False, False, True, True]
    else:  # per block 24 of 48 go: rows 0-2 of each block, the lowest row-major indices
        assert got[1][:3].logical_not().all() and got[1][3:].all()


@needs_ext
def test_cpu_input_not_modified_and_errors():
    W, Hinv = problem(13, 64)
    W0 = W.clone()
    obs_update(W, Hinv, blocksize=16, prune=PruneSpec(sparsity=0.5), backend="cpu")
    assert torch.equal(W, W0)
    with pytest.raises(LmsqueezeError, match="blocksize 6 must be a multiple of M = 4"):
        obs_update(W, Hinv, blocksize=6, prune=PruneSpec(n=2, m=4), backend="cpu")
    with pytest.raises(LmsqueezeError, match="Hinv must be float32"):
        obs_update(W, Hinv.double(), prune=PruneSpec(sparsity=0.5), backend="cpu")


# ---- Triton (interpreted on the CPU: slow, so shapes are small) ----------------------------------

@needs_triton
@pytest.mark.parametrize("rows,cols,blocksize,modes", [
    (13, 96, 32, ["unstructured-0.5", "2:4", "gptq-4b-g16", "gptq-3b-sym-row", "joint-2:4-4b-g8"]),
    (21, 128, 64, ["unstructured-0.5", "joint-0.3-8b-g24"]),
    (1, 40, 16, ["4:8"]),
])
def test_triton_matches_reference(rows, cols, blocksize, modes):
    W, Hinv = problem(rows, cols)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    W, Hinv = W.to(device), Hinv.to(device)
    for mode in modes:
        check_same(W, Hinv, "triton", blocksize, *MODES[mode])


@needs_triton
def test_triton_group_reaching_past_the_block():
    """A group of 96 columns with blocksize 64: its scale reads columns the block has not updated yet."""
    W, Hinv = problem(13, 192)
    check_same(W, Hinv, "triton", 64, None, QuantSpec(bits=4, group_size=96))
