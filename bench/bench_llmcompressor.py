"""lmsqueeze vs llm-compressor on the same model, tokens and thread count (issue 22).

Each tool runs as a process of its own, started from here: the whole process is timed (wall clock,
user + system CPU seconds and peak RSS from wait4), from interpreter start to the checkpoint on disk:
load the model, calibrate, compress, save. Both read the same model directory and the same token
tensor (saved once, [nsamples, seqlen] int64, no padding), run fp32 with the same torch thread count,
and keep the lm_head dense. With --ppl-windows N (models with a tokenizer), both checkpoints are then
scored by the same code: lmsqueeze's wikitext2:test perplexity on the first N windows of 512 tokens.

    python bench/bench_llmcompressor.py --model llama7b --layers 2 --nsamples 8 --seqlen 512
    python bench/bench_llmcompressor.py --model smollm2-135m --nsamples 32 --seqlen 512 --methods sparsegpt \
        --ppl-windows 40
    # the issue's full setting (a quiet many-core machine; ~10^15 FLOP a pass):
    python bench/bench_llmcompressor.py --model llama7b --layers 4 --nsamples 128 --seqlen 2048

--model llama7b: a randomly initialised (seeded) LlamaForCausalLM with Llama-2-7B's shapes (hidden
4096, MLP 11008, 32 heads, vocab 32000) cut to --layers decoder layers, written once as fp32
safetensors under --work-dir; random token ids (seeded) calibrate it. Any other --model is a
builtin name or a local HF directory, calibrated on --calib text windows drawn by lmsqueeze.

Methods: sparsegpt (50% unstructured; lmsqueeze saves dense-with-zeros, llm-compressor with
save_compressed=False) and gptq (4-bit, group 128, asymmetric as both tools default for W4A16
here: lmsqueeze --format compressed-tensors, llm-compressor scheme W4A16_ASYM, packed). Damping
0.01 and block 128 in both.

Install llm-compressor in an environment of its own (CI never needs it; `make bench-llmc-env`):

    python3.11 -m venv /work/llmc-venv
    /work/llmc-venv/bin/pip install torch==2.13.0    # FIRST: the CPU build from the local wheel; any other
                                                     # torch spec downloads gigabytes of CUDA packages
    /work/llmc-venv/bin/pip install llmcompressor==0.14.0.1   # keeps torch 2.13.0 (checked with --dry-run)

then pass --llmc-python /work/llmc-venv/bin/python (the default). Results: a markdown table on
stdout and JSON (bench.harness.machine_info, settings, per-run numbers) in bench/results/ or --output.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LLAMA7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
           "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
METHODS = ("sparsegpt", "gptq")


# ---- the two runners: each executes in a fresh interpreter of its own tool's environment -------------------

def run_lmsqueeze(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    from lmsqueeze.compressor import GPTQConfig, SparseGPTConfig, save_compressed
    from lmsqueeze.compressor import compress as lmsq_compress

    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).eval()
    ids = torch.load(a.tokens)
    if a.method == "sparsegpt":
        config, fmt = SparseGPTConfig(sparsity=0.5, percdamp=0.01, blocksize=128), "dense"
    else:
        config, fmt = GPTQConfig(bits=4, group_size=128, percdamp=0.01, blocksize=128), "compressed-tensors"
    grids = {} if fmt == "compressed-tensors" else None
    t0 = time.perf_counter()
    report = lmsq_compress(model, config, ids, batch_size=a.batch_size, measure_error=False, grids=grids)
    t_compress = time.perf_counter() - t0
    tok = None
    if (Path(a.model_dir) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.model_dir)
    save_compressed(model, tok, a.out_dir, report, model_name=str(a.model_dir), format=fmt, grids=grids)
    return {"compress_s": t_compress, "phases": report.timings}


def run_llmc(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).eval()
    ids = torch.load(a.tokens)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    if a.method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        recipe = SparseGPTModifier(sparsity=0.5, mask_structure="0:0", dampening_frac=0.01, block_size=128,
                                   targets=["Linear"], ignore=["re:.*lm_head"])
        compressed = False
    else:
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(scheme="W4A16_ASYM", targets=["Linear"], ignore=["lm_head"], dampening_frac=0.01,
                              block_size=128)
        compressed = True
    tok = a.model_dir if (Path(a.model_dir) / "tokenizer_config.json").exists() else None
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], batch_size=a.batch_size, shuffle_calibration_samples=False,
            pipeline="sequential")
    t_compress = time.perf_counter() - t0
    model.save_pretrained(a.out_dir, save_compressed=compressed)
    if tok is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tok).save_pretrained(a.out_dir)
    return {"compress_s": t_compress}


# ---- the driver (lmsqueeze's environment) -----------------------------------------------------------------

def prepare(args, work: Path) -> tuple[Path, Path, str]:
    """(model directory, token file, how the tokens were drawn); written once per setting under work."""
    import torch

    if args.model == "llama7b":
        model_dir = work / f"llama7b-shaped-{args.layers}L-seed{args.seed}"
        if not (model_dir / "model.safetensors").exists() and not (model_dir / "model.safetensors.index.json").exists():
            from transformers import LlamaConfig, LlamaForCausalLM

            torch.manual_seed(args.seed)
            cfg = LlamaConfig(**LLAMA7B, num_hidden_layers=args.layers, torch_dtype="float32", tie_word_embeddings=False)
            model = LlamaForCausalLM(cfg).eval()  # transformers' own init: N(0, 0.02) weights, unit norms
            tmp = model_dir.with_name(model_dir.name + ".tmp")
            model.save_pretrained(tmp)
            os.replace(tmp, model_dir)
            del model
        if not (model_dir / "tokenizer_config.json").exists():
            # llm-compressor's oneshot insists on a processor whenever it is given a dataset, even one of token
            # ids; the random model gets SmolLM2's tokenizer files, which tokenize nothing here (the tokens are
            # drawn below) and are saved beside both outputs alike
            from lmsqueeze.models import builtin_dir, load_tokenizer

            load_tokenizer(str(builtin_dir("smollm2-135m"))).save_pretrained(model_dir)
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, LLAMA7B["vocab_size"], (args.nsamples, args.seqlen), generator=g)
        how = f"random token ids (seed {args.seed})"
    else:
        from lmsqueeze.data import calibration_batches
        from lmsqueeze.models import builtin_dir, load_tokenizer

        model_dir = builtin_dir(args.model) if not Path(args.model).is_dir() else Path(args.model)
        tok = load_tokenizer(str(model_dir))
        ids = calibration_batches(tok, args.calib, args.nsamples, args.seqlen, args.seed)
        how = f"{args.calib} windows (seed {args.seed})"
    tokens = work / f"tokens-{args.model.replace('/', '_')}-{args.nsamples}x{args.seqlen}-seed{args.seed}.pt"
    torch.save(ids.clone(), tokens)
    return model_dir, tokens, how


def run_side(tool: str, python: str, method: str, args, model_dir: Path, tokens: Path, out_dir: Path) -> dict:
    cmd = [python, str(Path(__file__).resolve()), f"--run-{tool}", "--method", method, "--model-dir", str(model_dir),
           "--tokens", str(tokens), "--out-dir", str(out_dir), "--threads", str(args.threads),
           "--batch-size", str(args.batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "LMSQUEEZE_QUIET": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(ROOT) if tool == "lmsqueeze" else ""
    log = out_dir.with_name(out_dir.name + ".log")
    with open(log, "w") as sink:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env)
        # wait4: this process's own CPU time and peak RSS (its waited-for children included), not a running total
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    res = {"tool": tool, "method": method, "wall_s": wall, "rc": proc.returncode,
           "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024, "log": str(log)}
    text = log.read_text()
    line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        res["error"] = text.strip().splitlines()[-5:]
    else:
        res.update(json.loads(line[len("RESULT "):]))
    return res


def sparsity_of(out_dir: Path) -> float | None:
    """Fraction of exact zeros in the decoder's linear weights of a dense-with-zeros checkpoint."""
    from safetensors import safe_open

    zeros = total = 0
    for f in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if ".layers." in k and k.endswith("proj.weight"):
                    w = st.get_tensor(k)
                    zeros += int((w == 0).sum())
                    total += w.numel()
    return zeros / total if total else None


