"""Text sources for calibration and evaluation.

A source is named by a string:
- `pydoc`: the English prose of the Python docs that ships with CPython (`pydoc_data.topics`).
- `wikitext2[:test|:valid]`, `alpaca`, `piqa`: read from the data directory (`--data-dir`, else
  LMSQUEEZE_DATA_DIR, else `../shared/data` beside the repository).
- a local `.txt`, `.json` or `.jsonl` path (JSON: a list of strings or of records with a text field).
- `hf:<dataset>[:<split>[:<field>]]`: a Hugging Face hub dataset, when online and `datasets` is installed.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.io import iter_jsonl, read_json_file, read_text_file

REPO_ROOT = Path(__file__).resolve().parent.parent

# name -> (relative path in the data dir, what it is)
DATASETS = {
    "wikitext2:test": ("wikitext2/test.txt", "WikiText-2 test split (tokenized variant)"),
    "wikitext2:valid": ("wikitext2/valid.txt", "WikiText-2 validation split (tokenized variant)"),
    "alpaca": ("alpaca/alpaca_5000.json", "5,000 Alpaca instructions; text = instruction, input, response"),
    "piqa": ("piqa/valid.jsonl", "PIQA validation set; text = goal and correct solution"),
    "bbq": ("bbq", "BBQ bias benchmark, 6 categories (evaluation only)"),
    "crows_pairs": ("crows_pairs/crows_pairs_anonymized.csv", "CrowS-Pairs (evaluation only)"),
    "bold": ("bold", "BOLD prompts (evaluation only)"),
    "dialect": ("dialect/habitual_pairs.tsv", "AAE/SAE habitual-be minimal pairs (evaluation only)"),
}
ALIASES = {"wikitext2": "wikitext2:test"}
TEXT_SOURCES = ("pydoc", "wikitext2:test", "wikitext2:valid", "alpaca", "piqa")


def data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where named data sets are looked for, in order."""
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = []
    if os.environ.get("LMSQUEEZE_DATA_DIR"):
        dirs.append(Path(os.environ["LMSQUEEZE_DATA_DIR"]))
    dirs.append(REPO_ROOT.parent / "shared" / "data")
    return dirs


