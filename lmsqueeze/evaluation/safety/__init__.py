"""Safety evaluation: representational bias (BBQ, CrowS-Pairs), dialect bias and harm in generation.

Each task is a pure reduction over a `ModelBackend` (backend.py: `loglik` and `generate`), so the
model side can be swapped without touching the metrics. `run_safety` (suite.py) runs them and
returns a JSON-able report; `python -m lmsqueeze.evaluation.safety --help` runs it from the shell.
"""
from lmsqueeze.evaluation.safety.backend import HFBackend, ModelBackend
from lmsqueeze.evaluation.safety.suite import SUITES, TASKS, parse_tasks, render_markdown, run_safety

__all__ = ["HFBackend", "ModelBackend", "SUITES", "TASKS", "parse_tasks", "render_markdown", "run_safety"]
