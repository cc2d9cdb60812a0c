"""The five original methods give the outputs they gave before the method registry (fixed seeds).

The fingerprints below were recorded at commit ee1d9e4 (before lmsqueeze.compressor.methods became one
module per method): per case the number of exact zeros in the compressed weights, the float64 dot product
of those weights with a fixed uniform pattern and the OBS loss estimate. Zeros must match exactly; the
dot product and loss to 1e-6 relative (room for fp32 summation order in the C++ kernels, far below
what any change in a mask, a rounding decision or a scale would move them by).
"""
import pytest
import torch

from lmsqueeze.compressor import compress
from lmsqueeze.compressor.config import GPTQConfig, MagnitudeConfig, RTNConfig, SparseGPTConfig, WandaConfig
from lmsqueeze.compressor.driver import weight_of
from lmsqueeze.compressor.methods import compress_weight
from lmsqueeze.models import load_model
from tests.compressor.test_methods import layer_problem

CASES = {
    "magnitude": MagnitudeConfig(sparsity=0.5),
    "magnitude-row": MagnitudeConfig(sparsity=0.6, scope="row"),
    "wanda": WandaConfig(sparsity=0.5),
    "wanda-2:4": WandaConfig(sparsity="2:4"),
    "sparsegpt": SparseGPTConfig(sparsity=0.5, blocksize=32),
    "sparsegpt-4:8-4bit": SparseGPTConfig(sparsity="4:8", bits=4, group_size=16, blocksize=32),
    "gptq": GPTQConfig(bits=3, group_size=16, blocksize=32),
    "gptq-act-order-sym": GPTQConfig(bits=4, group_size=16, act_order=True, sym=True, blocksize=32),
    "rtn": RTNConfig(bits=3, group_size=32),
}

# (zeros, dot with the pattern, OBS loss) of one 24 x 96 layer, layer_problem(seed=3)
LAYER = {
    "magnitude": (1152, -31.80380980780128, None),
    "magnitude-row": (1392, -27.468424132322816, None),
    "wanda": (1152, -20.88538411573964, None),
    "wanda-2:4": (1152, -17.227915268419178, None),
    "sparsegpt": (1152, -22.5806415115455, 239.3343048095703),
    "sparsegpt-4:8-4bit": (1155, -22.66091215220262, 434.2564697265625),
    "gptq": (458, -50.687607764703024, 479.4497375488281),
    "gptq-act-order-sym": (238, -38.140563799634215, 152.8028106689453),
    "rtn": (524, -39.01706353735372, None),
}

# (zeros, dot with the pattern) over every compressed module of tiny-llama, 4 x 32 random tokens
MODEL = {
    "wanda": (36864, -38.482255067727436),
    "gptq-act-order-sym": (8044, -74.2334511010555),
}


def pattern(shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("case", list(LAYER))
def test_per_layer_outputs_unchanged(case):
    W, _, H, col_sq = layer_problem(rows=24, cols=96, seed=3)
    cfg = CASES[case]
    stat = {"magnitude": None, "rtn": None, "wanda": col_sq}.get(cfg.method, H)
    res = compress_weight(W, stat, cfg, keep_grid=True)
    zeros, dot, loss = LAYER[case]
    assert int((res.W == 0).sum()) == zeros
    assert float((res.W.double() * pattern(W.shape)).sum()) == pytest.approx(dot, rel=1e-6)
    if loss is None:
        assert res.loss is None
    else:
        assert res.loss == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("case", list(MODEL))
def test_driver_outputs_unchanged(case):
    torch.manual_seed(0)
    model, _ = load_model("tiny-llama")
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    rep = compress(model, CASES[case], ids, batch_size=2)
    g = torch.Generator().manual_seed(1)
    mods = dict(model.named_modules())
    zeros, dot = 0, 0.0
    for rec in rep.modules:
        W = weight_of(mods[rec.name]).detach().double()
        zeros += int((W == 0).sum())
        dot += float((W * torch.rand(W.shape, generator=g, dtype=torch.float64)).sum())
    assert (zeros, dot) == (MODEL[case][0], pytest.approx(MODEL[case][1], rel=1e-6))
