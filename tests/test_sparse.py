import pytest
import torch
from torch import nn

from lmsqueeze import models
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels import nm_mask
from lmsqueeze.kernels import sparse24 as s24
from lmsqueeze.models import load_model
from lmsqueeze.sparse import SparseLinear, load_sparse, sparsify_model
from lmsqueeze.testing import assert_close

# logits of the sparse model against the dense-with-zeros model, per dtype: both sum in fp32 inside
# each matmul, in different orders, and round each layer's output to the dtype; two decoder layers
# and a head compound that to a few ulps (relative to the logits' scale).
LOGIT_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


def prune_24(model: nn.Module, skip=("lm_head",)) -> int:
    n = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod) is nn.Linear and not name.endswith(skip):
                mod.weight.mul_(nm_mask(mod.weight.abs(), 2, 4))
                n += 1
    return n


@pytest.fixture(autouse=True)
def forced_sparse():
    """The kernels are what is tested here, not the timing: force 2:4 (the choice has its own tests)."""
    prev = s24.set_sparse24_mode("sparse24")
    yield
    s24.set_sparse24_mode(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsified_tiny_llama_matches_dense_with_zeros(dtype):
    model, tok = load_model("tiny-llama", dtype=dtype)
    assert prune_24(model) == 14
    ids = torch.tensor([tok.encode("sparse models still talk")])
    with torch.no_grad():
        dense = model(ids).logits.float()
        dense_gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    swapped = sparsify_model(model)
    assert len(swapped) == 14 and "lm_head" not in swapped  # lm_head was not pruned, so it stays dense
    assert isinstance(model.model.layers[0].mlp.down_proj, SparseLinear)
    with torch.no_grad():
        sparse = model(ids).logits.float()
        sparse_gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    atol, rtol = LOGIT_TOL[dtype]
    assert_close(sparse, dense, atol=atol * float(dense.abs().max()), rtol=rtol, name=f"logits {dtype}")
    if dtype == torch.float32:
        assert torch.equal(sparse_gen, dense_gen)
    else:
        assert sparse_gen.shape == dense_gen.shape


def test_sparse_linear_bias_leading_dims_and_dense_choice():
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight.abs(), 2, 4))
    sl = SparseLinear.from_linear(lin)
    assert set(dict(sl.named_buffers())) == {"values", "meta", "bias"}
    assert torch.equal(sl.weight, lin.weight.detach())
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = lin(x)
        assert_close(sl(x), expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)
        s24.set_sparse24_mode("dense")  # the dense fallback path gives the same answer
        assert_close(sl(x), expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)
    assert "format=2:4" in repr(sl)


def test_not_24_raises_and_sparsify_skips():
    lin = nn.Linear(32, 8)
    with pytest.raises(LmsqueezeError, match="weight is not 2:4"):
        SparseLinear.from_linear(lin)
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight.mul_(nm_mask(model[0].weight.abs(), 2, 4))
        model[2].weight.zero_()  # 2:4 but 8 columns: not a multiple of 16, stays dense
    assert sparsify_model(model) == ["0"]
    assert isinstance(model[0], SparseLinear) and type(model[1]) is nn.Linear and type(model[2]) is nn.Linear


def test_load_sparse_from_saved_checkpoint(tmp_path):
    model, tok = load_model("tiny-llama", dtype="fp32")
    prune_24(model)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ids = torch.tensor([tok.encode("hello")])
    with torch.no_grad():
        dense = model(ids).logits
    sparse_model, _, swapped = load_sparse(str(tmp_path), dtype="fp32")
    assert len(swapped) == 14
    with torch.no_grad():
        got = sparse_model(ids).logits
    assert_close(got, dense, atol=1e-4 * float(dense.abs().max()), rtol=1e-4)


def test_load_sparse_rejects_dense_checkpoint(tmp_path):
    model, tok = load_model("tiny-llama", dtype="fp32")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(LmsqueezeError, match="has no 2:4 linear layer"):
        load_sparse(str(tmp_path), dtype="fp32")


def test_conv1d_swaps_and_matches(tmp_path):
    """GPT-2's Conv1D stores W as [in, out]: its 2:4 groups run along the first dimension (issue 16, item 3)."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 64)  # nf=24 outputs, nx=64 inputs; weight [64, 24]
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
        conv.weight.copy_(conv.weight * nm_mask(conv.weight.t().abs(), 2, 4).t())
    model = nn.Sequential(conv)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        expected = model(x)
    assert sparsify_model(model) == ["0"]
    assert isinstance(model[0], SparseLinear) and (model[0].in_features, model[0].out_features) == (64, 24)
    with torch.no_grad():
        assert_close(model(x), expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5, name="conv1d")
    dense_in_wrong_direction = Conv1D(64, 16)  # 2:4 along the outputs only: must stay dense
    with torch.no_grad():
        dense_in_wrong_direction.weight.copy_(torch.randn(16, 64) * nm_mask(torch.rand(16, 64), 2, 4))
    assert sparsify_model(nn.Sequential(dense_in_wrong_direction)) == []


@pytest.mark.parametrize("arch", models.TINY)
def test_every_architecture_compress_24_save_load_sparse_generate(arch, tmp_path):
    """compress 2:4 -> save -> load_sparse -> generate, the same tokens and logits as the dense-with-zeros model."""
    from lmsqueeze.compressor import WandaConfig, compress, save_compressed

    model, tok = load_model(arch, dtype="fp32")
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    report = compress(model, WandaConfig(sparsity="2:4"), calib)
    save_compressed(model, tok, tmp_path / arch, report, model_name=arch)
    ids = torch.tensor([tok.encode("sparse models still talk")])
    with torch.no_grad():
        dense = model(ids).logits
        dense_gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    sparse_model, _, swapped = load_sparse(str(tmp_path / arch), dtype="fp32")
    assert set(swapped) == {r.name for r in report.modules}  # every module the compressor pruned
    with torch.no_grad():
        got = sparse_model(ids).logits
        gen = sparse_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert_close(got, dense, atol=1e-4 * float(dense.abs().max()), rtol=1e-4, name=f"{arch} logits")
    assert torch.equal(gen, dense_gen)