def find_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of a named data set, or an error that lists every place it looked."""
    name = ALIASES.get(name, name)
    if name not in DATASETS:
        raise LmsqueezeError(f"unknown data set '{name}'; known: {', '.join(DATASETS)}")
    rel = DATASETS[name][0]
    tried = []
    for d in data_dirs(data_dir):
        p = d / rel
        if p.exists():
            return p
        tried.append(str(p))
    raise LmsqueezeError(f"data set '{name}' not found; looked in: {', '.join(tried)} "
                         f"(give --data-dir or set LMSQUEEZE_DATA_DIR)")


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def alpaca_records(data_dir=None) -> list[dict]:
    return read_json_file(find_dataset("alpaca", data_dir), "the alpaca data set")


def piqa_records(data_dir=None) -> list[dict]:
    path = find_dataset("piqa", data_dir)
    labels_path = path.with_name("valid-labels.lst")
    labels = read_text_file(labels_path, "the PIQA labels").split() if labels_path.exists() else None
    items = []
    for lineno, rec in iter_jsonl(path, "the PIQA data set"):
        if labels is not None:
            if lineno > len(labels):
                raise LmsqueezeError(f"{labels_path} has {len(labels)} labels but {path} has a record on line {lineno}")
            rec["label"] = int(labels[lineno - 1])
        items.append(rec)
    return items


def _records_text(records: list, path: str) -> str:
    parts = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            parts.append(rec)
        elif isinstance(rec, dict):
            for key in ("text", "content", "output", "response"):
                if isinstance(rec.get(key), str):
                    parts.append(rec[key])
                    break
            else:
                raise LmsqueezeError(f"{path}: record {i} has no text field (one of text, content, output, response)")
        else:
            raise LmsqueezeError(f"{path}: record {i} is {type(rec).__name__}, expected a string or an object")
    return "\n\n".join(parts)


def _file_text(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return read_text_file(path, "text file")
    if suffix == ".json":
        data = read_json_file(path, "text file")
        if not isinstance(data, list):
            raise LmsqueezeError(f"{path}: expected a JSON list of strings or records")
        return _records_text(data, str(path))
    if suffix == ".jsonl":
        return _records_text([rec for _, rec in iter_jsonl(path, "text file")], str(path))
    raise LmsqueezeError(f"{path}: unsupported file type '{suffix}'; valid: .txt, .json, .jsonl")


def _hub_text(spec: str) -> str:
    parts = spec.split(":")[1:]
    if not parts or not parts[0]:
        raise LmsqueezeError(f"'{spec}': expected hf:<dataset>[:<split>[:<field>]]")
    name, split, field = parts[0], (parts[1] if len(parts) > 1 else "train"), (parts[2] if len(parts) > 2 else "text")
    try:
        import datasets
    except ImportError:
        raise LmsqueezeError(f"'{spec}' needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, ...: all one message for the user
        raise LmsqueezeError(f"cannot load '{name}' split '{split}' from the Hugging Face hub: {exc}") from None
    if field not in ds.column_names:
        raise LmsqueezeError(f"'{name}' has no field '{field}'; fields: {', '.join(ds.column_names)}")
    return "\n\n".join(t for t in ds[field] if t)


def load_text(source: str, data_dir: str | os.PathLike | None = None) -> str:
    """The whole text of a source, as one string."""
    if source == "pydoc":
        return pydoc_text()
    if source.startswith("hf:"):
        return _hub_text(source)
    name = ALIASES.get(source, source)
    if name in ("wikitext2:test", "wikitext2:valid"):
        return read_text_file(find_dataset(name, data_dir), f"the {name} data set")
    if name == "alpaca":
        return "\n\n".join("\n".join(x for x in (r["instruction"], r.get("input", ""), r["output"]) if x)
                           for r in alpaca_records(data_dir))
    if name == "piqa":
        return "\n\n".join(f"{r['goal']} {r['sol1'] if r.get('label', 0) == 0 else r['sol2']}"
                           for r in piqa_records(data_dir))
    if name in DATASETS:
        raise LmsqueezeError(f"'{name}' is an evaluation data set, not a text source; text sources: "
                             f"{', '.join(TEXT_SOURCES)}, a .txt/.json/.jsonl path, or hf:<dataset>")
    path = Path(source).expanduser()
    if path.suffix.lower() in (".txt", ".json", ".jsonl"):
        if not path.exists():
            raise LmsqueezeError(f"text file '{source}' does not exist")
        return _file_text(path)
    raise LmsqueezeError(f"unknown text source '{source}'; valid: {', '.join(TEXT_SOURCES)}, "
                         f"a .txt/.json/.jsonl path, or hf:<dataset>[:<split>[:<field>]]")


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """All tokens of `text` as one 1-D long tensor, no special tokens added."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0,
                        data_dir: str | os.PathLike | None = None, text: str | None = None) -> torch.Tensor:
    """nsamples disjoint token windows of length seqlen, drawn at random (seeded) from the source.

    Returns a [nsamples, seqlen] long tensor. Windows never overlap, so the text must hold at least
    nsamples * seqlen tokens. text: the source's text when the caller already read it (the CLI reads
    it before loading the model, so that a bad file fails before the model's load time is spent).
    """
    if nsamples < 1:
        raise LmsqueezeError(f"nsamples must be >= 1, got {nsamples}")
    if seqlen < 2:
        raise LmsqueezeError(f"seqlen must be >= 2, got {seqlen}")
    tokens = tokenize_text(tokenizer, load_text(source, data_dir) if text is None else text)
    need = nsamples * seqlen
    if tokens.numel() < need:
        raise LmsqueezeError(f"'{source}' has {tokens.numel()} tokens but {nsamples} x {seqlen} = {need} were asked "
                             f"for; lower --nsamples or --seqlen")
    nwindows = tokens.numel() // seqlen
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(nwindows, generator=gen)[:nsamples].sort().values
    return torch.stack([tokens[i * seqlen:(i + 1) * seqlen] for i in picks.tolist()])


