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
    assert err.startswith("lmsqueeze: error: unknown task 'bleu:pydoc'; valid: ppl:SOURCE, divergence:SOURCE, ")
    valid = err.split("valid: ", 1)[1].strip().split(", ")
    assert {"mc:FILE.jsonl", "piqa", "alpaca", "crows", "bold"} <= set(valid)  # the list grows with the registry
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


# ---- issue 17: the behaviour a script and a user can rely on ----------------------------------------------

def _no_quiet_env(**extra):
    import os

    env = {k: v for k, v in os.environ.items() if k != "LMSQUEEZE_QUIET"}
    return {**env, **extra}


def test_version(capsys):
    from lmsqueeze import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"lmsqueeze {__version__}"


@pytest.mark.parametrize("argv,message", [
    (["compress", "--model", "tiny-llama"], "the following arguments are required: --method, --output-dir"),
    (["eval", "--model", "tiny-llama", "--limit", "many"], "argument --limit: invalid int value: 'many'"),
    (["tasks", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["eval", "--model", "m", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8' (choose from "),
])
def test_bad_usage_is_one_error_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and err.startswith("lmsqueeze: error: ") and message in err
    assert "--help" in err  # says where the valid flags are listed


def test_a_failed_run_is_exit_1_one_line_and_a_log_with_the_traceback(capsys, monkeypatch, tmp_path):
    import lmsqueeze.cli as cli

    def broken(args):
        raise RuntimeError("the kernel fell over\nsecond line")

    monkeypatch.setattr(cli, "cmd_models", broken)
    monkeypatch.setenv("LMSQUEEZE_CACHE", str(tmp_path))
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("lmsqueeze: error: models failed: RuntimeError: the kernel fell over (traceback in ")
    log = err.rsplit("traceback in ", 1)[1].strip().rstrip(")")
    assert log.startswith(str(tmp_path / "logs"))
    text = open(log).read()
    assert "command: lmsqueeze models" in text and "Traceback" in text and "second line" in text


def test_a_model_that_fails_to_load_is_one_line_and_no_traceback(tmp_path):
    from lmsqueeze.models import load_model

    model, tok = load_model("tiny-llama")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    proc = subprocess.run([sys.executable, "-m", "lmsqueeze", "eval", "--model", str(tmp_path / "m"), "--tasks",
                           "ppl:pydoc"], capture_output=True, text=True, timeout=300,
                          env=_no_quiet_env(LMSQUEEZE_CACHE=str(tmp_path / "cache")))
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lmsqueeze: error: "), proc.stderr


def test_a_task_that_cannot_run_fails_the_run_unless_skipped(capsys, monkeypatch, tmp_path):
    import importlib

    real = importlib.import_module

    def without_vader(name, *args, **kwargs):  # as if the [safety] extra were not installed
        if name.startswith("vaderSentiment"):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_vader)
    argv = ["--quiet", "eval", "--model", "tiny-gpt2", "--tasks", "ppl:pydoc,bold", "--limit", "1", "--eval-seqlen",
            "16"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.startswith("lmsqueeze: error: task 'bold' cannot run: ") and "--skip-unavailable" in err
    out = tmp_path / "r.json"
    assert main([*argv, "--skip-unavailable", "--output", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [r["task"] for r in rep["results"]] == ["ppl:pydoc", "bold"]
    assert "vaderSentiment" in rep["results"][1]["skipped"]


def test_a_missing_data_set_is_a_task_that_cannot_run(capsys, tmp_path):
    argv = ["--quiet", "eval", "--model", "tiny-llama", "--tasks", "ppl:pydoc,piqa", "--limit", "1", "--eval-seqlen",
            "16", "--data-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmsqueeze: error: task 'piqa' cannot run: data set 'piqa' not found") and \
        "--skip-unavailable" in err
    out = tmp_path / "r.json"
    assert main([*argv, "--skip-unavailable", "--output", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [r["task"] for r in rep["results"]] == ["ppl:pydoc", "piqa"] and "not found" in rep["results"][1]["skipped"]


def test_a_log_file_gets_lines_not_carriage_returns(tmp_path):
    log = tmp_path / "run.log"
    with open(log, "w") as f:  # stdout and stderr both to the file, as `lmsqueeze ... > log 2>&1`
        proc = subprocess.run([sys.executable, "-m", "lmsqueeze", "compress", "--model", "tiny-llama", "--method",
                               "wanda", "--sparsity", "0.5", "--calib", "pydoc", "--nsamples", "2", "--calib-seqlen",
                               "32", "--output-dir", str(tmp_path / "out")], stdout=f, stderr=subprocess.STDOUT,
                              timeout=300, env=_no_quiet_env())
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text
    assert "calibration: 2 x 32 = 64 tokens of pydoc through every layer" in text
    assert "lmsqueeze: wanda: the first layer took " in text and "for all 2; shorter with --nsamples" in text
    assert "lmsqueeze: wanda: 2/2 layer in " in text
    assert len(text.splitlines()) < 20


@pytest.mark.parametrize("command", ["eval", "compress", "study"])
def test_one_name_per_concept_and_threads_on_every_computing_command(command, capsys):
    from lmsqueeze.cli import build_parser

    need = {"eval": ["--model", "m"], "compress": ["--model", "m", "--method", "rtn", "--output-dir", "o"],
            "study": ["--output-dir", "o"]}[command]
    p = build_parser()
    args = p.parse_args([command, *need, "--threads", "3"])
    assert args.threads == 3 and args.dtype in ("auto", None)  # one default: auto (fp32 on CPU, bf16 on CUDA)
    if command == "eval":
        assert p.parse_args([command, *need, "--eval-seqlen", "64"]).eval_seqlen == 64
        assert p.parse_args([command, *need, "--seqlen", "64"]).eval_seqlen == 64
        assert "--seqlen is deprecated here; use --eval-seqlen" in capsys.readouterr().err
    else:
        assert p.parse_args([command, *need, "--calib-seqlen", "64"]).calib_seqlen == 64
        assert p.parse_args([command, *need, "--seqlen", "64"]).calib_seqlen == 64
        assert capsys.readouterr().err.strip() == "lmsqueeze: --seqlen is deprecated here; use --calib-seqlen"
    if command == "study":
        assert p.parse_args([command, *need, "--eval-seqlen", "64"]).eval_seqlen == 64


def test_the_default_dtype_is_one_rule():
    from lmsqueeze.cli import resolve_dtype

    assert resolve_dtype("auto", "cpu") == "fp32" and resolve_dtype(None, None) == "fp32"
    assert resolve_dtype("auto", "cuda") == "bf16" and resolve_dtype(None, "cuda:1") == "bf16"
    assert resolve_dtype("fp16", "cpu") == "fp16"
