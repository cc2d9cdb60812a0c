import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels import (
    nm_mask,
    nm_mask_ref,
    rowwise_mask,
    rowwise_mask_ref,
    wanda_mask,
    wanda_mask_ref,
    wanda_scores,
)
from tests.conftest import requires_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# rows x cols: 1, odd sizes, non-multiples of the 16-lane vector, and rows of >= 1024 columns that
# take the sampled-bracket path of the C++ selection
ROW_SHAPES = [(1, 1), (13, 7), (5, 257), (3, 769), (6, 4100)]
NM = [(2, 4), (1, 4), (3, 4), (4, 8), (3, 8), (1, 2), (8, 16), (2, 5), (3, 12)]  # 2:5 and 3:12: the scalar path


def _scores(rows, cols, dtype, seed=0, ties=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, cols, generator=g)
    if ties and cols > 3:
        s[:, ::3] = s[:, 1:2].clone()  # many exact ties per row
        s[0, :2] = torch.tensor([-0.0, 0.0])  # -0 ties with +0
    return s.to(dtype)


def _pruned_per_row(keep):
    return (~keep).sum(dim=-1)


def test_wanda_hand_computed_row():
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0, 0.5, 0.5, -8.0, 1.0]])
    norm = torch.tensor([16.0, 1.0, 1.0, 0.25, 4.0, 4.0, 0.0, 1.0])  # sqrt: 4, 1, 1, .5, 2, 2, 0, 1
    # scores 4, 2, 3, 2, 1, 1, 0, 1: the 4 lowest are cols 6 (0), 4, 5, 7 (1, ties by column)
    assert wanda_scores(W, norm).tolist() == [[4.0, 2.0, 3.0, 2.0, 1.0, 1.0, 0.0, 1.0]]
    expected = [[True, True, True, True, False, False, False, False]]
    # 2:4: group (4, 2, 3, 2) prunes col 1 then col 3 (tie: lower column first); (1, 1, 0, 1) prunes 6, 4
    expected_24 = [[True, False, True, False, False, True, False, True]]
    for backend in ["ref"] + ["cpu"] * _has_cpu() + ["triton"] * _has_triton():
        assert wanda_mask(W, norm, 0.5, backend=backend).tolist() == expected
        assert wanda_mask(W, norm, n=2, m=4, backend=backend).tolist() == expected_24


