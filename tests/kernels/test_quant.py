import pytest
import torch
import torch.nn.functional as F

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels import nm_mask
from lmsqueeze.kernels.obs import QuantSpec, quantize_rtn
from lmsqueeze.kernels.quant import (
    QuantWeight,
    Sparse24QuantWeight,
    dequantize,
    int8_act_applies,
    pack_codes,
    quant_grid,
    quant_matmul,
    quant_matmul_ref,
    quant_pack,
    quant_pack_codes,
    quantize_act_int8,
    sparse24_quant_matmul,
    sparse24_quant_matmul_ref,
    sparse24_quant_pack,
    sparse24_quant_pack_codes,
    unpack_codes,
)
from lmsqueeze.testing import assert_close
from tests.conftest import requires_triton

# One tolerance per dtype (atol relative to max|expected|, rtol): fast paths and the reference both
# sum in fp32 in a different order and round once to the output dtype (one ulp of it).
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (1e-4, 2 ** -7)}
# (rows of x, out, in, group_size): a single row, odd sizes, groups that do not divide the width,
# widths that are not multiples of the 32-column chunk, batches on both sides of the 16-row GEMV limit
SHAPES = [(1, 1, 64, 32), (1, 13, 64, 48), (3, 257, 192, 128), (16, 33, 576, 128), (17, 13, 576, 128),
          (1, 19, 200, 64), (5, 7, 40, 40), (3, 9, 80, 17)]


def weight(out, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, cols, generator=g)


