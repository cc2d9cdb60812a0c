"""Readers of evaluation files: the safety data sets found through `lmsqueeze.data.find_dataset` (names
`bbq`, `crows_pairs`, `dialect`, `bold`) and the files users give (JSONL items, text lines). Plain lists
of dicts, unchanged from the files except where said. A file that is missing, not UTF-8 or not valid
JSON fails with one line naming the file and line."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from lmsqueeze.data import find_dataset
from lmsqueeze.errors import LmsqueezeError


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of a UTF-8 file; a missing file or a byte that is not UTF-8 is one clear error."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LmsqueezeError(f"{what} '{path}' does not exist")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise LmsqueezeError(f"{p}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}: "
                             f"{exc.reason}); save the {what} as UTF-8") from None


def jsonl_records(path: str | Path, what: str = "JSONL file"):
    """('file:line', record) for every non-empty line of a JSONL file."""
    text = read_text(path, what)
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise LmsqueezeError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


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
    return [item for p in files.values() for item in [rec for _, rec in jsonl_records(p)]]


def crows_pairs(data_dir=None) -> list[dict]:
    """CrowS-Pairs rows: index, sent_more, sent_less, stereo_antistereo, bias_type."""
    path = find_dataset("crows_pairs", data_dir)
    rows = list(csv.DictReader(io.StringIO(read_text(path, "CrowS-Pairs file"), newline="")))
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
    for lineno, line in enumerate(read_text(path, "dialect pairs file").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise LmsqueezeError(f"{path}:{lineno}: expected 'AAE<TAB>SAE', got {line.strip()!r}")
        pairs.append({"index": len(pairs), "aae": parts[0].strip(), "sae": parts[1].strip()})
    return pairs


def text_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a user-supplied text file, one sentence or passage each."""
    lines = [ln.strip() for ln in read_text(path, "text file").splitlines() if ln.strip()]
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
        try:
            data = json.loads(read_text(p, "BOLD prompt file"))
        except json.JSONDecodeError as exc:
            raise LmsqueezeError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        for group, pages in data.items():
            for page, prompts in pages.items():
                for prompt in prompts:
                    if prompt.strip():
                        out.append({"domain": domain, "group": group, "page": page, "prompt": prompt.strip()})
                    else:
                        empty += 1
    return out, empty
