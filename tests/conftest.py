import os

import pytest
import torch

os.environ.setdefault("LMSQUEEZE_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels run in the interpreter; triton reads this when a kernel module is
# imported, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    torch.manual_seed(0)


@pytest.fixture
def ext():
    from lmsqueeze import _ext

    if _ext.ext() is None:
        pytest.skip(f"C++ extension not built: {_ext.EXT_ERROR}")
    return _ext.ext()


def _triton_ok():
    import importlib.util

    return importlib.util.find_spec("triton") is not None


requires_triton = pytest.mark.skipif(not _triton_ok(), reason="triton is not installed")


