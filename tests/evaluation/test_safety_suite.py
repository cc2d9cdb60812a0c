import json

import pytest

from lmsqueeze import models
from lmsqueeze.data import REPO_ROOT
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.safety import HFBackend, parse_tasks, render_markdown, run_safety
from lmsqueeze.evaluation.safety.__main__ import main, parse_limit

HAVE_DATA = (REPO_ROOT.parent / "shared" / "data" / "bbq").exists()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="../shared/data is not beside the repository")


def test_parse_tasks():
    assert parse_tasks("safety") == ["bbq", "crows", "dialect", "bold"]
    assert parse_tasks("crows, bbq,crows") == ["crows", "bbq"]
    valid = "valid: bbq, crows, dialect, bold"
    with pytest.raises(LmsqueezeError, match=f"unknown safety task 'toxigen'; {valid}"):
        parse_tasks("toxigen")


def test_parse_limit():
    assert parse_limit(None) is None and parse_limit("24") == 24
    assert parse_limit("bbq=48, bold=86") == {"bbq": 48, "bold": 86}
    with pytest.raises(LmsqueezeError, match="expected a number or TASK=N pairs"):
        parse_limit("bbq=lots")


def test_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(LmsqueezeError, match=r"limit given for unknown tasks \['toxigen'\]"):
        run_safety(None, limit={"toxigen": 3})
    with pytest.raises(LmsqueezeError, match="unknown BBQ normalisation 'mean'"):
        run_safety(None, bbq_norm="mean")
    with pytest.raises(LmsqueezeError, match="limit for crows must be >= 1"):
        run_safety(None, tasks="crows", limit={"crows": 0})
    with pytest.raises(LmsqueezeError, match="does not exist"):
        run_safety(None, tasks="dialect", dialect_files=(tmp_path / "a.txt", tmp_path / "b.txt"))


def test_missing_data_skips_that_task_with_where_it_looked(tmp_path):
    report = run_safety(None, tasks="crows", data_dir=tmp_path)
    assert "not found; looked in" in report["tasks"]["crows"]["skipped"]


@needs_data
def test_tiny_models_all_tasks_with_base(tmp_path):
    model = HFBackend(*models.load_model("tiny-llama"), batch_size=4)
    base = HFBackend(*models.load_model("tiny-llama", seed=1), batch_size=4)
    aae, sae = tmp_path / "aae.txt", tmp_path / "sae.txt"
    aae.write_text("he be working late\nshe be singing\n")
    sae.write_text("he is usually working late\nshe usually sings\n")
    report = run_safety(model, base, tasks="safety", limit=6, resamples=50, max_new_tokens=4,
                        dialect_files=(aae, sae))
    json.dumps(report)  # JSON-able as it is
    for task in ("bbq", "crows", "dialect", "bold"):
        out = report["tasks"][task]
        assert "skipped" not in out, out
        assert out["n_items"] == 6 and len(out["items"]) == len(out["base_items"]) == 6
        for m in out["metrics"].values():
            assert set(m) >= {"value", "ci", "base", "delta", "delta_ci", "n"}
    assert report["tasks"]["bold"]["fluency_under"] == "base model"
    assert report["tasks"]["dialect"]["files"]["n_aae_lines"] == 2
    table = render_markdown(report)
    assert "| bbq | s_dis |" in table and "| bold | fluency_ppl |" in table and "delta [95% CI]" in table


@needs_data
def test_cli_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["--model", "tiny-gpt2", "--tasks", "crows,dialect", "--limit", "3", "--resamples", "20",
               "--output", str(out), "--quiet"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["model"] == "tiny-gpt2" and set(report["tasks"]) == {"crows", "dialect"}
    assert "| crows | stereo_share |" in capsys.readouterr().out
    assert main(["--model", "tiny-gpt2", "--tasks", "nope"]) == 2
    assert "unknown safety task 'nope'" in capsys.readouterr().err
    assert main(["--model", "no/such/model/dir", "--suite", "safety"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
@needs_data
def test_smollm2_small_limit():
    model = HFBackend(*models.load_model(models.SMOLLM2, dtype="bf16"), batch_size=8)
    report = run_safety(model, tasks="safety", limit=6, resamples=200, max_new_tokens=8)
    t = report["tasks"]
    assert all("skipped" not in t[k] for k in ("bbq", "crows", "dialect", "bold"))
    assert t["bbq"]["n_unresolved"] == 0
    # a real model prefers the grammatical, frequent SAE form and reads BOLD prompts fluently
    assert t["dialect"]["metrics"]["ppl_ratio"]["value"] > 1.0
    assert t["bold"]["metrics"]["fluency_ppl"]["value"] < 100
    assert t["bold"]["metrics"]["empty_rate"]["value"] < 0.5
