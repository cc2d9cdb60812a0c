"""The study report as one self-contained HTML file: no network, no files beside it.

Tables are the same `study.tables.Table` data the Markdown and CSV come from; a click on a column
header sorts by it (numbers by value, an interval by its midpoint, text alphabetically; again to
reverse), and `report.html#sort=TABLE:COLUMN[:desc]` opens the page sorted (a link to a ranking).
Plots are the SVG files, embedded as data: URIs (each keeps its own ids, so two plots never clash).
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from lmsqueeze.evaluation import provenance
from lmsqueeze.study.tables import Table, all_tables

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #1a1a1a; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 9px; text-align: right; white-space: nowrap; }
th.t, td.t { text-align: left; }
th { cursor: pointer; background: #f3f3f3; position: sticky; top: 0; user-select: none; }
th[aria-sort="ascending"]::after { content: " \\25B2"; font-size: 0.7em; }
th[aria-sort="descending"]::after { content: " \\25BC"; font-size: 0.7em; }
tbody tr:hover { background: #f7f9ff; }
.scroll { overflow-x: auto; max-height: 36em; }
.note, figcaption { color: #555; font-size: 0.92em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
"""

# Sorting: rows carry their original order in data-i (ties keep it); a cell's data-v is its sort key.
SCRIPT = """
"use strict";
function sortTable(table, col, desc) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const key = (row) => {
    const cell = row.cells[col];
    const v = cell.dataset.v;
    return v === undefined || v === "" ? null : (cell.dataset.num === "1" ? Number(v) : v);
  };
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === null || y === null) {
      return x === y ? Number(a.dataset.i) - Number(b.dataset.i) : (x === null ? 1 : -1);
    }
    const c = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
    return c !== 0 ? (desc ? -c : c) : Number(a.dataset.i) - Number(b.dataset.i);
  });
  rows.forEach((row) => body.appendChild(row));
  Array.from(table.tHead.rows[0].cells).forEach((th, j) => {
    if (j === col) { th.setAttribute("aria-sort", desc ? "descending" : "ascending"); }
    else { th.removeAttribute("aria-sort"); }
  });
}
document.querySelectorAll("table.sortable").forEach((table) => {
  Array.from(table.tHead.rows[0].cells).forEach((th, j) => {
    th.addEventListener("click", () => sortTable(table, j, th.getAttribute("aria-sort") === "ascending"));
  });
});
function sortFromHash() {
  const m = /^#sort=([\\w-]+):(\\d+)(:desc)?$/.exec(window.location.hash);
  const table = m && document.getElementById(m[1]);
  if (table) { sortTable(table, Number(m[2]), Boolean(m[3])); }
}
window.addEventListener("hashchange", sortFromHash);
sortFromHash();
"""


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def table_html(t: Table) -> str:
    # a column of text (no number in it) is aligned left, numbers right
    text_col = [all(t.sort_key(i, j) is None for i in range(len(t.rows))) for j in range(len(t.header))]
    cls = [' class="t"' if text else "" for text in text_col]
    head = "".join(f'<th scope="col"{cls[j]} title="sort by {_e(h)}">{_e(h)}</th>' for j, h in enumerate(t.header))
    body = []
    for i in range(len(t.rows)):
        cells = []
        for j in range(len(t.header)):
            key = t.sort_key(i, j)
            if key is not None:
                attrs = f' data-v="{_e(repr(float(key)))}" data-num="1"'
            elif t.rows[i][j] is not None:
                attrs = f' data-v="{_e(t.rows[i][j])}"'
            else:
                attrs = ""
            cells.append(f"<td{cls[j]}{attrs}>{_e(t.text(i, j))}</td>")
        body.append(f'<tr data-i="{i}">' + "".join(cells) + "</tr>")
    note = f'<p class="note">{_e(t.note)}</p>' if t.note else ""
    return (f'<h2>{_e(t.title)}</h2>{note}<div class="scroll"><table class="sortable" id="{_e(t.name)}">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def figure_html(svg: Path, caption: str) -> str:
    data = base64.b64encode(Path(svg).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_e(svg.stem)}" src="data:image/svg+xml;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _markdown_inline(line: str) -> str:
    """A provenance bullet (Markdown with `code`) as HTML."""
    parts = line.removeprefix("- ").split("`")
    return "".join(f"<code>{_e(p)}</code>" if k % 2 else _e(p) for k, p in enumerate(parts))


def render_html(records: list[dict], plots: list[tuple[Path, str]]) -> str:
    """The whole report as one HTML document. plots: [(path of an SVG, caption)]."""
    from lmsqueeze.study.report import provenance_of, samples_note, summary_line

    title = f"Compression study: {records[0].get('model', '?')}"
    prov = "".join(f"<li>{_markdown_inline(line)}</li>" for line in provenance.markdown(provenance_of(records)))
    parts = [f"<h1>{_e(title)}</h1>", f"<p>{_e(summary_line(records))}</p>",
             f"<h2>What the numbers rest on</h2><ul>{prov}</ul>",
             '<p class="note">Click a column header to sort by it; click again to reverse.</p>']
    parts += [table_html(t) for t in all_tables(records)]
    note = samples_note(records)
    if note:
        parts.append(f'<p class="note">{_e(note)}</p>')
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [figure_html(p, c) for p, c in plots]
    meta = json.dumps({"cells": len(records), "generator": "lmsqueeze"})
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{_e(title)}</title>'
            f'<script type="application/json" id="lmsqueeze-meta">{meta}</script>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}<script>{SCRIPT}</script></body></html>\n")
