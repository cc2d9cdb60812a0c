"""The study's tables as data: built once from results.jsonl records, then written as Markdown, CSV, LaTeX
and HTML (`study.report`, `study.html`), so the four never disagree.

Columns come from the tasks: each record lists its tasks' headline metrics as [key, title, format,
better] (key "TASK/METRIC"), so a new task's headline shows up here with no change to this file.
A table cell is a plain value (str, int, float or None) or an interval, a tuple (low, high); each
column has a number format. CSV keeps full precision and writes an interval as two columns.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

# ---- reading records --------------------------------------------------------------------------------


def columns(records: list[dict]) -> list[tuple[str, str, str]]:
    """(metric key, column title, format) of every headline metric in the records, in first-seen order."""
    seen = {}
    for r in records:
        for key, title, fmt, *_ in r.get("headline", []):
            seen.setdefault(key, (key, title, fmt))
    return list(seen.values())


def titles(records: list[dict]) -> dict:
    return {k: t for k, t, _ in columns(records)}


def find_key(records: list[dict], kind: str, metric: str) -> str | None:
    """The key of the first metric `metric` of a task of `kind` (e.g. "ppl", "ppl") in the records."""
    for r in records:
        for key in r.get("metrics", {}):
            task, _, m = key.rpartition("/")
            if m == metric and task.partition(":")[0] == kind:
                return key
    return None


def value(rec: dict | None, key: str):
    m = (rec or {}).get("metrics", {}).get(key)
    v = m.get("value") if isinstance(m, dict) else None
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def interval(rec: dict | None, key: str, which: str = "ci"):
    m = (rec or {}).get("metrics", {}).get(key) or {}
    ci = m.get(which) or [None, None]
    return None if ci[0] is None or ci[1] is None else (ci[0], ci[1])


def setting(rec: dict) -> str:
    """What a cell varies: "0.5", "2:4", "3-bit", "0.5 + 3-bit" (joint sparse + quantized), "-" (dense or a
    fixed format such as nf4)."""
    if rec["method"] == "dense":
        return "-"
    parts = ([str(rec["sparsity"])] if rec.get("sparsity") is not None else []) \
        + ([f"{rec['bits']}-bit"] if rec.get("bits") is not None else [])
    return " + ".join(parts) or "-"


def sparsity_order(s) -> tuple:
    """Unstructured fractions by value, then N:M patterns by N/M, then bit widths; a joint "0.5 + 3-bit" sits
    right after its plain sparsity, joint cells by bits."""
    if s is None or s == "-":
        return (2, 0.0, 0, "")
    s = str(s)
    if " + " in s:
        sparsity, _, bits = s.partition(" + ")
        return (*sparsity_order(sparsity)[:2], float(bits.removesuffix("-bit")), s)
    if s.endswith("-bit"):  # quantizer settings, by bits
        return (3, float(s.removesuffix("-bit")), 0, s)
    if ":" in s:
        n, m = s.split(":")
        return (1, 1 - int(n) / int(m), 0, s)
    return (0, float(s), 0, s)


def method_order() -> list[str]:
    """The order of methods in every table and plot: "dense" first, then the method registry's order
    (`lmsqueeze.compressor.methods.registry`: pruners, pruners that also quantize, quantizers; within a kind
    in registration order), so a plug-in method takes its place by kind with no edit here."""
    from lmsqueeze.compressor.methods import names  # imports torch: on use, not when tables is imported

    return ["dense", *names()]


def order_records(records: list[dict]) -> list[dict]:
    """The records sorted by method (`method_order`; a method no longer registered, such as a plug-in whose
    LMSQUEEZE_METHODS entry is gone, after the registered ones by name), then sparsity, bits, calibration."""
    rank = {m: i for i, m in enumerate(method_order())}
    return sorted(records, key=lambda r: (rank.get(r["method"], len(rank)), r["method"],
                                          sparsity_order(r.get("sparsity")), r.get("bits") or 0,
                                          r.get("calib") or ""))


def dense_of(records: list[dict]) -> dict | None:
    return next((r for r in records if r["method"] == "dense"), None)


# ---- tables -----------------------------------------------------------------------------------------

@dataclass
class Table:
    name: str               # file stem of its CSV (tables/<name>.csv) and its HTML id
    title: str
    header: list[str]
    rows: list[list]        # cells: str, int, float, None, or (low, high) for an interval
    fmts: list[str | None] = field(default_factory=list)  # per column: a format for numbers (None: str())
    note: str = ""

    def text(self, i: int, j: int) -> str:
        """Cell (i, j) as the Markdown and HTML tables show it."""
        v, fmt = self.rows[i][j], self.fmts[j] if j < len(self.fmts) else None
        if v is None:
            return "-"
        if isinstance(v, tuple):
            return f"[{_num(v[0], fmt)}, {_num(v[1], fmt)}]"
        return _num(v, fmt)

    def sort_key(self, i: int, j: int):
        """A number to sort cell (i, j) by (an interval by its midpoint), or None for text."""
        v = self.rows[i][j]
        if isinstance(v, tuple):
            return (v[0] + v[1]) / 2
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
        return None


def _num(v, fmt: str | None) -> str:
    if isinstance(v, str) or fmt is None or not isinstance(v, (int, float)):
        return str(v)
    return format(v, fmt)


def headline_table(records: list[dict], intervals: bool = False) -> Table:
    """The "beyond perplexity" grid: one row per cell, a column per headline metric; intervals=True holds
    the 95% intervals instead of the values (and no compression time)."""
    cols = [c for c in columns(records) if any(value(r, c[0]) is not None for r in records)]
    header = ["method", "sparsity/bits", "calibration"] + [t for _, t, _ in cols]
    fmts: list[str | None] = [None, None, None] + [f for _, _, f in cols]
    if not intervals:
        header.append("compress time (s)")
        fmts.append(".1f")
    rows = []
    for r in order_records(records):
        row = [r["method"], setting(r), r.get("calib") or "-"]
        row += [interval(r, k) if intervals else value(r, k) for k, _, _ in cols]
        if not intervals:
            c = r.get("compression")
            row.append(c["seconds"] if c else None)
        rows.append(row)
    if intervals:
        return Table("intervals", "95% intervals", header, rows, fmts,
                     "Percentile bootstrap over items (windows for ppl/JSD/top-1, questions for the rest); Wilson "
                     "for proportions; a dash means the metric has no interval.")
    return Table("headline", "Beyond perplexity", header, rows, fmts)


def ppl_vs_divergence_table(records: list[dict]) -> Table | None:
    """Per cell: relative perplexity change next to JSD and flips, ranked by JSD (the point of the study:
    cells close in perplexity can be far apart in how much they changed the model's outputs)."""
    dense = dense_of(records)
    ppl, jsd, flips = (find_key(records, "ppl", "ppl"), find_key(records, "divergence", "jsd"),
                       find_key(records, "piqa", "flips"))
    base = value(dense, ppl) if dense and ppl else None
    rows = [r for r in records if r["method"] != "dense" and jsd and value(r, jsd) is not None]
    if base is None or not rows:
        return None
    out = []
    for r in sorted(rows, key=lambda r: value(r, jsd)):
        p = value(r, ppl)
        out.append([r["label"], None if p is None else 100 * (p / base - 1), value(r, jsd),
                    value(r, flips) if flips else None])
    return Table("ppl_vs_divergence", "Perplexity against divergence", ["cell", "ppl change (%)", "JSD", "PIQA flips"],
                 out, [None, "+.1f", ".4f", ".3f"])


def metrics_table(records: list[dict]) -> Table:
    """Every metric of every cell, long format: value, interval, n, base, paired delta and its interval."""
    rows = []
    for r in order_records(records):
        for key, m in r.get("metrics", {}).items():
            task, _, metric = key.rpartition("/")
            rows.append([r["label"], task, metric, m.get("value"), _pair(m.get("ci")), m.get("n"), m.get("base"),
                         m.get("delta"), _pair(m.get("delta_ci"))])
    return Table("metrics", "Every metric", ["cell", "task", "metric", "value", "95% CI", "n", "base", "delta",
                                             "delta 95% CI"], rows, [None, None, None, ".4g", ".4g", None, ".4g",
                                                                     "+.4g", "+.4g"])


def groups_table(records: list[dict]) -> Table | None:
    """The per-group breakdowns behind the heat maps: change from the base, its interval and n."""
    rows = []
    for r in order_records(records):
        for task, block in (r.get("groups") or {}).items():
            for g, c in block.get("groups", {}).items():
                rows.append([r["label"], task, block.get("metric"), g, c.get("value"), c.get("base"), c.get("delta"),
                             _pair(c.get("delta_ci")), c.get("n")])
    if not rows:
        return None
    return Table("groups", "Per-group changes", ["cell", "task", "metric", "group", "value", "base", "delta",
                                                 "delta 95% CI", "n"], rows,
                 [None, None, None, None, ".4g", ".4g", "+.4g", "+.4g", None])


def _pair(ci):
    if not ci or ci[0] is None or ci[1] is None:
        return None
    return (ci[0], ci[1])


def all_tables(records: list[dict]) -> list[Table]:
    out = [headline_table(records), headline_table(records, intervals=True), ppl_vs_divergence_table(records),
           groups_table(records), metrics_table(records)]
    return [t for t in out if t is not None]


# ---- writers ----------------------------------------------------------------------------------------

def to_markdown(t: Table) -> str:
    lines = ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(t.text(i, j) for j in range(len(t.header))) + " |" for i in range(len(t.rows))]
    return "\n".join(lines)


