import copy

import pytest
import torch
from torch import nn

from lmsqueeze import qlinear
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels import nm_mask
from lmsqueeze.kernels.quant import dequantize, quant_pack, sparse24_quant_pack
from lmsqueeze.models import load_model
from lmsqueeze.qlinear import (
    QuantLinear,
    Sparse24QuantLinear,
    fake_quantize_model,
    quantize_model,
    set_quant_mode,
    swap_packed,
)
from lmsqueeze.testing import assert_close

# logits of the packed model against its fake-quantized dense model (same dtype): both sum in fp32
# inside each matmul, in different orders, and round each layer's output to the dtype; two decoder
# layers and a head compound that to a few ulps (relative to the logits' scale), as in test_sparse.
LOGIT_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


@pytest.fixture(autouse=True)
def forced_packed():
    """The kernels are what is tested here, not the timing: force the packed path (the choice has its own test)."""
    prev = set_quant_mode("packed")
    yield
    set_quant_mode(prev)


def prune_24(model: nn.Module) -> None:
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod) is nn.Linear and name != "lm_head":
                mod.weight.mul_(nm_mask(mod.weight.abs(), 2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["4-bit g32", "8-bit g48 sym", "2:4 + 4-bit g32"])
def test_packed_tiny_llama_matches_fake_quantized(form, dtype):
    model, tok = load_model("tiny-llama", dtype=dtype)
    bits, gs = (8, 48) if form.startswith("8") else (4, 32)
    if form.startswith("2:4"):
        prune_24(model)
    swapped = quantize_model(model, bits=bits, group_size=gs, sym="sym" in form, sparse24=form.startswith("2:4"))
    assert len(swapped) == 14 and "lm_head" not in swapped
    kind = Sparse24QuantLinear if form.startswith("2:4") else QuantLinear
    assert isinstance(model.model.layers[0].mlp.down_proj, kind)
    reference = copy.deepcopy(model)
    assert len(fake_quantize_model(reference)) == 14
    ids = torch.tensor([tok.encode("packed models still talk")])
    with torch.no_grad():
        got = model(ids).logits.float()
        expected = reference(ids).logits.float()
        gen = model.generate(ids, max_new_tokens=6, do_sample=False)
        ref_gen = reference.generate(ids, max_new_tokens=6, do_sample=False)
    atol, rtol = LOGIT_TOL[dtype]
    assert_close(got, expected, atol=atol * float(expected.abs().max()), rtol=rtol, name=f"{form} {dtype}")
    if dtype == torch.float32:
        assert torch.equal(gen, ref_gen)
    else:
        assert gen.shape == ref_gen.shape


def test_module_buffers_bias_dense_choice_and_repr():
    lin = nn.Linear(96, 24)
    ql = QuantLinear.from_linear(lin, bits=4, group_size=64)
    assert set(dict(ql.named_buffers())) == {"qweight", "scales", "zeros", "bias"}
    Wq = dequantize(quant_pack(lin.weight.detach(), bits=4, group_size=64))
    assert torch.equal(ql.weight, Wq)
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, Wq, lin.bias)
        assert_close(ql(x), expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)
        set_quant_mode("dense")  # the dense fallback gives the same answer
        assert_close(ql(x), expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)
    assert "quant 4-bit g64" in repr(ql)


def test_auto_choice_is_measured_once_per_bucket():
    set_quant_mode("auto")
    qlinear.clear_quant_choices()
    ql = QuantLinear.from_linear(nn.Linear(128, 64), bits=4, group_size=128)
    with torch.no_grad():
        ql(torch.randn(1, 128))
        ql(torch.randn(1, 128))
        ql(torch.randn(3, 128))
    choices = qlinear.quant_choices()
    assert sorted(k[3] for k in choices) == [1, 4]  # batch buckets 1 and 4, one measurement each
    assert all(rec["choice"] in ("dense", "packed") for rec in choices.values())


def test_swap_packed_from_checkpoint_tensors():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    with torch.no_grad():
        model[2].weight.mul_(nm_mask(model[2].weight.abs(), 2, 4))
    packed = {"0": quant_pack(model[0].weight.detach(), bits=8, group_size=32),
              "2": sparse24_quant_pack(model[2].weight.detach(), group_size=16)}
    assert swap_packed(model, packed) == ["0", "2"]
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], Sparse24QuantLinear)
    with pytest.raises(LmsqueezeError, match="name no plain nn.Linear"):
        swap_packed(model, {"1": packed["0"]})
    other = nn.Sequential(nn.Linear(48, 32))
    with pytest.raises(LmsqueezeError, match=r"is \(32, 64\) but the layer is \[32, 48\]"):
        swap_packed(other, {"0": packed["0"]})


def test_swap_packed_into_a_meta_skeleton():
    """Loading without a dense copy: the model is built on the meta device, the packed weights are real."""
    lin = nn.Linear(64, 32, bias=False)
    packed = quant_pack(lin.weight.detach(), bits=4, group_size=32)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 32, bias=False))
    swap_packed(model, {"0": packed})
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, dequantize(packed))
        assert_close(model(x), expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_int8_activations_match_the_rounded_reference(ext, sparse):
    """Default act="int8": every packed layer rounds its <= 16 input rows to int8 per 32 columns; the fake-quantized
    model with that same rounding on each linear's input (quantize_act_int8) is the exact reference."""
    from lmsqueeze.kernels.quant import quantize_act_int8

    model, tok = load_model("tiny-llama", dtype=torch.float32)
    if sparse:
        prune_24(model)
    assert len(quantize_model(model, bits=4, group_size=64, sparse24=sparse)) == 14
    reference = copy.deepcopy(model)
    fake_quantize_model(reference)

    def round_input(_, args):
        x = args[0]
        return (quantize_act_int8(x.reshape(-1, x.shape[-1])).reshape(x.shape),)

    for name, mod in reference.named_modules():
        if type(mod) is nn.Linear and name != "lm_head":
            mod.register_forward_pre_hook(round_input)
    ids = torch.tensor([tok.encode("int8 rows of x, four-bit weights")[:12]])  # <= 16 rows per linear
    with torch.no_grad():
        got = model(ids).logits
        expected = reference(ids).logits
    atol, rtol = LOGIT_TOL[torch.float32]
    assert_close(got, expected, atol=atol * float(expected.abs().max()), rtol=rtol, name=f"int8 act, 2:4 {sparse}")
