"""The study's plots, from results.jsonl records alone: each written as PNG at print resolution and as SVG.

Rules every plot keeps, because a reader takes a plot at its word:
- every point that has an interval in its record carries it as an error bar (95%, as in the tables);
- unstructured sparsity fractions sit on one axis, joined by lines per method; N:M patterns are other
  kinds of sparsity, drawn as unjoined points in a block of their own to the right (a line from 0.5
  to 2:4 would suggest a trend between them that does not exist);
- the base model (the dense cell) is drawn as a line with its interval as a band, and every axis is
  widened to hold it, so a baseline is never cut off;
- heat maps print n in every cell and hatch the cells whose interval of the change covers zero.
"""
from __future__ import annotations

import math
from pathlib import Path

from lmsqueeze.evaluation.files import write_bytes_atomic
from lmsqueeze.study.tables import (
    columns,
    dense_of,
    find_key,
    interval,
    order_records,
    setting,
    sparsity_order,
    titles,
    value,
)

DPI = 300  # PNG resolution: print quality
FORMATS = ("png", "svg")
HATCH_NOTE = "hatched: the 95% interval of the change covers 0"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text in the SVG (searchable, smaller)
    plt.rcParams["svg.hashsalt"] = "lmsqueeze"  # the same records give the same SVG bytes
    return plt


def _save(fig, path: Path) -> list[Path]:
    """path.png at DPI and path.svg beside it, each written whole or not at all; the paths written."""
    import io

    out = []
    for fmt in FORMATS:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=DPI, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None)
        out.append(write_bytes_atomic(path.with_suffix("." + fmt), buf.getvalue()))
    return out


def _err(v: float, ci) -> tuple[float, float]:
    """(below, above) error bar lengths of value v with interval ci (0 where there is none)."""
    if ci is None:
        return 0.0, 0.0
    return max(0.0, v - ci[0]), max(0.0, ci[1] - v)


def _log_if_wide(ax, values: list[float], axis: str = "y") -> bool:
    """Perplexity on a log axis only when it spans more than a factor 10 (plain numbers otherwise).

    Decided on the plotted values, not the axis limits: those include a margin that can reach
    below zero.
    """
    values = [v for v in values if v is not None and v > 0]
    if values and max(values) / min(values) > 10:
        from matplotlib.ticker import ScalarFormatter

        getattr(ax, f"set_{axis}scale")("log")
        getattr(ax, f"{axis}axis").set_major_formatter(ScalarFormatter())
        return True
    return False


def _hold(ax, values: list[float], log: bool = False) -> None:
    """Widen the y axis (never narrow it) so that every value in `values` lies inside it, with a margin."""
    values = [v for v in values if v is not None and math.isfinite(v) and (v > 0 or not log)]
    if not values:
        return
    lo, hi = ax.get_ylim()
    vlo, vhi = min(values), max(values)
    if log:
        pad = (math.log10(vhi) - math.log10(vlo)) * 0.05 or 0.05
        lo, hi = min(lo, 10 ** (math.log10(vlo) - pad)), max(hi, 10 ** (math.log10(vhi) + pad))
    else:
        pad = (vhi - vlo) * 0.05 or abs(vhi) * 0.05 or 0.05
        lo, hi = min(lo, vlo - pad), max(hi, vhi + pad)
    ax.set_ylim(lo, hi)


def _baseline(ax, dense: dict | None, metric: str) -> list[float]:
    """The dense cell's value as a dashed line and its interval as a band; the values the axis must hold."""
    v = value(dense, metric) if dense else None
    if v is None:
        return []
    ci = interval(dense, metric)
    ax.axhline(v, color="gray", linestyle="--", linewidth=1, label="dense (base)", zorder=1)
    if ci is not None and ci[1] > ci[0]:
        ax.axhspan(ci[0], ci[1], color="gray", alpha=0.15, linewidth=0, zorder=0)
        return [v, ci[0], ci[1]]
    return [v]


def method_colors(records: list[dict]) -> dict:
    """One colour per method, the same in every plot."""
    return {m: f"C{i}" for i, m in enumerate(sorted({r["method"] for r in records if r["method"] != "dense"}))}


def _is_nm(s) -> bool:
    return ":" in str(s)


