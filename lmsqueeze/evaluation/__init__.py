"""Evaluation: one engine for every task.

backend.py   the model interface (loglik, perplexity windows, generation, per-token rows)
loglik.py    the batched log-likelihood core it runs on
task.py      the task contract, its registry and suites; tasks/ holds one module per task
cache.py     base-model results on disk, reused by every evaluation against the same base
stats.py     intervals and paired deltas; report.py the Markdown view of a report; api.py `evaluate`
"""


def perplexity(model, tokenizer, source: str, seqlen: int = 512, limit: int | None = None,
               batch_tokens: int = 4096, data_dir=None) -> dict:
    """Token-, word- and byte-level perplexity of a loaded model on a text source (the `ppl:SOURCE`
    task's summary, with `metrics` holding the intervals)."""
    from lmsqueeze.evaluation.backend import Backend
    from lmsqueeze.evaluation.task import EvalOptions
    from lmsqueeze.evaluation.tasks.perplexity import PerplexityTask

    task = PerplexityTask(source, EvalOptions(seqlen=seqlen, limit=limit, batch_tokens=batch_tokens,
                                              data_dir=data_dir))
    task.ensure_loaded()
    out = task.run(Backend(model, tokenizer, batch_tokens=batch_tokens), None)
    return {**out["summary"], "metrics": out["metrics"], "items": out["items"]}
