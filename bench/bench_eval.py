"""Evaluation throughput against the peer users would otherwise run: lmsqueeze vs lm-evaluation-harness.

    python bench/bench_eval.py [--items 400] [--ppl-windows 40] [--model smollm2-135m] [--batch-size 16]

Whole processes, side by side, on the same model (fp32), the same items and the same prompt:
- piqa: accuracy on the first `--items` PIQA validation items. lm-evaluation-harness runs `--model hf`
  with a local task YAML written by this script (its data: the items with their labels in one JSONL file
  under a temporary directory) whose prompt is lmsqueeze's, start token included
  ("<start>Question: {goal}\\nAnswer:" + " {solution}"), so both score the same token sequences.
- ppl: perplexity of wikitext2:test. lmsqueeze: `ppl:wikitext2:test` over `--ppl-windows` disjoint windows
  of 512 tokens; lm-evaluation-harness: a local `loglikelihood_rolling` task over the same text (one
  document), `max_length=512`. The two window rules differ by one token a window (lmsqueeze conditions
  each window on its first token; lm-eval scores it from the previous window's last), so the word
  perplexities agree to a fraction of a percent, not exactly: the table shows both.
Each process is timed whole (model load, tokenization, scoring, writing results), once; the ratio is
lm-eval's time over lmsqueeze's.

The compute floor: both tools run the same model forward over the same tokens, so on a CPU that is
compute-bound (fp32 GEMMs) neither can be faster than FLOPs / the machine's GEMM rate. The script counts
the tokens each task forwards (every sequence minus its last token), multiplies by the forward FLOPs a
token costs (2 x the decoder's linear weights, plus 2 x the output head's for lm-eval, which applies the
head at every position; lmsqueeze applies it only to scored tokens), measures the fp32 GEMM rate of this
machine on the model's own MLP shape, and prints the seconds each tool needs at that rate: the floor
below which no implementation of the same computation can go. lm-evaluation-harness must be installed in the same environment
(`pip install lm-eval`); without it the script says so and times lmsqueeze alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PIQA_YAML = """task: lmsq_piqa
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{start}Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