def sweep_positions(records: list[dict]) -> tuple[dict, list[str], list[str]]:
    """({setting: x}, unstructured settings, N:M settings): unstructured fractions at 0..k-1, then a gap of
    one slot, then the N:M patterns (so the two kinds never share a run of the axis)."""
    rows = [r for r in records if r.get("sparsity") is not None]
    settings = sorted({str(r["sparsity"]) for r in rows}, key=sparsity_order)
    frac = [s for s in settings if not _is_nm(s)]
    nm = [s for s in settings if _is_nm(s)]
    pos = {s: float(i) for i, s in enumerate(frac)}
    start = len(frac) + (1 if frac else 0)
    pos.update({s: float(start + i) for i, s in enumerate(nm)})
    return pos, frac, nm


def plot_sweeps(records: list[dict], path: Path) -> bool:
    """Each headline metric against sparsity, one series per method and calibration source, error bars
    from the intervals; fractions joined by lines, N:M patterns as unjoined points in their own block."""
    rows = [r for r in records if r.get("sparsity") is not None]
    metrics = [m for m, _, _ in columns(records) if any(value(r, m) is not None for r in rows)]
    ppl = find_key(records, "ppl", "ppl")
    if not rows or not metrics:
        return False
    plt = _pyplot()
    pos, frac, nm = sweep_positions(records)
    dense = dense_of(records)
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.4 * nrow), squeeze=False)
    series = sorted({(r["method"], r.get("calib")) for r in rows}, key=lambda s: (s[0], s[1] or ""))
    calibs = sorted({s[1] or "" for s in series})
    styles = ["-", "--", ":", "-."]
    colors = method_colors(records)
    # series side by side inside a slot, so error bars of equal settings do not hide each other
    shift = {s: (i - (len(series) - 1) / 2) * min(0.08, 0.5 / max(1, len(series))) for i, s in enumerate(series)}
    for ax, metric in zip(axes.flat, metrics):
        held = []
        log = metric == ppl and _log_if_wide(ax, [value(r, ppl) for r in records])
        for method, calib in series:
            pts = sorted((pos[str(r["sparsity"])], value(r, metric), interval(r, metric), str(r["sparsity"]))
                         for r in rows if r["method"] == method and r.get("calib") == calib
                         and value(r, metric) is not None)
            if not pts:
                continue
            style = dict(color=colors[method], linestyle=styles[calibs.index(calib or "") % len(styles)])
            label = method + (f" ({calib})" if calib else "")
            for part in ([p for p in pts if not _is_nm(p[3])], [p for p in pts if _is_nm(p[3])]):
                if not part:
                    continue
                xs = [p[0] + shift[(method, calib)] for p in part]
                ys = [p[1] for p in part]
                errs = list(zip(*[_err(p[1], p[2]) for p in part]))
                joined = not _is_nm(part[0][3])
                ax.errorbar(xs, ys, yerr=[list(errs[0]), list(errs[1])], marker="o", markersize=4, capsize=2.5,
                            elinewidth=1, label=label, **{**style, "linestyle": style["linestyle"] if joined
                                                          else "none"})
                label = None  # one legend entry per series
                held += [p[1] for p in part] + [c for p in part if p[2] for c in p[2]]
        held += _baseline(ax, dense, metric)
        ticks = sorted(pos.items(), key=lambda kv: kv[1])
        ax.set_xticks([x for _, x in ticks])
        ax.set_xticklabels([s for s, _ in ticks])
        if frac and nm:
            ax.axvline(len(frac), color="black", linewidth=0.6, alpha=0.5)
        ax.set_xlim(-0.5, max(pos.values()) + 0.5)
        ax.set_xlabel("unstructured fraction" + ("  |  N:M pattern" if nm else "") if frac else "N:M pattern")
        ax.set_title(titles(records).get(metric, metric))
        ax.grid(alpha=0.3)
        _hold(ax, held, log)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, bbox_to_anchor=(0.5, 0))
    fig.suptitle("metrics against sparsity (error bars: 95% intervals; N:M patterns are not joined to fractions)")
    legend_rows = math.ceil(len(labels) / 4)
    fig.tight_layout(rect=(0, (0.15 + 0.2 * legend_rows) / fig.get_figheight(), 1, 0.97))  # room for the legend
    _save(fig, path)
    plt.close(fig)
    return True


