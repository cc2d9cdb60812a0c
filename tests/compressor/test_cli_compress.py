"""`lmsqueeze compress`: a thin shell; bad input ends in one clear line."""
import json
import subprocess
import sys

import pytest

from lmsqueeze.cli import main

BASE = ["compress", "--model", "tiny-llama", "--calib", "pydoc", "--nsamples", "4", "--calib-seqlen", "32", "--dtype", "fp32"]


def test_compress_writes_a_checkpoint_and_a_summary(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["--quiet", *BASE, "--method", "sparsegpt", "--sparsity", "2:4", "--bits", "4", "--group-size", "16",
                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| sparsegpt 2:4 + 4-bit g16 |" in printed and "peak RSS" in printed and "solve" in printed
    meta = json.loads((out / "lmsqueeze.json").read_text())
    assert meta["config"]["sparsity"] == "2:4" and meta["config"]["bits"] == 4
    assert meta["calibration"]["source"] == "pydoc" and meta["calibration"]["nsamples"] == 4
    assert meta["model"] == "tiny-llama" and (out / "config.json").exists()


@pytest.mark.parametrize("flags,message", [
    (["--method", "wanda", "--sparsity", "1.2"], "sparsity 1.2 is out of range"),
    (["--method", "magnitude", "--sparsity", "3:2"], "N:M pattern 3:2 is invalid"),
    (["--method", "gptq", "--bits", "5"], "bits 5 is not supported; valid: 2, 3, 4, 8"),
    (["--method", "wanda", "--bits", "4"], "method 'wanda' does not take --bits"),
])
def test_bad_input_is_one_line(tmp_path, capsys, flags, message):
    assert main([*BASE, *flags, "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lmsqueeze: error: {err.removeprefix('lmsqueeze: error: ')}" and message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_unknown_method_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmsqueeze", *BASE, "--method", "obs", "--output-dir",
                           str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --method: invalid choice: 'obs'" in proc.stderr


def test_data_free_methods_run_no_calibration_unless_the_error_is_asked_for(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "rtn"
    try:
        # no --dtype: the one default (auto: fp32 on CPU); no --calib: a data-free method never reads one
        assert main(["--quiet", "compress", "--model", "tiny-llama", "--method", "rtn", "--bits", "4", "--threads", "1",
                     "--output-dir", str(out)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "calibration:" not in err
    meta = json.loads((out / "lmsqueeze.json").read_text())
    assert meta["schema"] == "lmsqueeze.compressed/1" and meta["dtype"] == "fp32"
    assert meta["calibration"] == {"source": None}
    assert meta["timings"]["forward"] == 0.0 and meta["timings"]["propagate"] == 0.0
    assert all(m["recon_error"] is None for m in meta["modules"])

    out = tmp_path / "rtn-measured"
    assert main(["--quiet", *BASE, "--method", "rtn", "--bits", "4", "--measure-error", "--output-dir", str(out)]) == 0
    assert "calibration: 4 x 32 = 128 tokens of pydoc through every layer (rtn: --measure-error)" in \
        capsys.readouterr().err
    meta = json.loads((out / "lmsqueeze.json").read_text())
    assert meta["calibration"]["source"] == "pydoc" and meta["calibration"]["tokens"] == 128
    assert all(m["recon_error"] > 0 for m in meta["modules"])


def test_no_measure_error_skips_the_measurement_entirely(tmp_path, capsys):
    out = tmp_path / "sgpt"
    assert main(["--quiet", *BASE, "--method", "sparsegpt", "--sparsity", "0.5", "--no-measure-error",
                 "--output-dir", str(out)]) == 0
    meta = json.loads((out / "lmsqueeze.json").read_text())
    assert all(m["recon_error"] is None and m["sparsity"] == 0.5 for m in meta["modules"])
    assert meta["timings"]["error"] == 0.0 and meta["timings"]["statistics"] > 0  # calibrated, nothing measured
