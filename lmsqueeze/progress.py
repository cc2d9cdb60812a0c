"""Progress bars (tqdm) that one switch silences: `--quiet` on the CLI, LMSQUEEZE_QUIET=1, or set_quiet()."""
from __future__ import annotations

import os

from tqdm.auto import tqdm

_quiet = os.environ.get("LMSQUEEZE_QUIET", "0") == "1"


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


def progress(iterable=None, **kwargs):
    """tqdm, disabled when quiet; kwargs go to tqdm (desc, total, unit, leave, ...)."""
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=_quiet, **kwargs)
