import pytest
import torch
import torch.nn.functional as F

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels import nm_mask
from lmsqueeze.kernels import sparse24 as s24
from lmsqueeze.kernels.sparse24 import compress, decompress, sparse24_matmul, sparse24_matmul_ref
from lmsqueeze.testing import assert_close
from tests.conftest import requires_triton

# One tolerance per dtype: the fast paths and the reference both sum in fp32 (order differs) and
# round once to the output dtype, so they may differ by one ulp of it (rtol) plus fp32 order noise
# relative to the output's scale (atol * max|expected|).
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 2 ** -7), torch.float16: (1e-4, 2 ** -10)}
# (rows of x, out, in): a single row, odd sizes, widths that are not multiples of the 64-column chunk
SHAPES = [(1, 1, 16), (1, 13, 48), (3, 7, 80), (5, 33, 112), (13, 257, 1536), (16, 64, 4096), (17, 9, 128),
          (1, 769, 784), (40, 19, 208)]


def pruned(out, cols, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g)
    return (W * nm_mask(W.abs(), 2, 4)).to(dtype)


def inputs(rows, out, cols, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    W = pruned(out, cols, dtype, seed)
    x = torch.randn(rows, cols, generator=g).to(dtype)
    b = torch.randn(out, generator=g).to(dtype)
    return x, W, b


def check(backend, rows, out, cols, dtype, with_bias=True):
    x, W, b = inputs(rows, out, cols, dtype)
    values, meta = compress(W)
    bias = b if with_bias else None
    y = sparse24_matmul(x, values, meta, bias, backend=backend)
    expected = F.linear(x.float(), W.float(), None if bias is None else bias.float()).to(dtype)  # dense-with-zeros
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (rows, out)
    assert_close(y, expected, atol=atol * float(expected.float().abs().max()), rtol=rtol,
                 name=f"{backend} {dtype} {rows}x{cols} -> {out}")


# ---- format ---------------------------------------------------------------------------------------
def test_hand_computed_layout():
    # one row, 16 columns: groups keep (0,1), (1,3), (0,2), (2,3)
    W = torch.tensor([[1., 2., 0., 0., 0., 3., 0., 4., 5., 0., 6., 0., 0., 0., 7., 8.]])
    values, meta = compress(W)
    assert values.tolist() == [[1., 2., 3., 4., 5., 6., 7., 8.]]
    codes = [0 | 1 << 2, 1 | 3 << 2, 0 | 2 << 2, 2 | 3 << 2]  # i0 low 2 bits, i1 high 2 bits
    word = sum(c << (4 * k) for k, c in enumerate(codes))
    assert word == 0xE8D4 and meta.dtype == torch.int16
    assert meta.tolist() == [[word - 65536]]  # bit 15 set: stored as a negative int16


def test_fewer_than_two_nonzeros_round_trip():
    W = torch.zeros(2, 16)
    W[0, 3] = 5.0  # one non-zero: kept with the lowest zero position
    values, meta = compress(W)
    assert values[0, :2].tolist() == [0.0, 5.0]
    assert torch.equal(decompress(values, meta), W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out,cols", [(1, 16), (13, 48), (257, 784), (64, 4096)])
def test_round_trip_exact(out, cols, dtype):
    W = pruned(out, cols, dtype)
    W[0, :4] = 0  # an all-zero group
    values, meta = compress(W)
    assert values.shape == (out, cols // 2) and values.dtype == dtype
    assert meta.shape == (out, cols // 16) and meta.dtype == torch.int16
    assert torch.equal(decompress(values, meta), W)
    values2, meta2 = compress(decompress(values, meta))  # compress is stable
    assert torch.equal(values2, values) and torch.equal(meta2, meta)


def test_not_24_names_first_bad_group():
    W = pruned(4, 32, torch.float32)
    W[2, 20:23] = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(LmsqueezeError, match=r"row 2, columns 20\.\.23 hold 3 non-zeros"):
        compress(W)
    assert not s24.is_24(W)


def test_bad_width_and_shapes_are_clear():
    with pytest.raises(LmsqueezeError, match="multiple of 16; this weight has 20 columns"):
        compress(torch.zeros(3, 20))
    with pytest.raises(LmsqueezeError, match="must be 2-D"):
        compress(torch.zeros(16))
    values, meta = compress(pruned(8, 32, torch.float32))
    with pytest.raises(LmsqueezeError, match="must equal the weight's input width 32"):
        sparse24_matmul(torch.randn(2, 30), values, meta)
    with pytest.raises(LmsqueezeError, match="x is torch.bfloat16 but the weight values are torch.float32"):
        sparse24_matmul(torch.randn(2, 32, dtype=torch.bfloat16), values, meta)
    with pytest.raises(LmsqueezeError, match="meta must be int16"):
        sparse24_matmul(torch.randn(2, 32), values, meta.int())
    with pytest.raises(LmsqueezeError, match="do not describe a 2:4 weight"):
        sparse24_matmul(torch.randn(2, 32), values, meta[:, :1])
    with pytest.raises(LmsqueezeError, match=r"bias must be \[8\]"):
        sparse24_matmul(torch.randn(2, 32), values, meta, torch.zeros(7))
    with pytest.raises(LmsqueezeError, match="cannot run sparse24_matmul"):
        sparse24_matmul(torch.randn(2, 32), values, meta, backend="cuda")


# ---- matmul ---------------------------------------------------------------------------------------
def test_ref_hand_computed():
    W = torch.tensor([[1., 2., 0., 0., 0., 3., 0., 4., 5., 0., 6., 0., 0., 0., 7., 8.]])
    values, meta = compress(W)
    x = torch.arange(16.0)[None]
    # 1*0 + 2*1 + 3*5 + 4*7 + 5*8 + 6*10 + 7*14 + 8*15 = 363
    assert sparse24_matmul_ref(x, values, meta, torch.tensor([0.5])).tolist() == [[363.5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out,cols", SHAPES)
def test_cpu_matches_dense(ext, rows, out, cols, dtype):
    check("cpu", rows, out, cols, dtype)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_fallback_isas_match_dense(ext, isa, dtype):
    prev = ext.set_isa_cap(isa)
    try:
        assert ext.active_isa() in (isa, "generic")
        for rows, out, cols in [(1, 13, 48), (13, 257, 1536), (6, 19, 208)]:
            check("cpu", rows, out, cols, dtype, with_bias=rows != 6)
    finally:
        ext.set_isa_cap(prev)


def test_cpu_no_bias_leading_dims_and_strided_x(ext):
    _, W, _ = inputs(1, 40, 192, torch.bfloat16)
    values, meta = compress(W)
    base = torch.randn(2, 3, 384, dtype=torch.bfloat16)
    x = base[..., ::2]  # non-unit column stride, leading dims (2, 3)
    y = sparse24_matmul(x, values, meta, backend="cpu")
    assert y.shape == (2, 3, 40)
    expected = F.linear(x.float(), W.float()).to(torch.bfloat16)
    atol, rtol = TOL[torch.bfloat16]
    assert_close(y, expected, atol=atol * float(expected.float().abs().max()), rtol=rtol)
    rows_view = torch.randn(10, 192, dtype=torch.bfloat16)[::3]  # strided rows, unit column stride
    assert_close(sparse24_matmul(rows_view, values, meta, backend="cpu"),
                 sparse24_matmul_ref(rows_view, values, meta), atol=atol * 100, rtol=rtol)


def test_cpu_float16_falls_back_to_ref(ext):
    x, W, b = inputs(3, 8, 32, torch.float16)
    values, meta = compress(W)
    assert torch.equal(sparse24_matmul(x, values, meta, b), sparse24_matmul_ref(x, values, meta, b))
    with pytest.raises(LmsqueezeError, match="float32 and bfloat16"):
        sparse24_matmul(x, values, meta, b, backend="cpu")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,out,cols", [(1, 1, 16), (3, 70, 80), (13, 257, 784), (17, 9, 128)])
def test_triton_matches_dense(rows, out, cols, dtype):
    check("triton", rows, out, cols, dtype, with_bias=out != 70)


def test_ref_fallback_without_extension(monkeypatch):
    from lmsqueeze import _ext

    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "EXT_ERROR", "pretend not built")
    x, W, b = inputs(2, 8, 32, torch.bfloat16)
    values, meta = compress(W)
    assert torch.equal(sparse24_matmul(x, values, meta, b), sparse24_matmul_ref(x, values, meta, b))
    with pytest.raises(LmsqueezeError, match="pretend not built"):
        sparse24_matmul(x, values, meta, b, backend="cpu")


# ---- dense or 2:4 ---------------------------------------------------------------------------------
@pytest.fixture
def fresh_choices():
    s24.clear_sparse24_choices()
    prev = s24.set_sparse24_mode(None)
    yield
    s24.set_sparse24_mode(prev)
    s24.clear_sparse24_choices()


def test_choice_never_picks_slower_sparse(monkeypatch, fresh_choices):
    monkeypatch.delenv("LMSQUEEZE_SPARSE24", raising=False)
    calls = []

    def fake(out, cols, rows, dtype, device):
        calls.append(rows)
        # 2:4 slower at big batches, within the noise margin at 2 rows, clearly faster at 1 row
        sparse = {1: 0.5, 2: 0.97}.get(rows, 1.5)
        return {"dense_s": 1.0, "sparse24_s": sparse, "choice": "sparse24" if sparse <= s24.MARGIN else "dense"}

    monkeypatch.setattr(s24, "measure_sparse24", fake)
    assert s24.choose_sparse24(64, 128, 1, torch.bfloat16, "cpu") == "sparse24"
    assert s24.choose_sparse24(64, 128, 2, torch.bfloat16, "cpu") == "dense"
    assert s24.choose_sparse24(64, 128, 100, torch.bfloat16, "cpu") == "dense"
    assert s24.choose_sparse24(64, 128, 99, torch.bfloat16, "cpu") == "dense"  # same bucket: no new measurement
    assert calls == [1, 2, 128]
    assert set(s24.sparse24_choices()) == {(64, 128, b, torch.bfloat16, "cpu") for b in (1, 2, 128)}


def test_choice_real_measurement_is_consistent(fresh_choices):
    rec = s24.measure_sparse24(64, 256, 4, torch.float32, torch.device("cpu"))
    assert rec["dense_s"] > 0 and rec["sparse24_s"] > 0
    assert (rec["choice"] == "sparse24") == (rec["sparse24_s"] <= s24.MARGIN * rec["dense_s"])


def test_forced_modes(monkeypatch, fresh_choices):
    monkeypatch.setattr(s24, "measure_sparse24", lambda *a: pytest.fail("a forced mode must not measure"))
    s24.set_sparse24_mode("dense")
    assert s24.choose_sparse24(64, 128, 1, torch.float32, "cpu") == "dense"
    s24.set_sparse24_mode(None)
    monkeypatch.setenv("LMSQUEEZE_SPARSE24", "sparse24")
    assert s24.choose_sparse24(64, 128, 1, torch.float32, "cpu") == "sparse24"
    monkeypatch.setenv("LMSQUEEZE_SPARSE24", "fast")
    with pytest.raises(LmsqueezeError, match="LMSQUEEZE_SPARSE24='fast' is not a mode"):
        s24.choose_sparse24(64, 128, 1, torch.float32, "cpu")
    with pytest.raises(LmsqueezeError, match="unknown sparse24 mode 'fast'"):
        s24.set_sparse24_mode("fast")


def test_batch_buckets():
    assert [s24.batch_bucket(n) for n in (1, 2, 3, 4, 5, 16, 17, 255, 256, 10000)] == [1, 2, 4, 4, 8, 16, 32, 256,
                                                                                          256, 256]


def test_semi_structured_conversion_is_guarded():
    """cuSPARSELt/CUTLASS take CUDA tensors only: on anything else the conversion says so in one error."""
    values, meta = compress(pruned(64, 128, torch.bfloat16))
    with pytest.raises(LmsqueezeError, match="semi-structured sparse tensors cannot take this 2:4 weight"):
        s24._semi_weight(values, meta)
