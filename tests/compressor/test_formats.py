"""Checkpoint formats: the solver's grid kept exactly, packed files read back by other people's code
(compressed-tensors in a process that never imports lmsqueeze; an independent GPTQ reader written
here from the published layout), packed 2:4 loaded with no dense copy, and refusals before any work."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lmsqueeze import models
from lmsqueeze.compressor import compress, make_config, save_compressed
from lmsqueeze.compressor.formats import gptq_pack_rows, gptq_unpack_rows, plan
from lmsqueeze.compressor.methods import compress_weight, prepare_hessian
from lmsqueeze.compressor.packed import load_packed
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels.obs import QuantSpec, obs_update_ref, quantize_rtn, quantize_rtn_grid
from lmsqueeze.models import tiny_model

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _layer(rows=24, cols=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(4 * cols, cols, generator=g) * torch.linspace(0.1, 3, cols)
    return W, X.T @ X / X.shape[0]


# ---- the grid ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,opts", [
    ("rtn", dict(bits=4, group_size=32)),                       # 80 columns: the last group holds 16
    ("rtn", dict(bits=3, group_size=-1, sym=True)),
    ("gptq", dict(bits=4, group_size=32)),
    ("gptq", dict(bits=4, group_size=16, act_order=True)),
    ("gptq", dict(bits=2, group_size=-1, sym=True, act_order=True)),
    ("sparsegpt", dict(sparsity="2:4", bits=4, group_size=16)),
])
def test_grid_reproduces_the_solver_bit_for_bit(method, opts):
    W, H = _layer()
    cfg = make_config(method, **opts)
    res = compress_weight(W, H, cfg, keep_grid=True)
    g = res.grid
    assert torch.equal(g.dequantize(), res.W)                   # exactly the weights the solver produced
    assert g.codes.dtype == torch.uint8 and int(g.codes.max()) <= 2 ** g.bits - 1
    assert torch.equal(g.zero, g.zero.round()) and bool((g.zero >= 0).all() and (g.zero <= 2 ** g.bits - 1).all())
    groups = 1 if cfg.group_size == -1 else -(-W.shape[1] // cfg.group_size)
    assert g.scale.shape == (W.shape[0], groups) and g.g_idx.shape == (W.shape[1],)
    assert sorted(torch.bincount(g.g_idx.long()).tolist(), reverse=True)[0] <= W.shape[1] // groups + 16
    if method == "sparsegpt":                                   # pruned weights: code == zero point
        pruned = res.mask.logical_not()
        assert torch.equal(g.codes[pruned].float(), g.zero[:, g.g_idx.long()][pruned])
    if getattr(cfg, "act_order", False) and cfg.group_size != -1:
        assert not torch.equal(g.g_idx, torch.arange(W.shape[1], dtype=torch.int32) // cfg.group_size)


def test_keeping_the_grid_changes_nothing_in_the_reference_sweep():
    W, H = _layer(seed=3)
    Wd, Hinv, _, _ = prepare_hessian(W, H, 0.01)
    spec = QuantSpec(4, 16, False)
    plain = obs_update_ref(Wd, Hinv, blocksize=32, quant=spec)
    kept = obs_update_ref(Wd, Hinv, blocksize=32, quant=spec, return_grid=True)
    assert torch.equal(plain[0], kept[0]) and torch.equal(plain[2], kept[2])
    Wq, grid = quantize_rtn_grid(W, spec)
    assert torch.equal(Wq, quantize_rtn(W, spec)) and torch.equal(grid.dequantize(), Wq)


def test_gptq_packing_hand_case():
    codes = torch.arange(8).view(8, 1)                          # rows 0..7 of one column, 4-bit
    assert gptq_pack_rows(codes, 4).tolist() == [[0x76543210]]
    top = torch.full((8, 1), 15)                                # all ones: the int32 pattern -1
    assert gptq_pack_rows(top, 4).tolist() == [[-1]]
    assert gptq_pack_rows(torch.tensor([[3], [0], [1], [2]] * 4), 2).tolist() == [[0x93939393 - 2 ** 32]]
    c = torch.randint(0, 256, (64, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(gptq_unpack_rows(gptq_pack_rows(c, 8), 8), c)


# ---- whole models -----------------------------------------------------------------------------------------

def _compressed(method, dtype=torch.float32, **opts):
    model = tiny_model("tiny-llama", dtype=dtype)
    cfg = make_config(method, **opts)
    grids = {}
    report = compress(model, cfg, CALIB, grids=grids)
    return model, report, grids


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


LOAD_WITHOUT_LMSQUEEZE = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    ids = torch.load(sys.argv[1])
    for d in sys.argv[2:]:
        out = {}
        m = AutoModelForCausalLM.from_pretrained(d, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
        with torch.no_grad():
            out["logits"] = m(ids).logits.float()
        out["down_proj"] = dict(m.named_parameters())["model.layers.1.mlp.down_proj.weight"].detach().float()
        qc = json.load(open(d + "/config.json"))["quantization_config"]
        if qc["config_groups"]["group_0"]["weights"]["symmetric"] and "group_1" not in qc["config_groups"]:
            # the default route (compressed modules, decompressed on the first forward); asymmetric
            # checkpoints fail there with compressed-tensors 0.20.1 (its meta path leaves zero points unpacked),
            # and so do quantized tied embeddings (transformers 5.24 then finds no lm_head to tie)
            m = AutoModelForCausalLM.from_pretrained(d).eval()
            with torch.no_grad():
                out["logits_default"] = m(ids).logits.float()
        torch.save(out, d + "/read_back.pt")
    assert not any(k == "lmsqueeze" or k.startswith("lmsqueeze.") for k in sys.modules), "imported lmsqueeze"
""")