def plot_calibration(records: list[dict], path: Path) -> bool:
    """Calibration source effect: per (method, setting), one bar per source with its interval, for ppl, JSD
    and PIQA flips; the dense value as a line."""
    rows = [r for r in records if r.get("calib")]
    if len({r["calib"] for r in rows}) < 2:
        return False
    groups = sorted({(r["method"], setting(r)) for r in rows}, key=lambda g: (g[0], sparsity_order(g[1])))
    sources = sorted({r["calib"] for r in rows})
    ppl = find_key(records, "ppl", "ppl")
    metrics = [m for m in (ppl, find_key(records, "divergence", "jsd"), find_key(records, "piqa", "flips"))
               if m and any(value(r, m) is not None for r in rows)]
    if not metrics:
        return False
    plt = _pyplot()
    dense = dense_of(records)
    width = 0.8 / len(sources)
    fig, axes = plt.subplots(1, len(metrics), squeeze=False,
                             figsize=(max(5.0, 0.9 * len(groups) * len(sources) / 2 + 2) * len(metrics) / 1.5, 3.8))
    for ax, metric in zip(axes.flat, metrics):
        held = []
        log = metric == ppl and _log_if_wide(ax, [value(r, ppl) for r in records])
        for j, src in enumerate(sources):
            xs, vals, lo, hi = [], [], [], []
            for i, g in enumerate(groups):
                r = next((r for r in rows if (r["method"], setting(r)) == g and r["calib"] == src), None)
                v = value(r, metric) if r is not None else None
                if v is None:
                    continue
                e = _err(v, interval(r, metric))
                xs.append(i + (j - (len(sources) - 1) / 2) * width)
                vals.append(v)
                lo.append(e[0])
                hi.append(e[1])
                held += [v - e[0], v + e[1]]
            ax.bar(xs, vals, width, yerr=[lo, hi], capsize=2.5, label=src, color=f"C{j}",
                   error_kw={"elinewidth": 1})
        held += _baseline(ax, dense, metric)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{m}\n{s}" for m, s in groups], fontsize=8)
        ax.set_title(titles(records).get(metric, metric))
        ax.grid(alpha=0.3, axis="y")
        _hold(ax, held, log)
    handles, labels = axes.flat[0].get_legend_handles_labels()  # below the panels: inside, it hid bars
    fig.legend(handles, labels, title="calibration", loc="lower center", ncol=min(6, len(labels)), fontsize=8,
               bbox_to_anchor=(0.5, 0))
    fig.suptitle("calibration source effect (error bars: 95% intervals)")
    fig.tight_layout(rect=(0, 0.75 / fig.get_figheight(), 1, 1))
    _save(fig, path)
    plt.close(fig)
    return True


def covers_zero(ci) -> bool | None:
    """Whether an interval holds 0 (None: no interval)."""
    if not ci or ci[0] is None or ci[1] is None:
        return None
    return ci[0] <= 0 <= ci[1]