def describe_sources(data_dir=None) -> list[dict]:
    """Every named source, whether it is present and where."""
    rows = [{"name": "pydoc", "present": True, "where": "pydoc_data.topics (CPython)",
             "what": "English prose from the Python documentation"}]
    for name, (_, what) in DATASETS.items():
        try:
            where, present = str(find_dataset(name, data_dir)), True
        except LmsqueezeError:
            where, present = "not found in " + ", ".join(str(d) for d in data_dirs(data_dir)), False
        rows.append({"name": name, "present": present, "where": where, "what": what})
    return rows


# ---- the safety data sets (BBQ, CrowS-Pairs, dialect pairs, BOLD) and user text files -------------------
# Plain lists of dicts, unchanged from the files except where said.

def bbq_items(data_dir=None, categories: list[str] | None = None) -> list[dict]:
    """BBQ items of every `<Category>.jsonl` in the bbq folder (or only `categories`)."""
    folder = find_dataset("bbq", data_dir)
    files = {p.stem: p for p in sorted(folder.glob("*.jsonl"))}
    if not files:
        raise LmsqueezeError(f"no BBQ category files (*.jsonl) in {folder}")
    if categories:
        unknown = [c for c in categories if c not in files]
        if unknown:
            raise LmsqueezeError(f"unknown BBQ categories {unknown}; present: {', '.join(files)}")
        files = {c: files[c] for c in categories}
    return [rec for p in files.values() for _, rec in iter_jsonl(p, "BBQ file")]


def crows_pairs(data_dir=None) -> list[dict]:
    """CrowS-Pairs rows: index, sent_more, sent_less, stereo_antistereo, bias_type."""
    path = find_dataset("crows_pairs", data_dir)
    rows = list(csv.DictReader(io.StringIO(read_text_file(path, "CrowS-Pairs file"), newline="")))
    need = {"sent_more", "sent_less", "stereo_antistereo", "bias_type"}
    if rows and not need <= rows[0].keys():
        raise LmsqueezeError(f"{path}: expected columns {sorted(need)}, found {sorted(rows[0])}")
    return [{"index": int(r[""]) if r.get("") else i, "sent_more": r["sent_more"],
             "sent_less": r["sent_less"], "stereo_antistereo": r["stereo_antistereo"],
             "bias_type": r["bias_type"]} for i, r in enumerate(rows)]


def dialect_pairs(data_dir=None) -> list[dict]:
    """AAE/SAE minimal pairs from the TSV (no header: `AAE<TAB>SAE`)."""
    path = find_dataset("dialect", data_dir)
    pairs = []
    for lineno, line in enumerate(read_text_file(path, "dialect pairs file").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise LmsqueezeError(f"{path}:{lineno}: expected 'AAE<TAB>SAE', got {line.strip()!r}")
        pairs.append({"index": len(pairs), "aae": parts[0].strip(), "sae": parts[1].strip()})
    return pairs


def text_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a user-supplied text file, one sentence or passage each."""
    lines = [ln.strip() for ln in read_text_file(path, "text file").splitlines() if ln.strip()]
    if not lines:
        raise LmsqueezeError(f"text file '{path}' has no non-empty lines")
    return lines


def bold_prompts(data_dir=None) -> tuple[list[dict], int]:
    """(BOLD prompts flattened to {domain, group, page, prompt}, number of empty prompts left out);
    domain from `<domain>_prompt.json`. The shipped files hold 23,679 prompts, 5 of them empty."""
    folder = find_dataset("bold", data_dir)
    files = sorted(folder.glob("*_prompt.json"))
    if not files:
        raise LmsqueezeError(f"no BOLD prompt files (*_prompt.json) in {folder}")
    out, empty = [], 0
    for p in files:
        domain = p.name.removesuffix("_prompt.json")
        data = read_json_file(p, "BOLD prompt file")
        for group, pages in data.items():
            for page, prompts in pages.items():
                for prompt in prompts:
                    if prompt.strip():
                        out.append({"domain": domain, "group": group, "page": page, "prompt": prompt.strip()})
                    else:
                        empty += 1
    return out, empty
