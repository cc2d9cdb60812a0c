"""A study's report, rendered from DIR/results.jsonl alone (re-rendered by `lmsqueeze report DIR`):

    DIR/report.md            the tables, what the numbers rest on, the plots
    DIR/report.html          the same in one self-contained file: sortable tables, plots inline (SVG)
    DIR/tables/*.csv         every table, full precision (an interval as two columns)
    DIR/tables/headline.tex  the headline grid as a booktabs LaTeX table, intervals under the values
    DIR/plots/*.png, *.svg   the plots at print resolution and as vectors (`study.plots`)

The table puts perplexity beside the measures that see what perplexity averages away: divergence from
the base (JSD, top-1 agreement), answers that flipped, generation quality, and bias/harm deltas.
"""
from __future__ import annotations

import os
from pathlib import Path

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation import provenance
from lmsqueeze.evaluation.files import write_text_atomic
from lmsqueeze.study.tables import (
    all_tables,
    dense_of,
    headline_latex,
    headline_table,
    ppl_vs_divergence_table,
    to_csv,
    to_markdown,
)


def render_table(records: list[dict], intervals: bool = False) -> str:
    """The "beyond perplexity" table in Markdown: one row per cell; intervals=True shows 95% intervals instead."""
    return to_markdown(headline_table(records, intervals))


def provenance_of(records: list[dict]) -> dict:
    """What the study's numbers rest on (`evaluation.provenance`), from its records: the model, the tasks'
    texts, the window and n per metric (the largest n over the cells; they share their items)."""
    first = records[0]
    tasks = list(dict.fromkeys(k.rpartition("/")[0] for r in records for k in r.get("metrics", {})))
    n: dict[str, int] = {}
    for r in records:
        for key, m in r.get("metrics", {}).items():
            if m.get("n") is not None:
                n[key] = max(n.get(key, 0), m["n"])
    return provenance.describe(first.get("model"), None, tasks, first.get("eval", {}).get("seqlen"), n)


def summary_line(records: list[dict]) -> str:
    ev = records[0].get("eval", {})
    return (f"{len(records)} cells; evaluation: suite {ev.get('suite')}"
            + (f" + tasks {', '.join(ev['tasks'])}" if ev.get("tasks") else "")
            + f", limit {ev.get('limit')}, eval seqlen {ev.get('seqlen')}, dtype {ev.get('dtype')}. "
            "Divergence, top-1 agreement and flips compare each cell with the base model"
            + (" (the dense row compares the base with itself)." if dense_of(records) else "."))


def samples_note(records: list[dict]) -> str | None:
    n = sum(len(r.get("samples") or {}) for r in records)
    return f"Per-item sample records (`--log-samples`): {n} files under `samples/`." if n else None


def render_report(records: list[dict], plots: list | None = None, title: str | None = None) -> str:
    """report.md's text. plots: [(stem, caption)] of the plots written under plots/ (or bare stems/names)."""
    if not records:
        raise LmsqueezeError("no results to report: results.jsonl has no complete cell")
    vals, cis = headline_table(records), headline_table(records, intervals=True)
    out = [f"# {title or 'Compression study: ' + str(records[0].get('model', '?'))}", "", summary_line(records), "",
           "## What the numbers rest on", "", *provenance.markdown(provenance_of(records)), "",
           f"## {vals.title}", "", to_markdown(vals), "", f"## {cis.title}", "", cis.note, "", to_markdown(cis), ""]
    deltas = ppl_vs_divergence_table(records)
    if deltas is not None:
        out += [f"## {deltas.title}", "", to_markdown(deltas), ""]
    out += ["## Files", "", "Every table as CSV in `tables/` (" + ", ".join(f"`{t.name}.csv`" for t in
                                                                           all_tables(records))
            + "); the headline grid as LaTeX in `tables/headline.tex`; this report as one HTML file, `report.html`."]
    note = samples_note(records)
    if note:
        out.append(note)
    out.append("")
    if plots:
        out += ["## Plots", ""]
        for p in plots:
            stem, caption = (p if isinstance(p, tuple) else (Path(p).stem, ""))
            out += [f"![{stem}](plots/{stem}.png)", "", (caption + " " if caption else "")
                    + f"Vector version: [plots/{stem}.svg](plots/{stem}.svg).", ""]
    return "\n".join(out)


def write_report(directory: str | os.PathLike, plots: bool = True) -> Path:
    """Render report.md, report.html, tables/ and plots/ in DIR from DIR/results.jsonl; returns report.md's path."""
    from lmsqueeze.study.html import render_html
    from lmsqueeze.study.plots import write_plots
    from lmsqueeze.study.runner import RESULTS, read_results

    directory = Path(directory)
    if not (directory / RESULTS).exists():
        raise LmsqueezeError(f"{directory} holds no {RESULTS}: run `lmsqueeze study --output-dir {directory}` first")
    records = read_results(directory)
    made = write_plots(records, directory / "plots") if plots and records else []
    text = render_report(records, made)
    from lmsqueeze.study.agreement import (
        agreement_section,  # cheap vs expensive metrics across cells (issue 20)
    )
    text += agreement_section(records, directory, plots=plots)
    for t in all_tables(records):
        write_text_atomic(directory / "tables" / f"{t.name}.csv", to_csv(t))
    write_text_atomic(directory / "tables" / "headline.tex", headline_latex(
        records, f"Compression study of {records[0].get('model', '?')}: headline metrics, 95% intervals beneath."))
    write_text_atomic(directory / "report.html", render_html(records, [(directory / "plots" / f"{s}.svg", c)
                                                                       for s, c in made]))
    path = directory / "report.md"
    write_text_atomic(path, text + "\n")
    return path
