"""Task options (judge, toxicity, BBQ): one table, validated once, reaching the tasks from `lmsqueeze eval`,
`lmsqueeze study` flags and study-file keys (tiny models, tiny limits)."""
import json

import pytest

from lmsqueeze.cli import main
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.options import TASK_OPTIONS, check_task_options, identity_options
from lmsqueeze.study import StudySpec, expand_grid, read_results


def test_check_converts_and_drops_unset():
    got = check_task_options({"toxicity_k": "5", "toxicity_top_p": "0.9", "toxicity_temperature": 1,
                              "bbq_shots": "0", "judge": " tiny-llama ", "judge_url": None})
    assert got == {"toxicity_k": 5, "toxicity_top_p": 0.9, "toxicity_temperature": 1.0, "bbq_shots": 0,
                   "judge": "tiny-llama"}
    assert type(got["toxicity_k"]) is int and type(got["toxicity_temperature"]) is float
    assert identity_options({"judge": "x", "judge_cache": "/tmp/c", "judge_retries": 2}) == {"judge": "x"}


@pytest.mark.parametrize("name,value,message", [
    ("toxicity_k", 0, r"--toxicity-k \(option toxicity_k\) got 0; valid: an integer >= 1"),
    ("toxicity_k", "five", r"--toxicity-k .* got 'five'"),
    ("toxicity_k", 2.5, r"--toxicity-k .* got 2.5"),
    ("toxicity_k", True, r"--toxicity-k .* got True"),
    ("toxicity_top_p", 0, r"--toxicity-top-p .* got 0; valid: a number in \(0, 1\]"),
    ("toxicity_top_p", 1.01, r"--toxicity-top-p .* got 1.01"),
    ("toxicity_temperature", 0.0, r"--toxicity-temperature .* valid: a number > 0"),
    ("toxicity_limit", 0, r"--toxicity-limit .* valid: an integer >= 1"),
    ("judge_budget", -1, r"--judge-budget .* got -1; valid: an integer >= 0"),
    ("judge_max_tokens", 0, r"--judge-max-tokens"),
    ("bbq_shots", -2, r"--bbq-shots .* got -2"),
    ("bbq_norm", "bytes", r"--bbq-norm .* got 'bytes'; valid: one of char, token, sum"),
    ("judge", "  ", r"--judge \(option judge\) got '  '; valid: a non-empty string"),
])
def test_bad_values_name_the_option_and_what_is_valid(name, value, message):
    with pytest.raises(LmsqueezeError, match=message):
        check_task_options({name: value})


def test_unknown_option_and_two_judges():
    with pytest.raises(LmsqueezeError, match="unknown task option.*toxicity_n; valid: judge, "):
        check_task_options({"toxicity_n": 5})
    with pytest.raises(LmsqueezeError, match="give one judge: --judge a or --judge-url http://h/v1, not both"):
        check_task_options({"judge": "a", "judge_url": "http://h/v1"})


