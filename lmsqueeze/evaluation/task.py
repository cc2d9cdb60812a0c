"""The task contract and its registry: one module under `evaluation/tasks/` per task, nothing else to touch.

A task is a class decorated with `@register("kind", usage=..., suites=...)`. It

1. `load()`s and validates its items (files, data sets) before any model is loaded: a bad file costs
   no model load time;
2. `run(backend, base)`s: builds its requests, has the backend (`evaluation.backend.Backend`: loglik,
   perplexity windows, generation, top-k) answer them, scores every item and summarises. `base` is the
   same task's result on the base model (from the on-disk cache, `evaluation.cache`) or None; paired
   metrics take the base's per-item values from it (items come in the same order on both sides).

A result is `{"summary": {...}, "metrics": {name: {value, ci, n[, base, delta, delta_ci]}}, "items": [...]}`
and optionally `"rows"` (tensors kept beside the JSON in the base cache, e.g. the base's top-k
log-probs). `headline` names the metrics shown in the study table, the report and the plots, with a
title, a number format and which direction is better; `suites` puts the task into `--suite` names.
`needs_base` marks a task that means nothing without a base model (divergence); `suite_needs_base`
one that a suite includes only when a base model is given. Every module in `evaluation/tasks/` is
imported on first use of the registry, so dropping a file there adds a task.

Sample records (`--log-samples`): after `run`, `samples(result, base, backend)` turns the result's items
into one JSON-serialisable record per item, built with `sample(...)`:
    {"doc_id": int, "prompt": str | None, "reference": str | list | None, "output": str | list | None,
     "base_output": same or None, "metrics": {name: number}, "base_metrics": {name: number} | None, ...}
doc_id is the item's position in the task's items (the same on the model and the base side); prompt is
the text the model was given, reference what it is scored against, output what the model produced (its
answer, its chosen option, ...), base_output the same for the base model on the same item. `metrics`
holds the item's own numbers. `sample_metrics` declares, for the reported metrics that follow from
them, how: `SampleMetric(field, weight, exp)` means
    value = f(sum_i w_i x_i / sum_i w_i),  x_i = metrics[field], w_i = metrics[weight] (1 when None),
    f = exp when exp else identity,
so `aggregate(records, rule)` recomputes the reported value from the records (the base's value from
`base_metrics`). A plain mean is `SampleMetric("correct")`; a token-weighted mean
`SampleMetric("jsd", "tokens")`; perplexity `SampleMetric("nll", "tokens", exp=True)`. A metric that is
not a weighted mean of per-item numbers (e.g. a bias score over item subsets) is left out of
`sample_metrics` and its task docstring says how it follows from the records' fields. The default
`samples` keeps each item's numeric fields as its metrics and no texts; tasks override it.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import pkgutil
from dataclasses import asdict, dataclass, field

from lmsqueeze.errors import LmsqueezeError


class TaskUnavailable(LmsqueezeError):
    """A task cannot run here (a missing optional package or data set); `--skip-unavailable` skips it."""


@dataclass(frozen=True)
class Headline:
    """A metric a task puts in the study table: result["metrics"][key]."""
    key: str
    title: str
    fmt: str = ".3f"
    better: str = "higher"  # "higher", "lower" or "closer to base" (bias scores: 0 or the base is best)


@dataclass
class EvalOptions:
    """Settings every task reads (each task uses the ones that concern it).

    seqlen: perplexity/divergence window in tokens. limit: windows or items per task. batch_tokens: token
    budget of one forward. topk: k of the base's cached distribution. max_new_tokens: generation length
    of instruction tasks; safety_new_tokens: of continuation tasks (BOLD). seed: item sampling, sampled
    generation and bootstrap. chat_template: format instruction prompts with the model's chat template
    when it has one. resamples: bootstrap resamples. extra: task-specific settings (e.g. dialect files).
    """
    seqlen: int = 512
    limit: int | None = None
    batch_tokens: int = 4096
    topk: int = 64
    max_new_tokens: int = 128
    safety_new_tokens: int = 32
    data_dir: str | None = None
    seed: int = 0
    chat_template: bool = True
    resamples: int = 1000
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, low in (("seqlen", 2), ("batch_tokens", 1), ("topk", 1), ("max_new_tokens", 1),
                          ("safety_new_tokens", 1), ("resamples", 0)):
            if getattr(self, name) < low:
                raise LmsqueezeError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise LmsqueezeError(f"limit must be >= 1, got {self.limit}")


@dataclass(frozen=True)
class SampleMetric:
    """How a reported metric follows from its sample records: f(sum w_i x_i / sum w_i) (module docstring)."""
    field: str
    weight: str | None = None
    exp: bool = False


def sample(doc_id: int, *, prompt=None, reference=None, output=None, base_output=None, metrics: dict | None = None,
           base_metrics: dict | None = None, **extra) -> dict:
    """One sample record (module docstring); `extra` adds task-specific fields (e.g. the choices)."""
    return {"doc_id": int(doc_id), "prompt": prompt, "reference": reference, "output": output,
            "base_output": base_output, "metrics": dict(metrics or {}),
            "base_metrics": None if base_metrics is None else dict(base_metrics), **extra}


def aggregate(records: list[dict], rule: SampleMetric, side: str = "metrics") -> float:
    """The reported value that `rule` recomputes from sample records (side "base_metrics": the base's)."""
    num = den = 0.0
    for r in records:
        m = r[side]
        w = 1.0 if rule.weight is None else float(m[rule.weight])
        num += w * float(m[rule.field])
        den += w
    if den == 0:
        return float("nan")
    return math.exp(num / den) if rule.exp else num / den


def _numbers(item: dict) -> dict:
    return {k: v for k, v in item.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Task:
    """One evaluation; see the module docstring. Subclasses set the class attributes via @register."""
    kind: str = ""
    usage: str = ""
    suites: tuple[str, ...] = ()
    suite_needs_base: bool = False
    needs_base: bool = False
    order: int = 100  # place in suites and listings (lower first), so they do not depend on import order
    headline: tuple[Headline, ...] = ()
    # settings (EvalOptions fields) that change this task's results, for the base cache key
    option_keys: tuple[str, ...] = ("limit", "seed")

    def __init__(self, arg: str | None, opts: EvalOptions):
        self.arg = arg
        self.opts = opts
        self._loaded = False

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind

    def load(self) -> None:
        """Read and validate the task's items (no model needed); called before any model loads."""

    def ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()
            self._loaded = True

    def fingerprint(self) -> str:
        """A hash of the items this task runs on (part of the base cache key)."""
        return ""

    def check_model(self, model_or_config) -> None:
        """Fail early (before any weights load) when the task's settings cannot fit this model."""

    def cache_key(self) -> dict:
        opts = asdict(self.opts)
        return {"task": self.name, "options": {k: opts[k] for k in self.option_keys},
                "items": self.fingerprint(), "version": getattr(self, "version", 1)}

    def run(self, backend, base: dict | None) -> dict:
        raise NotImplementedError

    # reported metric name -> how it follows from the sample records' metrics (module docstring)
    sample_metrics: dict[str, SampleMetric] = {}

    def samples(self, result: dict, base: dict | None, backend) -> list[dict]:
        """Per-item sample records of `result` (this task's `run` output on `backend`'s model; `base`: the
        base's result or None), one per item in item order; see the module docstring."""
        base_items = base.get("items") if base is not None else None
        return [sample(i, metrics=_numbers(it), base_metrics=_numbers(base_items[i]) if base_items else None)
                for i, it in enumerate(result.get("items", []))]


def digest(obj) -> str:
    """A short stable hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


_REGISTRY: dict[str, type[Task]] = {}
SUITES = ("core", "safety", "full")  # "full" is every task of the other suites


def register(kind: str, usage: str | None = None, suites: tuple[str, ...] = (), suite_needs_base: bool = False):
    """Class decorator: make `kind` (the part before ':') a task. usage: how it is written ('ppl:SOURCE');
    suites: the `--suite` names that include it (as `usage` without its argument, or as `suite_arg`)."""
    for s in suites:
        if s not in SUITES or s == "full":
            raise LmsqueezeError(f"task '{kind}': unknown suite '{s}'; valid: core, safety")

    def deco(cls: type[Task]) -> type[Task]:
        cls.kind, cls.usage, cls.suites, cls.suite_needs_base = kind, usage or kind, tuple(suites), suite_needs_base
        _REGISTRY[kind] = cls
        return cls
    return deco


def _ensure_builtin() -> None:
    import lmsqueeze.evaluation.tasks as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")


def registry() -> dict[str, type[Task]]:
    """Every registered task kind -> its class, in (order, kind) order."""
    _ensure_builtin()
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def valid_tasks() -> str:
    return ", ".join(cls.usage for cls in registry().values())


def task_class(name: str) -> type[Task] | None:
    return registry().get(name.partition(":")[0])


def suite_tasks(suite: str, has_base: bool) -> list[str]:
    """The task names of a suite, in registry order."""
    if suite not in SUITES:
        raise LmsqueezeError(f"unknown suite '{suite}'; valid: {', '.join(SUITES)}")
    out = []
    for cls in registry().values():
        if (suite in cls.suites or (suite == "full" and cls.suites)) and (has_base or not cls.suite_needs_base):
            out.append(getattr(cls, "suite_arg", None) or cls.usage)
    return out


def task_names(tasks, suite: str | None, has_base: bool) -> list[str]:
    """The task names from --tasks ('a,b' or a list) and --suite, duplicates dropped, order kept."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else (tasks or [])) if t.strip()]
    if suite is not None:
        names += suite_tasks(suite, has_base)
    if not names:
        raise LmsqueezeError(f"no tasks given: use --tasks and/or --suite ({', '.join(SUITES)}); "
                             f"tasks: {valid_tasks()}")
    return list(dict.fromkeys(names))


def parse_tasks(spec, opts: EvalOptions | None = None, *, suite: str | None = None,
                has_base: bool = False) -> list[Task]:
    """Task objects from 'ppl:wikitext2,piqa' (or a list) and a suite; unknown names fail with the valid list."""
    opts = opts or EvalOptions()
    reg = registry()
    tasks = []
    for name in task_names(spec, suite, has_base):
        kind, _, arg = name.partition(":")
        if kind not in reg:
            raise LmsqueezeError(f"unknown task '{name}'; valid: {valid_tasks()}")
        cls = reg[kind]
        takes_arg = ":" in cls.usage
        optional = "[:" in cls.usage  # e.g. dialect[:AAE_FILE:SAE_FILE]
        if takes_arg and not arg and not optional:
            raise LmsqueezeError(f"task '{name}' needs an argument: {cls.usage}")
        if not takes_arg and arg:
            raise LmsqueezeError(f"task '{kind}' takes no argument, got '{name}'")
        tasks.append(cls(arg or None, opts))
    return tasks


def headline_of(task_name: str) -> tuple[Headline, ...]:
    cls = task_class(task_name)
    return cls.headline if cls is not None else ()
