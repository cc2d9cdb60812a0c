"""The study report renders from a hand-written results.jsonl (tests/fixtures/study); grid and records."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmsqueeze.cli import main
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.study import StudySpec, expand_grid, load_study_file, read_results, write_report
from lmsqueeze.study.report import render_report
from lmsqueeze.study.runner import _repair, append_record, record_metrics

FIXTURE = Path(__file__).parent / "fixtures" / "study"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def study_dir(tmp_path):
    shutil.copy(FIXTURE / "results.jsonl", tmp_path / "results.jsonl")
    return tmp_path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The fixture study rendered once for the tests that read its files. Cheaper plots: 40 dpi and two panels
    in the sweep instead of eleven (a full render costs ~15 s of CPU; the plot tests below check the real
    resolution and the panels)."""
    import os

    from lmsqueeze.study import plots, tables

    d = tmp_path_factory.mktemp("study")
    shutil.copy(FIXTURE / "results.jsonl", d / "results.jsonl")
    umask = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(plots, "DPI", 40)
            mp.setattr(plots, "columns", lambda records: tables.columns(records)[:2])
            write_report(d)
    finally:
        os.umask(umask)
    return d


def test_read_results_ignores_a_torn_last_line():
    recs = read_results(FIXTURE)
    assert [r["key"] for r in recs] == ["k-dense", "k-mag05", "k-mag24", "k-wan05p", "k-wan05a", "k-sgpt24p",
                                        "k-gptq4p"]