def test_compressed_tensors_loads_without_lmsqueeze_with_the_same_logits(tmp_path):
    pytest.importorskip("compressed_tensors")
    cases = {"gptq4g16": ("gptq", dict(bits=4, group_size=16)), "rtn3sym": ("rtn", dict(bits=3, group_size=32, sym=True)),
             "gptq8ch": ("gptq", dict(bits=8, group_size=-1, act_order=True))}
    want = {}
    for name, (method, opts) in cases.items():
        model, report, grids = _compressed(method, **opts)
        fmt = None if opts.get("sym") else "compressed-tensors"  # the default for symmetric grids only
        meta = save_compressed(model, None, tmp_path / name, report, grids=grids, format=fmt)
        assert meta["save_format"] == "compressed-tensors"
        cfg = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
        assert cfg["config_groups"]["group_0"]["weights"]["num_bits"] == opts["bits"]
        assert "lm_head" in cfg["ignore"]
        want[name] = (_logits(model), model.model.layers[1].mlp.down_proj.weight.detach().float(), meta)
    torch.save(IDS, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_LMSQUEEZE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ids.pt"), *(str(tmp_path / n) for n in cases)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, (logits, w, meta) in want.items():
        got = torch.load(tmp_path / name / "read_back.pt")
        # fp32 model: fp32 scales, integer codes and zeros: the unpacked weights are the solver's, bit for bit
        assert torch.equal(got["down_proj"], w), name
        torch.testing.assert_close(got["logits"], logits, rtol=0, atol=1e-5)
        if cases[name][1].get("sym"):
            torch.testing.assert_close(got["logits_default"], logits, rtol=0, atol=1e-5)
        bits = meta["sizes"]["bits_per_weight"]
        assert cases[name][1]["bits"] <= bits < cases[name][1]["bits"] + 3, (name, bits)


def _read_gptq_independently(directory, module):
    """The published GPTQ layout, read with nothing from lmsqueeze: W [out, in] fp32."""
    from safetensors.torch import load_file

    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    bits = qc["bits"]
    sd = {}
    for f in directory.glob("*.safetensors"):
        sd.update(load_file(f))
    qweight, qzeros = sd[f"{module}.qweight"], sd[f"{module}.qzeros"]
    scales, g_idx = sd[f"{module}.scales"], sd[f"{module}.g_idx"].long()
    per, mask = 32 // bits, (1 << bits) - 1
    words = qweight.to(torch.int64) & 0xFFFFFFFF                      # [in / per, out]
    q = torch.stack([(words >> (bits * j)) & mask for j in range(per)], dim=1).reshape(-1, qweight.shape[1])
    zwords = qzeros.to(torch.int64) & 0xFFFFFFFF                      # [groups, out / per]
    z = torch.stack([(zwords >> (bits * j)) & mask for j in range(per)], dim=2).reshape(qzeros.shape[0], -1)
    if qc.get("checkpoint_format", "gptq") == "gptq":
        z = z + 1                                                     # v1 stores zero - 1
    W = scales.float()[g_idx] * (q - z[g_idx]).float()                # [in, out]
    return W.t(), q.t(), z, g_idx, qc


def test_gptq_act_order_round_trips_through_an_independent_reader(tmp_path):
    model, report, grids = _compressed("gptq", bits=4, group_size=16, act_order=True)
    save_compressed(model, None, tmp_path / "g", report, format="gptq", grids=grids)
    for name, grid in grids.items():
        W, q, z, g_idx, qc = _read_gptq_independently(tmp_path / "g", name)
        assert torch.equal(q, grid.codes.long()) and torch.equal(g_idx, grid.g_idx.long())
        assert torch.equal(z.t().float(), grid.zero)
        fp16_scale = grid.scale.half().float()                        # the layout's scale dtype
        assert torch.equal(W, fp16_scale[:, grid.g_idx.long()] * (grid.codes.float() - grid.zero[:, grid.g_idx.long()]))
        torch.testing.assert_close(W, grid.dequantize(), rtol=2 ** -10, atol=0)
    assert qc["quant_method"] == "gptq" and qc["desc_act"] is True and qc["group_size"] == 16 and qc["sym"] is False
    assert qc["bits"] == 4
    from safetensors import safe_open

    keys = set()
    for f in (tmp_path / "g").glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            keys.update(fh.keys())
    assert not any(f"{n}.weight" in keys for n in grids) and all(f"{n}.qweight" in keys for n in grids)


def test_packed_24_loads_without_a_dense_copy_and_matches_dense(tmp_path):
    model, report, _ = _compressed("sparsegpt", dtype=torch.bfloat16, sparsity="2:4")
    dense_meta = save_compressed(model, None, tmp_path / "dense", report, format="dense")
    meta = save_compressed(model, None, tmp_path / "s24", report, format="sparse24")
    for d in ("dense", "s24"):
        assert json.loads((tmp_path / d / "config.json").read_text())["sparsity_structure"] == "2:4"
    s = meta["sizes"]
    assert s["compressed_modules_bytes"] == pytest.approx(0.5625 * 2 * s["compressed_weights"])
    assert s["weights_bytes"] < dense_meta["sizes"]["weights_bytes"]
    loaded, _, swapped = load_packed(tmp_path / "s24")
    assert len(swapped) == 14
    from lmsqueeze.sparse import SparseLinear

    mods = dict(loaded.named_modules())
    assert all(isinstance(mods[n], SparseLinear) and not any(True for _ in mods[n].parameters()) for n in swapped)
    for n in swapped:
        assert torch.equal(mods[n].weight, dict(model.named_modules())[n].weight.detach())
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0.02, atol=0.02)


