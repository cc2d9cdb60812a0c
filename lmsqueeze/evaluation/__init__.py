"""Evaluation: one engine for every task (backend.py, task.py, tasks/, cache.py, stats.py, report.py, api.py)."""


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