def ppl_of(out_dir: Path, windows: int) -> float:
    from lmsqueeze.evaluation import perplexity
    from lmsqueeze.models import load_model

    model, tok = load_model(str(out_dir), dtype="fp32")
    return perplexity(model, tok, "wikitext2:test", seqlen=512, limit=windows, batch_tokens=2048)["ppl"]


def table(results: list[dict], settings: dict) -> str:
    lines = [f"### lmsqueeze vs llm-compressor: {settings['model']}"
             + (f" ({settings['layers']} layers)" if settings["model"] == "llama7b" else "")
             + f", {settings['nsamples']} x {settings['seqlen']} tokens, {settings['threads']} threads, fp32", "",
             "| method | tool | wall s | CPU s | compress s (in process) | peak RSS | sparsity | ppl | "
             "wall ratio | CPU ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["method"], r["tool"]): r for r in results}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['tool']} | failed: {' / '.join(r['error'])[-200:]} | | | | | | | |")
            continue
        other = by.get((r["method"], "llm-compressor"))
        paired = r["tool"] == "lmsqueeze" and other is not None and "error" not in other
        sp, ppl = r.get("sparsity"), r.get("ppl")
        lines.append(f"| {r['method']} | {r['tool']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['compress_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} MiB | {'-' if sp is None else f'{sp:.4f}'} | "
                     f"{'-' if ppl is None else f'{ppl:.3f}'} | "
                     + (f"{other['wall_s'] / r['wall_s']:.2f}x | {other['cpu_s'] / r['cpu_s']:.2f}x |" if paired
                        else " | |"))
    lines.append("")
    lines.append("ratio: llm-compressor / lmsqueeze (above 1: lmsqueeze faster). CPU: user + system seconds of the "
                 "whole process; peak RSS: its maximum resident set.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama7b", help="llama7b (random, 7B shapes) or a builtin/local model")
    p.add_argument("--layers", type=int, default=2, help="llama7b: decoder layers (issue: 4)")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows (issue: 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (issue: 2048)")
    p.add_argument("--calib", default="wikitext2:valid", help="calibration text for real models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="sparsegpt,gptq", help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--tools", default="lmsqueeze,llm-compressor", help="which tools run (both by default)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both tools (default: all cores)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration windows per forward in both tools "
                                                             "(default 1: llm-compressor's default)")
    p.add_argument("--ppl-windows", type=int, default=0, help="score both outputs on this many wikitext2:test "
                                                              "windows (models with a tokenizer)")
    p.add_argument("--llmc-python", default="/work/llmc-venv/bin/python", help="python of llm-compressor's env")
    p.add_argument("--work-dir", default="/tmp/lmsqueeze-bench-llmc", help="model, tokens and outputs (kept)")
    p.add_argument("--output", default=None, help="JSON path (default bench/results/llmc-<time>.json)")
    for flag in ("--run-lmsqueeze", "--run-llmc"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in ("--method", "--model-dir", "--tokens", "--out-dir"):
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_lmsqueeze or args.run_llmc:
        res = run_lmsqueeze(args) if args.run_lmsqueeze else run_llmc(args)
        print("RESULT " + json.dumps(res, default=str), flush=True)
        return
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method '{m}'; valid: {', '.join(METHODS)}")
    tools = args.tools.split(",")
    for t in tools:
        if t not in ("lmsqueeze", "llm-compressor"):
            raise SystemExit(f"unknown tool '{t}'; valid: lmsqueeze, llm-compressor")
    if "llm-compressor" in tools and not Path(args.llmc_python).exists():
        raise SystemExit(f"--llmc-python {args.llmc_python} does not exist: install llm-compressor as this "
                         f"script's docstring says, or run --tools lmsqueeze")
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, tokens, how = prepare(args, work)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("run_")} | {"tokens_drawn": how}
    out = Path(args.output) if args.output else (
        ROOT / "bench" / "results" / f"llmc-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for method in methods:
        for tool in tools:
            python = sys.executable if tool == "lmsqueeze" else args.llmc_python
            out_dir = work / f"out-{tool}-{method}"
            print(f"  {method} / {tool} ...", file=sys.stderr, flush=True)
            r = run_side("lmsqueeze" if tool == "lmsqueeze" else "llmc", python, method, args, model_dir, tokens,
                         out_dir)
            r["tool"] = tool
            if "error" not in r:
                if method == "sparsegpt":
                    r["sparsity"] = sparsity_of(out_dir)
                if args.ppl_windows and args.model != "llama7b":
                    r["ppl"] = ppl_of(out_dir, args.ppl_windows)
            print(f"  {method} / {tool}: " + (str(r["error"]) if "error" in r else
                                              f"{r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU"), file=sys.stderr,
                  flush=True)
            results.append(r)
            _write(out, settings, results)
    print(table(results, settings))
    print(f"JSON: {out}", file=sys.stderr)


def _write(out: Path, settings: dict, results: list[dict]) -> None:
    from bench.harness import SCHEMA, machine_info

    payload = {"schema": SCHEMA, "title": "llm-compressor side by side", "machine": machine_info(),
               "settings": settings, "results": results}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    main()
