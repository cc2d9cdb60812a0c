"""What a report's numbers rest on: the model and where its "dense" weights came from, the texts, the
window, n per metric. Both the `lmsqueeze eval` report and the study report state it.

The embedded real models are 4-bit GGUF files that transformers dequantizes: their "dense" base is
already a quantized model, so a 4-bit quantizer with the GGUF's group size can look lossless on them.
The WikiText-2 files in the shared data are the tokenized variant (`<unk>` for rare words,
space-separated punctuation): their perplexities are not comparable with papers, which use the raw
variant. A report that leaves either out invites a wrong comparison.
"""
from __future__ import annotations

import json
from pathlib import Path

from lmsqueeze.errors import LmsqueezeError

# what each text or item source is, for the report (the tokenized/raw distinction first)
TEXT_NOTES = {
    "wikitext2:test": "WikiText-2 test split, tokenized variant (rare words are <unk>, punctuation split off); "
                      "perplexity is not comparable with papers, which use the raw variant",
    "wikitext2:valid": "WikiText-2 validation split, tokenized variant (not the raw variant papers use)",
    "pydoc": "English prose of the Python documentation (pydoc_data.topics of this CPython)",
    "alpaca": "Alpaca instructions (alpaca_5000.json)",
    "alpaca:responses": "the reference responses of Alpaca (alpaca_5000.json)",
}
TASK_DATA = {
    "piqa": "PIQA validation set (labelled)",
    "alpaca": "Alpaca instructions (alpaca_5000.json)",
    "bbq": "BBQ, the categories present in the data directory",
    "crows": "CrowS-Pairs (anonymized)",
    "dialect": "AAE/SAE habitual-be minimal pairs",
    "bold": "BOLD prompts",
}


def model_source(name: str | None) -> dict:
    """{"name", "what", "dequantized_gguf": True/False/None (unknown)} of a model as the CLI names it."""
    if not name:
        return {"name": name, "what": None, "dequantized_gguf": None}
    from lmsqueeze import models

    name = str(name)
    if name in models.DESCRIPTIONS:
        return {"name": name, "what": models.DESCRIPTIONS[name] + ", dequantized to float",
                "dequantized_gguf": True}
    if name in models.TINY:
        return {"name": name, "what": "a tiny randomly initialised test model", "dequantized_gguf": False}
    try:
        gguf = models.parse_gguf(name)
    except LmsqueezeError:
        gguf = None
    if gguf is not None:
        return {"name": name, "what": f"GGUF file {gguf[1]}, dequantized to float by transformers",
                "dequantized_gguf": True}
    path = Path(name).expanduser()
    meta = path / "lmsqueeze.json"
    if meta.is_file():  # an lmsqueeze checkpoint: what it was compressed from decides
        try:
            parent = json.loads(meta.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError):
            parent = None
        if parent and parent != name:
            inner = model_source(parent)
            return {"name": name, "what": f"an lmsqueeze checkpoint compressed from {parent}",
                    "dequantized_gguf": inner["dequantized_gguf"]}
    if path.is_dir():
        try:
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cfg = {}
        method = (cfg.get("quantization_config") or {}).get("quant_method")
        return {"name": name, "what": "a local checkpoint" + (f" ({method}-quantized)" if method else ""),
                "dequantized_gguf": False if not method else None}
    return {"name": name, "what": "a Hugging Face hub model", "dequantized_gguf": False}


def text_of(task: str) -> str | None:
    """What a task's items or text are (None when unknown: a user file is named by its path)."""
    kind, _, arg = task.partition(":")
    if kind in ("ppl", "divergence"):
        from lmsqueeze.data import ALIASES

        src = ALIASES.get(arg, arg)
        return TEXT_NOTES.get(src, f"the text of {src}")
    if kind == "mc":
        return f"multiple-choice items from {arg}"
    return TASK_DATA.get(kind)


def describe(model: str | None, base: str | None, tasks: list[str], seqlen, n: dict) -> dict:
    """The provenance block of a report. n: {"TASK/METRIC": items or windows}."""
    return {"model": model_source(model), "base": model_source(base) if base else None,
            "texts": {t: text_of(t) for t in tasks}, "window": seqlen,
            "windowed": [t for t in tasks if t.partition(":")[0] in ("ppl", "divergence")], "n": dict(n)}


def markdown(prov: dict) -> list[str]:
    """The provenance block as Markdown lines (a bullet list)."""
    out = []
    for role in ("model", "base"):
        m = prov.get(role)
        if not m or not m.get("name"):
            continue
        line = f"- {role}: `{m['name']}`" + (f": {m['what']}" if m.get("what") else "")
        if m.get("dequantized_gguf"):
            line += ("; the \"dense\" weights are a dequantized 4-bit GGUF, so the base is itself quantized "
                     "(a quantizer on the GGUF's grid can look lossless)")
        elif m.get("dequantized_gguf") is None:
            line += "; whether its weights come from a quantized file is not known"
        out.append(line)
    if prov.get("windowed"):
        out.append(f"- window: {prov['window']} tokens per perplexity/divergence window "
                   f"({', '.join(prov['windowed'])}); disjoint windows, the first token of each unscored")
    for task, what in prov.get("texts", {}).items():
        if what:
            out.append(f"- {task}: {what}")
    n = prov.get("n") or {}
    if n:
        by_task: dict[str, dict] = {}
        for key, v in n.items():
            task, _, metric = key.rpartition("/")
            by_task.setdefault(task, {})[metric] = v
        parts = []
        for task, per in by_task.items():
            if len(set(per.values())) == 1:  # one n for the whole task: say it once
                parts.append(f"{task} {next(iter(per.values()))}")
            else:
                parts.append(f"{task} (" + ", ".join(f"{m} {v}" for m, v in per.items()) + ")")
        out.append("- n, the windows or items behind each metric: " + "; ".join(parts))
    return out