def test_report_renders_table_intervals_and_plots(rendered):
    text = (rendered / "report.md").read_text()
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    for col in ("ppl", "JSD", "top-1 agr.", "PIQA acc", "PIQA flips", "EM", "F1", "ROUGE-L", "BBQ acc",
                "CrowS stereo", "BOLD negative", "compress time (s)"):
        assert f"| {col} |" in header
    # columns with no value in any row (dialect, BOLD offensive) are left out
    assert "dialect" not in header and "BOLD offensive" not in header
    table = lines[lines.index(header) + 2: lines.index(header) + 9]
    assert [row.split("|")[1].strip() for row in table] == ["dense", "magnitude", "magnitude", "wanda", "wanda",
                                                           "sparsegpt", "gptq"]
    assert table[0].startswith("| dense | - | - | 20.00 | 0.0000 | 1.000 |") and table[0].endswith("| - |")
    assert table[1].startswith("| magnitude | 0.5 | - | 30.00 | 0.2000 |") and table[1].endswith("| 1.5 |")
    assert table[3].startswith("| wanda | 0.5 | alpaca |")  # calibration sources in name order
    assert table[6].startswith("| gptq | 4-bit | pydoc | 21.00 |")
    assert "| magnitude | 0.5 | - | [27.00, 33.00] | [0.1600, 0.2400] |" in text  # the intervals table
    # perplexity change against divergence, ranked by JSD: +50% ppl for magnitude 0.5, +10% for sparsegpt 2:4
    assert "| magnitude 0.5 | +50.0 | 0.2000 | 0.250 |" in text
    assert "| sparsegpt 2:4 pydoc | +10.0 | 0.1500 | 0.250 |" in text
    assert text.index("gptq 4-bit pydoc | +5.0") < text.index("wanda 0.5 alpaca | +25.0")
    stems = ["calibration_effect", "metrics_vs_sparsity", "ppl_vs_divergence", "safety_groups"]
    assert {p.name for p in (rendered / "plots").iterdir()} >= {f"{s}.{ext}" for s in stems for ext in ("png", "svg")}
    for s in stems:
        assert (rendered / "plots" / f"{s}.png").read_bytes()[:8] == PNG
        svg = (rendered / "plots" / f"{s}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "</svg>" in svg
        assert f"(plots/{s}.png)" in text and f"(plots/{s}.svg)" in text


def test_report_states_what_the_numbers_rest_on(rendered):
    text = (rendered / "report.md").read_text()
    section = text[text.index("## What the numbers rest on"):text.index("## Beyond perplexity")]
    assert "window: 128 tokens" in section
    assert "tokenized variant" in section and "raw variant" in section
    assert "n, the windows or items behind each metric" not in section  # the fixture's metrics carry no n
    records = read_results(FIXTURE)
    for r in records:
        r["model"] = "smollm2-135m"
        for m in r["metrics"].values():
            m["n"] = 8
    text = render_report(records)
    assert "dequantized 4-bit GGUF" in text and "ppl:wikitext2:test 8" in text


def test_csv_of_every_table_and_latex_headline(rendered):
    import csv

    tables = rendered / "tables"
    assert {p.name for p in tables.iterdir()} >= {"groups.csv", "headline.csv", "headline.tex", "intervals.csv",
                                                  "metrics.csv", "ppl_vs_divergence.csv"}
    head = list(csv.DictReader((tables / "headline.csv").open()))
    assert [r["method"] for r in head] == ["dense", "magnitude", "magnitude", "wanda", "wanda", "sparsegpt", "gptq"]
    assert float(head[1]["ppl"]) == 30.0 and head[1]["sparsity/bits"] == "0.5" and head[0]["compress time (s)"] == ""
    ci = list(csv.DictReader((tables / "intervals.csv").open()))
    assert (float(ci[1]["ppl low"]), float(ci[1]["ppl high"])) == (27.0, 33.0)
    long = list(csv.DictReader((tables / "metrics.csv").open()))
    row = next(r for r in long if r["cell"] == "dense (base model)" and r["metric"] == "accuracy")
    assert (float(row["delta 95% CI low"]), float(row["delta 95% CI high"])) == (-0.05, 0.05)
    assert len(long) == sum(len(r["metrics"]) for r in read_results(FIXTURE))
    tex = (tables / "headline.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\begin{tabular}{lll" in tex
    assert "magnitude & 0.5 & - & \\makecell[r]{30.00\\\\{\\scriptsize [27.00, 33.00]}}" in tex
    assert tex.count("\\\\\n") == 8  # the header and seven cells


def test_latex_escapes_what_latex_would_misread():
    from lmsqueeze.study.tables import latex_escape

    assert latex_escape("a_b & 50% #1 {x} ~ ^ \\") == ("a\\_b \\& 50\\% \\#1 \\{x\\} \\textasciitilde{} "
                                                     "\\textasciicircum{} \\textbackslash{}")


def test_report_cli_rerenders(study_dir, capsys):
    assert main(["report", str(study_dir), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "| sparsegpt | 2:4 | pydoc | 22.00 |" in out
    assert (study_dir / "report.md").exists() and not (study_dir / "plots").exists()


def test_report_without_results_says_what_to_do(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "lmsqueeze study --output-dir" in capsys.readouterr().err
    with pytest.raises(LmsqueezeError, match="no complete cell"):
        render_report([])


def test_grid_varies_what_each_method_takes():
    spec = StudySpec(model="tiny-llama", methods="magnitude,wanda,sparsegpt,gptq,rtn", sparsity="0.5,2:4",
                     bits="3,4", calib="pydoc,alpaca")
    labels = [c.label for c in expand_grid(spec)]
    assert labels == ["dense (base model)", "magnitude 0.5", "magnitude 2:4",
                      "wanda 0.5 pydoc", "wanda 0.5 alpaca", "wanda 2:4 pydoc", "wanda 2:4 alpaca",
                      # --bits with a pruner that also quantizes: joint sparse + quantized cells
                      "sparsegpt 0.5 + 3-bit pydoc", "sparsegpt 0.5 + 3-bit alpaca",
                      "sparsegpt 0.5 + 4-bit pydoc", "sparsegpt 0.5 + 4-bit alpaca",
                      "sparsegpt 2:4 + 3-bit pydoc", "sparsegpt 2:4 + 3-bit alpaca",
                      "sparsegpt 2:4 + 4-bit pydoc", "sparsegpt 2:4 + 4-bit alpaca",
                      "gptq 3-bit pydoc", "gptq 3-bit alpaca", "gptq 4-bit pydoc", "gptq 4-bit alpaca",
                      "rtn 3-bit", "rtn 4-bit"]
    plain = StudySpec(model="tiny-llama", methods="sparsegpt,gptq", sparsity="0.5", calib="pydoc")
    assert [c.label for c in expand_grid(plain)] == ["dense (base model)", "sparsegpt 0.5 pydoc", "gptq 4-bit pydoc"]
    keys = [c.key(spec) for c in expand_grid(spec)]
    assert len(set(keys)) == len(keys)
    assert keys == [c.key(StudySpec(model="tiny-llama", methods="magnitude,wanda,sparsegpt,gptq,rtn",
                                    sparsity="0.5,2:4", bits="3,4", calib="pydoc,alpaca"))
                    for c in expand_grid(spec)]  # stable across processes: a hash of plain data
    # an evaluation setting changes every key (the cached result would not be the same measurement)
    other = StudySpec(model="tiny-llama", methods="magnitude", sparsity="0.5", limit=8)
    assert expand_grid(other)[1].key(other) != expand_grid(spec)[1].key(spec)


@pytest.mark.parametrize("kwargs, match", [
    ({"methods": "prune"}, "unknown method"),
    ({"sparsity": "1.5"}, "1.5"),
    ({"methods": "gptq", "bits": "x"}, "--bits"),
    ({"limit": 0}, "--limit"),
])
def test_bad_study_settings_say_what_is_wrong(kwargs, match):
    with pytest.raises(LmsqueezeError, match=match):
        expand_grid(StudySpec(model="tiny-llama", **kwargs))


def test_study_file_yaml_and_json(tmp_path):
    (tmp_path / "s.yaml").write_text("model: tiny-llama\nmethods: [magnitude, wanda]\nsparsity: [0.5, '2:4']\n"
                                     "calib-seqlen: 64\n")
    spec = StudySpec(**load_study_file(tmp_path / "s.yaml"))
    assert spec.methods == ("magnitude", "wanda") and spec.sparsity == ("0.5", "2:4") and spec.calib_seqlen == 64
    (tmp_path / "s.json").write_text(json.dumps({"model": "tiny-llama", "sparse": 0.5}))
    with pytest.raises(LmsqueezeError, match="unknown key.*sparse"):
        load_study_file(tmp_path / "s.json")


def test_append_after_a_torn_line_starts_a_new_line(tmp_path):
    append_record(tmp_path, {"key": "a"})
    with open(tmp_path / "results.jsonl", "ab") as f:
        f.write(b'{"key": "b", "lab')
    _repair(tmp_path / "results.jsonl")
    append_record(tmp_path, {"key": "c"})
    assert [r["key"] for r in read_results(tmp_path)] == ["a", "c"]
    assert (tmp_path / "results.jsonl").read_text() == '{"key": "a"}\n{"key": "c"}\n'


def test_record_metrics_take_every_metric_and_the_declared_headline():
    m = {"value": 0.5, "ci": [0.2, 0.8], "n": 4, "base": 0.75, "delta": -0.25, "delta_ci": [-0.6, 0.1]}
    report = {"results": [
        {"task": "ppl:pydoc", "kind": "ppl", "summary": {}, "metrics": {"ppl": {**m, "value": 2.0}}, "details": {}},
        {"task": "piqa", "kind": "piqa", "summary": {}, "metrics": {"acc": m, "flips": {"value": 0.25}},
         "details": {}},
        {"task": "crows", "kind": "crows", "summary": {}, "metrics": {"stereo_share": m},
         "details": {"by_bias_type": {"gender": {"metrics": {"stereo_share": m}}}}},
        {"task": "bold", "kind": "bold", "skipped": "no scorer"}]}
    metrics, headline, groups = record_metrics(report)
    assert metrics["piqa/acc"] == m and metrics["ppl:pydoc/ppl"]["value"] == 2.0
    assert [h[0] for h in headline] == ["ppl:pydoc/ppl", "piqa/acc", "piqa/flips", "crows/stereo_share"]
    assert headline[1][1] == "PIQA acc"
    assert groups["crows"]["metric"] == "stereo_share" and groups["crows"]["groups"]["gender"]["delta"] == -0.25


def test_report_files_are_readable_like_any_written_file(rendered):
    import stat

    files = [p for p in rendered.rglob("*") if p.is_file() and p.name != "results.jsonl"]
    assert len(files) >= 1 + 1 + 6 + 8  # report.md, report.html, tables, plots
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_perplexity_axes_go_logarithmic_only_when_one_cell_collapses(tmp_path, monkeypatch):
    from lmsqueeze.study import plots as report

    scales = []

    def spy(fig, path):
        scales.append((path.name, [ax.get_xscale() for ax in fig.axes], [ax.get_yscale() for ax in fig.axes]))

    monkeypatch.setattr(report, "_save", spy)
    records = _only(read_results(FIXTURE), "ppl:wikitext2:test/ppl", "divergence:wikitext2:test/jsd")  # ppl 20 .. 30
    report.plot_ppl_vs_divergence(records, tmp_path / "a.png")
    report.plot_sweeps(records, tmp_path / "b.png")
    collapsed = [dict(r) for r in records]
    for r in collapsed:
        if r["key"] == "k-mag24":
            key = "ppl:wikitext2:test/ppl"
            r["metrics"] = {**r["metrics"], key: dict(r["metrics"][key], value=2000.0)}
    report.plot_ppl_vs_divergence(collapsed, tmp_path / "c.png")
    report.plot_sweeps(collapsed, tmp_path / "d.png")
    assert scales[0][1][0] == "linear" and "log" not in scales[1][2]
    assert scales[2][1][0] == "log" and scales[3][2][0] == "log"  # the ppl panel comes first


# ---- the plots: read back from the figures themselves ------------------------------------------------

@pytest.fixture
def figures(monkeypatch):
    """{plot file name: the matplotlib figure}, kept open instead of saved."""
    from lmsqueeze.study import plots

    kept = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: kept.__setitem__(path.name, fig))
    monkeypatch.setattr(plots._pyplot(), "close", lambda fig=None: None)
    return kept


def _only(records, *keys):
    """The records with their headline cut to `keys` (fewer panels: the plot tests draw in a second, not ten)."""
    for r in records:
        r["headline"] = [h for h in r["headline"] if h[0] in keys]
    return records


def _sweep_records():
    """The fixture plus magnitude at 0.7 and 4:8: two fractions and two N:M patterns for one method."""
    recs = _only(read_results(FIXTURE), "ppl:wikitext2:test/ppl", "piqa/flips")
    mag = next(r for r in recs if r["key"] == "k-mag05")
    for key, sp, ppl in (("k-mag07", 0.7, 80.0), ("k-mag48", "4:8", 40.0)):
        r = json.loads(json.dumps(mag))
        r.update(key=key, sparsity=sp, label=f"magnitude {sp}")
        r["metrics"]["ppl:wikitext2:test/ppl"] = {"value": ppl, "ci": [ppl - 4, ppl + 6]}
        recs.append(r)
    return recs


def test_sweep_has_error_bars_and_never_joins_nm_to_fractions(figures):
    from matplotlib.container import ErrorbarContainer

    from lmsqueeze.study.plots import method_colors, plot_sweeps, sweep_positions

    recs = _sweep_records()
    assert plot_sweeps(recs, Path("s.png"))
    pos, frac, nm = sweep_positions(recs)
    assert (frac, nm) == (["0.5", "0.7"], ["2:4", "4:8"]) and pos == {"0.5": 0, "0.7": 1, "2:4": 3, "4:8": 4}
    ax = figures["s.png"].axes[0]
    assert ax.get_title() == "ppl"
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.get_label() != "dense (base)"]
    mag = [c for c in bars if round(c.lines[0].get_xdata()[0]) in (0, 3) and c.lines[0].get_color() == method_colors(recs)["magnitude"]]
    fractions, patterns = sorted(mag, key=lambda c: c.lines[0].get_xdata()[0])
    # fractions 0.5 and 0.7: one line through both; N:M 2:4 and 4:8: points, no line
    assert list(fractions.lines[0].get_ydata()) == [30.0, 80.0] and fractions.lines[0].get_linestyle() == "-"
    assert list(patterns.lines[0].get_ydata()) == [50.0, 40.0] and patterns.lines[0].get_linestyle() == "None"
    assert all(x >= 2.5 for x in patterns.lines[0].get_xdata()) and all(x < 1.5 for x in fractions.lines[0].get_xdata())
    # the error bars are the records' intervals
    segs = fractions.lines[2][0].get_segments()
    assert [(round(s[0][1], 6), round(s[1][1], 6)) for s in segs] == [(27.0, 33.0), (76.0, 86.0)]
    assert any(list(line.get_xdata()) == [2, 2] for line in ax.lines)  # the divider between the two kinds


def test_baselines_and_error_bars_are_never_cut_off(figures):
    from lmsqueeze.study.plots import plot_calibration, plot_ppl_vs_divergence, plot_sweeps

    recs = _only(read_results(FIXTURE), "ppl:wikitext2:test/ppl", "piqa/flips")
    dense = recs[0]
    dense["metrics"]["piqa/flips"] = {"value": 0.6, "ci": [0.5, 0.9]}  # far above every cell
    dense["metrics"]["ppl:wikitext2:test/ppl"] = {"value": 12.0, "ci": [8.0, 16.0]}  # below every cell
    assert plot_sweeps(recs, Path("s.png")) and plot_calibration(recs, Path("c.png"))
    assert plot_ppl_vs_divergence(recs, Path("p.png"))
    checked = 0
    for name, fig in figures.items():
        for ax in fig.axes:
            title = ax.get_title() + ax.get_ylabel()
            lo, hi = ax.get_ylim()
            if "PIQA flips" in title:
                assert lo <= 0.5 and hi >= 0.9, (name, title, lo, hi)
                checked += 1
            elif title.startswith("ppl"):
                assert lo <= 8.0 and hi >= (55.0 if name == "s.png" else 16.0), (name, title, lo, hi)
                checked += 1
    assert checked == 5  # sweep and calibration: ppl and flips; ppl-vs-divergence: flips


def test_heat_map_shows_n_and_hatches_intervals_that_cover_zero(figures):
    from matplotlib.patches import Rectangle

    from lmsqueeze.study.plots import plot_groups

    recs = read_results(FIXTURE)
    expect_hatched = 0
    for r in recs:
        for block in (r.get("groups") or {}).values():
            for c in block["groups"].values():
                d = c["delta"]
                c.update(n=12, delta_ci=[d - 0.1, d + 0.1])  # covers 0 exactly when the change is 0
                expect_hatched += r["method"] != "dense" and d == 0
    assert plot_groups(recs, Path("g.png"))
    axes = [ax for ax in figures["g.png"].axes if ax.get_title()]
    texts = [t.get_text() for ax in axes for t in ax.texts]
    assert len(texts) == 6 * 3 * 2 and all(t.endswith("\nn=12") for t in texts)
    hatched = [p for ax in axes for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch()]
    assert len(hatched) == expect_hatched and 0 < expect_hatched < 36
    assert all("interval of the change covers 0" in ax.get_title() for ax in axes)


def test_png_at_print_resolution_and_svg_beside_it(tmp_path):
    from PIL import Image

    from lmsqueeze.study.plots import DPI, plot_ppl_vs_divergence

    assert DPI >= 300
    assert plot_ppl_vs_divergence(read_results(FIXTURE), tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        assert round(im.info["dpi"][0]) == DPI and im.size[0] >= 6 * 2 * DPI * 0.8  # two 6-inch panels
    svg = (tmp_path / "p.svg").read_text()
    assert "<svg" in svg and "JSD against perplexity change" in svg  # text kept as text


def test_perplexity_change_carries_its_paired_interval(figures):
    from lmsqueeze.study.plots import plot_ppl_vs_divergence

    recs = _only(read_results(FIXTURE), "ppl:wikitext2:test/ppl")
    mag = next(r for r in recs if r["key"] == "k-mag05")  # ppl 30 against the base's 20: +50%
    mag["metrics"]["ppl:wikitext2:test/ppl"].update(delta=10.0, delta_ci=[8.0, 11.0])
    assert plot_ppl_vs_divergence(recs, Path("p.png"))
    ax = figures["p.png"].axes[0]
    bars = [c for c in ax.containers if list(c.lines[0].get_xdata()) == [50.0]]
    (xerr,) = [seg for seg in bars[0].lines[2] if seg.get_segments()[0][0][1] == seg.get_segments()[0][1][1]]
    (start, end), = [(s[0][0], s[1][0]) for s in xerr.get_segments()]
    assert (round(start, 9), round(end, 9)) == (40.0, 55.0)  # 100 * [8, 11] / 20


def test_tasks_without_a_suite_are_the_whole_evaluation():
    """--tasks alone runs those tasks; the core suite is the default only when no task is named (as in eval)."""
    assert StudySpec(model="tiny-llama", methods="magnitude", sparsity="0.5").suite == "core"
    spec = StudySpec(model="tiny-llama", methods="magnitude", sparsity="0.5", tasks="ppl:pydoc")
    assert spec.suite is None and spec.eval_settings()["suite"] is None


def test_study_spec_takes_the_cli_default_dtype():
    """StudySpec from Python defaults as the CLI does: fp32 on CPU, bf16 on CUDA; an explicit dtype stays."""
    assert StudySpec(model="tiny-llama", methods="magnitude", sparsity="0.5").dtype == "fp32"
    assert StudySpec(model="tiny-llama", methods="magnitude", sparsity="0.5", device="cuda").dtype == "bf16"
    assert StudySpec(model="tiny-llama", methods="magnitude", sparsity="0.5", dtype="bf16").dtype == "bf16"
