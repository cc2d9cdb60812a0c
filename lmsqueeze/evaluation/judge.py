"""Pairwise model judge: is the compressed model's answer better than the base model's?

Protocol (per item: an instruction, the base's answer, the compressed model's answer):
1. identical answers (after stripping whitespace) are a tie, and no judge is asked;
2. otherwise the judge is asked twice, once with the base's answer as "Response A" and once with it as
   "Response B" (LLM judges favour a position: Zheng et al., 2023, "Judging LLM-as-a-judge with MT-Bench
   and Chatbot Arena"), with `JUDGE_PROMPT` as the one user message, greedy (temperature 0);
3. each reply is parsed to A, B or tie (`parse_verdict`); a reply that names no verdict is "unparsed" and
   counted, never guessed;
4. the compressed model's outcome in one order is 1 (its answer preferred), 0.5 (tie) or 0; its item
   score is the mean over the parsed orders; items with no parsed order are left out and counted.

Reported: `win_rate` = the mean item score (ties count half; 0.5 = no difference) with a percentile
bootstrap interval over items; `tie_rate` and `consistency` (share of items whose two orders give the
same outcome for the compressed model), Wilson intervals; `position_a_rate`, the share of decisive
judgments (not ties) that picked Response A, with its Wilson interval: 0.5 means no position bias;
`unparsed_rate`, the share of the judge's replies that named no verdict (Wilson): a high one means the
judge does not follow the prompt and its win rate rests on few judgments.

Judges: a local Hugging Face model through the engine (`LocalJudge`: any model name `models.load_model`
takes, its chat template applied) or an OpenAI-compatible chat-completions endpoint (`EndpointJudge`,
through the official `openai` client: key from an environment variable, retries with back-off, a
request budget). Every reply is cached on disk (`JudgmentCache`, keyed by the judge's identity and the
exact prompt), so a study never asks the same question twice. A small model judges poorly: the builtin
models serve tests; a strong judge is the user's to give (`--judge-url`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.stats import estimate, mean_of, proportion, wilson

log = logging.getLogger("lmsqueeze")

JUDGE_PROMPT = """You are an impartial judge. Compare two responses to the instruction below and decide which \
one follows it better: correct, helpful, relevant to the request, complete and to the point. Neither the \
order in which the responses appear nor their length may influence you. If both are equally good or \
equally bad, call it a tie.

[Instruction]
{instruction}

[Response A]
{response_a}

[Response B]
{response_b}

