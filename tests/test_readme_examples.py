"""The README's Python example and examples/study.yaml run as shipped (at tiny size)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds one complete example"
    return blocks[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """tiny-llama saved as a Hugging Face directory (with its tokenizer), to stand in for smollm2-135m."""
    from lmsqueeze.models import load_model

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model, tok = load_model("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_the_readme_python_example_runs(tiny_dir, tmp_path, monkeypatch, capsys):
    code = _python_example()
    assert code.count('"smollm2-135m"') == 2  # the model and the base: the only names swapped for the test
    monkeypatch.chdir(tmp_path)  # "out/..." lands here
    monkeypatch.setenv("LMSQUEEZE_CACHE", str(tmp_path / "cache"))
    exec(compile(code.replace('"smollm2-135m"', repr(str(tiny_dir))), "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"sparsity 0\.500, relative error \d\.\d{4}", printed[0])
    assert any(line.startswith("ppl:pydoc          ppl ") for line in printed)
    assert any(line.startswith("divergence:pydoc   jsd ") for line in printed)
    meta = json.loads((tmp_path / "out" / "smollm2-wanda" / "lmsqueeze.json").read_text())
    assert meta["schema"] == "lmsqueeze.compressed/1" and meta["calibration"]["source"] == "list of texts"


def test_the_example_study_file_runs_at_tiny_size(tmp_path, monkeypatch, capsys):
    from lmsqueeze.cli import main
    from lmsqueeze.study import StudySpec, load_study_file

    path = ROOT / "examples" / "study.yaml"
    fields = load_study_file(path)
    spec = StudySpec(**fields)
    assert spec.model == "smollm2-135m" and spec.sparsity == ("0.5", "2:4") and spec.calib_seqlen == 512
    monkeypatch.setenv("LMSQUEEZE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "study"
    # the file as shipped, with only its sizes (and the model) made tiny on the command line
    assert main(["--quiet", "study", "--config", str(path), "--model", "tiny-llama", "--methods", "wanda",
                 "--sparsity", "2:4",
                 "--calib", "pydoc", "--nsamples", "2", "--calib-seqlen", "32", "--tasks", "ppl:pydoc",
                 "--suite", "core", "--limit", "1", "--eval-seqlen", "32", "--max-new-tokens", "2", "--resamples", "20",
                 "--no-plots", "--threads", "1", "--output-dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["dense", "wanda"] and records[1]["label"] == "wanda 2:4 pydoc"
    assert records[1]["calibration"]["nsamples"] == 2 and records[1]["eval"]["max_new_tokens"] == 2
    assert all(r["schema"] == "lmsqueeze.study-record/2" for r in records)
    study = json.loads((out / "study.json").read_text())
    assert study["schema"] == "lmsqueeze.study/1" and study["spec"]["dtype"] == "fp32"
    assert "report:" in capsys.readouterr().out