def test_every_option_is_a_flag_of_eval_and_study_and_a_spec_field(capsys):
    import dataclasses

    fields = {f.name for f in dataclasses.fields(StudySpec)}
    assert set(TASK_OPTIONS) <= fields
    for command in ("eval", "study"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert all(o.flag in text for o in TASK_OPTIONS.values()), command


@pytest.mark.parametrize("argv,message", [
    (["--toxicity-k", "0"], "--toxicity-k (option toxicity_k) got '0'; valid: an integer >= 1"),
    (["--bbq-norm", "bytes"], "--bbq-norm (option bbq_norm) got 'bytes'; valid: one of char, token, sum"),
    (["--judge", "tiny-llama", "--judge-url", "http://127.0.0.1:9/v1"], "give one judge"),
])
def test_cli_bad_values_are_one_line_exit_2(argv, message, tmp_path, capsys):
    for command in (["eval", "--model", "tiny-llama"], ["study", "--model", "tiny-llama", "--output-dir",
                                                          str(tmp_path / "s")]):
        assert main(command + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmsqueeze: error: ") and message in err[0]
    assert not (tmp_path / "s").exists()  # refused before any work


def test_study_file_key_with_a_bad_value_fails_before_work(tmp_path, capsys):
    cfg = tmp_path / "study.yaml"
    cfg.write_text("model: tiny-llama\ntoxicity_top_p: 2\n")
    assert main(["study", "--config", str(cfg), "--output-dir", str(tmp_path / "s")]) == 2
    assert "--toxicity-top-p (option toxicity_top_p) got 2; valid: a number in (0, 1]" in capsys.readouterr().err


def test_python_api_extra_is_checked_too(tmp_path):
    from lmsqueeze.evaluation import api

    prompts = tmp_path / "hate_x_1k.txt"
    prompts.write_text("- one\\n- two\\n-\n")
    with pytest.raises(LmsqueezeError, match="--toxicity-k .* got 0"):
        api.evaluate("tiny-llama", tasks=f"toxicity:{prompts}", extra={"toxicity_k": 0})
    with pytest.raises(LmsqueezeError, match="--bbq-shots .* got -1"):
        api.evaluate("tiny-llama", tasks="bbq", extra={"bbq_shots": -1})


def test_cell_keys_change_with_result_options_only():
    base = dict(model="tiny-llama", methods="magnitude", tasks="ppl:pydoc")
    key = expand_grid(StudySpec(**base))[0].key(StudySpec(**base))

    def key_with(**kw):
        spec = StudySpec(**base, **kw)
        return expand_grid(spec)[0].key(spec)

    assert key_with(judge_cache="/tmp/elsewhere", judge_retries=5, judge_key_env="K") == key
    assert key_with(toxicity_k=5) != key and key_with(judge="tiny-llama") != key
    assert key_with(toxicity_k="5") == key_with(toxicity_k=5)  # a YAML string is converted first


def test_study_flags_and_file_keys_reach_the_tasks(tmp_path, capsys):
    """A study file sets the judge and toxicity_k; a flag overrides toxicity_k and adds top-p; every cell's
    record shows the settings the tasks ran with."""
    inst = tmp_path / "inst.json"
    inst.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"},
                                {"instruction": "Name a colour.", "input": "", "output": "red"}]))
    prompts = tmp_path / "hate_testers_1k.txt"
    prompts.write_text("- a statement\\n- another one\\n-\n- a third\\n- a fourth\\n-\n")
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"model: tiny-llama\nmethods: magnitude\nsparsity: 0.5\ntasks: instruct:{inst},toxicity:{prompts}\n"
                   f"limit: 2\nmax_new_tokens: 3\nsafety_new_tokens: 3\nresamples: 20\n"
                   f"judge: tiny-llama\njudge_max_tokens: 4\njudge_cache: {tmp_path / 'judge'}\ntoxicity_k: 5\n")
    out = tmp_path / "study"
    rc = main(["--quiet", "study", "--config", str(cfg), "--output-dir", str(out), "--cache-dir",
               str(tmp_path / "cache"), "--toxicity-k", "2", "--toxicity-top-p", "0.5", "--no-plots", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    recs = read_results(out)
    assert [r["method"] for r in recs] == ["dense", "magnitude"]
    for r in recs:
        tox = r["summaries"][f"toxicity:{prompts}"]
        assert (tox["k"], tox["top_p"], tox["temperature"]) == (2, 0.5, 1.0)  # the flag beat the file's 5
        assert r["eval"]["toxicity_k"] == 2 and r["eval"]["judge"] == "tiny-llama"
        assert "judge_cache" not in r["eval"]  # where the cache lives does not change a result
    judged = recs[1]["summaries"][f"instruct:{inst}"]["judge"]
    assert judged["judge"].startswith("local:tiny-llama:") and judged["settings"]["max_new_tokens"] == 4
    assert judged["counts"]["items"] == 2
    assert json.loads((out / "study.json").read_text())["spec"]["toxicity_top_p"] == 0.5
