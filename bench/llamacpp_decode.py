"""Greedy decode of a GGUF Llama model by llama.cpp, timed: the outside anchor of bench_quant's decode part.

Runs inside the anchor environment, not lmsqueeze's (standard library + ctransformers only), e.g.

    /work/llama-venv/bin/python bench/llamacpp_decode.py model.gguf --prompt 1,2,3 --tokens 16 --threads 1

and prints one JSON object on stdout: the llama.cpp build, the last prompt position's logits, the
greedy tokens and the seconds of every timed decode (prompt evaluation + `tokens` new tokens, the
same work that transformers' generate does in bench_quant).

The anchor environment: llama.cpp's own Python binding (llama-cpp-python) has no wheel for this
machine on the package index and building it takes too long here; the prebuilt `ctransformers`
0.2.27 wheel (Sep 2023) bundles llama.cpp with an AVX2 build and reads GGUF files:

    python3.11 -m venv /work/llama-venv
    /work/llama-venv/bin/pip install ctransformers==0.2.27 huggingface_hub   # hub: imported by its __init__

(`pyllamacpp` 2.4.3, the other prebuilt wheel, bundles a llama.cpp from before GGUF (ggjt v3 files
only), so it cannot load these files.)
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="GGUF file (Llama architecture)")
    p.add_argument("--prompt", required=True, help="comma-separated token ids")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per decode (default 16)")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1)")
    p.add_argument("--repeat", type=int, default=3, help="timed decodes after one untimed (default 3)")
    p.add_argument("--lib", default="avx2", help="ctransformers build: avx2, avx or basic (default avx2)")
    args = p.parse_args()

    from ctransformers import LLM, Config

    prompt = [int(t) for t in args.prompt.split(",")]
    config = Config(context_length=len(prompt) + args.tokens + 8, threads=args.threads, batch_size=len(prompt),
                    top_k=1, top_p=1.0, temperature=1.0, repetition_penalty=1.0, last_n_tokens=1, seed=0)
    t0 = time.perf_counter()
    llm = LLM(args.model, "llama", config=config, lib=args.lib)
    load_s = time.perf_counter() - t0

    def decode() -> tuple[list[int], list[float]]:
        llm._context.clear()          # a fresh sequence: the KV cache is overwritten from position 0
        llm.eval(prompt)
        logits = list(llm.logits)
        out = []
        for _ in range(args.tokens):
            tok = llm.sample()        # top_k=1, no repetition penalty: the arg max of the logits
            out.append(tok)
            llm.eval([tok])
        return out, logits

    t0 = time.perf_counter()
    generated, logits = decode()
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        again, _ = decode()
        times.append(time.perf_counter() - t0)
        if again != generated:
            raise SystemExit(f"llama.cpp decoded {again} after {generated}: greedy decode is not deterministic")
    print(json.dumps({"engine": "llama.cpp (ctransformers 0.2.27, lib " + args.lib + ")", "load_s": load_s,
                      "first_s": first_s, "times_s": times, "tokens": generated, "prompt": prompt,
                      "threads": args.threads, "logits": logits}))


if __name__ == "__main__":
    main()