def to_csv(t: Table) -> str:
    """Full precision; an interval column becomes '<title> low' and '<title> high'; empty for no value."""
    is_pair = [any(isinstance(row[j], tuple) for row in t.rows) for j in range(len(t.header))]
    header = []
    for h, pair in zip(t.header, is_pair):
        header += [f"{h} low", f"{h} high"] if pair else [h]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in t.rows:
        out = []
        for v, pair in zip(row, is_pair):
            if pair:
                out += list(v) if isinstance(v, tuple) else ["", ""]
            else:
                out.append("" if v is None else repr(v) if isinstance(v, float) else v)
        w.writerow(out)
    return buf.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(s: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(s))


def headline_latex(records: list[dict], caption: str = "") -> str:
    """The headline grid as a booktabs LaTeX table: each metric's value with its 95% interval beneath it
    in small type (needs \\usepackage{booktabs} and \\usepackage{makecell})."""
    vals, cis = headline_table(records), headline_table(records, intervals=True)
    ncols = len(cis.header)
    spec = "lll" + "r" * (ncols - 3)
    lines = ["% lmsqueeze study: headline grid; needs \\usepackage{booktabs,makecell}",
             "\\begin{table}[t]", "\\centering", "\\small", f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
             " & ".join(latex_escape(h) for h in cis.header) + " \\\\", "\\midrule"]
    for i in range(len(vals.rows)):
        cells = [latex_escape(vals.text(i, j)) for j in range(3)]
        for j in range(3, ncols):
            v, ci = vals.rows[i][j], cis.rows[i][j]
            if v is None:
                cells.append("--")
            elif ci is None:
                cells.append(latex_escape(vals.text(i, j)))
            else:
                cells.append(f"\\makecell[r]{{{latex_escape(vals.text(i, j))}\\\\"
                             f"{{\\scriptsize {latex_escape(cis.text(i, j))}}}}}")
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}",
              f"\\caption{{{latex_escape(caption or 'Compression study: headline metrics with 95% intervals.')}}}",
              "\\label{tab:lmsqueeze-study}", "\\end{table}"]
    return "\n".join(lines) + "\n"