def act_order(cols, gs, seed=1):
    """GPTQ act-order g_idx: a random column order, groups of gs consecutive columns in that order."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(cols, generator=g)
    g_idx = torch.empty(cols, dtype=torch.int32)
    g_idx[perm] = (torch.arange(cols) // gs).to(torch.int32)
    return g_idx


def check(y, x, W_ref, bias, dtype, name):
    """Compare y with x @ W_ref.T + bias computed in fp32 and rounded to dtype."""
    expected = F.linear(x.float(), W_ref.float(), None if bias is None else bias.float()).to(dtype)
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and y.shape == expected.shape, (y.dtype, y.shape)
    assert_close(y, expected, atol=atol * float(expected.float().abs().max()), rtol=rtol, name=name)


# ---- format ---------------------------------------------------------------------------------------
def test_hand_packed_words():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 9]])
    words = pack_codes(codes, 4)
    assert words.dtype == torch.int32 and words.shape == (1, 2)
    assert words[0, 0].item() & 0xFFFFFFFF == 0xF7654321
    assert words[0, 1].item() == 9  # padded with zero codes
    assert pack_codes(torch.tensor([[0x11, 0x22, 0x33, 0xFF]]), 8).tolist() == [[0xFF332211 - 2 ** 32]]
    assert torch.equal(unpack_codes(words, 4, 9), codes)


def test_hand_computed_grid():
    # one row, two groups of 4: asymmetric grid [min(w, 0), max(w, 0)] over 15 levels
    W = torch.tensor([[0.0, 1.5, 3.0, -1.5, 2.0, 2.0, 2.0, 2.0]])
    p = quant_pack(W, bits=4, group_size=4)
    assert torch.allclose(p.scales, torch.tensor([[0.3, 2 / 15]]))
    assert p.zeros.tolist() == [[5, 0]]
    assert unpack_codes(p.qweight, 4, 8).tolist() == [[5, 10, 15, 0, 15, 15, 15, 15]]
    assert torch.allclose(dequantize(p), W)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("cols,gs", [(64, 32), (576, 128), (200, 64), (40, -1)])
def test_pack_matches_rtn(bits, sym, cols, gs):
    W = weight(13, cols)
    p = quant_pack(W, bits=bits, group_size=gs, sym=sym)
    assert p.qweight.shape == (13, -(-cols * bits // 32)) and p.scales.shape == (13, -(-cols // p.group_size))
    assert torch.equal(dequantize(p), quantize_rtn(W, QuantSpec(bits=bits, group_size=gs, sym=sym)))
    if sym:
        assert (p.zeros == 2 ** (bits - 1)).all()


def test_pack_codes_keeps_the_solved_grid():
    W = weight(7, 96)
    codes, scales, zeros = quant_grid(W, 4, 32, False)
    scales = scales.to(torch.bfloat16)  # a checkpoint's scales: kept exactly, never re-rounded
    p = quant_pack_codes(codes, scales, zeros, bits=4, group_size=32)
    assert torch.equal(unpack_codes(p.qweight, 4, 96), codes)
    grp = torch.arange(96) // 32
    assert torch.equal(dequantize(p), scales.float()[:, grp] * (codes - zeros[:, grp]).float())


def test_act_order_layout():
    cols, gs = 192, 64
    W = weight(5, cols)
    g_idx = act_order(cols, gs)
    p = quant_pack(W, bits=4, group_size=gs, g_idx=g_idx)
    assert p.perm is not None and torch.equal(g_idx[p.perm].long(), torch.arange(cols) // gs)
    # each group's grid is computed over its own (scattered) columns
    Wq = dequantize(p)
    for g in range(3):
        cols_g = (g_idx == g).nonzero().flatten()
        assert torch.equal(Wq[:, cols_g], quantize_rtn(W[:, cols_g], QuantSpec(bits=4, group_size=-1)))
    # the same grid handed in as codes round-trips exactly
    codes = torch.empty(5, cols, dtype=torch.int64)
    codes[:, p.perm] = unpack_codes(p.qweight, 4, cols)
    p2 = quant_pack_codes(codes, p.scales, p.zeros, 4, gs, g_idx=g_idx)
    assert torch.equal(p2.qweight, p.qweight) and torch.equal(dequantize(p2), Wq)


# ---- matmul against the reference -----------------------------------------------------------------
def _inputs(rows, out, cols, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randn(rows, cols, generator=g).to(dtype), torch.randn(out, generator=g).to(dtype)


def _w_ref(p, rows, dtype):
    # above 16 rows the CPU kernel runs the dense GEMM on the weight dequantized into x's dtype
    Wq = dequantize(p)
    return Wq.to(dtype).float() if rows > 16 else Wq


def _x_seen(x, p, act):
    """x as the CPU kernel multiplies it: rounded to int8 blocks where act="int8" applies (else x itself)."""
    x2 = x.reshape(-1, x.shape[-1])
    if act == "int8" and int8_act_applies(p, x2.shape[0]):
        return quantize_act_int8(x2.float(), getattr(p, "perm", None)).reshape(x.shape)
    return x


@pytest.mark.parametrize("act", ["fp32", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows,out,cols,gs", SHAPES + [(2, 11, 128, 64), (5, 70, 320, -1)])
def test_cpu_matches_reference(ext, rows, out, cols, gs, bits, dtype, act):
    p = quant_pack(weight(out, cols), bits=bits, group_size=gs, sym=bits == 8)
    x, b = _inputs(rows, out, cols, dtype)
    y = quant_matmul(x, p, b, backend="cpu", act=act)
    check(y, _x_seen(x, p, act), _w_ref(p, rows, dtype), b, dtype,
          f"cpu {bits}-bit {dtype} {rows}x{cols}->{out} g{gs} act {act}")
    assert torch.equal(quant_matmul(x, p, b, backend="ref"), quant_matmul_ref(x, p, b))


@pytest.mark.parametrize("act", ["fp32", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16, 17])
def test_cpu_act_order(ext, rows, dtype, act):
    cols, gs = 576, 128
    p = quant_pack(weight(29, cols), bits=4, group_size=gs, g_idx=act_order(cols, gs))
    x, b = _inputs(rows, 29, cols, dtype)
    check(quant_matmul(x, p, b, backend="cpu", act=act), _x_seen(x, p, act), _w_ref(p, rows, dtype), b, dtype,
          f"act-order {rows} rows act {act}")


# ---- int8 activations -----------------------------------------------------------------------------
def test_quantize_act_int8_hand_computed():
    # one block of 32: max |x| = 2.54 -> d = 0.02; 0.03 / 0.02 = 1.5 rounds half to even (2), -0.05 -> -2.5 -> -2
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([2.54, 0.03, -0.05, 0.011])
    xh = quantize_act_int8(x)
    d = torch.tensor(2.54) / 127
    assert torch.equal(xh[0, :4], torch.tensor([127.0, 2.0, -2.0, 1.0]) * d)
    assert torch.equal(xh[0, 4:], torch.zeros(28))
    # an all-zero block stays zero; blocks are independent; a permutation blocks the packed order
    x2 = torch.cat([torch.zeros(1, 32), torch.full((1, 32), 3.0)], 1)
    assert torch.equal(quantize_act_int8(x2), x2)
    perm = torch.arange(64).flip(0)
    assert torch.equal(quantize_act_int8(x2, perm), x2)
    with pytest.raises(LmsqueezeError, match="in=40 is not a multiple"):
        quantize_act_int8(torch.randn(1, 40))


def test_int8_act_changes_the_result_and_stays_close(ext):
    # the int8 path must really run (its result differs from the exact one) and stay within 1% of it
    for make, mm in [(lambda: quant_pack(weight(300, 576), group_size=128), quant_matmul),
                     (lambda: sparse24_quant_pack(pruned(300, 576), group_size=128), sparse24_quant_matmul)]:
        p = make()
        x = torch.randn(3, 576)
        assert int8_act_applies(p, 3) and not int8_act_applies(p, 17)
        y8, y32 = mm(x, p, backend="cpu", act="int8"), mm(x, p, backend="cpu", act="fp32")
        assert not torch.equal(y8, y32)
        assert float((y8 - y32).norm() / y32.norm()) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_act_default_and_env(ext, monkeypatch, dtype):
    p = quant_pack(weight(40, 128), group_size=64)
    x, _ = _inputs(2, 40, 128, dtype)
    y8 = quant_matmul(x, p, backend="cpu", act="int8")
    assert torch.equal(quant_matmul(x, p, backend="cpu"), y8)           # default: int8
    monkeypatch.setenv("LMSQUEEZE_QUANT_ACT", "fp32")
    assert torch.equal(quant_matmul(x, p, backend="cpu"), quant_matmul(x, p, backend="cpu", act="fp32"))
    monkeypatch.setenv("LMSQUEEZE_QUANT_ACT", "int4")
    with pytest.raises(LmsqueezeError, match="LMSQUEEZE_QUANT_ACT='int4'.*valid: fp32, int8"):
        quant_matmul(x, p, backend="cpu")
    with pytest.raises(LmsqueezeError, match="act='fp16'"):
        quant_matmul(x, p, act="fp16")


@pytest.mark.parametrize("isa", ["avx2", "generic"])
@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_fallback_isas(ext, isa, bits):
    prev = ext.set_isa_cap(isa)
    try:
        for rows, out, cols, gs in [(1, 13, 200, 64), (5, 33, 576, 128), (3, 9, 80, 17)]:
            p = quant_pack(weight(out, cols), bits=bits, group_size=gs)
            x, b = _inputs(rows, out, cols, torch.float32)
            check(quant_matmul(x, p, b, backend="cpu"), _x_seen(x, p, "int8"), dequantize(p), b, torch.float32,
                  f"{isa} {bits}-bit")
            p24 = sparse24_quant_pack(pruned(out, 576 if cols % 16 else cols), group_size=64)
            x, b = _inputs(rows, out, p24.in_features, torch.float32)
            check(sparse24_quant_matmul(x, p24, b, backend="cpu"), _x_seen(x, p24, "int8"), dequantize(p24), b,
                  torch.float32, f"{isa} 2:4")
    finally:
        ext.set_isa_cap(prev)


def test_strided_x_and_leading_dims(ext):
    p = quant_pack(weight(21, 128), bits=4, group_size=64)
    x = torch.randn(6, 256)[:, ::2]  # a strided view
    check(quant_matmul(x, p, backend="cpu"), _x_seen(x, p, "int8"), dequantize(p), None, torch.float32, "strided")
    x3 = torch.randn(2, 3, 128)
    y = quant_matmul(x3, p, backend="cpu")
    assert y.shape == (2, 3, 21)
    check(y.reshape(6, 21), _x_seen(x3.reshape(6, 128), p, "int8"), dequantize(p), None, torch.float32, "3-D x")


# ---- 2:4 + 4-bit ----------------------------------------------------------------------------------
def pruned(out, cols, seed=0):
    W = weight(out, cols, seed)
    return W * nm_mask(W.abs(), 2, 4)


@pytest.mark.parametrize("cols,gs", [(64, 32), (576, 128), (208, 64), (48, -1)])
def test_sparse24_pack_is_rtn_on_dense_with_zeros(cols, gs):
    W = pruned(13, cols)
    W[0, :4] = 0  # an all-zero group of 4
    p = sparse24_quant_pack(W, group_size=gs)
    Wq = dequantize(p)
    assert torch.equal(Wq, quantize_rtn(W, QuantSpec(bits=4, group_size=gs)))
    assert torch.equal(Wq == 0, (Wq == 0) | (W == 0)) and ((Wq.reshape(13, -1, 4) != 0).sum(-1) <= 2).all()
    ngroups = -(-cols // p.group_size)
    assert p.nbytes() == 13 * (cols // 16 * 4 + cols // 16 * 2 + ngroups * 5)  # codes + meta + fp32 scale, u8 zero


def test_sparse24_pack_codes_round_trip():
    W = pruned(9, 128)
    p = sparse24_quant_pack(W, group_size=64)
    codes, scales, zeros = quant_grid(W, 4, 64, False)
    p2 = sparse24_quant_pack_codes(codes, scales, zeros, 4, 64)
    # the same weight; a kept value that rounds to 0 may be stored at another position of its group
    assert torch.equal(dequantize(p2), dequantize(p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out,cols,gs", [(1, 1, 64, 64), (1, 13, 64, 32), (3, 257, 192, 128),
                                              (16, 33, 576, 128), (17, 13, 576, 128), (5, 7, 208, 48),
                                              (7, 19, 320, -1), (4, 5, 1536, 64)])
@pytest.mark.parametrize("act", ["fp32", "int8"])
def test_sparse24_cpu_matches_reference(ext, rows, out, cols, gs, dtype, act):
    p = sparse24_quant_pack(pruned(out, cols), group_size=gs, sym=gs == 48)
    x, b = _inputs(rows, out, cols, dtype)
    y = sparse24_quant_matmul(x, p, b, backend="cpu", act=act)
    check(y, _x_seen(x, p, act), _w_ref(p, rows, dtype), b, dtype,
          f"2:4+4-bit cpu {dtype} {rows}x{cols}->{out} g{gs} act {act}")
    assert torch.equal(sparse24_quant_matmul(x, p, b, backend="ref"), sparse24_quant_matmul_ref(x, p, b))


# ---- Triton (interpreter on CPU: small shapes) ------------------------------------------------------
@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out,cols,gs,bits,order", [(1, 13, 64, 48, 4, False), (3, 70, 192, 128, 4, True),
                                                         (17, 9, 80, 32, 8, False)])
def test_triton_matches_reference(rows, out, cols, gs, bits, order, dtype):
    g_idx = act_order(cols, gs) if order else None
    p = quant_pack(weight(out, cols), bits=bits, group_size=gs, g_idx=g_idx)
    x, b = _inputs(rows, out, cols, dtype)
    check(quant_matmul(x, p, b, backend="triton"), x, dequantize(p), b, dtype, f"triton {bits}-bit {dtype}")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out,cols,gs", [(1, 13, 64, 32), (3, 70, 208, 128)])
def test_triton_sparse24_matches_reference(rows, out, cols, gs, dtype):
    p = sparse24_quant_pack(pruned(out, cols), group_size=gs)
    x, b = _inputs(rows, out, cols, dtype)
    check(sparse24_quant_matmul(x, p, b, backend="triton"), x, dequantize(p), b, dtype, f"triton 2:4 {dtype}")


# ---- bad input --------------------------------------------------------------------------------------
def test_bad_input_is_named():
    W = weight(8, 64)
    with pytest.raises(LmsqueezeError, match="bits=3"):
        quant_pack(W, bits=3)
    with pytest.raises(LmsqueezeError, match="group_size=0"):
        quant_pack(W, group_size=0)
    with pytest.raises(LmsqueezeError, match="2-D"):
        quant_pack(W[0])
    bad_gidx = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(LmsqueezeError, match="columns in group 0"):
        quant_pack(W, group_size=32, g_idx=bad_gidx)
    with pytest.raises(LmsqueezeError, match=r"g_idx must be an integer tensor \[in=64\]"):
        quant_pack(W, group_size=32, g_idx=torch.zeros(63, dtype=torch.int32))
    codes, scales, zeros = quant_grid(W, 4, 32, False)
    with pytest.raises(LmsqueezeError, match=r"codes must lie in \[0, 15\]"):
        quant_pack_codes(codes + 16, scales, zeros, 4, 32)
    with pytest.raises(LmsqueezeError, match="ngroups=2"):
        quant_pack_codes(codes, scales[:, :1], zeros[:, :1], 4, 32)
    with pytest.raises(LmsqueezeError, match="zeros must be integers"):
        quant_pack_codes(codes, scales, zeros + 0.5, 4, 32)
    p = quant_pack(W, group_size=32)
    with pytest.raises(LmsqueezeError, match="input width 64"):
        quant_matmul(torch.randn(2, 63), p)
    wrong = QuantWeight(p.qweight[:, :-1], p.scales, p.zeros, None, None, p.shape, 4, 32, False)
    with pytest.raises(LmsqueezeError, match=r"qweight must be int32 \[out=8, ceil\(in\*bits/32\)=8\]"):
        quant_matmul(torch.randn(2, 64), wrong)
    wrong_bits = QuantWeight(p.qweight, p.scales, p.zeros, None, None, p.shape, 8, 32, False)
    with pytest.raises(LmsqueezeError, match="qweight must be int32"):
        dequantize(wrong_bits)
    with pytest.raises(LmsqueezeError, match="bias must be"):
        quant_matmul(torch.randn(2, 64), p, torch.zeros(7))
    with pytest.raises(LmsqueezeError, match="not 2:4"):
        sparse24_quant_pack(W)
    with pytest.raises(LmsqueezeError, match="multiple of 16"):
        sparse24_quant_pack(pruned(4, 64), group_size=24)
    with pytest.raises(LmsqueezeError, match="valid: 4"):
        sparse24_quant_pack(pruned(4, 64), bits=8)
    p24 = sparse24_quant_pack(pruned(4, 64), group_size=32)
    bad = Sparse24QuantWeight(p24.qvalues, p24.meta.to(torch.int32), p24.scales, p24.zeros, p24.shape, 4, 32, False)
    with pytest.raises(LmsqueezeError, match="meta must be int16"):
        sparse24_quant_matmul(torch.randn(1, 64), bad)
    with pytest.raises(LmsqueezeError, match="has no 'cuda'|unknown backend"):
        quant_matmul(torch.randn(1, 64), p, backend="nope")


def test_cpu_kernel_checks_its_operands(ext):
    p = quant_pack(weight(8, 64), group_size=32)
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        ext.quant_matmul_cpu(x, p.qweight, p.scales, p.zeros, None, 64, 3, 32, None)
    with pytest.raises(RuntimeError, match="does not hold 4-bit codes of 72 columns"):
        ext.quant_matmul_cpu(x, p.qweight, p.scales, p.zeros, None, 72, 4, 32, None)
    with pytest.raises(RuntimeError, match="zeros must be a contiguous uint8"):
        ext.quant_matmul_cpu(x, p.qweight, p.scales, p.zeros.to(torch.int32), None, 64, 4, 32, None)
    with pytest.raises(RuntimeError, match="perm values"):
        ext.quant_matmul_cpu(x, p.qweight, p.scales, p.zeros, torch.full((64,), 64), 64, 4, 32, None)
    with pytest.raises(RuntimeError, match="int8 activations need 4-bit codes, in and group_size multiples of 64"):
        ext.quant_matmul_cpu(x, p.qweight, p.scales, p.zeros, None, 64, 4, 32, None, True)
