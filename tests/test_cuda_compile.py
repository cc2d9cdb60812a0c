"""The CUDA kernel sources include no torch header, so nvcc checks them here even without a GPU."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(source, tmp_path):
    with open(source) as f:
        assert "torch/" not in f.read(), f"{source} includes a torch header; keep torch glue in ops_cuda.cpp"
    cmd = ["nvcc", "-c", "-O3", "-std=c++17", "-arch=sm_90", "-I", os.path.join(ROOT, "csrc"), source,
           "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed on {source}:\n{proc.stderr}"


def test_there_are_cuda_sources():
    assert SOURCES, "no CUDA sources found under csrc/cuda"
