"""The method registry: one module per compression method, found by name.

A method module holds the pure per-layer math (it knows nothing of models) and registers it once:

    register("wanda", WandaConfig, kind="prune", needs=("col_sq_norm",),
             solve=lambda W, stats, cfg, keep_grid: wanda(W, stats["col_sq_norm"], cfg),
             summary="prune the smallest |W| * ||x|| per output row")

- config: the frozen, validated config dataclass (lmsqueeze.compressor.config._Config subclass) whose
  class attribute `method` is the registered name;
- kind: "prune", "quantize" or "both" (a pruner that also quantizes when given bits: joint);
- needs: the calibration statistics the driver collects for it, a tuple of STATISTICS (empty: data-free);
- solve(W [out, in], stats {statistic: tensor}, cfg, keep_grid) -> LayerResult, per linear module; or
  solve_group({name: W}, stats, cfg, keep_grid) -> {name: LayerResult} for the modules that read one input
  tensor together (q/k/v, gate/up), for methods that must treat them as one (AWQ's shared input scale).

Every module in this package whose name does not start with "_" is imported on first use, so adding a
method is adding one file here. Methods outside the package are loaded from LMSQUEEZE_METHODS: module
names or paths of .py files, separated by commas. The CLI's --method choices, the study grid and the
report read `registry()`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lmsqueeze.compressor.methods._common import (
    LayerResult,
    check_finite,
    check_result,
    keep_from_scores,
    prepare_hessian,
)
from lmsqueeze.errors import LmsqueezeError

# the statistics the driver can collect per distinct input tensor x [tokens, in] (valid tokens only):
#   col_sq_norm  [in]      mean x_j^2                 (Wanda; OWL's outlier scores)
#   hessian      [in, in]  2 X^T X / n                (SparseGPT, GPTQ, AWQ's output error)
#   act_absmean  [in]      mean |x_j|                 (AWQ's activation scale)
#   act_absmax   [in]      max |x_j|                  (LLM.int8's outlier features)
STATISTICS = ("col_sq_norm", "hessian", "act_absmean", "act_absmax")
KINDS = ("prune", "quantize", "both")
ENV_PLUGINS = "LMSQUEEZE_METHODS"


@dataclass(frozen=True)
class Method:
    """One registered method (see the module docstring)."""

    name: str
    config: type
    kind: str
    needs: tuple[str, ...]
    solve: Callable | None
    summary: str
    solve_group: Callable | None = None
    module: str = ""

    @property
    def prunes(self) -> bool:
        return self.kind in ("prune", "both")

    @property
    def quantizes(self) -> bool:
        return self.kind in ("quantize", "both")

    @property
    def data_free(self) -> bool:
        return not self.needs

    @property
    def takes_bits(self) -> bool:
        """Whether its config has a `bits` field a study can vary (NF4 and LLM.int8 have fixed widths)."""
        import dataclasses

        return any(f.name == "bits" for f in dataclasses.fields(self.config))


_REGISTRY: dict[str, Method] = {}
_loaded = {"builtin": False, "plugins": None, "plugin_names": ()}


def register(name: str, config: type, *, kind: str, needs: tuple[str, ...] = (), solve: Callable | None = None,
             summary: str = "", solve_group: Callable | None = None) -> Method:
    """Add a method under `name` (what --method takes); returns its record. See the module docstring."""
    if kind not in KINDS:
        raise LmsqueezeError(f"method '{name}' declares kind '{kind}'; valid: {', '.join(KINDS)}")
    needs = tuple(needs)
    bad = [s for s in needs if s not in STATISTICS]
    if bad:
        raise LmsqueezeError(f"method '{name}' needs unknown statistic(s) {', '.join(bad)}; valid: {', '.join(STATISTICS)}")
    if (solve is None) == (solve_group is None):
        raise LmsqueezeError(f"method '{name}' must give exactly one of solve= and solve_group=")
    if getattr(config, "method", None) != name:
        raise LmsqueezeError(f"method '{name}' registers {config.__name__}, whose `method` is "
                             f"'{getattr(config, 'method', None)}'; they must match")
    module = getattr(solve or solve_group, "__module__", "")
    old = _REGISTRY.get(name)
    if old is not None and old.module != module:
        raise LmsqueezeError(f"method '{name}' is registered twice ({old.module} and {module})")
    config.needs = needs  # a config alone says what calibration it needs (the CLI asks before loading data)
    method = Method(name, config, kind, needs, solve, summary, solve_group, module)
    _REGISTRY[name] = method
    return method


def _load_builtin() -> None:
    if _loaded["builtin"]:
        return
    _loaded["builtin"] = True
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def _load_plugins() -> None:
    spec = os.environ.get(ENV_PLUGINS, "")
    if _loaded["plugins"] == spec:
        return
    for name in _loaded["plugin_names"]:  # the variable changed: the methods it named before are gone
        _REGISTRY.pop(name, None)
    _loaded["plugins"] = spec
    before = set(_REGISTRY)
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        if entry.endswith(".py"):
            path = Path(entry)
            if not path.is_file():
                raise LmsqueezeError(f"{ENV_PLUGINS} names {entry}, which is not a file")
            name = f"lmsqueeze_method_{path.stem}"
            found = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(found)
            sys.modules[name] = mod
            found.loader.exec_module(mod)
        else:
            try:
                if entry in sys.modules:  # registered before, then dropped: run its register() again
                    importlib.reload(sys.modules[entry])
                else:
                    importlib.import_module(entry)
            except ImportError as exc:
                raise LmsqueezeError(f"{ENV_PLUGINS} names module '{entry}', which does not import: {exc}") from None
    _loaded["plugin_names"] = tuple(n for n in _REGISTRY if n not in before)


def registry() -> dict[str, Method]:
    """Every method by name: pruners, then pruners that also quantize, then quantizers; within a kind in
    registration order (the builtins by file name, then LMSQUEEZE_METHODS)."""
    _load_builtin()
    _load_plugins()
    order, kinds = list(_REGISTRY), ("prune", "both", "quantize")
    return {m.name: m for m in sorted(_REGISTRY.values(), key=lambda m: (kinds.index(m.kind), order.index(m.name)))}


def names() -> tuple[str, ...]:
    return tuple(registry())


def get(name: str) -> Method:
    """The method called `name`, or one error that lists the valid names."""
    reg = registry()
    if name not in reg:
        raise LmsqueezeError(f"unknown method '{name}'; valid: {', '.join(reg)}")
    return reg[name]


def compress_weight(W: torch.Tensor, stat, cfg, keep_grid: bool = False) -> LayerResult:
    """Compress one weight W [out, in] with cfg's method.

    stat: {statistic: tensor} as the method's `needs` lists, or for a method that needs one statistic the
    tensor itself (col_sq_norm [in] for wanda, H [in, in] for sparsegpt and gptq), or None when data-free
    (a data-free method ignores a tensor it is given).
    keep_grid: quantizers also return their QuantGrid (ignored by pure pruners).
    Methods registered with solve_group are run as a group of one.
    """
    method = get(cfg.method)
    if stat is None or isinstance(stat, dict):
        stats = stat or {}
    elif not method.needs:  # a data-free method ignores a statistic it was handed, as the dispatch always did
        stats = {}
    elif len(method.needs) == 1:
        stats = {method.needs[0]: stat}
    else:
        raise LmsqueezeError(f"{cfg.method} needs the statistics {', '.join(method.needs)}: pass them as a dict")
    missing = [s for s in method.needs if s not in stats]
    if missing:
        raise LmsqueezeError(f"{cfg.method} needs the statistic(s) {', '.join(missing)}")
    if method.solve is not None:
        return method.solve(W, stats, cfg, keep_grid)
    return method.solve_group({"w": W}, stats, cfg, keep_grid)["w"]


# the per-layer functions of the original five, importable from here as before
from lmsqueeze.compressor.methods.gptq import gptq  # noqa: E402
from lmsqueeze.compressor.methods.magnitude import magnitude  # noqa: E402
from lmsqueeze.compressor.methods.rtn import rtn  # noqa: E402
from lmsqueeze.compressor.methods.sparsegpt import sparsegpt  # noqa: E402
from lmsqueeze.compressor.methods.wanda import wanda  # noqa: E402

__all__ = ["KINDS", "STATISTICS", "LayerResult", "Method", "check_finite", "check_result", "compress_weight", "get",
           "gptq", "keep_from_scores", "magnitude", "names", "prepare_hessian", "register", "registry", "rtn",
           "sparsegpt", "wanda"]
