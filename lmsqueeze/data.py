"""Text sources for calibration and evaluation.

A source is named by a string:
- `pydoc`: the English prose of the Python docs that ships with CPython (`pydoc_data.topics`).
- `wikitext2[:test|:valid]`, `alpaca`, `piqa`: read from the data directory (`--data-dir`, else
  LMSQUEEZE_DATA_DIR, else `../shared/data` beside the repository).
- a local `.txt`, `.json` or `.jsonl` path (JSON: a list of strings or of records with a text field),
  optionally gzip-compressed (`.txt.gz`, `.json.gz`, `.jsonl.gz`). A `.json.gz` holding one JSON object a
  line is read as JSON lines: the C4 shards (`c4-train.00000-of-01024.json.gz`, one `{"text", "timestamp",
  "url"}` a line) are named so. A glob (`c4/c4-train.0000*-of-01024.json.gz`) reads every match in order.
- `hf:<dataset>[:<split>[:<field>]]`: a Hugging Face hub dataset, when online and `datasets` is installed.
- `chat:<instructions>`: instruction records (`alpaca`, or an instruction .json/.jsonl file in any layout
  `instruction_records` reads) formatted as conversations with the model's chat template (user turn:
  instruction and input; assistant turn: the reference answer); without a chat template, in the Alpaca
  prompt format followed by the answer. Only calibration (`calibration_batches`) formats them, since the
  template is the tokenizer's; `load_text` returns the records' plain text.
- `mix:<source>@<weight>+<source>@<weight>...`: a mixture; calibration draws round(nsamples x weight /
  total weight) windows from each part (largest remainders; every part gets at least one window).
"""
from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import logging
import os
from pathlib import Path

import torch

from lmsqueeze.errors import DataNotFound, LmsqueezeError
from lmsqueeze.io import iter_jsonl, read_json_file, read_text_file

log = logging.getLogger("lmsqueeze")
REPO_ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".txt.gz", ".json.gz", ".jsonl.gz")

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
    raise DataNotFound(f"data set '{name}' not found; looked in: {', '.join(tried)} "
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


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(TEXT_SUFFIXES, key=len, reverse=True) if name.endswith(s)), path.suffix.lower())


def _gzip_text(path: Path, what: str) -> str:
    """The decompressed file decoded as UTF-8; a file that is not gzip or not UTF-8 fails in one line."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise LmsqueezeError(f"{what} '{path}' is not a readable gzip file: {exc}") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise LmsqueezeError(f"{path}: {what} is not UTF-8 after decompression (byte offset {exc.start}: "
                             f"{exc.reason})") from None


def _json_records(text: str, path: Path, what: str) -> list:
    """A JSON list, or JSON lines (one value a line): C4's .json.gz shards are JSON lines."""
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LmsqueezeError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}) in {what}") from None
        return data
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise LmsqueezeError(f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno}); {what} "
                                     f"needs a JSON list or one JSON value per line") from None
    return out


def _file_text(path: Path) -> str:
    suffix = _suffix(path)
    if suffix == ".txt":
        return read_text_file(path, "text file")
    if suffix == ".txt.gz":
        return _gzip_text(path, "text file")
    if suffix in (".json.gz", ".jsonl.gz"):
        data = _json_records(_gzip_text(path, "text file"), path, "text file")
        if not isinstance(data, list):
            raise LmsqueezeError(f"{path}: expected a JSON list or JSON lines of strings or records")
        return _records_text(data, str(path))
    if suffix == ".json":
        data = read_json_file(path, "text file")
        if not isinstance(data, list):
            raise LmsqueezeError(f"{path}: expected a JSON list of strings or records")
        return _records_text(data, str(path))
    if suffix == ".jsonl":
        return _records_text([rec for _, rec in iter_jsonl(path, "text file")], str(path))
    raise LmsqueezeError(f"{path}: unsupported file type '{suffix}'; valid: {', '.join(TEXT_SUFFIXES)}")


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
    if source.startswith("chat:"):
        return "\n\n".join(_plain(r) for r in instruction_records(source[5:], data_dir))
    if source.startswith("mix:"):
        return "\n\n".join(load_text(part, data_dir) for part, _ in parse_mixture(source))
    if any(c in source for c in "*?["):
        paths = sorted(glob.glob(os.path.expanduser(source)))
        if not paths:
            raise LmsqueezeError(f"no file matches '{source}'")
        return "\n\n".join(load_text(p, data_dir) for p in paths)
    path = Path(source).expanduser()
    if _suffix(path) in TEXT_SUFFIXES:
        if not path.exists():
            raise LmsqueezeError(f"text file '{source}' does not exist")
        return _file_text(path)
    raise LmsqueezeError(f"unknown text source '{source}'; valid: {', '.join(TEXT_SOURCES)}, "
                         f"a {'/'.join(TEXT_SUFFIXES)} path or glob, hf:<dataset>[:<split>[:<field>]], "
                         f"chat:<instructions>, mix:<source>@<weight>+...")


