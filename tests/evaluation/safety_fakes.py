"""A scripted `ModelBackend` for the safety tests: log-likelihoods and continuations looked up in tables."""


class ScriptedBackend:
    def __init__(self, loglik=None, generations=None, default=(-5.0, 5)):
        self.table = dict(loglik or {})
        self.generations = dict(generations or {})
        self.default = default
        self.calls = []

    def loglik(self, requests):
        self.calls.append(("loglik", list(requests)))
        return [self.table.get(r, self.default) for r in requests]

    def generate(self, prompts, max_new_tokens):
        self.calls.append(("generate", list(prompts)))
        return [self.generations.get(p, "") for p in prompts]
