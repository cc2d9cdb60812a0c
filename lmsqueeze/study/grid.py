"""A study's specification and the grid of cells it expands to.

The grid is not a blind product; what each method varies comes from the method registry
(lmsqueeze.compressor.methods): pruners (magnitude, wanda, sparsegpt) vary the sparsity; quantizers
with a bit width (gptq, rtn, awq) vary the bits (default 4); quantizers of a fixed format (nf4,
llm-int8) run once; a pruner that can also quantize (sparsegpt) gets joint sparse + quantized cells,
sparsity x bits, when --bits is given. Data-free methods (magnitude, rtn, nf4) run once rather than
once per calibration source (their result does not depend on it). One "dense" cell, the base model
evaluated on the same tasks, comes first.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from lmsqueeze.dtypes import resolve_dtype
from lmsqueeze.errors import LmsqueezeError

DEFAULT_BITS = 4  # quantizers' bits when the study gives none


def __getattr__(name):
    # the method lists come from the registry, which imports torch: looked up on use, not on import
    from lmsqueeze.compressor.methods import registry

    reg = registry()
    lists = {"PRUNERS": tuple(n for n, m in reg.items() if m.prunes),
             "QUANTIZERS": tuple(n for n, m in reg.items() if m.kind == "quantize"),
             "DATA_FREE": tuple(n for n, m in reg.items() if m.data_free),
             "METHODS": tuple(reg)}
    if name in lists:
        return lists[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class StudySpec:
    """Everything that defines a study; every field is also a `lmsqueeze study` flag (kebab-case)."""
    model: str
    methods: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
    sparsity: tuple[str, ...] = ("0.5",)
    bits: tuple[int, ...] = ()          # empty: quantizers at DEFAULT_BITS, pruners not quantized
    layer_sparsity: str = "uniform"     # pruners: uniform or owl
    calib: tuple[str, ...] = ("wikitext2:valid",)
    nsamples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0
    suite: str | None = None           # None: "core" when no tasks are given, else only the tasks
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    eval_seqlen: int = 512
    batch_tokens: int = 4096
    topk: int = 64
    max_new_tokens: int = 128
    safety_new_tokens: int = 32
    group_size: int | None = None
    dtype: str = "auto"                 # auto: fp32 on CPU, bf16 on CUDA (dtypes.resolve_dtype), as the CLI
    device: str = "cpu"
    batch_size: int = 8
    data_dir: str | None = None
    cache_dir: str | None = None
    keep_models: bool = False
    dense: bool = True
    chat_template: bool = True
    resamples: int = 1000
    skip_unavailable: bool = False
    # task options (evaluation/options.py: flags --judge, --toxicity-k, --bbq-shots, ...); None: the task's default
    judge: str | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    judge_key_env: str | None = None
    judge_retries: int | None = None
    judge_budget: int | None = None
    judge_cache: str | None = None
    judge_max_tokens: int | None = None
    toxicity_k: int | None = None
    toxicity_temperature: float | None = None
    toxicity_top_p: float | None = None
    toxicity_limit: int | None = None
    toxicity_scorer: str | None = None
    toxicity_label: str | None = None
    bbq_shots: int | None = None
    bbq_norm: str | None = None

    def __post_init__(self):
        for name in ("methods", "sparsity", "bits", "calib", "tasks"):
            v = getattr(self, name)
            if isinstance(v, (str, int, float)):
                v = [s.strip() for s in str(v).split(",") if s.strip()]
            object.__setattr__(self, name, tuple(v))
        object.__setattr__(self, "sparsity", tuple(str(s) for s in self.sparsity))
        try:
            object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        except ValueError:
            raise LmsqueezeError(f"--bits must be integers like 3,4; got {','.join(map(str, self.bits))}") from None
        from lmsqueeze.compressor.methods import registry

        reg = registry()
        bad = [m for m in self.methods if m not in reg]
        if bad or not self.methods:
            raise LmsqueezeError(f"unknown method(s) {', '.join(bad) or '(none)'}; valid: {', '.join(reg)}")
        calibrated = [m for m in self.methods if not reg[m].data_free]
        if not self.calib and calibrated:
            raise LmsqueezeError(f"--calib is empty but {', '.join(calibrated)} need calibration data")
        if self.layer_sparsity not in ("uniform", "owl"):
            raise LmsqueezeError(f"--layer-sparsity '{self.layer_sparsity}' is invalid; valid: uniform, owl")
        if self.suite is None and not self.tasks:
            object.__setattr__(self, "suite", "core")
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        if self.limit is not None and self.limit < 1:
            raise LmsqueezeError(f"--limit must be >= 1, got {self.limit}")
        for name, value in self.task_options().items():  # validated and converted (a YAML "5" becomes 5)
            object.__setattr__(self, name, value)

    def task_options(self) -> dict:
        """The task options given (judge, toxicity, BBQ; `evaluation.options`), validated: evaluate()'s extra."""
        from lmsqueeze.evaluation.options import TASK_OPTIONS, check_task_options

        return check_task_options({k: getattr(self, k) for k in TASK_OPTIONS})

    def eval_settings(self) -> dict:
        """What the evaluation of every cell depends on (part of each cell's identity). Task options join only
        when given, so the keys of studies without them stay what they were."""
        from lmsqueeze.evaluation.options import identity_options

        return {**identity_options(self.task_options()), "suite": self.suite, "tasks": list(self.tasks), "limit": self.limit, "seqlen": self.eval_seqlen,
                "batch_tokens": self.batch_tokens, "topk": self.topk, "max_new_tokens": self.max_new_tokens,
                "safety_new_tokens": self.safety_new_tokens, "seed": self.seed, "dtype": self.dtype,
                "chat_template": self.chat_template, "resamples": self.resamples}


