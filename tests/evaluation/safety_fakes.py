"""A scripted backend for the task tests: log-likelihoods and continuations looked up in tables.

It offers what the tasks use of `evaluation.backend.Backend` (loglik on text pairs, token-level requests
whose tokens are the texts themselves, text_prompt, generate)
so a task's scoring can be checked on hand-made numbers without a model.
"""
from lmsqueeze.evaluation.backend import GenerationResult
from lmsqueeze.evaluation.loglik import LoglikResult


class ScriptedBackend:
    def __init__(self, loglik=None, generations=None, default=(-5.0, 5)):
        self.table = dict(loglik or {})
        self.generations = dict(generations or {})
        self.default = default
        self.calls = []

    def loglik(self, requests, desc=None):
        self.calls.append(("loglik", list(requests)))
        return [LoglikResult(*self.table.get(r, self.default), greedy=False) for r in requests]

    max_len = None  # no position limit

    def encode_pair(self, context, continuation):
        """One pseudo-token per side: the texts themselves, so token-level requests map back to the table."""
        return [context], [continuation]

    def loglik_tokens(self, requests, desc=None):
        return self.loglik([(ctx[0], cont[0]) for ctx, cont in requests], desc)

    def text_prompt(self, text):
        return text

    def generate(self, prompts, max_new_tokens, desc=None, **kw):
        self.calls.append(("generate", list(prompts)))
        return GenerationResult([[self.generations.get(p, "")] for p in prompts])
