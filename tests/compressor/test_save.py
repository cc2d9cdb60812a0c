"""save_compressed: a failed write (disk full) is one line naming the directory and the OS error and
leaves the old checkpoint as it was; checkpoints get the permissions save_pretrained gives under the umask."""
import errno
import os
import stat

import pytest
import torch

from lmsqueeze.compressor import compress, make_config, save_compressed
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models import tiny_model

CALIB = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def compressed():
    model = tiny_model("tiny-llama")
    cfg = make_config("magnitude", sparsity=0.5)
    return model, compress(model, cfg, CALIB)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_checkpoint_permissions_follow_the_umask(tmp_path, compressed, umask_027):
    model, report = compressed
    save_compressed(model, None, tmp_path / "ckpt", report)
    plain = tmp_path / "plain"
    model.save_pretrained(plain)                                     # a plain save: directory by the umask
    assert _mode(tmp_path / "ckpt") == _mode(plain) == 0o750          # (mkdtemp alone would give 0700)
    assert _mode(plain / "config.json") == 0o640
    names = sorted(f.name for f in (tmp_path / "ckpt").iterdir())
    assert "model.safetensors" in names and "lmsqueeze.json" in names and "README.md" in names
    for f in (tmp_path / "ckpt").iterdir():                          # every file as open() makes it: 0666 & ~umask
        assert _mode(f) == 0o640, f.name


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/pretend/model.safetensors")


def test_disk_full_is_one_line_and_keeps_the_old_checkpoint(tmp_path, compressed, monkeypatch):
    model, report = compressed
    target = tmp_path / "ckpt"
    save_compressed(model, None, target, report)
    before = {f.name: f.read_bytes() for f in target.iterdir()}
    monkeypatch.setattr(type(model), "save_pretrained", _disk_full)
    with pytest.raises(LmsqueezeError) as exc:
        save_compressed(model, None, target, report)
    msg = str(exc.value)
    assert len(msg.splitlines()) == 1 and str(target) in msg and "No space left on device" in msg
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]   # no temporary directory left behind


def test_disk_full_through_the_cli_has_no_traceback(tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    from lmsqueeze.cli import main

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", _disk_full)
    out = tmp_path / "x"
    rc = main(["--quiet", "compress", "--model", "tiny-llama", "--calib", "pydoc", "--nsamples", "2", "--calib-seqlen", "16",
               "--dtype", "fp32", "--method", "magnitude", "--sparsity", "0.5", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"could not write the checkpoint to '{out}': No space left on device" in err and not out.exists()