Give a one-sentence reason, then your verdict on the last line, exactly one of: [[A]] (A is better), \
[[B]] (B is better), [[tie]]."""

VERDICTS = ("A", "B", "tie")
# Parsing, strict to lenient; the first rule that finds a verdict decides. A letter verdict must be a
# capital A or B unless a label word precedes it, so "I prefer a short answer" names no verdict.
_MARKUP = re.compile(r"\*\*|__|[*`#]")  # bold, italics, code and heading marks around a verdict
# JUDGE_PROMPT's own section headers: a small model echoes "[Response A]" and goes on writing an answer,
# which is no verdict (SmolLM2-135M did on 8 of 8 replies; read as "A", it looked like pure position bias)
_HEADERS = re.compile(r"\[\s*(?:instruction|response\s*[ab])\s*\]", re.I)
_BRACKETED = re.compile(r"\[\[\s*(a|b|tie)\s*\]\]", re.I)
_SINGLE = re.compile(r"\[\s*(A|B|[Tt]ie)\s*\]")
_LABEL = r"(?i:response|assistant|answer|option|output)\s*"
_LABELLED = re.compile(r"(?i:verdict|answer|winner|choice|better (?:response|answer) is|better one is|prefer|pick"
                       r"|choose)\s*(?i:is)?\s*[:\-=]?\s*\[?\s*(?:" + _LABEL + r")?\(?(A|B|[Tt]ie)\)?\b")
_IS_BETTER = re.compile(r"(?:\b" + _LABEL + r"\(?([AB])\)?|(?<![\w'])([AB])\)?)\s+(?i:is|was|seems)\s+"
                        r"(?i:clearly\s+|slightly\s+|much\s+)?(?i:the\s+)?(?i:better|superior|preferred|stronger"
                        r"|more (?:helpful|accurate|correct|complete|relevant)|winner)"
                        r"|(?:\b" + _LABEL + r"\(?([AB])\)?|(?<![\w'])([AB])\)?)\s+(?i:wins)\b")
_TIE_PHRASE = re.compile(r"\b(?:it(?:'s| is) a tie|(?:a|the) tie\b|equally (?:good|bad|helpful|poor|correct|"
                         r"wrong|(?:in)?accurate|(?:un)?helpful)|neither (?:response |one )?is better|"
                         r"(?:are|is) (?:of )?(?:the )?(?:same|equal) (?:quality|value))", re.I)
_BARE = re.compile(r"^\W*(?:final\s+)?(?:verdict|answer)?\W*(?:response|assistant|option|output)?\s*\(?"
                   r"(a|b|tie|equal|both)\)?\W*$", re.I)
_TIE_WORDS = {"tie", "equal", "both"}


def _norm(v: str) -> str:
    v = v.lower()
    return "tie" if v in _TIE_WORDS else v.upper()


def parse_verdict(reply: str) -> str | None:
    """'A', 'B' or 'tie' from a judge's reply; None when it names no verdict (or names A and B alike).

    Markdown marks (**A**, `B`, ## Verdict) and echoed prompt headers ([Response A]) are dropped first. Then, the first rule that finds one decides:
    1. the last double-bracketed verdict: [[A]], [[ b ]], [[Tie]] (what JUDGE_PROMPT asks for);
    2. the last single-bracketed one: [A], [tie];
    3. the last labelled one: "Verdict: B", "Answer: A", "The better response is A", "I prefer Response B";
    4. the reply, its last line or its first line being only a verdict: "A", "Response B.", "(a)", "tie";
    5. "A is better", "Response B is more helpful", "Assistant A wins", or a tie phrase ("equally good",
       "it's a tie", "neither response is better"), when these all agree;
    6. a reply that mentions exactly one of "Response A" / "Response B".
    A reply none of these match is unparsed: `judge_answers` counts it (`unparsed_rate`), never guesses."""
    text = _HEADERS.sub(" ", _MARKUP.sub("", reply or ""))
    for rule in (_BRACKETED, _SINGLE, _LABELLED):
        found = rule.findall(text)
        if found:
            return _norm(found[-1])
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for candidate in [text.strip()] + lines[-1:] + lines[:1]:
        m = _BARE.match(candidate)
        if m:
            return _norm(m.group(1))
    named = {_norm(next(g for g in m.groups() if g)) for m in _IS_BETTER.finditer(text)}
    if _TIE_PHRASE.search(text):
        named.add("tie")
    if len(named) == 1:
        return named.pop()
    if named:
        return None  # "A is better ... B is better": no single verdict
    low = text.lower()
    a, b = "response a" in low, "response b" in low
    if a != b:
        return "A" if a else "B"
    return None


def judge_messages(instruction: str, response_a: str, response_b: str) -> list[dict]:
    return [{"role": "user", "content": JUDGE_PROMPT.format(instruction=instruction, response_a=response_a,
                                                            response_b=response_b)}]


def outcome(verdict: str | None, model_is_a: bool) -> float | None:
    """The compressed model's outcome in one order: 1 preferred, 0.5 tie, 0 not; None unparsed."""
    if verdict is None:
        return None
    if verdict == "tie":
        return 0.5
    return float((verdict == "A") == model_is_a)


def summarize(judged: list[dict], resamples: int = 1000, seed: int = 0) -> dict:
    """Metrics from per-item judgments.

    judged[i]: {"identical": bool, "verdicts": {"model_second": v1, "model_first": v2}} with v in A/B/tie/None
    ("model_second": the base's answer was Response A). Returns {metrics, counts}; sets each item's "score"
    (its mean outcome for the compressed model, None when no order gave a verdict).
    """
    scores, ties, consistent, first_pick = [], [], [], []
    unparsed = no_verdict = identical = 0
    for j in judged:
        j["score"] = None
        if j["identical"]:
            identical += 1
            j["score"] = 0.5
            scores.append(0.5)
            ties.append(1.0)
            consistent.append(1.0)
            continue
        outs = []
        for order, v in j["verdicts"].items():
            o = outcome(v, model_is_a=(order == "model_first"))
            if o is None:
                unparsed += 1
                continue
            outs.append(o)
            if v != "tie":
                first_pick.append(float(v == "A"))
        if not outs:
            no_verdict += 1
            continue
        j["score"] = float(np.mean(outs))
        scores.append(j["score"])
        ties.append(float(all(o == 0.5 for o in outs)))
        if len(outs) == 2:
            consistent.append(float(outs[0] == outs[1]))
    metrics = {}
    if scores:
        metrics["win_rate"] = estimate(mean_of("score"), {"score": np.array(scores)}, resamples=resamples, seed=seed)
        metrics["tie_rate"] = estimate(proportion("tie"), {"tie": np.array(ties)}, resamples=resamples, seed=seed)
    if consistent:
        metrics["judge_consistency"] = estimate(proportion("c"), {"c": np.array(consistent)}, resamples=resamples,
                                                seed=seed)
    if first_pick:
        k, n = int(sum(first_pick)), len(first_pick)
        metrics["position_a_rate"] = {"value": k / n, "ci": wilson(k, n), "n": n, "interval": "wilson"}
    replies = sum(len(j["verdicts"]) for j in judged if not j["identical"])
    if replies:  # the share of the judge's replies that named no verdict: counted, never guessed
        metrics["unparsed_rate"] = {"value": unparsed / replies, "ci": wilson(unparsed, replies), "n": replies,
                                    "interval": "wilson"}
    counts = {"items": len(judged), "identical_answers": identical, "replies": replies, "unparsed_replies": unparsed,
              "items_without_verdict": no_verdict, "items_scored": len(scores)}
    return {"metrics": metrics, "counts": counts}


# ---- the judgment cache --------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    from lmsqueeze.models import cache_dir

    return cache_dir() / "judge"


class JudgmentCache:
    """Replies on disk, one JSON line each ({key, reply}), appended as they come: an interrupted study keeps
    what it paid for. key: sha256 of the judge's identity, the messages and the decoding settings."""

    def __init__(self, identity: str, root: str | os.PathLike | None = None):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", identity).strip("_")[-60:] or "judge"
        digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
        self.path = Path(root or default_cache_dir()) / f"{slug}-{digest}.jsonl"
        self.identity = identity
        self._replies: dict[str, str] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self._replies[rec["key"]] = rec["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by an interrupted write: that judgment is asked again

    def key(self, messages: list[dict], settings: dict) -> str:
        blob = json.dumps({"judge": self.identity, "messages": messages, "settings": settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self._replies.get(key)

    def put(self, key: str, reply: str) -> None:
        self._replies[key] = reply
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "reply": reply}) + "\n")

    def __len__(self) -> int:
        return len(self._replies)


# ---- judges --------------------------------------------------------------------------------------------

class Judge:
    """Answers batches of chat messages; `ask` goes through the cache and the request budget."""
    settings: dict = {}

    def __init__(self, identity: str, cache_dir=None, budget: int | None = None):
        if budget is not None and budget < 0:
            raise LmsqueezeError(f"judge request budget must be >= 0, got {budget}")
        self.identity, self.budget = identity, budget
        self.cache = JudgmentCache(identity, cache_dir)
        self.requests = 0  # replies obtained from the judge itself this run (not from the cache)
        self.cache_hits = 0
        self.over_budget = 0

    def _complete(self, batch: list[list[dict]]) -> list[str]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"judge": self.identity, "settings": self.settings, "cache": str(self.cache.path)}

    def ask(self, batch: list[list[dict]]) -> list[str | None]:
        """Replies per message list; None for those the request budget left unasked."""
        keys = [self.cache.key(m, self.settings) for m in batch]
        out: list[str | None] = [self.cache.get(k) for k in keys]
        self.cache_hits += sum(r is not None for r in out)
        todo = list(dict.fromkeys(i for i, r in enumerate(out) if r is None))
        if self.budget is not None:
            allowed = max(0, self.budget - self.requests)
            self.over_budget += max(0, len(todo) - allowed)
            if len(todo) > allowed:
                log.warning("judge %s: request budget %d reached; %d judgments left unasked", self.identity,
                            self.budget, len(todo) - allowed)
            todo = todo[:allowed]
        if todo:
            replies = self._complete([batch[i] for i in todo])
            self.requests += len(todo)
            for i, r in zip(todo, replies):
                self.cache.put(keys[i], r)
                out[i] = r
        return out


