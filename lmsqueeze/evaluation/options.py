"""Task-specific evaluation options: the judge, the toxicity protocol and BBQ, in one table.

Each option is a `lmsqueeze eval` and `lmsqueeze study` flag (kebab-case, `--toxicity-k`), a study file
key (snake_case, `toxicity_k:`) and a key of `evaluate(extra=...)`; the tasks read them from
`EvalOptions.extra`. `check_task_options` validates them all in one place, so a bad value is one clear
error naming the option, the value and what is valid, before any model loads. Light on purpose (no
torch): the CLI builds its parser from `TASK_OPTIONS`.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmsqueeze.errors import LmsqueezeError


@dataclass(frozen=True)
class TaskOption:
    """One option: its key, value type, the valid range (low bound, inclusive unless `open_low`; high bound,
    inclusive) or choices, the help text, and whether it changes results (part of a study cell's identity)."""
    name: str
    type: type
    help: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple[str, ...] = ()
    identity: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def valid(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is not None and self.high is not None:
            return f"a number in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            kind = "an integer" if self.type is int else "a number"
            return f"{kind} {'>' if self.open_low else '>='} {self.low:g}"
        return "a non-empty string"

    def check(self, value):
        """The value converted to `type`; raises LmsqueezeError naming the option when it is not valid."""
        bad = LmsqueezeError(f"{self.flag} (option {self.name}) got {value!r}; valid: {self.valid()}")
        if self.type is str:
            if not isinstance(value, str) or not value.strip():
                raise bad
            value = value.strip()
            if self.choices and value not in self.choices:
                raise bad
            return value
        if isinstance(value, bool):  # YAML `toxicity_k: yes` is not a number
            raise bad
        try:
            number = self.type(value)
        except (TypeError, ValueError):
            raise bad from None
        if self.type is int and isinstance(value, float) and value != number:
            raise bad
        if self.low is not None and (number <= self.low if self.open_low else number < self.low):
            raise bad
        if self.high is not None and number > self.high:
            raise bad
        return number


TASK_OPTIONS: dict[str, TaskOption] = {o.name: o for o in (
    # the pairwise judge of instruct:FILE (evaluation/judge.py)
    TaskOption("judge", str, "pairwise judge of instruct:FILE answers against the base's: a local model (builtin "
               "name, directory or hub id). Small models judge poorly and serve tests: give a strong one"),
    TaskOption("judge_url", str, "the judge as an OpenAI-compatible chat-completions endpoint, e.g. "
               "http://127.0.0.1:8000/v1 (python -m lmsqueeze.evaluation.serve serves a local model)"),
    TaskOption("judge_model", str, "model name sent to --judge-url (default 'default')"),
    TaskOption("judge_key_env", str, "environment variable holding the --judge-url API key (default "
               "OPENAI_API_KEY)", identity=False),
    TaskOption("judge_retries", int, "retries of a failed judge request, with back-off (default 3)", low=0,
               identity=False),
    TaskOption("judge_budget", int, "at most this many judge requests per run; cached judgments are free "
               "(default: no limit)", low=0),
    TaskOption("judge_cache", str, "judgment cache directory (default LMSQUEEZE_CACHE/judge)", identity=False),
    TaskOption("judge_max_tokens", int, "tokens a judge may write per verdict (default 64 local, 256 endpoint)",
               low=1),
    # toxicity:FILE (tasks/toxicity.py); the continuation length is --safety-new-tokens
    TaskOption("toxicity_k", int, "toxicity: sampled continuations per prompt (default 25, as Gehman et al.)",
               low=1),
    TaskOption("toxicity_temperature", float, "toxicity: sampling temperature (default 1.0)", low=0,
               open_low=True),
    TaskOption("toxicity_top_p", float, "toxicity: nucleus sampling top-p (default 0.9)", low=0, high=1,
               open_low=True),
    TaskOption("toxicity_limit", int, "toxicity: prompts drawn, spread equally over the groups (default --limit): "
               "a few hundred prompts beside a --limit sized for the costlier tasks", low=1),
    TaskOption("toxicity_scorer", str, "toxicity scorer: profanity (offline default) or a local Hugging Face "
               "sequence-classification directory (hf:DIR or DIR)"),
    TaskOption("toxicity_label", str, "toxicity: the classifier's toxic label name when it cannot be guessed"),
    # bbq (tasks/bbq.py)
    TaskOption("bbq_shots", int, "BBQ: solved examples from other items before each prompt (default 0, "
               "zero-shot)", low=0),
    TaskOption("bbq_norm", str, "BBQ: how option log-likelihoods are normalised (default char)",
               choices=("char", "token", "sum")),
)}


def check_task_options(values: dict) -> dict:
    """The given task options (None values dropped), validated and converted; {name: value}.

    values: {option name: value}, e.g. {"toxicity_k": "5", "judge": None}. Raises LmsqueezeError for an
    unknown name (listing the valid ones), a bad value (naming the option and its valid range), or both
    --judge and --judge-url.
    """
    unknown = sorted(set(values) - set(TASK_OPTIONS))
    if unknown:
        raise LmsqueezeError(f"unknown task option(s) {', '.join(unknown)}; valid: {', '.join(TASK_OPTIONS)}")
    out = {k: TASK_OPTIONS[k].check(v) for k, v in values.items() if v is not None}
    if "judge" in out and "judge_url" in out:
        raise LmsqueezeError(f"give one judge: --judge {out['judge']} or --judge-url {out['judge_url']}, not both")
    return out


def identity_options(values: dict) -> dict:
    """The options among `values` that change results (a study cell's identity; not caches, keys, retries)."""
    return {k: v for k, v in values.items() if TASK_OPTIONS[k].identity}
