"""Do the cheap metrics agree with the expensive ones? Rank correlations across the cells of a study.

Cheap metrics need one forward pass per item: perplexity (its ratio to the base's: the change), JSD from
the base, top-1 agreement with the base, answer flips. Expensive ones need generation and a scorer or a
judge: instruction F1 and ROUGE-L, the judge's win rate against the base. Over the cells that have both
metrics of a pair (the dense row included: no change), the table gives Spearman's rho and Kendall's tau-b
(scipy.stats.spearmanr / kendalltau) with 95% percentile bootstrap intervals over cells (cells drawn
with replacement, `resamples` times, seeded; a resample whose ranks are all tied in one metric has no
correlation and is left out of the interval). With few cells the intervals are wide; that is the answer.

Orientation: every metric is turned into "damage" before ranking (perplexity change, JSD and flips as
they are; top-1 agreement, F1, ROUGE-L and win rate negated), so a positive correlation means the two
metrics agree on which cells the compression hurt most. This is the claim of Beyond Perplexity-style
studies that JSD tracks the judge better than perplexity does (see the rows with "judge win rate").
`agreement_table(records)` -> `study.tables.Table`; `agreement_section(records, directory)` writes
tables/agreement.csv and plots/agreement.png/.svg (a heat map of Spearman's rho) and returns report.md's
section.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from scipy import stats as _sps

from lmsqueeze.study.tables import Table, find_key, to_csv, to_markdown, value

# (title, task kind, metric, sign that turns it into damage)
CHEAP = (("ppl change", "ppl", "ppl", 1.0), ("JSD", "divergence", "jsd", 1.0),
         ("top-1 agreement", "divergence", "top1", -1.0), ("flips", "piqa", "flips", 1.0),
         ("flips (mc)", "mc", "flips", 1.0))
EXPENSIVE = (("instruction F1", "instruct", "f1", -1.0), ("instruction ROUGE-L", "instruct", "rougeL", -1.0),
             ("judge win rate", "instruct", "win_rate", -1.0), ("Alpaca F1", "alpaca", "f1", -1.0),
             ("Alpaca ROUGE-L", "alpaca", "rougeL", -1.0))
MIN_CELLS = 3


def _corr(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(Spearman rho, Kendall tau-b); NaN when either side has all ranks tied."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(_sps.spearmanr(x, y).statistic), float(_sps.kendalltau(x, y).statistic)


def _corr_batch(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[B, 2] (Spearman rho, Kendall tau-b) of each row pair of x, y [B, n], vectorized (scipy's definitions:
    rho = Pearson of average ranks; tau-b = sum sx*sy / sqrt(sum sx^2 * sum sy^2) over pairs i < j, with
    sx = sign(x_i - x_j)); NaN for a row whose ranks are all tied."""
    rx, ry = _sps.rankdata(x, axis=1), _sps.rankdata(y, axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(1) / np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
        sx = np.sign(x[:, :, None] - x[:, None, :])
        sy = np.sign(y[:, :, None] - y[:, None, :])
        tau = (sx * sy).sum((1, 2)) / np.sqrt((sx ** 2).sum((1, 2)) * (sy ** 2).sum((1, 2)))
    return np.stack([rho, tau], 1)


def rank_agreement(x, y, resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """{n, spearman, spearman_ci, kendall, kendall_ci, defined_resamples} of paired per-cell values.

    x, y: [n cells]. The intervals are percentile bootstrap over cells; None where undefined."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = x.size
    rho, tau = _corr(x, y)
    out = {"n": int(n), "spearman": None if math.isnan(rho) else rho, "kendall": None if math.isnan(tau) else tau,
           "spearman_ci": [None, None], "kendall_ci": [None, None], "defined_resamples": 0}
    if n < MIN_CELLS or resamples < 1:
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    boot = _corr_batch(x[idx], y[idx])
    ok = ~np.isnan(boot[:, 0])
    out["defined_resamples"] = int(ok.sum())
    if ok.any():
        lo, hi = np.quantile(boot[ok], [alpha / 2, 1 - alpha / 2], axis=0)
        out["spearman_ci"], out["kendall_ci"] = [float(lo[0]), float(hi[0])], [float(lo[1]), float(hi[1])]
    return out


def _damage(records, kind, metric, sign) -> tuple[str | None, dict]:
    key = find_key(records, kind, metric)
    if key is None:
        return None, {}
    vals = {}
    for r in records:
        v = value(r, key)
        if v is not None:
            vals[r["label"]] = sign * (math.log(v) if kind == "ppl" and v > 0 else v)  # log ppl: the change
    return key, vals


def agreement_rows(records: list[dict], resamples: int = 1000, seed: int = 0) -> list[dict]:
    """One row per (cheap, expensive) pair present in the records: {cheap, expensive, keys, cells, ...}."""
    rows = []
    for ct, ck, cm, cs in CHEAP:
        ckey, cv = _damage(records, ck, cm, cs)
        if ckey is None:
            continue
        for et, ek, em, es in EXPENSIVE:
            ekey, ev = _damage(records, ek, em, es)
            if ekey is None:
                continue
            cells = [lab for lab in cv if lab in ev]
            res = rank_agreement([cv[c] for c in cells], [ev[c] for c in cells], resamples, seed)
            why = None
            if len(cells) < MIN_CELLS:
                why = f"{len(cells)} cells have both metrics; a rank correlation needs at least {MIN_CELLS}"
            elif res["spearman"] is None:
                why = "one metric is the same in every cell (all ranks tied)"
            rows.append({"cheap": ct, "expensive": et, "cheap_key": ckey, "expensive_key": ekey, "cells": cells,
                         "why_missing": why, **res})
    return rows


def agreement_table(records: list[dict], resamples: int = 1000, seed: int = 0) -> Table | None:
    rows = agreement_rows(records, resamples, seed)
    if not rows:
        return None

    def pair(ci):
        return None if ci[0] is None else (ci[0], ci[1])

    out = [[r["cheap"], r["expensive"], r["n"], r["spearman"], pair(r["spearman_ci"]), r["kendall"],
            pair(r["kendall_ci"]), r["why_missing"] or ""] for r in rows]
    return Table("agreement", "Do the cheap metrics agree with the expensive ones?",
                 ["cheap metric", "expensive metric", "cells", "Spearman rho", "95% CI", "Kendall tau", "95% CI",
                  "note"], out, [None, None, None, "+.2f", "+.2f", "+.2f", "+.2f", None],
                 note=f"Rank correlations across cells, every metric oriented as damage (positive: the two agree "
                      f"on which cells were hurt most); 95% percentile bootstrap over cells, {resamples} resamples.")


def agreement_plot(rows: list[dict], path: Path) -> bool:
    """A heat map of Spearman's rho, cheap (rows) x expensive (columns), as path .png and .svg."""
    from lmsqueeze.study.plots import _pyplot, _save

    cheap = list(dict.fromkeys(r["cheap"] for r in rows))
    expensive = list(dict.fromkeys(r["expensive"] for r in rows))
    grid = np.full((len(cheap), len(expensive)), np.nan)
    for r in rows:
        if r["spearman"] is not None:
            grid[cheap.index(r["cheap"]), expensive.index(r["expensive"])] = r["spearman"]
    if np.isnan(grid).all():
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(expensive), 1.0 + 0.55 * len(cheap)))
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(expensive)), expensive, rotation=20, ha="right")
    ax.set_yticks(range(len(cheap)), cheap)
    for i in range(len(cheap)):
        for j in range(len(expensive)):
            ax.text(j, i, "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:+.2f}", ha="center", va="center",
                    fontsize=8)
    fig.colorbar(im, ax=ax, label="Spearman rho (damage vs damage)")
    ax.set_title("Cheap vs expensive metrics across cells")
    _save(fig, path)
    plt.close(fig)
    return True


def agreement_section(records: list[dict], directory: str | Path, resamples: int = 1000, seed: int = 0,
                      plots: bool = True) -> str:
    """report.md's agreement section ('' when no pair of metrics is in the records); writes
    DIRECTORY/tables/agreement.csv and, with plots, DIRECTORY/plots/agreement.png/.svg."""
    from lmsqueeze.evaluation.files import write_text_atomic

    rows = agreement_rows(records, resamples, seed)
    if not rows:
        return ""
    directory = Path(directory)
    t = agreement_table(records, resamples, seed)
    write_text_atomic(directory / "tables" / "agreement.csv", to_csv(t))
    out = ["", f"## {t.title}", "", t.note, "", to_markdown(t), ""]
    if not plots:
        return "\n".join(out)
    (directory / "plots").mkdir(parents=True, exist_ok=True)
    if agreement_plot(rows, directory / "plots" / "agreement.png"):
        out += ["![agreement](plots/agreement.png)", "", "Spearman's rho of each pair. Vector version: "
                "[plots/agreement.svg](plots/agreement.svg).", ""]
    return "\n".join(out)
