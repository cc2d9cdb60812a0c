"""--offload disk: layers on disk, one in memory at a time; same result as in memory, loadable checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmsqueeze import LmsqueezeError, compress, load_compressed, save_compressed
from lmsqueeze.compressor import SparseGPTConfig, WandaConfig
from lmsqueeze.compressor.driver import find_decoder_layers
from lmsqueeze.compressor.offload import DiskOffload, check_mode
from lmsqueeze.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def calib(n=5, t=24):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 256, (n, t), generator=g)


@pytest.mark.parametrize("arch,cfg", [("tiny-llama", SparseGPTConfig(sparsity=0.5, blocksize=16)),
                                      ("tiny-gpt2", WandaConfig(sparsity="2:4"))])
def test_disk_offload_equals_in_memory(tmp_path, arch, cfg):
    want_model, tok = load_model(arch)
    want = compress(want_model, cfg, calib(), batch_size=2)
    model, _ = load_model(arch)
    off = DiskOffload.from_model(model, tmp_path / "work")
    layers = find_decoder_layers(model)
    assert all(p.device.type == "meta" for p in layers.parameters())  # nothing of the layers in memory
    got = compress(model, cfg, calib(), batch_size=2, offload=off)
    assert got.offload == "disk" and "disk offload" in got.summary_markdown()
    assert all(p.device.type == "meta" for p in layers.parameters())  # written back and dropped
    assert [m.sparsity for m in got.modules] == [m.sparsity for m in want.modules]
    assert [m.recon_error for m in got.modules] == [m.recon_error for m in want.modules]
    save_compressed(model, tok, tmp_path / "out", got, offload=off)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len({v for v in index["weight_map"].values()}) == len(layers) + 1
    loaded, _, meta = load_compressed(tmp_path / "out")
    assert meta["offload"] == "disk"
    ref = want_model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k  # the same computation on the same values: bit-identical


def test_meta_layers_without_offload_are_refused():
    model, _ = load_model("tiny-llama")
    find_decoder_layers(model).to("meta")
    with pytest.raises(LmsqueezeError, match="meta tensors"):
        compress(model, WandaConfig(sparsity=0.5), calib())


def test_bad_mode():
    with pytest.raises(LmsqueezeError, match="none, cpu, disk"):
        check_mode("ssd")


def test_cli_offload_disk(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "lmsqueeze", "--quiet", "compress", "--model", "tiny-llama",
                          "--method", "wanda", "--sparsity", "0.5", "--calib", "pydoc", "--nsamples", "4",
                          "--calib-seqlen", "32", "--offload", "disk", "--output-dir", str(out)],
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(disk offload)" in res.stdout
    assert not list(tmp_path.glob(".lmsqueeze-offload-*"))  # the work directory is removed
    model, _, meta = load_compressed(out)
    assert meta["offload"] == "disk"
    w = model.model.layers[0].mlp.up_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5)