PPL_YAML = """task: lmsq_wikitext
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def _run(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def _lm_eval_results(out_dir: Path) -> dict:
    files = sorted(out_dir.rglob("results*.json"))
    if not files:
        raise SystemExit(f"lm-eval wrote no results under {out_dir}")
    return json.loads(files[-1].read_text())["results"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--items", type=int, default=400, help="PIQA items (default 400)")
    p.add_argument("--ppl-windows", type=int, default=40, help="wikitext2:test windows of 512 tokens (default 40)")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size (default 16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in both (default: torch's choice)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--only", choices=["piqa", "ppl"], default=None)
    p.add_argument("--output", default=None, help="JSON path (default bench/results/eval-vs-lm-eval-<time>.json)")
    args = p.parse_args(argv)

    from bench.harness import SCHEMA, machine_info
    from lmsqueeze import models
    from lmsqueeze.data import load_text, piqa_records
    from lmsqueeze.evaluation.api import _load_tokenizer
    from lmsqueeze.evaluation.backend import start_token

    path = models.resolve(args.model)
    tok = _load_tokenizer(args.model)
    start = tok.convert_ids_to_tokens(start_token(tok))
    env = {**os.environ, "LMSQUEEZE_QUIET": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    have_lm_eval = shutil.which("lm_eval") is not None or _importable("lm_eval")
    rows, record = [], {"schema": SCHEMA, "title": "bench_eval", "machine": machine_info(), "settings": vars(args),
                        "cases": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    try:
        data_dir = ["--data-dir", args.data_dir] if args.data_dir else []
        if args.only in (None, "piqa"):
            recs = piqa_records(args.data_dir)[:args.items]
            (tmp / "piqa").mkdir()
            (tmp / "piqa" / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
            (tmp / "tasks").mkdir(exist_ok=True)
            (tmp / "tasks" / "piqa.yaml").write_text(PIQA_YAML.format(data=tmp / "piqa" / "valid.jsonl",
                                                                      start=start))
            ours_s, _ = _run([sys.executable, "-m", "lmsqueeze", "eval", "--model", args.model, "--tasks", "piqa",
                              "--limit", str(args.items), "--dtype", "fp32", "--output", str(tmp / "ours.json"),
                              "--resamples", "0"] + data_dir, env)
            ours = json.loads((tmp / "ours.json").read_text())["results"][0]["summary"]
            case = {"lmsqueeze_s": ours_s, "lmsqueeze_acc": ours["acc"], "lmsqueeze_acc_norm": ours["acc_norm"]}
            if have_lm_eval:
                theirs_s, _ = _run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                                    f"pretrained={path},dtype=float32", "--tasks", "lmsq_piqa", "--include_path",
                                    str(tmp / "tasks"), "--batch_size", str(args.batch_size), "--output_path",
                                    str(tmp / "lm-eval-piqa")], env)
                res = _lm_eval_results(tmp / "lm-eval-piqa")["lmsq_piqa"]
                case.update(lm_eval_s=theirs_s, lm_eval_acc=res["acc,none"], lm_eval_acc_norm=res["acc_norm,none"],
                            speedup=theirs_s / ours_s)
            record["cases"]["piqa"] = case
            rows.append(("piqa", f"{args.items} items", case, "acc"))
        if args.only in (None, "ppl"):
            text = load_text("wikitext2:test", args.data_dir)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            cut = min(len(ids), args.ppl_windows * 512)
            part = tok.decode(ids[:cut])
            (tmp / "wiki.txt").write_text(part)
            (tmp / "wiki.jsonl").write_text(json.dumps({"text": part}) + "\n")
            (tmp / "tasks").mkdir(exist_ok=True)
            (tmp / "tasks" / "wiki.yaml").write_text(PPL_YAML.format(data=tmp / "wiki.jsonl"))
            ours_s, _ = _run([sys.executable, "-m", "lmsqueeze", "eval", "--model", args.model, "--tasks",
                              f"ppl:{tmp / 'wiki.txt'}", "--eval-seqlen", "512", "--dtype", "fp32", "--output",
                              str(tmp / "ours-ppl.json"), "--resamples", "0"], env)
            ours = json.loads((tmp / "ours-ppl.json").read_text())["results"][0]["summary"]
            case = {"lmsqueeze_s": ours_s, "lmsqueeze_word_ppl": ours["word_ppl"], "lmsqueeze_ppl": ours["ppl"],
                    "tokens": ours["tokens"]}
            if have_lm_eval:
                theirs_s, _ = _run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                                    f"pretrained={path},dtype=float32,max_length=512", "--tasks", "lmsq_wikitext",
                                    "--include_path", str(tmp / "tasks"), "--batch_size", str(args.batch_size),
                                    "--output_path", str(tmp / "lm-eval-ppl")], env)
                res = _lm_eval_results(tmp / "lm-eval-ppl")["lmsq_wikitext"]
                case.update(lm_eval_s=theirs_s, lm_eval_word_ppl=res["word_perplexity,none"],
                            speedup=theirs_s / ours_s)
            record["cases"]["ppl"] = case
            rows.append(("ppl wikitext2:test", f"{ours['tokens']} tokens", case, "word_ppl"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if record["cases"]:
        record["floor"] = _compute_floor(args, tok, record["cases"])
    print("| task | size | lmsqueeze | lm-eval | speedup | lmsqueeze metric | lm-eval metric |")
    print("|---|---|---|---|---|---|---|")
    for name, size, c, metric in rows:
        theirs = f"{c['lm_eval_s']:.1f} s" if "lm_eval_s" in c else "not installed"
        speed = f"{c['speedup']:.2f}x" if "speedup" in c else "-"
        print(f"| {name} | {size} | {c['lmsqueeze_s']:.1f} s | {theirs} | {speed} | "
              f"{metric} {c['lmsqueeze_' + metric]:.4f} | "
              f"{'-' if 'lm_eval_' + metric not in c else format(c['lm_eval_' + metric], '.4f')} |")
    if "floor" in record:
        f = record["floor"]
        print(f"\ncompute floor at this machine's fp32 GEMM rate ({f['gemm_gflops']:.0f} GFLOP/s on "
              f"{f['gemm_shape']}): forward FLOPs per token {f['flops_per_token'] / 1e9:.3f} G without the "
              f"head, {f['flops_per_token_with_head'] / 1e9:.3f} G with it")
        print("| task | tokens forwarded | lmsqueeze floor | lm-eval floor | best possible speedup |")
        print("|---|---|---|---|---|")
        for name, c in f["cases"].items():
            print(f"| {name} | {c['tokens']} | {c['lmsqueeze_floor_s']:.1f} s | {c['lm_eval_floor_s']:.1f} s | "
                  f"{c['lm_eval_floor_s'] / c['lmsqueeze_floor_s']:.2f}x (compute alone) |")
    if not have_lm_eval:
        print("\nlm-evaluation-harness is not installed here (pip install lm-eval): lmsqueeze timed alone")
    out = Path(args.output) if args.output else ROOT / "bench" / "results" / \
        f"eval-vs-lm-eval-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str))
    print(f"JSON: {out}", file=sys.stderr)
    return 0


def _gemm_gflops(m: int, k: int, n: int, seconds: float = 2.0) -> float:
    """Best fp32 GFLOP/s of torch.mm on [m, k] x [k, n] over repeated calls for about `seconds`."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def _compute_floor(args, tok, cases: dict) -> dict:
    """Tokens each task forwards, FLOPs a token costs, and the seconds both take at this machine's GEMM rate."""
    from lmsqueeze import models
    from lmsqueeze.data import piqa_records
    from lmsqueeze.evaluation.backend import split_whitespace

    cfg = models.load_config(args.model)
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    linear = layers * (h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter)
    per_token, head = 2 * linear, 2 * h * cfg.vocab_size
    gflops = _gemm_gflops(4096, h, inter)
    out = {"gemm_gflops": gflops, "gemm_shape": f"[4096, {h}] x [{h}, {inter}] fp32",
           "flops_per_token": per_token, "flops_per_token_with_head": per_token + head, "cases": {}}
    if "piqa" in cases:  # start token + context + continuation, less the last token (it predicts nothing)
        tokens = scored = 0
        for r in piqa_records(args.data_dir)[:args.items]:
            for sol in (r["sol1"], r["sol2"]):
                ctx, cont = split_whitespace(f"Question: {r['goal']}\nAnswer:", f" {sol}")
                c = tok(cont, add_special_tokens=False)["input_ids"]
                tokens += 1 + len(tok(ctx, add_special_tokens=False)["input_ids"]) + len(c) - 1
                scored += len(c)
        out["cases"]["piqa"] = {"tokens": tokens, "scored": scored}
    if "ppl" in cases:
        out["cases"]["ppl wikitext2:test"] = {"tokens": cases["ppl"]["tokens"], "scored": cases["ppl"]["tokens"]}
    for c in out["cases"].values():
        c["lmsqueeze_floor_s"] = (c["tokens"] * per_token + c["scored"] * head) / gflops / 1e9
        c["lm_eval_floor_s"] = c["tokens"] * (per_token + head) / gflops / 1e9
    return out


def _importable(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


if __name__ == "__main__":
    raise SystemExit(main())
