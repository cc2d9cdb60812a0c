"""Backend choice shared by every op (DESIGN.md, "one contract for every op").

Auto-selection: CUDA tensor -> cuda, else triton, else ref; CPU tensor -> cpu (C++), else ref.
`backend=`, LMSQUEEZE_BACKEND_<OP> or LMSQUEEZE_BACKEND forces one (in that order); a forced backend
that cannot run raises, an automatic choice that cannot run falls back and says why once per
(op, backend).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from lmsqueeze import _ext
from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger("lmsqueeze")

BACKENDS = ("ref", "cpu", "cuda", "triton")
_warned: set[tuple[str, str]] = set()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def why_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    """None when `backend` can run `op` on tensors on `device`; otherwise the reason, in one line."""
    if backend == "ref":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend takes CPU tensors, got {device.type}"
        if not _ext.has_op(f"{op}_cpu"):
            return _ext.EXT_ERROR or f"lmsqueeze._C has no {op}_cpu"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend takes CUDA tensors, got {device.type}"
        if not _ext.has_op(f"{op}_cuda"):
            return _ext.EXT_ERROR or "lmsqueeze._C was built without CUDA"
        return None
    if backend == "triton":
        if not triton_available():
            return "triton is not installed (pip install triton)"
        if device.type == "cpu" and not triton_interpreting():
            return "triton runs CPU tensors only under TRITON_INTERPRET=1"
        return None
    return f"unknown backend '{backend}'"


def choose_backend(op: str, device: torch.device, backend: str | None, implemented: tuple[str, ...]) -> str:
    """The backend that runs `op` for tensors on `device`.

    implemented: the backends this op has (always includes "ref").
    """
    # per op (LMSQUEEZE_BACKEND_HESSIAN_UPDATE=ref: time one kernel's reference inside a whole run),
    # then for every op
    forced = (backend or os.environ.get(f"LMSQUEEZE_BACKEND_{op.upper()}") or os.environ.get("LMSQUEEZE_BACKEND")
              or None)
    if forced is not None:
        if forced not in BACKENDS:
            raise LmsqueezeError(f"unknown backend '{forced}'; valid: {', '.join(BACKENDS)}")
        if forced not in implemented:
            raise LmsqueezeError(f"{op} has no '{forced}' backend; it has: {', '.join(implemented)}")
        reason = why_unavailable(op, forced, device)
        if reason is not None:
            raise LmsqueezeError(f"backend '{forced}' cannot run {op}: {reason}")
        return forced
    order = ("cuda", "triton", "ref") if device.type == "cuda" else ("cpu", "ref")
    for name in order:
        if name not in implemented:
            continue
        reason = why_unavailable(op, name, device)
        if reason is None:
            return name
        if (op, name) not in _warned:
            _warned.add((op, name))
            log.info("%s: not using the %s backend: %s", op, name, reason)
    return "ref"
