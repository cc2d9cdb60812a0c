"""lm-evaluation-harness on lmsqueeze's backend: an `lm_eval` model over `Backend`, and the tasks of a YAML file.

`LmsqueezeLM(backend)` is an `lm_eval.api.model.LM`: lm-eval builds the requests of its tasks (prompts,
few-shot examples, choices, filters, metrics: all lm-eval's) and our engine answers them
(`Backend.loglikelihood`, `loglikelihood_rolling`, `generate_until`: the start-token and whitespace rules of
`backend`, batched under its token budget). `run_yaml(backend, yaml_path)` evaluates the task(s) a local
YAML file defines (its `dataset_path`/`dataset_kwargs` may point at local data files, e.g. `dataset_path:
json` with `data_files`) and returns lm-eval's per-document metric values, which the `lmeval:YAML` task
(`tasks/lmeval.py`) pairs with the base model's for flips and paired deltas.
Needs `lm_eval` (pip install 'lmsqueeze[lmeval]').
"""
from __future__ import annotations

import logging
from pathlib import Path

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.task import TaskUnavailable

log = logging.getLogger("lmsqueeze")


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise TaskUnavailable("lm-evaluation-harness tasks need lm_eval: pip install 'lmsqueeze[lmeval]'") from None
    return LM


def make_lm(backend):
    """An lm_eval LM whose three request types the backend answers."""
    LM = _lm_base()

    class LmsqueezeLM(LM):
        def __init__(self):
            super().__init__()
            self.backend = backend

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.backend.loglikelihood([tuple(r.args[:2]) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.backend.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.backend.generate_until([(r.args[0], dict(r.args[1])) for r in requests])

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.backend.tokenizer, "name_or_path", "") or "lmsqueeze")

    return LmsqueezeLM()


def yaml_task_names(path: str | Path) -> list[str]:
    """The `task:` names a YAML file defines (a file with a `group:` is named by its group)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # lm-eval's !function tags
    p = Path(path).expanduser()
    if not p.is_file():
        raise LmsqueezeError(f"lm-eval task file '{path}' does not exist")
    try:
        doc = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as exc:
        raise LmsqueezeError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not (doc.get("task") or doc.get("group")):
        raise LmsqueezeError(f"{p}: an lm-eval task file needs a 'task:' (or 'group:') name")
    name = doc.get("group") or doc["task"]
    return [name] if isinstance(name, str) else list(name)


def load_task_dict(path: str | Path):
    """lm-eval's task dict of the YAML file's tasks (its folder is the include path; no built-in tasks)."""
    _lm_base()
    from lm_eval.tasks import TaskManager

    p = Path(path).expanduser().resolve()
    names = yaml_task_names(p)
    manager = TaskManager(include_path=str(p.parent), include_defaults=False)
    try:
        return manager.load(names)
    except Exception as exc:  # a bad field, a missing data file: lm-eval's message, one line
        raise LmsqueezeError(f"lm-eval cannot load the task(s) {names} of {p}: {exc}") from None


def run_yaml(backend, path: str | Path, limit: int | None = None, task_dict=None) -> dict:
    """{task name: {"metrics": {name: value}, "docs": [{doc_id, target, <metric>: value, ...}] sorted by doc_id,
    "higher_is_better": {...}}} from lm-eval's evaluate on `backend`."""
    from lm_eval.evaluator import evaluate

    task_dict = task_dict or load_task_dict(path)
    out = evaluate(make_lm(backend), task_dict, limit=limit, log_samples=True, bootstrap_iters=0,
                   verbosity="ERROR")
    res = {}
    for name, metrics in out["results"].items():
        samples = out.get("samples", {}).get(name, [])
        keys = [k.split(",")[0] for k in metrics if "," in k and not k.split(",")[0].endswith("_stderr")]
        docs = []
        for s in sorted(samples, key=lambda s: s["doc_id"]):
            docs.append({"doc_id": s["doc_id"], "target": str(s.get("target")),
                         **{k: float(s[k]) for k in keys if isinstance(s.get(k), (int, float))}})
        res[name] = {"metrics": {k.split(",")[0]: v for k, v in metrics.items()
                                 if "," in k and not k.split(",")[0].endswith("_stderr")
                                 and isinstance(v, (int, float))},
                     "docs": docs, "higher_is_better": out.get("higher_is_better", {}).get(name, {})}
    return res
