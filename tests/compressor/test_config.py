import pytest

from lmsqueeze.compressor.config import (
    GPTQConfig,
    MagnitudeConfig,
    RTNConfig,
    SparseGPTConfig,
    WandaConfig,
    from_dict,
    make_config,
    parse_sparsity,
)
from lmsqueeze.errors import LmsqueezeError


@pytest.mark.parametrize("value,expected", [(0.5, 0.5), ("0.5", 0.5), (0, 0.0), ("2:4", (2, 4)), ("4:8", (4, 8)),
                                            ("1:3", (1, 3)), ((2, 4), (2, 4))])
def test_parse_sparsity(value, expected):
    assert parse_sparsity(value) == expected


@pytest.mark.parametrize("bad,message", [
    (1.2, "sparsity 1.2 is out of range"), (1.0, "out of range"), (-0.1, "out of range"),
    ("3:2", "N:M pattern 3:2 is invalid"), ("4:4", "0 < N < M"), ("0:4", "0 < N < M"), ("a:b", "two integers"),
    ("half", "sparsity 'half' is invalid"), (True, "invalid"),
])
def test_bad_sparsity_is_one_clear_message(bad, message):
    with pytest.raises(LmsqueezeError, match=message):
        WandaConfig(sparsity=bad)


def test_bad_quantization_and_shared_fields():
    with pytest.raises(LmsqueezeError, match="bits 5 is not supported; valid: 2, 3, 4, 8"):
        GPTQConfig(bits=5)
    with pytest.raises(LmsqueezeError, match="group size 0 is invalid"):
        RTNConfig(group_size=0)
    with pytest.raises(LmsqueezeError, match="bits 5"):
        SparseGPTConfig(bits=5)
    with pytest.raises(LmsqueezeError, match="blocksize"):
        SparseGPTConfig(blocksize=0)
    with pytest.raises(LmsqueezeError, match="multiple of M = 8"):
        SparseGPTConfig(sparsity="4:8", blocksize=12)
    with pytest.raises(LmsqueezeError, match="percdamp"):
        GPTQConfig(percdamp=-1)
    with pytest.raises(LmsqueezeError, match="scope"):
        MagnitudeConfig(scope="column")


def test_unknown_method_and_foreign_options():
    with pytest.raises(LmsqueezeError, match="unknown method 'obs'; valid: magnitude, wanda, sparsegpt, gptq, rtn, "
                                             "awq, llm-int8, nf4"):
        make_config("obs")
    with pytest.raises(LmsqueezeError, match="method 'wanda' does not take --bits"):
        make_config("wanda", bits=4)
    with pytest.raises(LmsqueezeError, match="does not take --act-order"):
        make_config("rtn", act_order=True)


@pytest.mark.parametrize("cfg", [MagnitudeConfig(sparsity="2:4", scope="row"), WandaConfig(sparsity=0.3),
                                 SparseGPTConfig(sparsity="4:8", bits=4, group_size=128, exclude=("*lm_head",)),
                                 GPTQConfig(bits=3, act_order=True, sym=True), RTNConfig(bits=8, group_size=-1)])
def test_round_trip_and_frozen(cfg):
    d = cfg.to_dict()
    assert d["method"] == cfg.method
    assert from_dict(d) == cfg
    assert type(cfg).from_dict(d) == cfg
    with pytest.raises(Exception):
        cfg.blocksize = 64


def test_include_exclude_patterns():
    cfg = WandaConfig(include=("*.mlp.*",), exclude=("*down_proj",))
    assert cfg.selects("model.layers.0.mlp.up_proj")
    assert not cfg.selects("model.layers.0.mlp.down_proj")
    assert not cfg.selects("model.layers.0.self_attn.q_proj")
    assert WandaConfig().selects("model.layers.0.self_attn.q_proj")


def test_fraction_of_nm():
    assert WandaConfig(sparsity="2:4").fraction == 0.5
    assert WandaConfig(sparsity="1:4").fraction == 0.75
    assert WandaConfig(sparsity="2:4").nm == (2, 4)
    assert WandaConfig(sparsity=0.5).nm is None