def plot_groups(records: list[dict], path: Path) -> bool:
    """Per-group bias/harm heat maps: change from the base model per cell (rows) and group (columns), with
    n in every cell; cells whose interval of the change covers zero are hatched."""
    tasks = sorted({t for r in records for t in (r.get("groups") or {})})
    rows = [r for r in order_records(records) if r["method"] != "dense" and r.get("groups")]
    if not tasks or not rows:
        return False
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(len(tasks), 1, squeeze=False,
                             figsize=(10, 1.2 + 0.5 * len(rows) * len(tasks) + 1.6 * len(tasks)))
    for ax, task in zip(axes.flat, tasks):
        metric = next(r["groups"][task]["metric"] for r in rows if task in r["groups"])
        names = sorted({g for r in rows for g in r["groups"].get(task, {}).get("groups", {})})
        cells = [[r["groups"].get(task, {}).get("groups", {}).get(g) or {} for g in names] for r in rows]
        data = [[float("nan") if c.get("delta") is None else c["delta"] for c in row] for row in cells]
        finite = [abs(v) for row in data for v in row if not math.isnan(v)]
        lim = max(finite) if finite and max(finite) > 0 else 1.0
        im = ax.imshow(data, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r["label"] for r in rows], fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.split("/")[-1] for n in names], rotation=45, ha="right", fontsize=8)
        small = len(rows) * len(names) <= 300
        for i, row in enumerate(cells):
            for j, c in enumerate(row):
                v = data[i][j]
                if math.isnan(v):
                    continue
                if covers_zero(c.get("delta_ci")):
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", linewidth=0,
                                           edgecolor="0.35", alpha=0.6))
                if small:
                    text = f"{v:+.2f}" + (f"\nn={c['n']}" if c.get("n") is not None else "")
                    ax.text(j, i, text, ha="center", va="center", fontsize=6.5, linespacing=0.9,
                            color="white" if abs(v) > 0.6 * lim else "black")
        ax.set_title(f"{task}: change in {metric} from the base model, per group ({HATCH_NOTE})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_ppl_vs_divergence(records: list[dict], path: Path) -> bool:
    """Per cell: perplexity change against JSD and against PIQA flips, error bars on both axes (for the change:
    its paired interval when the record has one, else the cell's own perplexity interval over the base).

    Cells are told apart by marker, not by text labels (a crowded sweep made those unreadable):
    colour = method, shape = sparsity or bits, fill = calibration source. The base model sits at x = 0
    (or 1 on the ratio axis), drawn as a line.
    """
    dense = dense_of(records)
    ppl = find_key(records, "ppl", "ppl")
    base = value(dense, ppl) if dense and ppl else None
    rows = [r for r in records if r["method"] != "dense" and ppl and value(r, ppl) is not None]
    ys = [m for m in (find_key(records, "divergence", "jsd"), find_key(records, "piqa", "flips"))
          if m and any(value(r, m) is not None for r in rows)]
    if base is None or not rows or not ys:
        return False
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(ys), figsize=(6 * len(ys), 4.4), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in order_records(rows)))  # the legend in the tables' order
    colors = method_colors(records)
    settings = sorted({setting(r) for r in rows}, key=sparsity_order)
    shapes = {st: "osD^vPX*ph"[i % 10] for i, st in enumerate(settings)}
    calibs = sorted({r.get("calib") or "none" for r in rows})
    fills = {c: ("full", "none", "left", "bottom", "right", "top")[i % 6] for i, c in enumerate(calibs)}
    ratios = [value(r, ppl) / base for r in rows]
    log_x = max(ratios + [1.0]) / min(ratios + [1.0]) > 10  # one collapsed method would squash all the others

    def x_of(ratio):
        return ratio if log_x else 100 * (ratio - 1)

    for ax, metric in zip(axes.flat, ys):
        held = []
        for r, ratio in zip(rows, ratios):
            y = value(r, metric)
            if y is None:
                continue
            # the paired interval of the change (same windows on both models) when the record has it
            dci = interval(r, ppl, "delta_ci")
            pci = [(base + c) / base for c in dci] if dci else [c / base for c in interval(r, ppl) or ()] or None
            xe = _err(x_of(ratio), [x_of(c) for c in pci] if pci else None)
            ye = _err(y, interval(r, metric))
            ax.errorbar([x_of(ratio)], [y], xerr=[[xe[0]], [xe[1]]], yerr=[[ye[0]], [ye[1]]], linestyle="",
                        marker=shapes[setting(r)], fillstyle=fills[r.get("calib") or "none"],
                        color=colors[r["method"]], markersize=8, markeredgewidth=1.5, elinewidth=0.8, capsize=2)
            held += [y - ye[0], y + ye[1]]
        ax.axvline(x_of(1.0), color="gray", linestyle="--", linewidth=1)
        held += _baseline(ax, dense, metric)
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
        _hold(ax, held)
    handles = [Line2D([], [], linestyle="", marker="o", color=colors[m], label=m) for m in methods]
    handles += [Line2D([], [], linestyle="", marker=shapes[st], color="gray", label=st) for st in settings]
    if len(calibs) > 1 or calibs != ["none"]:
        handles += [Line2D([], [], linestyle="", marker="o", fillstyle=fills[c], color="gray", markersize=8,
                           label=f"calib: {c}") for c in calibs]
    handles.append(Line2D([], [], linestyle="--", color="gray", label="dense (base)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8,
               bbox_to_anchor=(0.5, -0.02 - 0.05 * (len(handles) // 9)))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(fig, path)
    plt.close(fig)
    return True


# (file stem, function, caption)
PLOTS = [("metrics_vs_sparsity", plot_sweeps,
          "Headline metrics against sparsity; error bars are 95% intervals, the dashed line and band the dense "
          "base model. Unstructured fractions are joined per method; N:M patterns stand apart, unjoined."),
         ("calibration_effect", plot_calibration,
          "Effect of the calibration source per method and setting; error bars are 95% intervals."),
         ("safety_groups", plot_groups,
          "Change from the base model per group; each cell shows the change and n. " + HATCH_NOTE + "."),
         ("ppl_vs_divergence", plot_ppl_vs_divergence,
          "Divergence and answer flips against perplexity change; error bars on both axes are 95% intervals.")]


def write_plots(records: list[dict], directory: Path) -> list[tuple[str, str]]:
    """Every plot that the records can fill, as DIRECTORY/<stem>.png and .svg; [(stem, caption)] of those made."""
    directory.mkdir(parents=True, exist_ok=True)
    return [(stem, caption) for stem, fn, caption in PLOTS if fn(records, directory / f"{stem}.png")]
