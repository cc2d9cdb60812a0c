"""Method configs: frozen dataclasses validated on construction, one per method.

Sparsity is a fraction in [0, 1) (unstructured) or an "N:M" string (N kept in every M consecutive
inputs, N < M: 2:4, 4:8, ...). Quantization: bits in (2, 3, 4, 8), group size in columns (-1: one
scale per output channel), symmetric or asymmetric, act-order (GPTQ).

Every config also names which linear layers it touches: `include` and `exclude` are fnmatch patterns
on the module's full name (e.g. "model.layers.3.mlp.down_proj"); by default every linear layer
inside the decoder layers is compressed, and embeddings and `lm_head` never are (they live outside
the decoder layers).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels.masks import check_nm
from lmsqueeze.kernels.obs import BITS, PruneSpec, QuantSpec


def parse_sparsity(value) -> float | tuple[int, int]:
    """0.5, "0.5" -> 0.5;  "2:4" -> (2, 4). Anything else is a clear error."""
    if isinstance(value, bool):
        raise LmsqueezeError(f"sparsity {value!r} is invalid; give a fraction in [0, 1) or N:M such as 2:4")
    if isinstance(value, (tuple, list)) and len(value) == 2:
        n, m = value
        check_nm(n, m)
        return int(n), int(m)
    if isinstance(value, str) and ":" in value:
        left, _, right = value.partition(":")
        try:
            n, m = int(left), int(right)
        except ValueError:
            raise LmsqueezeError(f"sparsity '{value}' is invalid; N:M needs two integers, e.g. 2:4 or 4:8") from None
        check_nm(n, m)
        return n, m
    try:
        frac = float(value)
    except (TypeError, ValueError):
        raise LmsqueezeError(f"sparsity {value!r} is invalid; give a fraction in [0, 1) or N:M such as 2:4") from None
    if not 0.0 <= frac < 1.0:
        raise LmsqueezeError(f"sparsity {value} is out of range; valid: a fraction 0 <= s < 1, or N:M such as 2:4")
    return frac


def sparsity_str(value) -> str:
    parsed = parse_sparsity(value)
    return f"{parsed[0]}:{parsed[1]}" if isinstance(parsed, tuple) else f"{parsed:g}"


@dataclass(frozen=True)
class _Config:
    """Fields every method shares."""

    blocksize: int = 128
    percdamp: float = 0.01
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    method = ""  # set by each subclass (a class attribute, not a field)
    needs = ()   # the calibration statistics; set from the method registry (lmsqueeze.compressor.methods)

    def __post_init__(self):
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise LmsqueezeError(f"blocksize {self.blocksize!r} is invalid; valid: an integer >= 1 (default 128)")
        if not 0.0 <= float(self.percdamp) < 1.0:
            raise LmsqueezeError(f"percdamp {self.percdamp} is out of range; valid: 0 <= percdamp < 1 (default 0.01)")
        for name in ("include", "exclude"):
            val = getattr(self, name)
            if isinstance(val, str):
                val = (val,)
            if not all(isinstance(p, str) for p in val):
                raise LmsqueezeError(f"{name} must be a list of module-name patterns, got {val!r}")
            object.__setattr__(self, name, tuple(val))

    def selects(self, name: str) -> bool:
        """Whether the linear module called `name` (inside a decoder layer) is compressed."""
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def to_dict(self) -> dict:
        d = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        if d.get("layer_sparsity") == "uniform":  # the default spread: written as before OWL existed (same study keys)
            for key in ("layer_sparsity", "owl_threshold", "owl_lambda"):
                d.pop(key)
        return d

    def describe(self) -> str:
        return self.method

    @classmethod
    def from_dict(cls, d: dict):
        """The config that to_dict() wrote (the method key may be left out)."""
        d = {"method": cls.method, **d}
        if d["method"] != cls.method:
            raise LmsqueezeError(f"{cls.__name__}.from_dict got a '{d['method']}' config")
        return from_dict(d)


def _set_sparsity(cfg) -> None:
    parsed = parse_sparsity(cfg.sparsity)
    object.__setattr__(cfg, "sparsity", sparsity_str(parsed) if isinstance(parsed, tuple) else parsed)
    cfg._check_layer_sparsity()


def _owl_note(cfg) -> str:
    return " owl" if cfg.layer_sparsity == "owl" else ""


def _check_quant(cfg) -> None:
    if cfg.bits not in BITS:
        raise LmsqueezeError(f"bits {cfg.bits} is not supported; valid: {', '.join(map(str, BITS))}")
    if not isinstance(cfg.group_size, int) or (cfg.group_size != -1 and cfg.group_size < 1):
        raise LmsqueezeError(f"group size {cfg.group_size!r} is invalid; valid: -1 (per channel) or an integer >= 1")


LAYER_SPARSITY = ("uniform", "owl")


@dataclass(frozen=True)
class _Sparse:
    """Mixin: the parsed sparsity, and how it is spread over the decoder layers.

    layer_sparsity "uniform": every layer gets `sparsity`; "owl" (Yin et al. 2023, outlier-weighted
    layerwise sparsity): layers with more outlier weights (Wanda score above owl_threshold times the mean of
    their module) are pruned less, around the same mean; the ratios spread over 2 * owl_lambda.
    Unstructured sparsity only (an N:M pattern fixes every layer's ratio).
    """

    layer_sparsity: str = "uniform"
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08

    def _check_layer_sparsity(self) -> None:
        if self.layer_sparsity not in LAYER_SPARSITY:
            raise LmsqueezeError(f"layer sparsity '{self.layer_sparsity}' is invalid; valid: {', '.join(LAYER_SPARSITY)}")
        if self.layer_sparsity == "uniform":
            return
        if self.nm:
            raise LmsqueezeError(f"--layer-sparsity owl spreads an unstructured sparsity over the layers; N:M "
                                 f"{self.sparsity} fixes every layer's ratio (valid with owl: a fraction such as 0.7)")
        if not float(self.owl_threshold) > 0:
            raise LmsqueezeError(f"owl_threshold {self.owl_threshold} is invalid; valid: > 0 (default 5)")
        s, lam = self.fraction, float(self.owl_lambda)
        if not (0.0 <= lam and s - 2 * lam >= 0.0 and s + 2 * lam < 1.0):
            raise LmsqueezeError(f"owl_lambda {self.owl_lambda} is out of range for sparsity {s:g}: the layer ratios "
                                 f"reach s +- 2 lambda, which must stay in [0, 1); valid: 0 <= lambda <= "
                                 f"{min(s / 2, (1 - s) / 2 - 1e-9):.4g}")

    @property
    def nm(self) -> tuple[int, int] | None:
        parsed = parse_sparsity(self.sparsity)
        return parsed if isinstance(parsed, tuple) else None

    @property
    def fraction(self) -> float:
        """The fraction of weights pruned: s, or 1 - N/M."""
        parsed = parse_sparsity(self.sparsity)
        return 1.0 - parsed[0] / parsed[1] if isinstance(parsed, tuple) else parsed

    def prune_spec(self) -> PruneSpec:
        nm = self.nm
        return PruneSpec(n=nm[0], m=nm[1]) if nm else PruneSpec(sparsity=float(self.sparsity))

    def check_width(self, cols: int, name: str) -> None:
        nm = self.nm
        if nm and cols % nm[1]:
            raise LmsqueezeError(f"N:M {nm[0]}:{nm[1]} needs a width that is a multiple of {nm[1]}; "
                                 f"{name} has {cols} input columns")


@dataclass(frozen=True)
class MagnitudeConfig(_Sparse, _Config):
    """Prune the smallest |W|, compared over the whole layer (scope="layer") or within each output row."""

    sparsity: float | str = 0.5
    scope: str = "layer"
    method = "magnitude"

    def __post_init__(self):
        super().__post_init__()
        _set_sparsity(self)
        if self.scope not in ("layer", "row"):
            raise LmsqueezeError(f"magnitude scope '{self.scope}' is invalid; valid: layer, row")

    def describe(self) -> str:
        return (f"magnitude {self.sparsity}" + (" per row" if self.scope == "row" and not self.nm else "")
                + _owl_note(self))


@dataclass(frozen=True)
class WandaConfig(_Sparse, _Config):
    """Prune the smallest |W_ij| * ||X_j||_2 within each output row (or each N:M group); no weight update."""

    sparsity: float | str = 0.5
    method = "wanda"

    def __post_init__(self):
        super().__post_init__()
        _set_sparsity(self)

    def describe(self) -> str:
        return f"wanda {self.sparsity}" + _owl_note(self)


@dataclass(frozen=True)
class SparseGPTConfig(_Sparse, _Config):
    """Blocked OBS pruning with weight update; with `bits`, jointly quantized (the zeros stay exact)."""

    sparsity: float | str = 0.5
    bits: int | None = None
    group_size: int = -1
    sym: bool = False
    method = "sparsegpt"

    def __post_init__(self):
        super().__post_init__()
        _set_sparsity(self)
        if self.bits is not None:
            _check_quant(self)
        nm = self.nm
        if nm and self.blocksize % nm[1]:
            raise LmsqueezeError(f"blocksize {self.blocksize} must be a multiple of M = {nm[1]} for N:M {self.sparsity}")

    def quant_spec(self) -> QuantSpec | None:
        return None if self.bits is None else QuantSpec(self.bits, self.group_size, self.sym)

    def describe(self) -> str:
        q = "" if self.bits is None else f" + {self.bits}-bit" + ("" if self.group_size == -1 else f" g{self.group_size}")
        return f"sparsegpt {self.sparsity}{q}" + _owl_note(self)


@dataclass(frozen=True)
class GPTQConfig(_Config):
    """Blocked OBS quantization onto the min/max grid per group; act_order visits columns by descending diag(H)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    method = "gptq"

    def __post_init__(self):
        super().__post_init__()
        _check_quant(self)

    def quant_spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym)

    def describe(self) -> str:
        return (f"gptq {self.bits}-bit" + ("" if self.group_size == -1 else f" g{self.group_size}")
                + (" sym" if self.sym else "") + (" act-order" if self.act_order else ""))