# ---- one loader for every packed format (modules stay packed) --------------------------------------------

def test_unpack_bitstream_reads_what_compressed_tensors_packs():
    """3-bit codes straddle int32 words in compressed-tensors' dense packing; 4- and 8-bit ones do not."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from lmsqueeze.compressor.packed import unpack_bitstream

    for bits, cols in ((3, 80), (4, 36), (8, 7), (2, 33)):
        codes = torch.randint(0, 2 ** bits, (5, cols), generator=torch.Generator().manual_seed(bits))
        words = helpers.pack_to_int32((codes - 2 ** (bits - 1)).to(torch.int8), bits)
        assert torch.equal(unpack_bitstream(words, bits, cols), codes), bits
    # hand case: codes 1, 2, 3, ... of 3 bits: 0b...011_010_001 in the first word
    words = helpers.pack_to_int32(torch.tensor([[1, 2, 3]], dtype=torch.int8) - 4, 3)
    assert words.tolist() == [[0b011010001]] and unpack_bitstream(words, 3, 3).tolist() == [[1, 2, 3]]
    with pytest.raises(LmsqueezeError, match="hold 10 3-bit codes, not 11"):
        unpack_bitstream(torch.zeros(1, 1, dtype=torch.int32), 3, 11)


@pytest.mark.parametrize("method,opts,fmt,kind", [
    ("gptq", dict(bits=4, group_size=16, act_order=True), "gptq", "QuantLinear"),
    ("rtn", dict(bits=8, group_size=-1, sym=True), "gptq", "QuantLinear"),
    ("gptq", dict(bits=4, group_size=32), "compressed-tensors", "QuantLinear"),
    ("rtn", dict(bits=3, group_size=16), "compressed-tensors", "Linear"),          # 3-bit: dequantized at load
    ("sparsegpt", dict(sparsity="2:4", bits=4, group_size=32), "sparse24", "Sparse24QuantLinear"),
])
def test_load_packed_keeps_modules_packed_with_the_solvers_weights(tmp_path, method, opts, fmt, kind):
    """Each packed format lmsqueeze writes reads back with the compressed modules as packed modules whose
    weights are the solver's grid (fp32 model: bit for bit, gptq's fp16 scales aside) and the same logits."""
    model, report, grids = _compressed(method, **opts)
    meta = save_compressed(model, None, tmp_path / "p", report, format=fmt, grids=grids)
    assert meta["save_format"] == fmt
    loaded, _, swapped = load_packed(tmp_path / "p")
    mods = dict(loaded.named_modules())
    assert set(swapped) == (set() if kind == "Linear" else set(grids))
    for name, grid in grids.items():
        assert type(mods[name]).__name__ == kind, name
        if kind != "Linear":                                       # no dense [out, in] float copy is held
            assert not any(t.is_floating_point() and t.shape == grid.codes.shape for t in mods[name].buffers())
        want = grid.dequantize()
        if fmt == "gptq":                                          # the layout stores fp16 scales
            g = grid.g_idx.long()
            want = grid.scale.half().float()[:, g] * (grid.codes.float() - grid.zero[:, g])
        assert torch.equal(mods[name].weight.detach().float(), want), name
        with torch.no_grad():
            dict(model.named_modules())[name].weight.copy_(want)   # the format's weights (gptq: fp16 scales)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-4)


def test_joint_24_4bit_sparse24_is_smaller_than_packed_quantized_and_loads_in_eval(tmp_path):
    """Joint 2:4 + 4-bit in --format sparse24 stores 4-bit codes of the kept values only (+ 2:4 metadata):
    fewer bytes than compressed-tensors' codes for every weight; `lmsqueeze eval` runs it packed."""
    from lmsqueeze.cli import main

    model, report, grids = _compressed("sparsegpt", sparsity="2:4", bits=4, group_size=16)
    s24 = save_compressed(model, None, tmp_path / "s24", report, format="sparse24", grids=grids)["sizes"]
    ct = save_compressed(model, None, tmp_path / "ct", report, format="compressed-tensors", grids=grids)["sizes"]
    # per weight: 2 bits of codes + 1 bit of metadata + (fp32 scale + u8 zero) / 16 = 5.5 bits
    assert s24["bits_per_weight"] == pytest.approx(2 + 1 + 40 / 16, rel=1e-6)
    assert s24["compressed_modules_bytes"] < ct["compressed_modules_bytes"]
    manifest = json.loads((tmp_path / "s24" / "sparse24.json").read_text())
    assert {m["bits"] for m in manifest["modules"].values()} == {4}
    tiny = models.load_model("tiny-llama")[1]
    tiny.save_pretrained(tmp_path / "s24")
    assert main(["eval", "--model", str(tmp_path / "s24"), "--tasks", "ppl:pydoc", "--limit", "2", "--quiet",
                 "--output", str(tmp_path / "r.json")]) == 0