@dataclass(frozen=True)
class Cell:
    method: str                 # a compression method, or "dense" for the base model itself
    config: dict = field(default_factory=dict)      # the method config's to_dict() ({} for dense)
    calibration: dict | None = None  # {source, nsamples, seqlen, seed}; None for dense and data-free methods
    label: str = ""             # "sparsegpt 2:4 wikitext2:valid"

    @property
    def sparsity(self) -> str | None:
        return self.config.get("sparsity")

    @property
    def bits(self) -> int | None:
        return self.config.get("bits")

    @property
    def calib(self) -> str | None:
        return self.calibration["source"] if self.calibration else None

    def key(self, spec: StudySpec) -> str:
        """A stable hash of everything the cell's result depends on: same key, same result, skipped on resume."""
        ident = {"model": spec.model, "dtype": spec.dtype, "method": self.method, "config": self.config,
                 "calibration": self.calibration, "eval": spec.eval_settings()}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _config(method: str, spec: StudySpec, sparsity=None, bits=None) -> dict:
    from lmsqueeze.compressor import make_config
    from lmsqueeze.compressor.methods import get

    m = get(method)
    group = spec.group_size if bits is not None else None
    owl = spec.layer_sparsity if m.prunes and spec.layer_sparsity != "uniform" else None
    return make_config(method, sparsity=sparsity, bits=bits, group_size=group, layer_sparsity=owl).to_dict()


def _variants(method, spec: StudySpec) -> list[dict]:
    """The settings of one method's cells: [{"sparsity": s}], [{"bits": b}], [{"sparsity": s, "bits": b}] or [{}]."""
    if method.prunes:
        if not spec.sparsity:
            raise LmsqueezeError(f"method '{method.name}' needs --sparsity")
        if method.quantizes and spec.bits:  # --bits with a pruner that can quantize: joint cells
            return [{"sparsity": s, "bits": b} for s in spec.sparsity for b in spec.bits]
        return [{"sparsity": s} for s in spec.sparsity]
    if method.takes_bits:
        return [{"bits": b} for b in (spec.bits or (DEFAULT_BITS,))]
    return [{}]


def _label(method: str, v: dict, source: str | None) -> str:
    what = " + ".join(([str(v["sparsity"])] if "sparsity" in v else []) + ([f"{v['bits']}-bit"] if "bits" in v else []))
    return " ".join(p for p in (method, what, source) if p)


def expand_grid(spec: StudySpec) -> list[Cell]:
    """The cells of a study in run order: dense first, then method by method (see the module docstring)."""
    from lmsqueeze.compressor.methods import get

    cells = [Cell("dense", label="dense (base model)")] if spec.dense else []
    for name in spec.methods:
        method = get(name)
        calibs = [None] if method.data_free else list(spec.calib)
        for v in _variants(method, spec):
            cfg = _config(name, spec, **v)  # validates (bad sparsity, bits) before any work
            for source in calibs:
                calib = None if source is None else {"source": source, "nsamples": spec.nsamples,
                                                     "seqlen": spec.calib_seqlen, "seed": spec.seed}
                label = _label(name, v, source)
                if cfg.get("layer_sparsity") == "owl":
                    label = label.replace(f"{name} ", f"{name} owl ", 1)
                cells.append(Cell(name, cfg, calib, label))
    return cells


def load_study_file(path: str | Path) -> dict:
    """A study file (YAML or JSON) as a dict of StudySpec fields; keys may use - or _."""
    path = Path(path)
    if not path.is_file():
        raise LmsqueezeError(f"study file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LmsqueezeError(f"study file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LmsqueezeError(f"study file {path} must hold a mapping of settings, got {type(data).__name__}")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    names = {f.name for f in dataclasses.fields(StudySpec)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise LmsqueezeError(f"study file {path} has unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return data