@dataclass(frozen=True)
class RTNConfig(_Config):
    """Round to nearest on GPTQ's grid (the baseline GPTQ is measured against)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    method = "rtn"

    def __post_init__(self):
        super().__post_init__()
        _check_quant(self)

    def quant_spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym)

    def describe(self) -> str:
        return (f"rtn {self.bits}-bit" + ("" if self.group_size == -1 else f" g{self.group_size}")
                + (" sym" if self.sym else ""))


Config = _Config  # every method's config derives from it


def __getattr__(name):
    # METHODS and CONFIGS come from the method registry, which imports this module: looked up on use
    if name == "METHODS":
        from lmsqueeze.compressor.methods import names

        return names()
    if name == "CONFIGS":
        from lmsqueeze.compressor.methods import registry

        return {n: m.config for n, m in registry().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def config_class(method: str):
    """The config dataclass of a registered method; an unknown name is one error listing the valid ones."""
    from lmsqueeze.compressor.methods import get

    return get(method).config


def from_dict(d: dict):
    """The config that to_dict() wrote."""
    d = dict(d)
    cls = config_class(d.pop("method", None))
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise LmsqueezeError(f"{cls.method} config has no field(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # JSON lists back to tuples
    return cls(**d)


def make_config(method: str, **options):
    """A config from loose options (the CLI's flags); options left as None take the method's defaults.

    An option the method does not take (e.g. bits for wanda) is an error, not silently ignored.
    """
    cls = config_class(method)
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    bad = sorted(set(given) - names)
    if bad:
        flags = ", ".join("--" + b.replace("_", "-") for b in bad)
        raise LmsqueezeError(f"method '{method}' does not take {flags}")
    return cls(**given)


__all__ = ["Config", "GPTQConfig", "MagnitudeConfig", "RTNConfig", "SparseGPTConfig",
           "WandaConfig", "config_class", "from_dict", "make_config", "parse_sparsity", "sparsity_str"]
