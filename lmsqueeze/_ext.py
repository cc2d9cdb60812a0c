"""Loads the compiled extension lmsqueeze._C if it was built; every op falls back to its reference."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("lmsqueeze")

_C = None
EXT_ERROR: str | None = None

if os.environ.get("LMSQUEEZE_NO_EXT", "0") == "1":
    EXT_ERROR = "LMSQUEEZE_NO_EXT=1"
else:
    try:
        import torch  # noqa: F401  (the extension links against torch's libraries)

        from lmsqueeze import _C as _loaded

        _C = _loaded
    except ImportError as exc:  # not built: plain `pip install` with LMSQUEEZE_NO_EXT, or a source checkout
        EXT_ERROR = f"lmsqueeze._C is not built ({exc})"


def ext():
    """The extension module, or None."""
    return _C


def has_op(name: str) -> bool:
    return _C is not None and hasattr(_C, name)