def test_quantize_embedding_packs_the_tied_table_and_loads_without_lmsqueeze(tmp_path):
    """--quantize-embedding: the tied embedding is stored on the linear layers' grid (config group targeting
    Embedding), the
    output head is not stored twice, compressed-tensors alone reads back the model in memory, and so does
    load_packed; gptq refuses it before any work."""
    pytest.importorskip("compressed_tensors")
    from transformers import LlamaForCausalLM

    from lmsqueeze.cli import main
    from lmsqueeze.compressor.embeddings import quantize_embeddings

    cfg = models.tiny_config("tiny-llama")
    cfg.tie_word_embeddings = True                               # as SmolLM2 and Gemma 3 are
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    grids = {}
    report = compress(model, make_config("rtn", bits=4, group_size=16, sym=True), CALIB, grids=grids)
    before = model.get_input_embeddings().weight.detach().clone()
    info = quantize_embeddings(model, 4, 16, True, grids)
    table = model.get_input_embeddings().weight.detach()
    assert info["tied"] and info["group_size"] == 16 and model.get_output_embeddings().weight is model.model.embed_tokens.weight
    assert not torch.equal(table, before)
    # symmetric 4-bit: every entry within half a step (2 absmax / 15 per group of 16) of the original
    step = 2 * before.abs().reshape(before.shape[0], -1, 16).amax(-1, keepdim=True) / 15
    assert bool(((table - before).abs().reshape(step.shape[0], -1, 16) <= step / 2 + 1e-7).all())
    plain = save_compressed(model, None, tmp_path / "ct4", report, format="compressed-tensors",
                            grids={k: v for k, v in grids.items() if k != info["module"]})
    meta = save_compressed(model, None, tmp_path / "ct", report, format="compressed-tensors", grids=grids)
    from safetensors import safe_open

    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as fh:
        keys = set(fh.keys())
    assert "model.embed_tokens.weight_packed" in keys and "model.embed_tokens.weight" not in keys
    assert "lm_head.weight" not in keys
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert cfg["group_1"]["targets"] == ["Embedding"] and cfg["group_1"]["weights"]["num_bits"] == 4
    # the table went from 4 bytes (fp32) to half a byte + a scale per 16 entries
    saved = plain["sizes"]["weights_bytes"] - meta["sizes"]["weights_bytes"]
    assert saved == pytest.approx(table.numel() * (4 - 0.5 - 4 / 16), rel=0.01)
    # bits per weight counts the table's weights with its bytes: 4-bit codes + an fp32 scale per 16
    assert meta["sizes"]["bits_per_weight"] == pytest.approx(4 + 32 / 16, rel=0.02)
    torch.save(IDS, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_LMSQUEEZE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ids.pt"), str(tmp_path / "ct")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "ct" / "read_back.pt")
    torch.testing.assert_close(got["logits"], _logits(model), rtol=0, atol=1e-5)
    loaded, _, _ = load_packed(tmp_path / "ct")
    assert torch.equal(loaded.get_input_embeddings().weight, table)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-5)
    notes = plan(model, make_config("rtn", bits=4, group_size=16, sym=True), "compressed-tensors",
                 quantize_embedding=True).notes
    assert any("CompressedTensorsConfig(dequantize=True)" in n for n in notes)
    with pytest.raises(LmsqueezeError, match="has no place for a quantized embedding"):
        plan(tiny_model("tiny-llama"), make_config("rtn", bits=4, group_size=16), "gptq", quantize_embedding=True)
    with pytest.raises(LmsqueezeError, match="wanda without --bits quantizes nothing"):
        plan(tiny_model("tiny-llama"), make_config("wanda", sparsity=0.5), "dense", quantize_embedding=True)
    assert main(["compress", "--model", "tiny-llama", "--method", "rtn", "--bits", "4", "--group-size", "16",
                 "--quantize-embedding", "--format", "gptq", "--output-dir", str(tmp_path / "x"), "--quiet"]) == 2
    assert main(["compress", "--model", "tiny-llama", "--method", "rtn", "--bits", "4", "--group-size", "16", "--sym",
                 "--quantize-embedding", "--output-dir", str(tmp_path / "y"), "--quiet"]) == 0
    written = json.loads((tmp_path / "y" / "lmsqueeze.json").read_text())
    assert written["save_format"] == "compressed-tensors" and written["embedding_quantization"]["bits"] == 4
    assert load_packed(tmp_path / "y")[0].get_input_embeddings().weight.unique().numel() > 16