# ---- instruction records, chat-formatted calibration, mixtures ------------------------------------------

def _instr_text(value, where: str, field: str, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise LmsqueezeError(f"{where}: field '{field}' must be a non-empty string, got {value!r}")
    return value


def flatten_instructions(records: list, path: str) -> list[dict]:
    """[{instruction, input, output}] from flat records ({instruction, input?, output}: Alpaca and the like) or
    the Unnatural Instructions layout (Honovich et al., 2023: {instruction, instances: [{instruction_with_input,
    input, constraints, output}]}; one item per instance, its prompt the instruction_with_input (else the
    instruction, the input apart) followed by the constraints line when non-empty). Items whose output is empty
    (the shipped Alpaca file has some) are left out with a logged count: there is nothing to score or to
    calibrate on. A record of neither layout fails naming its index and the fields it has."""
    out, empty = [], 0
    for i, rec in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise LmsqueezeError(f"{where} is {type(rec).__name__}, expected an object")
        if "instances" in rec:
            if not isinstance(rec["instances"], list) or not rec["instances"]:
                raise LmsqueezeError(f"{where}: 'instances' must be a non-empty list")
            for j, inst in enumerate(rec["instances"]):
                w = f"{where} instance {j}"
                if not isinstance(inst, dict):
                    raise LmsqueezeError(f"{w} is {type(inst).__name__}, expected an object")
                if inst.get("instruction_with_input"):
                    prompt, inp = _instr_text(inst["instruction_with_input"], w, "instruction_with_input"), ""
                else:
                    prompt = _instr_text(rec.get("instruction"), where, "instruction")
                    inp = _instr_text(inst.get("input"), w, "input", required=False)
                constraints = _instr_text(inst.get("constraints"), w, "constraints", required=False).strip()
                if constraints:
                    prompt = f"{prompt}\n{constraints}"
                if inst.get("output") == "":
                    empty += 1
                    continue
                out.append({"instruction": prompt, "input": inp,
                            "output": _instr_text(inst.get("output"), w, "output")})
        elif "instruction" in rec and "output" in rec:
            if rec["output"] == "":
                empty += 1
                continue
            out.append({"instruction": _instr_text(rec["instruction"], where, "instruction"),
                        "input": _instr_text(rec.get("input"), where, "input", required=False),
                        "output": _instr_text(rec["output"], where, "output")})
        else:
            raise LmsqueezeError(f"{where} has fields {sorted(rec)}; expected instruction/input/output or the "
                                 f"Unnatural Instructions layout (instruction + instances)")
    if empty:
        log.warning("%s: %d items with an empty output left out", path, empty)
    return out


def instruction_records(source: str | Path, data_dir=None) -> list[dict]:
    """Every item of `alpaca` or an instruction file (.json list, .jsonl, either gzip-compressed), flattened
    (`flatten_instructions`)."""
    if str(source) == "alpaca":
        return flatten_instructions(alpaca_records(data_dir), "the alpaca data set")
    p = Path(source).expanduser()
    suffix = _suffix(p)
    if suffix not in (".json", ".jsonl", ".json.gz", ".jsonl.gz"):
        raise LmsqueezeError(f"instruction file '{source}': unsupported type '{suffix}'; valid: alpaca, or a .json, "
                             f".jsonl, .json.gz or .jsonl.gz file")
    if suffix == ".jsonl":
        records = [rec for _, rec in iter_jsonl(p, "instruction file")]
    elif suffix == ".json":
        records = read_json_file(p, "instruction file")
    else:
        if not p.exists():
            raise LmsqueezeError(f"instruction file '{source}' does not exist")
        records = _json_records(_gzip_text(p, "instruction file"), p, "instruction file")
    if not isinstance(records, list):
        raise LmsqueezeError(f"{p}: expected a JSON list of instruction records, got {type(records).__name__}")
    items = flatten_instructions(records, str(p))
    if not items:
        raise LmsqueezeError(f"instruction file '{source}' holds no items")
    return items


def _user_turn(r: dict) -> str:
    return r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")


def _plain(r: dict) -> str:
    return "\n".join(x for x in (r["instruction"], r.get("input", ""), r["output"]) if x)


def chat_tokens(tokenizer, source: str, data_dir=None) -> torch.Tensor:
    """All records of `chat:<instructions>` as one token sequence: each a conversation (user: instruction and
    input, assistant: output) in the tokenizer's chat template, else in the Alpaca format after the start
    token; conversations are concatenated as they are (the template writes each one's turn markers)."""
    from lmsqueeze.evaluation.backend import start_token
    from lmsqueeze.evaluation.tasks.alpaca import ALPACA_TEMPLATE, ALPACA_TEMPLATE_INPUT

    records = instruction_records(source, data_dir)
    ids: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        texts = tokenizer.apply_chat_template([[{"role": "user", "content": _user_turn(r)},
                                                {"role": "assistant", "content": r["output"]}] for r in records],
                                              tokenize=False)
        for one in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids += one
    else:
        log.info("chat:%s: the tokenizer has no chat template; records use the Alpaca format", source)
        start = start_token(tokenizer)
        texts = [(ALPACA_TEMPLATE_INPUT if r.get("input") else ALPACA_TEMPLATE).format(
            instruction=r["instruction"], input=r.get("input", "")) + r["output"] for r in records]
        for one in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids += ([start] if start is not None else []) + one
    return torch.tensor(ids, dtype=torch.long)


def parse_mixture(source: str) -> list[tuple[str, float]]:
    """[(source, weight)] of 'mix:wikitext2:valid@0.7+chat:alpaca@0.3'; bad weights fail naming them."""
    body = source.removeprefix("mix:")
    parts = []
    for piece in body.split("+"):
        name, at, w = piece.rpartition("@")
        if not at or not name:
            raise LmsqueezeError(f"mixture part '{piece}' of '{source}' needs a weight: <source>@<weight>, e.g. "
                                 f"mix:wikitext2:valid@0.7+chat:alpaca@0.3")
        try:
            weight = float(w)
        except ValueError:
            raise LmsqueezeError(f"mixture weight '{w}' of '{piece}' is not a number") from None
        if not weight > 0 or weight == float("inf"):
            raise LmsqueezeError(f"mixture weight of '{name}' must be a positive number, got {w}")
        if name.startswith("mix:"):
            raise LmsqueezeError(f"mixtures do not nest: '{piece}'")
        parts.append((name, weight))
    if len(parts) < 2:
        raise LmsqueezeError(f"'{source}' is a mixture of one source; give two or more: mix:A@w+B@w")
    return parts


def mixture_counts(weights: list[float], nsamples: int) -> list[int]:
    """Windows per part: nsamples x w / sum(w), largest remainders, at least one each."""
    if nsamples < len(weights):
        raise LmsqueezeError(f"a mixture of {len(weights)} sources needs nsamples >= {len(weights)}, got {nsamples}")
    total = sum(weights)
    shares = [nsamples * w / total for w in weights]
    counts = [max(1, int(s)) for s in shares]
    while sum(counts) < nsamples:
        i = max(range(len(weights)), key=lambda k: shares[k] - counts[k])
        counts[i] += 1
    while sum(counts) > nsamples:
        i = max((k for k in range(len(weights)) if counts[k] > 1), key=lambda k: counts[k] - shares[k])
        counts[i] -= 1
    return counts


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """All tokens of `text` as one 1-D long tensor, no special tokens added."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0,
                        data_dir: str | os.PathLike | None = None, text: str | None = None) -> torch.Tensor:
    """nsamples disjoint token windows of length seqlen, drawn at random (seeded) from the source.

    Returns a [nsamples, seqlen] long tensor. Windows never overlap, so the text must hold at least
    nsamples * seqlen tokens. text: the source's text when the caller already read it (the CLI reads
    it before loading the model, so that a bad file fails before the model's load time is spent); `chat:`
    and `mix:` sources ignore it (their tokens depend on the tokenizer's template and the part weights).
    A mixture draws each part's windows from that part alone (seed + the part's index).
    """
    if nsamples < 1:
        raise LmsqueezeError(f"nsamples must be >= 1, got {nsamples}")
    if seqlen < 2:
        raise LmsqueezeError(f"seqlen must be >= 2, got {seqlen}")
    if source.startswith("mix:"):
        parts = parse_mixture(source)
        counts = mixture_counts([w for _, w in parts], nsamples)
        return torch.cat([calibration_batches(tokenizer, name, n, seqlen, seed + i, data_dir)
                          for i, ((name, _), n) in enumerate(zip(parts, counts))])
    if source.startswith("chat:"):
        tokens = chat_tokens(tokenizer, source[5:], data_dir)
    else:
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


def bbq_user_items(directory: str | Path, data_dir=None) -> list[dict]:
    """BBQ items of the data directory's categories and of a user folder of `<Category>.jsonl` files (BBQ's own
    `data/` layout), the user's file winning on a shared category; the data directory may be absent."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise LmsqueezeError(f"BBQ folder '{directory}' does not exist or is not a directory")
    user = {p.stem: p for p in sorted(folder.glob("*.jsonl"))}
    if not user:
        raise LmsqueezeError(f"no BBQ category files (<Category>.jsonl) in {folder}")
    try:
        shipped = {p.stem: p for p in sorted(find_dataset("bbq", data_dir).glob("*.jsonl"))}
    except LmsqueezeError:
        shipped = {}
    files = {**shipped, **user}
    out = []
    for cat, p in sorted(files.items()):
        for lineno, rec in iter_jsonl(p, "BBQ file"):
            if not isinstance(rec, dict) or not {"context", "question", "ans0", "ans1", "ans2", "label"} <= rec.keys():
                raise LmsqueezeError(f"{p}:{lineno}: expected a BBQ record (context, question, ans0..ans2, label, "
                                     f"context_condition, question_polarity, answer_info, additional_metadata)")
            out.append({"category": cat, **rec})
    return out


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
