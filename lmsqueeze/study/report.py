"""DIR/report.md and DIR/plots/*.png, rendered from DIR/results.jsonl alone (re-rendered by `lmsqueeze report`).

The table puts perplexity beside the measures that see what perplexity averages away: divergence from
the base (JSD, top-1 agreement), answers that flipped, generation quality, and bias/harm deltas.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from lmsqueeze.errors import LmsqueezeError

# Columns come from the tasks: each record lists its tasks' headline metrics as [key, title, format,
# better] (key "TASK/METRIC"), so a new task's headline shows up here with no change to this file.


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


def _value(rec: dict, key: str):
    m = rec.get("metrics", {}).get(key)
    v = m.get("value") if isinstance(m, dict) else None
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _ci(rec: dict, key: str):
    m = rec.get("metrics", {}).get(key) or {}
    ci = m.get("ci") or [None, None]
    return None if ci[0] is None or ci[1] is None else ci


def _setting(rec: dict) -> str:
    if rec["method"] == "dense":
        return "-"
    return str(rec["sparsity"]) if rec.get("sparsity") is not None else f"{rec.get('bits')}-bit"


def _sparsity_order(s) -> tuple:
    """Unstructured fractions by value, then N:M patterns by N/M (they are plotted as categories)."""
    if s is None:
        return (2, 0.0, "")
    s = str(s)
    if s.endswith("-bit"):  # quantizer settings, by bits
        return (3, float(s.removesuffix("-bit")), s)
    if ":" in s:
        n, m = s.split(":")
        return (1, 1 - int(n) / int(m), s)
    return (0, float(s), s)


def _order(records: list[dict]) -> list[dict]:
    methods = ["dense", "magnitude", "wanda", "sparsegpt", "gptq", "rtn"]
    return sorted(records, key=lambda r: (methods.index(r["method"]) if r["method"] in methods else 99,
                                          _sparsity_order(r.get("sparsity")), r.get("bits") or 0,
                                          r.get("calib") or ""))


def _fmt(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render_table(records: list[dict], intervals: bool = False) -> str:
    """The "beyond perplexity" table: one row per cell; intervals=True shows 95% intervals instead."""
    cols = [c for c in columns(records) if any(_value(r, c[0]) is not None for r in records)]
    head = ["method", "sparsity/bits", "calibration"] + [t for _, t, _ in cols]
    if not intervals:
        head += ["compress time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _order(records):
        row = [r["method"], _setting(r), r.get("calib") or "-"]
        for key, _, fmt in cols:
            if intervals:
                ci = _ci(r, key)
                row.append("-" if ci is None else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]")
            else:
                row.append(_fmt(_value(r, key), fmt))
        if not intervals:
            c = r.get("compression")
            row.append("-" if not c else f"{c['seconds']:.1f} s")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_report(records: list[dict], plots: list[str] | None = None, title: str | None = None) -> str:
    if not records:
        raise LmsqueezeError("no results to report: results.jsonl has no complete cell")
    model = records[0].get("model", "?")
    ev = records[0].get("eval", {})
    dense = next((r for r in records if r["method"] == "dense"), None)
    out = [f"# {title or 'Compression study: ' + model}", "",
           f"{len(records)} cells; evaluation: suite {ev.get('suite')}"
           + (f" + tasks {', '.join(ev['tasks'])}" if ev.get("tasks") else "")
           + f", limit {ev.get('limit')}, eval seqlen {ev.get('seqlen')}, dtype {ev.get('dtype')}. "
           "Divergence, top-1 agreement and flips compare each cell with the base model"
           + (" (the dense row compares the base with itself)." if dense else "."), "",
           "## Beyond perplexity", "", render_table(records), "",
           "## 95% intervals", "",
           "Percentile bootstrap over items (windows for ppl/JSD/top-1, questions for the rest); "
           "a `-` means the metric has no interval.", "", render_table(records, intervals=True), ""]
    deltas = _ppl_vs_divergence(records, dense)
    if deltas:
        out += ["## Perplexity against divergence", "", deltas, ""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots] + [""]
    return "\n".join(out)


def _ppl_vs_divergence(records: list[dict], dense: dict | None) -> str:
    """Per cell: relative perplexity change next to JSD and flips, ranked by JSD (the point of the study:
    cells close in perplexity can be far apart in how much they changed the model's outputs)."""
    ppl, jsd, flips = (find_key(records, "ppl", "ppl"), find_key(records, "divergence", "jsd"),
                       find_key(records, "piqa", "flips"))
    base = _value(dense, ppl) if dense and ppl else None
    rows = [r for r in records if r["method"] != "dense" and jsd and _value(r, jsd) is not None]
    if base is None or not rows:
        return ""
    lines = ["| cell | ppl change | JSD | PIQA flips |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: _value(r, jsd)):
        p = _value(r, ppl)
        lines.append(f"| {r['label']} | {'-' if p is None else f'{100 * (p / base - 1):+.1f}%'} | "
                     f"{_value(r, jsd):.4f} | {_fmt(_value(r, flips) if flips else None, '.3f')} |")
    return "\n".join(lines)


# ---- plots ------------------------------------------------------------------------------------------

def _publish(tmp: str, path: Path) -> None:
    """Rename a finished temporary file onto `path` with the permissions a plain open() would give
    (mkstemp makes files only their owner can read)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _save(fig, path: Path) -> None:
    """savefig to a temporary file beside `path`, then rename: a plot appears whole or not at all."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_if_wide(ax, values: list[float]) -> None:
    """Perplexity on a log axis only when it spans more than a factor 10 (plain numbers otherwise).

    Decided on the plotted values, not the axis limits: those include a margin that can reach
    below zero.
    """
    values = [v for v in values if v is not None and v > 0]
    if values and max(values) / min(values) > 10:
        from matplotlib.ticker import ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())


def plot_sweeps(records: list[dict], path: Path) -> bool:
    """Each metric against sparsity (categorical axis: fractions, then N:M), one line per method and
    calibration source; the dense model as a dashed line."""
    rows = [r for r in records if r.get("sparsity") is not None]
    metrics = [m for m, _, _ in columns(records) if any(_value(r, m) is not None for r in rows)]
    ppl = find_key(records, "ppl", "ppl")
    if not rows or not metrics:
        return False
    plt = _pyplot()
    xs = sorted({str(r["sparsity"]) for r in rows}, key=_sparsity_order)
    dense = next((r for r in records if r["method"] == "dense"), None)
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.4 * nrow), squeeze=False)
    series = sorted({(r["method"], r.get("calib")) for r in rows}, key=lambda s: (s[0], s[1] or ""))
    calibs = sorted({s[1] or "" for s in series})
    styles = ["-", "--", ":", "-."]
    colors = {m: f"C{i}" for i, m in enumerate(sorted({s[0] for s in series}))}
    for ax, metric in zip(axes.flat, metrics):
        for method, calib in series:
            pts = [(xs.index(str(r["sparsity"])), _value(r, metric)) for r in rows
                   if r["method"] == method and r.get("calib") == calib and _value(r, metric) is not None]
            if not pts:
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[method],
                    linestyle=styles[calibs.index(calib or "") % len(styles)],
                    label=method + (f" ({calib})" if calib else ""))
        if dense is not None and _value(dense, metric) is not None:
            ax.axhline(_value(dense, metric), color="gray", linestyle="--", linewidth=1, label="dense")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs)
        ax.set_xlabel("sparsity")
        ax.set_title(titles(records).get(metric, metric))
        if metric == ppl:
            _log_if_wide(ax, [_value(r, ppl) for r in records])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), bbox_to_anchor=(0.5, -0.02 - 0.03 * (len(labels) // 4)))
    fig.suptitle("metrics against sparsity")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    _save(fig, path)
    plt.close(fig)
    return True


def plot_calibration(records: list[dict], path: Path) -> bool:
    """Calibration source effect: per (method, setting), one bar per source, for ppl and JSD."""
    rows = [r for r in records if r.get("calib")]
    if len({r["calib"] for r in rows}) < 2:
        return False
    plt = _pyplot()
    groups = sorted({(r["method"], _setting(r)) for r in rows}, key=lambda g: (g[0], _sparsity_order(g[1])))
    sources = sorted({r["calib"] for r in rows})
    ppl = find_key(records, "ppl", "ppl")
    metrics = [m for m in (ppl, find_key(records, "divergence", "jsd"), find_key(records, "piqa", "flips"))
               if m and any(_value(r, m) is not None for r in rows)]
    if not metrics:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(5.0, 0.9 * len(groups) * len(sources) / 2 + 2) * len(metrics) / 1.5, 3.8),
                             squeeze=False)
    width = 0.8 / len(sources)
    for ax, metric in zip(axes.flat, metrics):
        for j, src in enumerate(sources):
            vals = []
            for g in groups:
                r = next((r for r in rows if (r["method"], _setting(r)) == g and r["calib"] == src), None)
                vals.append(float("nan") if r is None or _value(r, metric) is None else _value(r, metric))
            ax.bar([i + (j - (len(sources) - 1) / 2) * width for i in range(len(groups))], vals, width, label=src)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{m}\n{s}" for m, s in groups], fontsize=8)
        ax.set_title(titles(records).get(metric, metric))
        if metric == ppl:
            _log_if_wide(ax, [_value(r, ppl) for r in records])
        ax.grid(alpha=0.3, axis="y")
    axes.flat[0].legend(title="calibration", fontsize=8)
    fig.suptitle("calibration source effect")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_groups(records: list[dict], path: Path) -> bool:
    """Per-group bias/harm heat maps: change from the base model per cell (rows) and group (columns)."""
    tasks = sorted({t for r in records for t in (r.get("groups") or {})})
    rows = [r for r in _order(records) if r["method"] != "dense" and r.get("groups")]
    if not tasks or not rows:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(tasks), 1, figsize=(10, 1.2 + 0.45 * len(rows) * len(tasks) + 1.5 * len(tasks)),
                             squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        metric = next(r["groups"][task]["metric"] for r in rows if task in r["groups"])
        names = sorted({g for r in rows for g in r["groups"].get(task, {}).get("groups", {})})
        grid = [[(r["groups"].get(task, {}).get("groups", {}).get(g) or {}).get("delta") for g in names]
                for r in rows]
        data = [[float("nan") if v is None else v for v in row] for row in grid]
        finite = [abs(v) for row in data for v in row if not math.isnan(v)]
        lim = max(finite) if finite and max(finite) > 0 else 1.0
        im = ax.imshow(data, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r["label"] for r in rows], fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.split("/")[-1] for n in names], rotation=45, ha="right", fontsize=8)
        if len(rows) * len(names) <= 300:
            for i, row in enumerate(data):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=7,
                                color="white" if abs(v) > 0.6 * lim else "black")
        ax.set_title(f"{task}: change in {metric} from the base model, per group")
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_ppl_vs_divergence(records: list[dict], path: Path) -> bool:
    """Per cell: perplexity change against JSD and against PIQA flips.

    Cells are told apart by marker, not by text labels (a crowded sweep made those unreadable):
    colour = method, shape = sparsity or bits, fill = calibration source.
    """
    dense = next((r for r in records if r["method"] == "dense"), None)
    ppl = find_key(records, "ppl", "ppl")
    base = _value(dense, ppl) if dense and ppl else None
    rows = [r for r in records if r["method"] != "dense" and ppl and _value(r, ppl) is not None]
    ys = [m for m in (find_key(records, "divergence", "jsd"), find_key(records, "piqa", "flips"))
          if m and any(_value(r, m) is not None for r in rows)]
    if base is None or not rows or not ys:
        return False
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(ys), figsize=(6 * len(ys), 4.4), squeeze=False)
    methods = [m for m in ("magnitude", "wanda", "sparsegpt", "gptq", "rtn") if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    colors = {m: f"C{i}" for i, m in enumerate(sorted(methods))}  # as in the other plots
    settings = sorted({_setting(r) for r in rows}, key=_sparsity_order)
    shapes = {st: "osD^vPX*ph"[i % 10] for i, st in enumerate(settings)}
    calibs = sorted({r.get("calib") or "none" for r in rows})
    fills = {c: ("full", "none", "left", "bottom", "right", "top")[i % 6] for i, c in enumerate(calibs)}
    ratios = [_value(r, ppl) / base for r in rows]
    log_x = max(ratios) / min(ratios) > 10  # one collapsed method would squash all the others
    for ax, metric in zip(axes.flat, ys):
        for r, ratio in zip(rows, ratios):
            y = _value(r, metric)
            if y is None:
                continue
            x = ratio if log_x else 100 * (ratio - 1)
            ax.plot([x], [y], linestyle="", marker=shapes[_setting(r)], fillstyle=fills[r.get("calib") or "none"],
                    color=colors[r["method"]], markersize=8, markeredgewidth=1.5)
        if log_x:
            from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("perplexity / base model perplexity (log scale)")
        else:
            ax.set_xlabel("perplexity change from the base model (%)")
        ax.set_ylabel(titles(records).get(metric, metric))
        ax.set_title(f"{titles(records).get(metric, metric)} against perplexity change")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], linestyle="", marker="o", color=colors[m], label=m) for m in methods]
    handles += [Line2D([], [], linestyle="", marker=shapes[st], color="gray", label=st) for st in settings]
    if len(calibs) > 1 or calibs != ["none"]:
        handles += [Line2D([], [], linestyle="", marker="o", fillstyle=fills[c], color="gray", markersize=8,
                           label=f"calib: {c}") for c in calibs]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8,
               bbox_to_anchor=(0.5, -0.02 - 0.05 * (len(handles) // 9)))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(fig, path)
    plt.close(fig)
    return True


PLOTS = [("metrics_vs_sparsity.png", plot_sweeps), ("calibration_effect.png", plot_calibration),
         ("safety_groups.png", plot_groups), ("ppl_vs_divergence.png", plot_ppl_vs_divergence)]


def write_report(directory: str | os.PathLike, plots: bool = True) -> Path:
    """Render DIR/report.md (and DIR/plots/*.png) from DIR/results.jsonl; returns the report's path."""
    from lmsqueeze.study.runner import RESULTS, read_results

    directory = Path(directory)
    if not (directory / RESULTS).exists():
        raise LmsqueezeError(f"{directory} holds no {RESULTS}: run `lmsqueeze study --output-dir {directory}` first")
    records = read_results(directory)
    made = []
    if plots:
        (directory / "plots").mkdir(exist_ok=True)
        made = [name for name, fn in PLOTS if fn(records, directory / "plots" / name)]
    text = render_report(records, made)
    path = directory / "report.md"
    fd, tmp = tempfile.mkstemp(prefix=".report.md.", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    _publish(tmp, path)
    return path
