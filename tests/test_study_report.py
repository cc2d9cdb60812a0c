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


def test_read_results_ignores_a_torn_last_line():
    recs = read_results(FIXTURE)
    assert [r["key"] for r in recs] == ["k-dense", "k-mag05", "k-mag24", "k-wan05p", "k-wan05a", "k-sgpt24p",
                                        "k-gptq4p"]


def test_report_renders_table_intervals_and_plots(study_dir):
    path = write_report(study_dir)
    text = path.read_text()
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    for col in ("ppl", "JSD", "top-1 agr.", "PIQA acc", "PIQA flips", "EM", "F1", "ROUGE-L", "BBQ acc",
                "CrowS stereo", "BOLD negative", "compress time"):
        assert f"| {col} |" in header
    # columns with no value in any row (dialect, BOLD offensive) are left out
    assert "dialect" not in header and "BOLD offensive" not in header
    table = lines[lines.index(header) + 2: lines.index(header) + 9]
    assert [row.split("|")[1].strip() for row in table] == ["dense", "magnitude", "magnitude", "wanda", "wanda",
                                                           "sparsegpt", "gptq"]
    assert table[0].startswith("| dense | - | - | 20.00 | 0.0000 | 1.000 |") and table[0].endswith("| - |")
    assert table[1].startswith("| magnitude | 0.5 | - | 30.00 | 0.2000 |") and table[1].endswith("| 1.5 s |")
    assert table[3].startswith("| wanda | 0.5 | alpaca |")  # calibration sources in name order
    assert table[6].startswith("| gptq | 4-bit | pydoc | 21.00 |")
    assert "| magnitude | 0.5 | - | [27.00, 33.00] | [0.1600, 0.2400] |" in text  # the intervals table
    # perplexity change against divergence, ranked by JSD: +50% ppl for magnitude 0.5, +10% for sparsegpt 2:4
    assert "| magnitude 0.5 | +50.0% | 0.2000 | 0.250 |" in text
    assert "| sparsegpt 2:4 pydoc | +10.0% | 0.1500 | 0.250 |" in text
    assert text.index("gptq 4-bit pydoc | +5.0%") < text.index("wanda 0.5 alpaca | +25.0%")
    plots = sorted(p.name for p in (study_dir / "plots").iterdir())
    assert plots == ["calibration_effect.png", "metrics_vs_sparsity.png", "ppl_vs_divergence.png",
                     "safety_groups.png"]
    for p in plots:
        assert (study_dir / "plots" / p).read_bytes()[:8] == PNG
        assert f"(plots/{p})" in text


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
                      "sparsegpt 0.5 pydoc", "sparsegpt 0.5 alpaca", "sparsegpt 2:4 pydoc", "sparsegpt 2:4 alpaca",
                      "gptq 3-bit pydoc", "gptq 3-bit alpaca", "gptq 4-bit pydoc", "gptq 4-bit alpaca",
                      "rtn 3-bit", "rtn 4-bit"]
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


def test_report_files_are_readable_like_any_written_file(study_dir):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        path = write_report(study_dir)
    finally:
        os.umask(umask)
    for f in [path, *(study_dir / "plots").iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_perplexity_axes_go_logarithmic_only_when_one_cell_collapses(tmp_path, monkeypatch):
    from lmsqueeze.study import report

    scales = []
    real_save = report._save

    def spy(fig, path):
        scales.append((path.name, [ax.get_xscale() for ax in fig.axes], [ax.get_yscale() for ax in fig.axes]))
        real_save(fig, path)

    monkeypatch.setattr(report, "_save", spy)
    records = read_results(FIXTURE)  # ppl 20 .. 30: plain axes
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