def test_dense_unstructured_says_so_in_config(tmp_path):
    model, report, _ = _compressed("magnitude", sparsity=0.5)
    save_compressed(model, None, tmp_path / "m", report)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["sparsity_structure"] == "unstructured"
    card = (tmp_path / "m" / "README.md").read_text()
    assert "- method: magnitude" in card and "- format: dense" in card and "from_pretrained" in card


# ---- refusals before any work -----------------------------------------------------------------------------

@pytest.mark.parametrize("method,opts,fmt,message", [
    ("gptq", dict(bits=4, group_size=48), "compressed-tensors", "group size 48 does not divide the input width(s) 64, 128"),
    ("rtn", dict(bits=4, group_size=48), "gptq", "Valid: --group-size 64 or 32 or 16 or 8 or -1"),
    ("gptq", dict(bits=3, group_size=16), "gptq", "not 3-bit; use --format compressed-tensors"),
    ("gptq", dict(bits=4, group_size=16, act_order=True), "compressed-tensors", "use --format gptq (carries g_idx)"),
    ("sparsegpt", dict(sparsity=0.5), "sparse24", "sparsity 0.5 is not 2:4"),
    ("wanda", dict(sparsity="2:4"), "gptq", "wanda 2:4 quantizes nothing; valid for it: dense, sparse24"),
    ("rtn", dict(bits=4), "int4", "format 'int4' is unknown; valid: dense, compressed-tensors, gptq, sparse24"),
    ("nf4", dict(), "compressed-tensors", "nf4 keeps another layout (see its module docstring) and is written as"),
    ("llm-int8", dict(), "gptq", "llm-int8 keeps another layout"),
])
def test_formats_refuse_what_they_cannot_hold(method, opts, fmt, message):
    with pytest.raises(LmsqueezeError) as exc:
        plan(tiny_model("tiny-llama"), make_config(method, **opts), fmt)
    assert message in str(exc.value)


