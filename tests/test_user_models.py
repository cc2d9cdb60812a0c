"""Models a user brings (issue 16): position limits, GGUF files, third-party quantized checkpoints, and
commands that check their inputs before they spend a model's load time."""
import json

import pytest
import torch

from lmsqueeze import models
from lmsqueeze.cli import main
from lmsqueeze.errors import LmsqueezeError

# ---- item 1: calibration longer than the model's positions --------------------------------------------------


@pytest.mark.parametrize("arch", models.TINY)
def test_every_tiny_model_declares_its_positions(arch):
    config = models.tiny_config(arch)
    assert models.max_positions(config) == 512
    assert models.max_positions(models.load_model(arch)[0]) == 512
    models.check_sequence_length(config, 512, "x")  # exactly the limit fits


def test_position_keys_of_other_families():
    from transformers import BloomConfig, Gemma3TextConfig, GPT2Config, MistralConfig

    assert models.position_limit(GPT2Config(n_positions=1024)) == ("n_positions", 1024)
    # a sliding window is not the limit: the model still numbers every position up to max_position_embeddings
    assert models.max_positions(MistralConfig(max_position_embeddings=32768, sliding_window=4096)) == 32768
    assert models.max_positions(Gemma3TextConfig(max_position_embeddings=32768, sliding_window=512)) == 32768
    assert models.max_positions(BloomConfig()) is None  # ALiBi: no position table, nothing to check
    models.check_sequence_length(BloomConfig(), 10 ** 6, "x")


@pytest.mark.parametrize("arch, key", [("tiny-gpt2", "n_positions"), ("tiny-opt", "max_position_embeddings"),
                                       ("tiny-llama", "max_position_embeddings")])
def test_too_long_names_limit_and_length(arch, key):
    with pytest.raises(LmsqueezeError) as e:
        models.check_sequence_length(models.tiny_config(arch), 1024, "--seqlen (the calibration window)")
    assert str(e.value) == (f"--seqlen (the calibration window) is 1024 tokens but the model "
                            f"({type(models.tiny_config(arch)).__name__.removesuffix('Config')}) has 512 positions "
                            f"({key}=512); use at most 512")


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-opt", "tiny-llama"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_compress_api_checks_positions_before_any_work(arch, method):
    """Learned positions (GPT-2, OPT) used to die in the capture with an IndexError; rotary ones (Llama)
    calibrated silently on positions they never saw."""
    from lmsqueeze.compressor import compress, make_config

    model, _ = models.load_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(0, 256, (1, 600))
    with pytest.raises(LmsqueezeError, match=r"the calibration window is 600 tokens but .* has 512 positions"):
        compress(model, make_config(method, sparsity=0.5), calib)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing was touched


def test_compress_cli_checks_positions_before_loading(tmp_path, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the length check")

    monkeypatch.setattr(models, "load_model", no_load)
    monkeypatch.setattr(models, "tiny_model", no_load)
    rc = main(["compress", "--model", "tiny-gpt2", "--method", "wanda", "--sparsity", "0.5", "--calib", "pydoc",
               "--nsamples", "2", "--calib-seqlen", "1024", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "--calib-seqlen (the calibration window) is 1024 tokens" in err and "(n_positions=512)" in err
    assert not (tmp_path / "out").exists()


# ---- item 7: a bad calibration file fails before the model is loaded ------------------------------------------

def test_compress_cli_reads_calibration_text_before_loading(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "calib.jsonl"
    bad.write_bytes('{"text": "plain"}\n{"text": "caf\u00e9"}\n'.encode("cp1252"))

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the calibration file was read")

    monkeypatch.setattr(models, "load_model", no_load)
    rc = main(["compress", "--model", "tiny-llama", "--method", "wanda", "--sparsity", "0.5", "--calib", str(bad),
               "--nsamples", "2", "--calib-seqlen", "16", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{bad}:2: text file is not UTF-8: byte(s) e9 at column 14" in err


# ---- item 4: GGUF files ----------------------------------------------------------------------------------------

def test_parse_gguf_forms(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert models.parse_gguf(str(f)) == (str(tmp_path), "m.gguf")
    assert models.parse_gguf(f"{tmp_path}::m.gguf") == (str(tmp_path), "m.gguf")
    assert models.parse_gguf("org/repo::model-Q4_K_M.gguf") == ("org/repo", "model-Q4_K_M.gguf")
    assert models.parse_gguf("org/repo") is None and models.parse_gguf(str(tmp_path)) is None
    with pytest.raises(LmsqueezeError, match="GGUF file '.*missing.gguf' does not exist"):
        models.load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(LmsqueezeError, match=r"expected DIR::FILE.gguf"):
        models.load_model(f"{tmp_path}::weights.bin")


# ---- item 5: third-party quantized checkpoints ------------------------------------------------------------------

def _quantized_dir(tmp_path, quant_method: str):
    """A tiny checkpoint whose config.json carries a quantizer's quantization_config (weights left dense:
    the loader-package check happens before any weight is read)."""
    model, tok = models.load_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": quant_method, "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("method, module, pip", [("compressed-tensors", "compressed_tensors", "compressed-tensors"),
                                                 ("gptq", "gptqmodel", "optimum gptqmodel")])
def test_missing_quantizer_package_is_one_line(tmp_path, monkeypatch, method, module, pip):
    import importlib.util

    real = importlib.util.find_spec
    hidden = {module, "compressed_tensors", "gptqmodel", "auto_gptq", "optimum"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.split(".")[0] in hidden else real(n, *a))
    d = _quantized_dir(tmp_path, method)
    with pytest.raises(LmsqueezeError) as e:
        models.load_model(str(d))
    msg = str(e.value)
    assert "\n" not in msg and f"is a {method}-quantized checkpoint" in msg and f"pip install {pip}" in msg


def _compressed_tensors_checkpoint(directory):
    """tiny-llama packed to 4-bit groups of 16 by the compressed-tensors package itself (as llm-compressor
    writes it): config.json carries quant_method compressed-tensors, the weights are packed int32."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    model, tok = models.load_model("tiny-llama")
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16)
    apply_quantization_config(model, QuantizationConfig(config_groups={"g": QuantizationScheme(targets=["Linear"],
                                                                                             weights=args)},
                                                        ignore=["lm_head"], format="pack-quantized"))
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "weight_scale"):
                groups = mod.weight.reshape(mod.weight.shape[0], -1, 16)
                mod.weight_scale.copy_((groups.abs().amax(-1) / 7.5).clamp(min=1e-8))
                mod.weight_zero_point.zero_()
                mod.quantization_status = QuantizationStatus.FROZEN
    comp = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    comp.compress_model(model)
    model.save_pretrained(directory)
    comp.update_config(directory)
    tok.save_pretrained(directory)
    return ct


def test_compressed_tensors_checkpoint_loads_with_its_own_loader(tmp_path):
    from transformers import AutoModelForCausalLM

    _compressed_tensors_checkpoint(tmp_path)
    config = models.load_config(str(tmp_path))
    assert models.quantization_method(config) == "compressed-tensors"
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # what from_pretrained does on its own
    ids = torch.tensor([[5, 17, 99, 200, 3]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        for dtype in ("fp32", "bf16"):  # the asked dtype does not apply to packed weights: the checkpoint's own
            model, tok = models.load_model(str(tmp_path), dtype=dtype)
            assert model.dtype == reference.dtype and tok.pad_token is not None
            assert torch.equal(model(input_ids=ids).logits, expected)
