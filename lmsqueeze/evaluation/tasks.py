"""The task registry: a task name -> a class that builds its loglik requests and reduces the results.

Task names on the command line: `ppl:SOURCE`, `divergence:SOURCE`, `piqa`, `mc:PATH.jsonl`, `alpaca`.
Adding a task (the safety tasks `bbq`, `crows`, `dialect`, `bold` come next) is one module with a
`Task` subclass and one `register(...)` line.

A task that compares with the base model declares `uses_base` (and `needs_base` when it means
nothing without one) and `base_topk`: None when the base's per-request results suffice (multiple
choice), else k for the per-token top-k rows. The base side is computed once into a cache
(`basecache`) before the model runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from lmsqueeze.errors import LmsqueezeError


@dataclass
class EvalOptions:
    seqlen: int = 512
    limit: int | None = None
    batch_tokens: int = 4096
    topk: int = 64
    max_new_tokens: int = 128
    data_dir: str | None = None

    def __post_init__(self):
        if self.seqlen < 2:
            raise LmsqueezeError(f"seqlen must be >= 2, got {self.seqlen}")
        if self.limit is not None and self.limit < 1:
            raise LmsqueezeError(f"limit must be >= 1, got {self.limit}")
        if self.batch_tokens < 1:
            raise LmsqueezeError(f"batch_tokens must be >= 1, got {self.batch_tokens}")
        if self.topk < 1:
            raise LmsqueezeError(f"topk must be >= 1, got {self.topk}")
        if self.max_new_tokens < 1:
            raise LmsqueezeError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


class Task:
    """One evaluation. Subclasses set `kind` and implement requests() and run()."""
    kind = ""
    uses_base = False
    needs_base = False

    def __init__(self, arg: str | None, opts: EvalOptions):
        self.arg = arg
        self.opts = opts
        self._requests = None

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind

    @property
    def base_topk(self) -> int | None:
        return None

    def build_requests(self, tokenizer) -> list:
        """The loglik requests that model and base both score (the base cache is keyed by them)."""
        raise NotImplementedError

    def requests(self, tokenizer) -> list:
        if self._requests is None:
            self._requests = self.build_requests(tokenizer)
        return self._requests

    def cache_key(self) -> dict:
        return {"task": self.name, "seqlen": self.opts.seqlen if self.kind in ("ppl", "divergence") else None,
                "limit": self.opts.limit, "k": self.base_topk}

    def run(self, model, tokenizer, base_cache) -> dict:
        """{"summary": {...}, "items": [...]}; base_cache is None without a base."""
        raise NotImplementedError


_REGISTRY: dict[str, tuple[type[Task], str]] = {}


def register(kind: str, cls: type[Task], usage: str) -> None:
    """Make `kind` (the part before ':') a task; `usage` is how it is written, e.g. 'ppl:SOURCE'."""
    _REGISTRY[kind] = (cls, usage)


def valid_tasks() -> str:
    _ensure_builtin()
    return ", ".join(u for _, u in _REGISTRY.values())


def _ensure_builtin() -> None:
    import lmsqueeze.evaluation.builtin_tasks  # noqa: F401  (registers the built-in tasks once)


def parse_tasks(spec: str | list[str], opts: EvalOptions | None = None) -> list[Task]:
    """Tasks from 'ppl:wikitext2,piqa' or a list of names; unknown names fail with the valid list."""
    _ensure_builtin()
    opts = opts or EvalOptions()
    # a source like wikitext2:test contains ':' too; only the part before the first ':' names the task
    names = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [t.strip() for t in spec]
    tasks = []
    for name in names:
        if not name:
            continue
        kind, _, arg = name.partition(":")
        if kind not in _REGISTRY:
            raise LmsqueezeError(f"unknown task '{name}'; valid: {valid_tasks()}")
        cls, usage = _REGISTRY[kind]
        takes_arg = ":" in usage
        if takes_arg and not arg:
            raise LmsqueezeError(f"task '{name}' needs an argument: {usage}")
        if not takes_arg and arg:
            raise LmsqueezeError(f"task '{kind}' takes no argument, got '{name}'")
        tasks.append(cls(arg or None, opts))
    if not tasks:
        raise LmsqueezeError(f"no tasks given; valid: {valid_tasks()}")
    return tasks