def test_dense_notes_a_partial_last_group():
    p = plan(tiny_model("tiny-llama"), make_config("rtn", bits=4, group_size=48), "dense")
    assert p.notes == ["group size 48 does not divide input width(s) 64, 128: the last group of each row there "
                       "holds 16, 32 column(s)"]


def test_cli_refuses_a_ragged_group_before_compressing(tmp_path, capsys):
    from lmsqueeze.cli import main

    out = tmp_path / "x"
    rc = main(["--quiet", "compress", "--model", "tiny-llama", "--calib", "pydoc", "--nsamples", "2", "--calib-seqlen", "16",
               "--dtype", "fp32", "--method", "rtn", "--bits", "4", "--group-size", "48", "--format", "gptq",
               "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "group size 48 does not divide" in err and not out.exists()


def test_cli_prints_sizes_and_writes_gptq(tmp_path, capsys):
    from lmsqueeze.cli import main

    out = tmp_path / "g"
    assert main(["--quiet", "compress", "--model", "tiny-llama", "--calib", "pydoc", "--nsamples", "2", "--calib-seqlen",
                 "16", "--dtype", "bf16", "--method", "rtn", "--bits", "4", "--group-size", "32", "--format", "gptq",
                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| format | weights on disk |" in printed and "| gptq |" in printed
    meta = json.loads((out / "lmsqueeze.json").read_text())
    # per module: 4-bit codes, an fp16 scale and a 4-bit zero per 32 weights of a row, an int32 g_idx per input
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
    bits = sum(4 * o * i + (16 + 4) * o * i // 32 + 32 * i for o, i in shapes) / sum(o * i for o, i in shapes)
    assert meta["save_format"] == "gptq" and meta["sizes"]["bits_per_weight"] == pytest.approx(bits)
    assert "quant_method gptq" in (out / "README.md").read_text()


@pytest.mark.slow
def test_smollm2_rtn4_packed_sizes_and_read_back(tmp_path):
    """SmolLM2 RTN 4-bit g64: the packed file's size, and its logits read back by compressed-tensors alone."""
    pytest.importorskip("compressed_tensors")
    from lmsqueeze.models import load_model

    model, tok = load_model("smollm2-135m", dtype="bf16")
    grids = {}
    report = compress(model, make_config("rtn", bits=4, group_size=64), None, measure_error=False, grids=grids)
    meta = save_compressed(model, tok, tmp_path / "ct", report, grids=grids, format="compressed-tensors")
    s = meta["sizes"]
    # 4-bit codes + a bf16 scale and a 4-bit zero per 64 weights: 4.31 bits per weight in the linear modules;
    # the tied bf16 embedding (28.3M of the 134.5M parameters) stays as it is, so the file is ~42% of bf16.
    # Each module also stores its weight_shape (2 x int64 = 128 bits): 210 modules over 30 layers of
    # 576 x (576 + 192 + 192 + 576 + 3 x 1536) linear weights
    weights = 30 * 576 * (576 + 192 + 192 + 576 + 3 * 1536)
    assert s["bits_per_weight"] == pytest.approx(4 + (16 + 4) / 64 + 210 * 128 / weights, rel=1e-6)
    assert s["fraction_of_bf16"] < 0.45 and s["compressed_modules"] == 30 * 7
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog and keeps on running.")["input_ids"]])
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_LMSQUEEZE.replace('"model.layers.1.mlp.down_proj.weight"',
                                                     '"model.layers.29.mlp.down_proj.weight"'))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ids.pt"), str(tmp_path / "ct")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "ct" / "read_back.pt")
    with torch.no_grad():
        want = model(ids).logits.float()
    # the stored scales are bf16 (the model dtype): each weight within one bf16 rounding of the fake-quantized one
    w_mem = model.model.layers[29].mlp.down_proj.weight.detach().float()
    assert bool(((got["down_proj"] - w_mem).abs() <= w_mem.abs() * 2 ** -7 + 1e-8).all())
    # one-ulp weight differences compound over 30 bf16 layers: measured mean |logit diff| 0.14 (max 1.2-1.5,
    # on logits of magnitude ~20) and >= 96% top-1 agreement on this sentence
    diff = (got["logits"] - want).abs()
    assert float(diff.mean()) < 0.3 and bool((got["logits"].argmax(-1) == want.argmax(-1)).float().mean() > 0.9)


def test_default_format_is_one_plain_from_pretrained_loads():
    """Symmetric grids default to packed compressed-tensors; asymmetric ones (whose packed zero points plain
    from_pretrained rejects) default to dense, and asking for compressed-tensors says how to load it."""
    from lmsqueeze.compressor import GPTQConfig, RTNConfig
    from lmsqueeze.compressor.formats import default_format, plan

    assert default_format(RTNConfig(bits=4, group_size=16, sym=True)) == "compressed-tensors"
    assert default_format(GPTQConfig(bits=4, group_size=16)) == "dense"
    model, _ = models.load_model("tiny-llama")
    notes = plan(model, GPTQConfig(bits=4, group_size=16), "compressed-tensors").notes
    assert any("CompressedTensorsConfig(dequantize=True)" in n for n in notes)


def test_eval_and_load_sparse_open_a_packed_24_checkpoint_like_its_dense_twin(tmp_path):
    """`lmsqueeze eval` and load_sparse take a --format sparse24 directory as they take the dense-with-zeros one:
    the same perplexity, and the 2:4 modules stay packed (no dense weight parameter appears)."""
    from lmsqueeze.cli import main
    from lmsqueeze.sparse import SparseLinear, load_sparse

    model, report, _ = _compressed("sparsegpt", dtype=torch.bfloat16, sparsity="2:4")
    tok = models.byte_tokenizer()
    save_compressed(model, tok, tmp_path / "dense", report, format="dense")
    save_compressed(model, tok, tmp_path / "s24", report, format="sparse24")
    ppl = {}
    for d in ("dense", "s24"):
        out = tmp_path / f"{d}.json"
        assert main(["--quiet", "eval", "--model", str(tmp_path / d), "--tasks", "ppl:pydoc", "--limit", "2",
                     "--eval-seqlen", "32", "--dtype", "bf16", "--resamples", "0", "--cache-dir",
                     str(tmp_path / "cache"), "--output", str(out)]) == 0
        ppl[d] = json.loads(out.read_text())["results"][0]["summary"]["ppl"]
    assert ppl["s24"] == pytest.approx(ppl["dense"], rel=1e-2)
    loaded, _, swapped = load_sparse(str(tmp_path / "s24"), dtype="bf16")
    mods = dict(loaded.named_modules())
    assert len(swapped) == 14 and all(isinstance(mods[n], SparseLinear) for n in swapped)
    assert not any(n.endswith(f"{s}.weight") for n, _ in loaded.named_parameters() for s in swapped)
    loaded, _ = models.load_model(str(tmp_path / "s24"), dtype="fp32")
    assert all(isinstance(dict(loaded.named_modules())[n], SparseLinear) for n in swapped)
    assert next(loaded.parameters()).dtype == torch.float32


def test_eval_of_a_packed_checkpoint_equals_its_dense_twin_with_exact_activations(tmp_path, monkeypatch):
    """The packed 4-bit kernels round activations to int8 by default (decode speed); evaluate() keeps them exact,
    so a packed checkpoint scores what its dense fake-quantized twin scores; LMSQUEEZE_QUANT_ACT=int8 opts in."""
    from lmsqueeze.evaluation.api import evaluate

    monkeypatch.delenv("LMSQUEEZE_QUANT_ACT", raising=False)
    model, report, grids = _compressed("rtn", bits=4, group_size=64, sym=True)   # widths of 64: int8 applies
    tok = models.load_model("tiny-llama")[1]
    save_compressed(model, tok, tmp_path / "ct", report, format="compressed-tensors", grids=grids)
    save_compressed(model, tok, tmp_path / "dense", report, format="dense")

    def ppl(d):
        r = evaluate(str(tmp_path / d), tasks="ppl:pydoc", limit=2, seqlen=64, log_samples=False,
                     cache_dir=str(tmp_path / "cache"))
        return r["results"][0]["metrics"]["ppl"]["value"]

    assert ppl("ct") == pytest.approx(ppl("dense"), rel=1e-5)
    assert "LMSQUEEZE_QUANT_ACT" not in os.environ
    # one row (a decode step): the int8-activation GEMV by default, exact inside an evaluation
    from lmsqueeze.evaluation.api import _exact_activations

    monkeypatch.setenv("LMSQUEEZE_QUANT", "packed")        # dense F.linear wins at these tiny widths otherwise
    loaded = load_packed(tmp_path / "ct")[0]
    step = IDS[:1, :1]

    def logits():
        with torch.no_grad():
            return loaded(step).logits

    want = model(step).logits.detach()
    torch.testing.assert_close(_exact_activations(logits)(), want, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(), want, rtol=0, atol=1e-5)