def _has_triton():
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _has_cpu():
    from lmsqueeze import _ext

    return _ext.has_op("rowwise_mask_cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", ROW_SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_cpu_rowwise_matches_ref(ext, rows, cols, dtype, sparsity):
    s = _scores(rows, cols, dtype)
    keep = rowwise_mask(s, sparsity, backend="cpu")
    assert torch.equal(keep, rowwise_mask_ref(s, sparsity))
    assert (_pruned_per_row(keep) == int(round(sparsity * cols))).all()


NM_SHAPES = [(r, c, n, m) for r, c in [(1, 16), (13, 40), (5, 240), (3, 4080)] for n, m in NM if c % m == 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,n,m", NM_SHAPES)
def test_cpu_nm_matches_ref(ext, rows, cols, dtype, n, m):
    s = _scores(rows, cols, dtype)
    keep = nm_mask(s, n, m, backend="cpu")
    assert torch.equal(keep, nm_mask_ref(s, n, m))
    assert (keep.reshape(rows, cols // m, m).sum(-1) == n).all()


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_cpu_scalar_paths_match_ref(ext, isa):
    prev = ext.set_isa_cap(isa)
    try:
        s = _scores(6, 4100, torch.float32)
        assert torch.equal(rowwise_mask(s, 0.6, backend="cpu"), rowwise_mask_ref(s, 0.6))
        s = _scores(5, 240, torch.float32)
        assert torch.equal(nm_mask(s, 2, 4, backend="cpu"), nm_mask_ref(s, 2, 4))
        W, norm = _scores(7, 1200, torch.bfloat16, ties=False), torch.rand(1200)
        assert torch.equal(wanda_mask(W, norm, 0.5, backend="cpu"), wanda_mask_ref(W, norm, 0.5))
    finally:
        ext.set_isa_cap(prev)


def _sampled_columns(cols):
    # where the C++ row-wise selection samples a row of >= 1024 columns: 16 chunks of 16 columns
    return [(i * (cols - 16)) // 15 + t for i in range(16) for t in range(16)]


def test_cpu_rowwise_when_the_sample_misleads(ext):
    # every sampled column holds a huge score, so the sampled bracket misses the k-th key and the
    # C++ selection must fall back to the whole-row search
    s = torch.rand(3, 2048)
    s[:, _sampled_columns(2048)] = 1e9
    s[1] = 5.0  # one row entirely tied
    assert torch.equal(rowwise_mask(s, 0.5, backend="cpu"), rowwise_mask_ref(s, 0.5))
    assert torch.equal(rowwise_mask(s, 0.95, backend="cpu"), rowwise_mask_ref(s, 0.95))
    W, norm = torch.rand(2, 2048), torch.ones(2048)
    W[:, _sampled_columns(2048)] = -1e9  # |w| is what counts
    assert torch.equal(wanda_mask(W, norm, 0.5, backend="cpu"), wanda_mask_ref(W, norm, 0.5))


def test_cpu_rowwise_one_very_long_row(ext):
    # a whole-layer mask is one row of numel columns. The sampled columns are huge, so the bracket
    # misses and the rounds start on all the keys. Checked without the sort-based reference (slow
    # at this size): exact count, every pruned score <= every kept one, ties by column.
    cols = 6_000_000
    s = torch.rand(1, cols, generator=torch.Generator().manual_seed(9))
    s[0, _sampled_columns(cols)] = 2.0
    keep = rowwise_mask(s, 0.5, backend="cpu")[0]
    row = s[0]
    assert int((~keep).sum()) == cols // 2
    t = row[~keep].max()
    assert row[keep].min() >= t
    tied = ~keep[row == t]  # pruned copies of the threshold come first in column order
    assert not (tied[1:] & ~tied[:-1]).any()


def test_cpu_nan_sorts_last_like_torch(ext):
    # torch.sort puts every NaN last (in column order, whatever its sign or payload)
    g = torch.Generator().manual_seed(11)
    for cols in (40, 1100):
        s = torch.randn(4, cols, generator=g)
        s[:, ::5] = float("nan")
        s[:, 1::7] = -float("nan")
        s[1, 2::9] = torch.tensor(0x7FC00123, dtype=torch.int32).view(torch.float32)  # another payload
        s[2] = float("nan")
        for sparsity in (0.5, 0.9):
            assert torch.equal(rowwise_mask(s, sparsity, backend="cpu"), rowwise_mask_ref(s, sparsity))
        assert torch.equal(nm_mask(s, 2, 4, backend="cpu"), nm_mask_ref(s, 2, 4))
        W, norm = torch.randn(3, cols, generator=g), torch.rand(cols, generator=g)
        W[0, ::3] = float("nan")
        norm[1::4] = float("nan")
        norm[2::6] = -1.0  # sqrt of a negative norm is NaN too
        assert torch.equal(wanda_mask(W, norm, 0.5, backend="cpu"), wanda_mask_ref(W, norm, 0.5))
        assert torch.equal(wanda_mask(W, norm, n=2, m=4, backend="cpu"), wanda_mask_ref(W, norm, n=2, m=4))


@requires_triton
def test_triton_nan_sorts_last_like_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(12)
    s = torch.randn(3, 40, generator=g)
    s[:, ::5] = float("nan")
    s[:, 1::7] = -float("nan")
    s[2] = float("nan")
    assert torch.equal(rowwise_mask(s, 0.5, backend="triton"), rowwise_mask_ref(s, 0.5))
    assert torch.equal(nm_mask(s, 2, 4, backend="triton"), nm_mask_ref(s, 2, 4))
    W, norm = torch.randn(3, 40, generator=g), torch.rand(40, generator=g)
    W[0, ::3] = -float("nan")
    norm[1::4] = float("nan")
    assert torch.equal(wanda_mask(W, norm, 0.5, backend="triton"), wanda_mask_ref(W, norm, 0.5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_wanda_rowwise_ties(ext, dtype):
    # quantized weights and equal norms: long runs of equal scores around the threshold, settled
    # by column order; and norms of zero make whole columns tie at 0
    g = torch.Generator().manual_seed(4)
    W = (torch.randint(-3, 4, (6, 4100), generator=g) / 4).to(dtype)
    norm = torch.ones(4100)
    norm[::10] = 0.0
    for sparsity in (0.3, 0.5, 0.77):
        assert torch.equal(wanda_mask(W, norm, sparsity, backend="cpu"), wanda_mask_ref(W, norm, sparsity))


def test_cpu_extreme_values(ext):
    s = torch.tensor([[float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38] * 200])
    assert torch.equal(rowwise_mask(s, 0.5, backend="cpu"), rowwise_mask_ref(s, 0.5))
    assert torch.equal(nm_mask(s, 2, 4, backend="cpu"), nm_mask_ref(s, 2, 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 1), (4, 13), (3, 1030)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_cpu_wanda_rowwise_matches_ref(ext, rows, cols, dtype, sparsity):
    W, norm = _scores(rows, cols, dtype, ties=False), torch.rand(cols) * 3
    assert torch.equal(wanda_mask(W, norm, sparsity, backend="cpu"), wanda_mask_ref(W, norm, sparsity))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,n,m", [(1, 8, 2, 4), (4, 24, 3, 8), (3, 1040, 2, 4), (3, 1040, 3, 8)])
def test_cpu_wanda_nm_matches_ref(ext, rows, cols, dtype, n, m):
    W, norm = _scores(rows, cols, dtype, ties=False), torch.rand(cols) * 3
    assert torch.equal(wanda_mask(W, norm, n=n, m=m, backend="cpu"), wanda_mask_ref(W, norm, n=n, m=m))


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rowwise_matches_ref(dtype):
    for rows, cols in [(1, 1), (2, 13), (2, 1030)]:
        s = _scores(rows, cols, dtype)
        for sparsity in (0.3, 0.5):
            assert torch.equal(rowwise_mask(s, sparsity, backend="triton"), rowwise_mask_ref(s, sparsity))


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (2, 5)])
def test_triton_nm_matches_ref(dtype, n, m):
    s = _scores(9, 120, dtype)
    assert torch.equal(nm_mask(s, n, m, backend="triton"), nm_mask_ref(s, n, m))


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_wanda_mask_matches_ref(dtype):
    W, norm = _scores(3, 40, dtype, ties=False), torch.rand(40)
    assert torch.equal(wanda_mask(W, norm, 0.5, backend="triton"), wanda_mask_ref(W, norm, 0.5))
    assert torch.equal(wanda_mask(W, norm, n=2, m=4, backend="triton"), wanda_mask_ref(W, norm, n=2, m=4))


@pytest.mark.parametrize("backend", ["ref", "cpu", pytest.param("triton", marks=requires_triton)])
def test_strided_views_and_leading_dims(backend):
    if backend == "cpu" and not _has_cpu():
        pytest.skip("C++ extension not built")
    base = _scores(8, 96, torch.float32)
    s = base[:, ::2]  # non-unit column stride
    assert torch.equal(rowwise_mask(s, 0.5, backend=backend), rowwise_mask_ref(s.contiguous(), 0.5))
    s3 = base.reshape(2, 4, 96)
    assert torch.equal(nm_mask(s3, 2, 4, backend=backend), nm_mask_ref(s3, 2, 4))
    W = base[:4, :12].t()  # [12, 4] transposed view (few rows: the interpreter runs one program per row)
    norm = torch.rand(4)
    assert torch.equal(wanda_mask(W, norm, 0.5, backend=backend), wanda_mask_ref(W.contiguous(), norm, 0.5))


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_pruning_twice_changes_nothing(backend):
    if backend == "cpu" and not _has_cpu():
        pytest.skip("C++ extension not built")
    s = torch.rand(4, 64) + 0.1
    keep = rowwise_mask(s, 0.5, backend=backend)
    assert torch.equal(rowwise_mask(s * keep, 0.5, backend=backend), keep)
    keep = nm_mask(s, 2, 4, backend=backend)
    assert torch.equal(nm_mask(s * keep, 2, 4, backend=backend), keep)


def test_bad_input_is_one_clear_error():
    s = torch.rand(4, 10)
    with pytest.raises(LmsqueezeError, match="sparsity 1.0 is out of range"):
        rowwise_mask(s, 1.0)
    with pytest.raises(LmsqueezeError, match="sparsity -0.1 is out of range"):
        wanda_mask(s, torch.rand(10), -0.1)
    with pytest.raises(LmsqueezeError, match="multiple of 4"):
        nm_mask(s, 2, 4)
    with pytest.raises(LmsqueezeError, match="N:M pattern 4:4 is invalid"):
        nm_mask(torch.rand(4, 8), 4, 4)
    with pytest.raises(LmsqueezeError, match="either sparsity or n and m"):
        wanda_mask(s, torch.rand(10), 0.5, n=2, m=4)
    with pytest.raises(LmsqueezeError, match="either sparsity or n and m"):
        wanda_mask(s, torch.rand(10))
    with pytest.raises(LmsqueezeError, match="col_sq_norm has shape"):
        wanda_mask(s, torch.rand(9), 0.5)
    with pytest.raises(LmsqueezeError, match="2-D"):
        rowwise_mask(torch.rand(10), 0.5)
    with pytest.raises(LmsqueezeError, match="has no 'cuda' backend"):
        nm_mask(torch.rand(4, 8), 2, 4, backend="cuda")


    with pytest.raises(LmsqueezeError, match=r"out must be a contiguous bool tensor of shape \(4, 10\)"):
        rowwise_mask(s, 0.5, out=torch.empty(4, 10, dtype=torch.uint8))
    with pytest.raises(LmsqueezeError, match="out must be a contiguous bool tensor"):
        wanda_mask(s, torch.rand(10), 0.5, out=torch.empty(10, 4, dtype=torch.bool).T)


def test_cpu_rowwise_few_distinct_values(ext):
    # quantized weights: a handful of levels, so the k-th key sits in a long run of equal keys and
    # the partition's "equal to the pivot" branch settles the row by column order
    g = torch.Generator().manual_seed(3)
    s = torch.randint(0, 8, (5, 4100), generator=g).float()
    s[4] = torch.randint(0, 2, (4100,), generator=g).float()
    for sparsity in (0.3, 0.5, 0.77):
        assert torch.equal(rowwise_mask(s, sparsity, backend="cpu"), rowwise_mask_ref(s, sparsity))


@pytest.mark.parametrize("backend", ["ref", "cpu", pytest.param("triton", marks=requires_triton)])
def test_out_is_written_and_returned(backend, monkeypatch, request):
    if backend == "cpu":
        request.getfixturevalue("ext")  # skips, with the build error, where the extension is missing
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    W = _scores(3, 1040, torch.bfloat16, seed=5, ties=False)
    norm = torch.rand(1040) + 0.1
    s3 = _scores(6, 48, torch.float32, seed=6).reshape(2, 3, 48)
    cases = [
        (lambda out: rowwise_mask(W.float(), 0.5, backend=backend, out=out), rowwise_mask_ref(W.float(), 0.5)),
        (lambda out: nm_mask(s3, 2, 4, backend=backend, out=out), nm_mask_ref(s3, 2, 4)),
        (lambda out: wanda_mask(W, norm, 0.6, backend=backend, out=out), wanda_mask_ref(W, norm, 0.6)),
        (lambda out: wanda_mask(W, norm, n=2, m=4, backend=backend, out=out), wanda_mask_ref(W, norm, n=2, m=4)),
    ]
    for run, expected in cases:
        out = torch.rand(expected.shape) < 0.5  # stale contents that must all be overwritten
        got = run(out)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(out, expected)


_COMPILE_MASKS = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lmsqueeze.kernels.triton.masks import _nm_kernel, _rowwise_kernel
common = {"x_ptr": "*bf16", "sq_ptr": "*fp32", "keep_ptr": "*u8"}
sig = {**common, "cols": "i32", "k": "i32", "stride_r": "i32", "stride_c": "i32", "stride_kr": "i32",
       "HAS_SQ": "constexpr", "BLOCK_C": "constexpr"}
triton.compile(ASTSource(fn=_rowwise_kernel, signature=sig, constexprs={"HAS_SQ": True, "BLOCK_C": 1024}),
               target=GPUTarget("cuda", 90, 32))
sig = {**common, "groups": "i32", "groups_per_row": "i32", "stride_r": "i32", "stride_c": "i32",
       "stride_kr": "i32", "N": "constexpr", "M": "constexpr", "MP": "constexpr", "HAS_SQ": "constexpr",
       "BLOCK_G": "constexpr"}
consts = {"N": 2, "M": 4, "MP": 4, "HAS_SQ": True, "BLOCK_G": 64}
triton.compile(ASTSource(fn=_nm_kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
"""


@requires_triton
def test_triton_gpu_paths_compile_for_sm90():
    # the fused Wanda row-wise and 2:4 kernels compiled to PTX (triton's bundled ptxas, no GPU needed),
    # in a process without TRITON_INTERPRET
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_MASKS], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
