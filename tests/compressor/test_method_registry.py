"""The method registry: adding a method is one file, and the CLI, the study grid and configs pick it up."""
import json
import textwrap

import pytest

from lmsqueeze.cli import main
from lmsqueeze.compressor.methods import get, names, registry
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.study.grid import StudySpec, expand_grid

TOY = textwrap.dedent('''
    """A toy pruner: zero the input columns with the smallest mean |x| (whole columns, every row)."""
    from dataclasses import dataclass

    import torch

    from lmsqueeze.compressor.config import _Config, _Sparse, parse_sparsity
    from lmsqueeze.compressor.methods import LayerResult, register


    @dataclass(frozen=True)
    class ToyConfig(_Sparse, _Config):  # _Sparse: the pruners' sparsity helpers (nm, fraction, layer_sparsity)
        sparsity: float = 0.5
        method = "toy"

        def __post_init__(self):
            super().__post_init__()
            object.__setattr__(self, "sparsity", parse_sparsity(self.sparsity))  # the CLI passes text


    def toy(W, act, cfg):
        k = round(cfg.fraction * W.shape[1])
        dead = torch.argsort(act, stable=True)[:k]
        keep = torch.ones_like(W, dtype=torch.bool)
        keep[:, dead] = False
        return LayerResult(W.float().masked_fill(~keep, 0.0), keep)


    register("toy", ToyConfig, kind="prune", needs=("act_absmean",),
             solve=lambda W, stats, cfg, keep_grid: toy(W, stats["act_absmean"], cfg), summary="columns by mean |x|")
''')


def test_a_method_in_one_file_appears_in_compress(tmp_path, monkeypatch, capsys):
    plugin = tmp_path / "toy_method.py"
    plugin.write_text(TOY)
    monkeypatch.setenv("LMSQUEEZE_METHODS", str(plugin))
    assert "toy" in names() and get("toy").needs == ("act_absmean",)
    out = tmp_path / "ckpt"
    assert main(["--quiet", "compress", "--model", "tiny-llama", "--method", "toy", "--sparsity", "0.25",
                 "--calib", "pydoc", "--nsamples", "2", "--calib-seqlen", "16", "--dtype", "fp32",
                 "--output-dir", str(out)]) == 0
    meta = json.loads((out / "lmsqueeze.json").read_text())
    assert meta["method"] == "toy" and meta["config"]["sparsity"] == 0.25
    assert all(m["sparsity"] == pytest.approx(0.25, abs=0.02) for m in meta["modules"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    assert "toy" in capsys.readouterr().out
    spec = StudySpec(model="tiny-llama", methods=("toy", "rtn"), sparsity=("0.5",), tasks=("ppl:pydoc",))
    assert [c.label for c in expand_grid(spec)] == ["dense (base model)", "toy 0.5 wikitext2:valid", "rtn 4-bit"]
    monkeypatch.delenv("LMSQUEEZE_METHODS")
    assert "toy" not in names()  # the variable is gone, and so is its method


def test_every_builtin_declares_what_it_is():
    reg = registry()
    assert list(reg)[:5] == ["magnitude", "wanda", "sparsegpt", "gptq", "rtn"]
    assert {"awq", "nf4", "llm-int8"} <= set(reg)
    kinds = {n: (m.kind, m.needs, m.takes_bits) for n, m in reg.items()}
    assert kinds["sparsegpt"] == ("both", ("hessian",), True)
    assert kinds["awq"] == ("quantize", ("hessian", "act_absmean"), True)
    assert kinds["nf4"] == ("quantize", (), False) and kinds["llm-int8"][1] == ("act_absmax",)
    with pytest.raises(LmsqueezeError, match="unknown method 'obs'; valid: magnitude, wanda"):
        get("obs")


def test_study_grid_joint_cells_and_fixed_width_quantizers():
    spec = StudySpec(model="tiny-llama", methods=("sparsegpt", "wanda", "awq", "llm-int8", "nf4"),
                     sparsity=("0.5",), bits=(3,), calib=("pydoc",), tasks=("ppl:pydoc",))
    cells = expand_grid(spec)
    assert [c.label for c in cells] == ["dense (base model)", "sparsegpt 0.5 + 3-bit pydoc", "wanda 0.5 pydoc",
                                        "awq 3-bit pydoc", "llm-int8 pydoc", "nf4"]
    joint = cells[1]
    assert joint.sparsity == 0.5 and joint.bits == 3 and joint.config["group_size"] == -1  # its own default
    # without --bits: sparsegpt prunes only and the quantizers take 4 bits
    plain = expand_grid(StudySpec(model="tiny-llama", methods=("sparsegpt", "gptq"), calib=("pydoc",),
                                  tasks=("ppl:pydoc",), layer_sparsity="owl", sparsity=("0.6",)))
    assert [c.label for c in plain[1:]] == ["sparsegpt owl 0.6 pydoc", "gptq 4-bit pydoc"]
    assert plain[1].config["layer_sparsity"] == "owl" and plain[1].config.get("bits") is None
    with pytest.raises(LmsqueezeError, match="unknown method\\(s\\) obs; valid: magnitude"):
        StudySpec(model="tiny-llama", methods=("obs",), tasks=("ppl:pydoc",))


def test_report_orders_methods_by_the_registry_and_places_a_plug_in(tmp_path, monkeypatch):
    """The report's rows follow the registry (pruners, joint, quantizers), not a list in the report: the toy
    plug-in pruner sits after the builtin pruners, before sparsegpt; joint cells name their bits; a method
    that is no longer registered comes last."""
    from pathlib import Path

    from lmsqueeze.study import read_results
    from lmsqueeze.study.report import render_table

    recs = read_results(Path(__file__).parent.parent / "fixtures" / "study")
    mag = next(r for r in recs if r["key"] == "k-mag05")
    gptq = next(r for r in recs if r["key"] == "k-gptq4p")
    sgpt = next(r for r in recs if r["key"] == "k-sgpt24p")
    extra = [dict(json.loads(json.dumps(mag)), key="k-toy", method="toy", label="toy 0.5"),
             dict(json.loads(json.dumps(gptq)), key="k-awq", method="awq", bits=3, label="awq 3-bit"),
             dict(json.loads(json.dumps(gptq)), key="k-int8", method="llm-int8", bits=None, label="llm-int8"),
             dict(json.loads(json.dumps(sgpt)), key="k-joint", sparsity=0.5, bits=3, label="sparsegpt 0.5 + 3-bit"),
             dict(json.loads(json.dumps(mag)), key="k-old", method="retired", label="retired 0.5")]
    records = extra[::-1] + recs  # the file's order must not matter

    def rows():
        lines = [ln for ln in render_table(records).splitlines()[2:]]
        return [tuple(c.strip() for c in ln.strip("|").split("|")[:2]) for ln in lines]

    monkeypatch.setenv("LMSQUEEZE_METHODS", str(_plugin(tmp_path)))
    assert rows() == [("dense", "-"), ("magnitude", "0.5"), ("magnitude", "2:4"), ("wanda", "0.5"), ("wanda", "0.5"),
                      ("toy", "0.5"), ("sparsegpt", "0.5 + 3-bit"), ("sparsegpt", "2:4"), ("gptq", "4-bit"),
                      ("awq", "3-bit"), ("llm-int8", "-"), ("retired", "0.5")]
    monkeypatch.delenv("LMSQUEEZE_METHODS")  # unregistered now: the toy rows go to the end, by name
    assert [r[0] for r in rows()][-2:] == ["retired", "toy"]


def _plugin(tmp_path):
    plugin = tmp_path / "toy_method.py"
    plugin.write_text(TOY)
    return plugin
