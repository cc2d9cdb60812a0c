"""The cheap-vs-expensive agreement table: hand-made cells with known ranks, bootstrap intervals, the reasons
a pair cannot be computed, and the report section with its plot."""
import pytest

from lmsqueeze.study.agreement import agreement_rows, agreement_section, rank_agreement


def _rec(label, method, ppl, jsd, top1, win, f1):
    m = {"ppl:wikitext2/ppl": {"value": ppl}, "divergence:wikitext2/jsd": {"value": jsd},
         "divergence:wikitext2/top1": {"value": top1}, "instruct:a.json/win_rate": {"value": win},
         "instruct:a.json/f1": {"value": f1}}
    return {"label": label, "method": method, "metrics": m}


RECORDS = [  # JSD ranks the damage exactly as the judge does; perplexity swaps the last two
    _rec("dense", "dense", 10.0, 0.00, 1.00, 0.50, 0.40),
    _rec("a", "wanda", 11.0, 0.01, 0.90, 0.45, 0.38),
    _rec("b", "sparsegpt", 12.0, 0.02, 0.85, 0.40, 0.37),
    _rec("c", "magnitude", 20.0, 0.05, 0.60, 0.20, 0.30),
    _rec("d", "magnitude", 15.0, 0.08, 0.50, 0.10, 0.20),
]


def test_rank_agreement_by_hand():
    r = rank_agreement([1, 2, 3, 4], [10, 20, 30, 40], resamples=200)
    assert r["spearman"] == pytest.approx(1.0) and r["kendall"] == pytest.approx(1.0) and r["n"] == 4
    # one swapped pair of 4: rho = 1 - 6 * 2 / (4 * 15) = 0.8, tau = (5 - 1) / 6
    r = rank_agreement([1, 2, 3, 4], [1, 2, 4, 3], resamples=200)
    assert r["spearman"] == pytest.approx(0.8) and r["kendall"] == pytest.approx(4 / 6)
    assert r["spearman_ci"][0] <= r["spearman_ci"][1] <= 1.0 and r["defined_resamples"] > 0
    assert rank_agreement([1, 2], [2, 1])["spearman_ci"] == [None, None]  # too few cells for an interval


def test_vectorized_bootstrap_matches_scipy():
    import numpy as np
    from scipy import stats

    from lmsqueeze.study.agreement import _corr_batch

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, size=(30, 7)).astype(float), rng.normal(size=(30, 7))  # ties in x
    got = _corr_batch(x, y)
    for i in range(30):
        if np.ptp(x[i]):
            assert got[i, 0] == pytest.approx(stats.spearmanr(x[i], y[i]).statistic)
            assert got[i, 1] == pytest.approx(stats.kendalltau(x[i], y[i]).statistic)


def test_agreement_rows_orientation_and_values():
    rows = {(r["cheap"], r["expensive"]): r for r in agreement_rows(RECORDS, resamples=200)}
    assert set(rows) == {(c, e) for c in ("ppl change", "JSD", "top-1 agreement")
                         for e in ("instruction F1", "judge win rate")}
    assert rows[("JSD", "judge win rate")]["spearman"] == pytest.approx(1.0)
    assert rows[("top-1 agreement", "judge win rate")]["spearman"] == pytest.approx(1.0)  # negated: agrees
    assert rows[("ppl change", "judge win rate")]["spearman"] == pytest.approx(0.9)  # 1 - 6*2/(5*24)
    assert rows[("ppl change", "judge win rate")]["kendall"] == pytest.approx(0.8)  # (9 - 1) / 10
    assert rows[("JSD", "judge win rate")]["cells"] == ["dense", "a", "b", "c", "d"]


def test_reasons_when_not_computable():
    few = agreement_rows(RECORDS[:2], resamples=50)
    assert all("2 cells have both metrics" in r["why_missing"] for r in few)
    flat = [dict(r, metrics={**r["metrics"], "instruct:a.json/f1": {"value": 0.3}}) for r in RECORDS]
    row = next(r for r in agreement_rows(flat, resamples=50) if r["expensive"] == "instruction F1")
    assert row["spearman"] is None and "all ranks tied" in row["why_missing"]


def test_section_writes_table_and_plot(tmp_path):
    text = agreement_section(RECORDS, tmp_path, resamples=100)
    assert "## Do the cheap metrics agree with the expensive ones?" in text
    assert "| JSD | judge win rate | 5 | +1.00 |" in text
    assert (tmp_path / "tables" / "agreement.csv").read_text().startswith("cheap metric,expensive metric,cells")
    assert (tmp_path / "plots" / "agreement.png").stat().st_size > 0 and (tmp_path / "plots" / "agreement.svg").exists()
    assert agreement_section([{"label": "x", "method": "dense", "metrics": {}}], tmp_path) == ""