class LocalJudge(Judge):
    """A local model (any name `models.load_model` takes) answering through the engine's Backend, greedy."""

    def __init__(self, model: str, cache_dir=None, budget: int | None = None, max_new_tokens: int = 64,
                 dtype: str = "fp32", device: str = "cpu", batch_tokens: int = 4096):
        from lmsqueeze.evaluation.api import identity_of_name

        self.model_name, self.dtype, self.device, self.batch_tokens = model, dtype, device, batch_tokens
        self.settings = {"max_new_tokens": max_new_tokens, "temperature": 0}
        super().__init__(f"local:{model}:{identity_of_name(model, dtype)[:16]}", cache_dir, budget)
        self._backend = None

    def _complete(self, batch):
        if self._backend is None:
            from lmsqueeze.evaluation.backend import Backend
            from lmsqueeze.models import load_model

            model, tok = load_model(self.model_name, dtype=self.dtype, device=self.device)
            self._backend = Backend(model, tok, batch_tokens=self.batch_tokens, name="judge")
        b = self._backend
        prompts = [b.instruction_prompt(m[-1]["content"]) if len(m) == 1 else chat_ids(b, m) for m in batch]
        return [t[0] for t in b.generate(prompts, self.settings["max_new_tokens"], desc="judge").texts]


def chat_ids(backend, messages: list[dict]) -> list[int]:
    """Token ids of a whole conversation (with the generation prompt) in the model's chat template; without
    one, the turns as "role: content" lines after the start token."""
    if backend.has_chat_template():
        return backend.encode(backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                     tokenize=False))
    text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
    return backend.text_prompt(text)


