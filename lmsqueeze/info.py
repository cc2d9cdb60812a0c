"""What this process can run: versions, the C++ extension and its CPU features, Triton, CUDA."""
from __future__ import annotations

import os
import platform


def backend_report() -> dict:
    """What this process can run: versions, the C++ extension, CPU features, Triton, CUDA."""
    import importlib.metadata as md

    import torch

    from lmsqueeze import __version__, _ext
    from lmsqueeze.kernels._dispatch import triton_available, triton_interpreting

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    C = _ext.ext()
    rep = {
        "versions": {"lmsqueeze": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "transformers": version("transformers"), "triton": version("triton")},
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "cpp_extension": {"built": C is not None, "why_not": _ext.EXT_ERROR},
        "triton": {"installed": triton_available(), "interpreter": triton_interpreting()},
        "cuda": {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available(),
                 "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                 "extension_kernels": bool(C is not None and C.has_cuda())},
    }
    if C is not None:
        rep["cpp_extension"]["cpu_features"] = dict(C.cpu_features())
        rep["cpp_extension"]["active_isa"] = C.active_isa()
        if hasattr(C, "amx_why_not"):  # AMX tiles for hessian_update: usable, or why not
            rep["cpp_extension"]["amx"] = C.amx_why_not() or "usable"
            rep["cpp_extension"]["hessian_update_bf16"] = C.hessian_update_cpu_path("bfloat16")
    return rep


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
