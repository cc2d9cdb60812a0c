import json
import subprocess
import sys

import pytest

from lmsqueeze.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "lmsqueeze", *args], capture_output=True, text=True, timeout=300)


def test_info_tells_the_truth(capsys):
    import torch

    from lmsqueeze import _ext

    assert main(["info", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["cpp_extension"]["built"] == (_ext.ext() is not None)
    assert rep["cuda"]["available"] == torch.cuda.is_available()
    if _ext.ext() is not None:
        flags = open("/proc/cpuinfo").read()
        assert rep["cpp_extension"]["cpu_features"]["avx512f"] == (" avx512f" in flags)
        assert rep["cpp_extension"]["cpu_features"]["amx_bf16"] == (" amx_bf16" in flags)
    assert main(["info"]) == 0
    assert "cpu backend (C++)" in capsys.readouterr().out


def test_unknown_model_is_one_line_no_traceback():
    proc = run("eval", "--model", "nope", "--tasks", "ppl:pydoc")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("lmsqueeze: error: cannot load model 'nope'")
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1


def test_missing_dataset_is_one_line(tmp_path):
    proc = run("eval", "--model", "tiny-llama", "--tasks", "ppl:wikitext2:test", "--data-dir", str(tmp_path))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "data set 'wikitext2:test' not found; looked in" in proc.stderr


def test_unknown_task(capsys):
    assert main(["eval", "--model", "tiny-llama", "--tasks", "bleu:pydoc"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'bleu:pydoc'; valid: ppl:SOURCE, divergence:SOURCE, mc:FILE.jsonl, piqa, alpaca, bbq" in err
    assert len(err.strip().splitlines()) == 1


def test_eval_ppl_on_tiny_model(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main(["--quiet", "eval", "--model", "tiny-llama", "--tasks", "ppl:pydoc", "--limit", "2", "--eval-seqlen", "64",
                 "--output", str(out)]) == 0
    assert "| ppl:pydoc | ppl |" in capsys.readouterr().out
    res = json.loads(out.read_text())["results"][0]
    assert res["summary"]["tokens"] == 2 * 63 and res["summary"]["ppl"] > 1 and len(res["items"]) == 2


def test_eval_against_base_and_bad_inputs(capsys, tmp_path):
    out = tmp_path / "r.json"
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "label": 1}) + "\n")
    assert main(["--quiet", "eval", "--model", "tiny-llama", "--base", "tiny-llama", "--tasks",
                 f"divergence:pydoc,mc:{mc}", "--limit", "2", "--eval-seqlen", "32", "--topk", "8",
                 "--cache-dir", str(tmp_path / "cache"), "--output", str(out)]) == 0
    assert "| divergence:pydoc | jsd | 0.0000 [0.0000, 0.0000] | 2 |" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["base"] == "tiny-llama" and rep["results"][1]["summary"]["flips"] == 0.0
    mc.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "label": 1}) + "\n{broken\n")
    assert main(["eval", "--model", "tiny-llama", "--tasks", f"mc:{mc}"]) == 2
    assert f"{mc}:2: not valid JSON" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-llama", "--tasks", "divergence:pydoc"]) == 2
    assert "task 'divergence:pydoc' compares with a base model: give one (--base)" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["models"], ["data"], ["--help"], ["eval", "--help"]])
def test_other_commands(cmd):
    proc = run(*cmd)
    assert proc.returncode == 0, proc.stderr


def test_eval_seqlen_old_spelling_still_works(capsys):
    assert main(["eval", "--model", "tiny-llama", "--tasks", "ppl:pydoc", "--limit", "1", "--seqlen", "16",
                 "--quiet"]) == 0
    out = capsys.readouterr()
    assert "--seqlen is deprecated here; use --eval-seqlen" in out.err
    assert "| ppl:pydoc | ppl |" in out.out


def test_quiet_and_verbose_go_before_or_after_the_subcommand(capsys):
    for argv in (["--quiet", "tasks"], ["tasks", "--quiet"], ["tasks", "-v"], ["-v", "tasks", "--quiet"]):
        assert main(argv) == 0
    assert "ppl:SOURCE" in capsys.readouterr().out


def test_eval_runs_safety_tasks_with_core_tasks(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main(["--quiet", "eval", "--model", "tiny-llama", "--base", "tiny-llama", "--tasks",
                 "ppl:pydoc,crows,dialect", "--limit", "3", "--eval-seqlen", "64", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| ppl:pydoc | ppl |" in text and "| crows | stereo_share |" in text and "| dialect | nll_gap |" in text
    rep = json.loads(out.read_text())
    crows = next(r for r in rep["results"] if r["task"] == "crows")
    assert crows["metrics"]["stereo_share"]["delta"] == 0.0  # a model against itself


def test_unknown_suite_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):  # argparse's own choices check
        main(["eval", "--model", "tiny-llama", "--suite", "nope"])
    from lmsqueeze.errors import LmsqueezeError
    from lmsqueeze.evaluation.task import task_names

    with pytest.raises(LmsqueezeError, match="unknown suite 'nope'"):
        task_names("", "nope", False)