class EndpointJudge(Judge):
    """An OpenAI-compatible chat-completions endpoint, through the official `openai` client.

    url: the API base (".../v1"). model: the model name sent with each request. key_env: the environment
    variable holding the API key (a local server without keys needs none). retries: retries of a failed
    request (connection errors, 408/409/429/5xx) with exponential back-off, by the client. timeout: seconds
    per request. budget: at most this many requests per run (cached replies are free).
    """

    def __init__(self, url: str, model: str = "default", key_env: str = "OPENAI_API_KEY", retries: int = 3,
                 timeout: float = 120.0, budget: int | None = None, cache_dir=None, max_tokens: int = 256):
        try:
            import openai
        except ImportError:
            raise LmsqueezeError("--judge-url needs the openai client: pip install 'lmsqueeze[judge]'") from None
        if not re.match(r"^https?://", url):
            raise LmsqueezeError(f"judge URL '{url}' must start with http:// or https:// (e.g. "
                                 f"http://127.0.0.1:8000/v1)")
        if retries < 0:
            raise LmsqueezeError(f"judge retries must be >= 0, got {retries}")
        self.url, self.model = url.rstrip("/"), model
        self.settings = {"temperature": 0, "max_tokens": max_tokens}
        key = os.environ.get(key_env) or "none"
        self._client = openai.OpenAI(base_url=self.url, api_key=key, max_retries=retries, timeout=timeout)
        self._openai = openai
        super().__init__(f"url:{self.url}:{model}", cache_dir, budget)

    def _complete(self, batch):
        out = []
        for messages in batch:
            try:
                r = self._client.chat.completions.create(model=self.model, messages=messages, **self.settings)
            except self._openai.APIConnectionError as exc:
                raise LmsqueezeError(f"judge endpoint {self.url} unreachable after retries: {exc}") from None
            except self._openai.APIStatusError as exc:
                raise LmsqueezeError(f"judge endpoint {self.url} answered HTTP {exc.status_code}: "
                                     f"{str(exc)[:300]}") from None
            out.append(r.choices[0].message.content or "")
        return out


def judge_from_options(extra: dict) -> Judge | None:
    """The judge named by the evaluation options (CLI: --judge MODEL or --judge-url URL with --judge-model,
    --judge-key-env, --judge-retries, --judge-budget, --judge-cache, --judge-max-tokens), or None."""
    name, url = extra.get("judge"), extra.get("judge_url")
    if name and url:
        raise LmsqueezeError(f"give one judge: --judge {name} or --judge-url {url}, not both")
    budget, tokens = extra.get("judge_budget"), extra.get("judge_max_tokens")
    if tokens is not None and tokens < 1:
        raise LmsqueezeError(f"judge max tokens must be >= 1, got {tokens}")
    if url:
        return EndpointJudge(url, model=extra.get("judge_model") or "default",
                             key_env=extra.get("judge_key_env") or "OPENAI_API_KEY",
                             retries=int(extra.get("judge_retries", 3)), budget=budget,
                             cache_dir=extra.get("judge_cache"), max_tokens=tokens or 256)
    if name:
        return LocalJudge(name, cache_dir=extra.get("judge_cache"), budget=budget, max_new_tokens=tokens or 64)
    return None


def judge_answers(judge: Judge, records: list[dict], base_answers: list[str], model_answers: list[str],
                  resamples: int = 1000, seed: int = 0) -> dict:
    """Judge the compressed model's answers against the base's on the same records (both orders; see the
    module docstring). Returns {metrics, items, counts, judge, requests, cache_hits, over_budget, prompt}."""
    if not (len(records) == len(base_answers) == len(model_answers)):
        raise LmsqueezeError(f"judge: {len(records)} records but {len(base_answers)} base and {len(model_answers)} "
                             f"model answers; they must be paired")
    batch, where = [], []
    for i, (r, b, m) in enumerate(zip(records, base_answers, model_answers)):
        if b.strip() == m.strip():
            continue
        inst = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        batch.append(judge_messages(inst, b, m))
        where.append((i, "model_second"))
        batch.append(judge_messages(inst, m, b))
        where.append((i, "model_first"))
    replies = judge.ask(batch) if batch else []
    items = [{"identical": b.strip() == m.strip(), "verdicts": {}, "replies": {}}
             for b, m in zip(base_answers, model_answers)]
    for (i, order), reply in zip(where, replies):
        items[i]["replies"][order] = reply
        if reply is not None:  # None: left unasked by the request budget (counted in over_budget)
            items[i]["verdicts"][order] = parse_verdict(reply)
    out = summarize(items, resamples, seed)
    out.update(items=items, **judge.describe(), requests=judge.requests, cache_hits=judge.cache_hits,
               over_budget=judge.over_budget, prompt=JUDGE_PROMPT)
    return out
