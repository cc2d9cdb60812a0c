"""Low-bit and 2:4 + low-bit inference against the best dense path: GEMV/GEMM per layer shape, then decode.

    python bench/bench_quant.py [--parts bandwidth,gemv,decode] [--quick] [--layers 2] [--tokens 16] [--paired 15]

bandwidth  read bandwidth: torch.sum over a buffer far bigger than the caches (DRAM) and over one
           that stays in L3 (cache), as in bench_sparse24.
gemv       x [batch, in] @ W.T at Llama-2-7B (4096x4096, 11008x4096, 4096x11008; out x in) and
           SmolLM2-135M shapes (576x576, 1536x576, 576x1536), batch 1, 4, 16: dense F.linear bf16 and
           fp32 (the best torch path is the faster of the two), 2:4 (sparse24_matmul, bf16), 4-bit g128
           (quant_matmul), 2:4 + 4-bit g128 (sparse24_quant_matmul), x in bf16. Each case is checked
           against its reference first. GB/s counts the bytes each really reads (packed weight +
           scales + zeros (+ meta) + x). The summary gives the speedup over the best dense path (from
           the medians, and paired back-to-back ratios with --paired) and the share of the DRAM bandwidth.
decode     greedy tokens/s of a randomly initialised model with Llama-2-7B's shapes cut to --layers
           layers (weights in DRAM): dense bf16, dense fp32, 2:4, 4-bit g128, 2:4 + 4-bit g128, every
           decoder linear converted; the 4-bit forms quantize lm_head too (4-bit, not 2:4), as a GGUF
           Q4_0 file does, the 2:4 form keeps it dense bf16; embeddings stay bf16 (one row a token). Each packed model is
           validated first: its last-position logits against its fake-quantized dense model in fp32,
           no further off than the dense bf16 model is from its own fp32 copy (2x, plus 0.1% of scale).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_sparse24 import bandwidth_cases, llama7b_shaped, prune_decoder_linears
from bench.harness import Case, parser, run
from lmsqueeze.kernels import nm_mask
from lmsqueeze.kernels.quant import (
    dequantize,
    quant_matmul,
    quant_pack,
    sparse24_quant_matmul,
    sparse24_quant_pack,
)
from lmsqueeze.kernels.sparse24 import compress, sparse24_matmul
from lmsqueeze.testing import compare

LLAMA7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # q/k/v/o, gate/up, down (out, in)
SMOLLM2 = [(576, 576), (1536, 576), (576, 1536)]         # q/o, gate/up, down
BATCHES = (1, 4, 16)
BF16_TOL = (1e-4, 2 ** -7)  # two fp32-accumulating paths rounded to bf16: one ulp apart at most
GROUP = 128


def _pruned(out, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g)
    return W * nm_mask(W.abs(), 2, 4)


def gemv_cases(quick: bool) -> list[Case]:
    cases = []
    shapes = (LLAMA7B[2:] + SMOLLM2[2:]) if quick else LLAMA7B + SMOLLM2
    for out, cols in shapes:
        Wf = _pruned(out, cols)                 # 2:4 so one weight serves every form
        W = Wf.to(torch.bfloat16)
        Wf = W.float()
        values, meta = compress(W)
        q4 = quant_pack(Wf, bits=4, group_size=GROUP)
        s24q4 = sparse24_quant_pack(Wf, bits=4, group_size=GROUP)
        for batch in BATCHES:
            x = torch.randn(batch, cols).to(torch.bfloat16)
            xf = x.float()
            group = f"{out}x{cols} batch {batch}"
            params = {"out": out, "in": cols, "batch": batch, "threads": torch.get_num_threads()}

            def checker(Wref, x=x):
                expected = F.linear(x.float(), Wref.float()).to(torch.bfloat16)
                scale = float(expected.float().abs().max())
                return lambda y: compare(y.to(torch.bfloat16), expected, atol=BF16_TOL[0] * scale, rtol=BF16_TOL[1])

            xb = x.numel() * 2
            flops = 2 * batch * W.numel()
            dense_check = checker(W)
            cases.append(Case("dense F.linear bf16", group, lambda x=x, W=W: F.linear(x, W),
                              dict(params, dtype="bf16"), check=dense_check, bytes=W.numel() * 2 + xb, flops=flops))
            cases.append(Case("dense F.linear fp32", group, lambda x=xf, W=Wf: F.linear(x, W),
                              dict(params, dtype="fp32"), check=dense_check, bytes=W.numel() * 4 + xb * 2,
                              flops=flops, baseline="dense F.linear bf16"))
            cases.append(Case("2:4 bf16", group, lambda x=x, v=values, m=meta: sparse24_matmul(x, v, m, backend="cpu"),
                              dict(params, dtype="bf16"), check=dense_check,
                              bytes=values.numel() * 2 + meta.numel() * 2 + xb, flops=flops // 2,
                              baseline="dense F.linear bf16"))
            # rows > 16 run dense GEMM on a bf16 tile; <= 16 the fp32 dequantized weight is the reference
            cases.append(Case("4-bit g128", group, lambda x=x, p=q4: quant_matmul(x, p, backend="cpu"),
                              dict(params, dtype="bf16", bits=4, group_size=GROUP), check=checker(dequantize(q4)),
                              bytes=q4.nbytes() + xb, flops=flops, baseline="dense F.linear bf16"))
            cases.append(Case("2:4 + 4-bit g128", group, lambda x=x, p=s24q4: sparse24_quant_matmul(x, p, backend="cpu"),
                              dict(params, dtype="bf16", bits=4, group_size=GROUP), check=checker(dequantize(s24q4)),
                              bytes=s24q4.nbytes() + xb, flops=flops // 2, baseline="dense F.linear bf16"))
    return cases


FORMS = ("2:4 bf16", "4-bit g128", "2:4 + 4-bit g128")


def gemv_summary(results: list[dict], dram: float, stat: str = "median_s") -> str:
    by_group: dict[str, dict[str, dict]] = {}
    for r in results:
        by_group.setdefault(r["group"], {})[r["name"]] = r
    head = "| shape (out x in) | batch | best dense | dense ms |"
    sep = "|---|---|---|---|"
    for f in FORMS:
        head += f" {f} ms | speedup | paired | GB/s | % DRAM bw |"
        sep += "---|---|---|---|---|"
    lines = [head, sep]
    for cases in by_group.values():
        dense = [c for c in cases.values() if c["name"].startswith("dense") and stat in c]
        if not dense:
            continue
        best = min(dense, key=lambda c: c[stat])
        p = best["params"]
        row = f"| {p['out']}x{p['in']} | {p['batch']} | {best['name'].removeprefix('dense F.linear ')} | {best[stat] * 1e3:.3f} |"
        for f in FORMS:
            c = cases.get(f)
            if not c or stat not in c:
                row += " | | | | |"
                continue
            gbs = c["GB_per_s"] * c["median_s"] / c[stat]
            # the paired ratio is against dense bf16; rescale to the best dense path when fp32 was faster
            paired = c.get("paired_speedup")
            bf = cases.get("dense F.linear bf16")
            if paired is not None and bf and bf is not best:
                paired *= best[stat] / bf[stat]
            row += (f" {c[stat] * 1e3:.3f} | {best[stat] / c[stat]:.2f}x | "
                    f"{'' if paired is None else f'{paired:.2f}x'} | {gbs:.1f} | {100 * gbs / dram:.0f}% |")
        lines.append(row)
    return "\n".join(lines)


# ---- decode ---------------------------------------------------------------------------------------
def decode_cases(name: str, model, prompt: torch.Tensor, tokens: int) -> list[Case]:
    """Dense bf16/fp32, 2:4, 4-bit and 2:4 + 4-bit versions of `model` (2:4-pruned decoder linears, bf16)."""
    from lmsqueeze.qlinear import fake_quantize_model, quantize_model
    from lmsqueeze.sparse import sparsify_model

    group = f"decode {name}"
    params = {"prompt": prompt.shape[1], "new_tokens": tokens, "threads": torch.get_num_threads()}
    model_f32 = copy.deepcopy(model).float()
    model_24 = copy.deepcopy(model)
    n24 = len(sparsify_model(model_24))
    model_q4 = copy.deepcopy(model)
    # lm_head too (as a GGUF Q4_0 file does): with 2 of 32 layers, a dense head would be a quarter of the bytes
    nq4 = len(quantize_model(model_q4, bits=4, group_size=GROUP, sparse24=False, skip=()))
    model_s24q4 = copy.deepcopy(model)
    ns24q4 = len(quantize_model(model_s24q4, bits=4, group_size=GROUP, sparse24=True, skip=()))

    def last_logits(m):
        with torch.no_grad():
            return m(prompt).logits[0, -1].float()

    bf16_err = float((last_logits(model) - last_logits(model_f32)).abs().max())

    def validated(packed_model):
        ref_model = copy.deepcopy(packed_model)
        fake_quantize_model(ref_model)
        reference = last_logits(ref_model.float())
        del ref_model
        scale = float(reference.abs().max())

        def check(_):
            err = float((last_logits(packed_model) - reference).abs().max())
            bound = 2 * bf16_err + 1e-3 * scale
            return None if err <= bound else f"{group}: max logit error {err:.3g} > {bound:.3g} (dense bf16 {bf16_err:.3g})"
        return check

    def generate(m):
        with torch.no_grad():
            return m.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    return [
        Case("dense bf16", group, lambda: generate(model), dict(params, dtype="bf16", max_logit_err=bf16_err)),
        Case("dense fp32", group, lambda: generate(model_f32), dict(params, dtype="fp32"), baseline="dense bf16"),
        Case("2:4 bf16", group, lambda: generate(model_24), dict(params, layers=n24), baseline="dense bf16"),
        Case("4-bit g128", group, lambda: generate(model_q4), dict(params, layers=nq4), check=validated(model_q4),
             baseline="dense bf16"),
        Case("2:4 + 4-bit g128", group, lambda: generate(model_s24q4), dict(params, layers=ns24q4),
             check=validated(model_s24q4), baseline="dense bf16"),
    ]


def decode_summary(results: list[dict]) -> str:
    lines = ["| model | case | tokens/s (median) | speedup vs best dense | paired vs dense bf16 |", "|---|---|---|---|---|"]
    by_group: dict[str, list[dict]] = {}
    for r in results:
        by_group.setdefault(r["group"], []).append(r)
    for group, rs in by_group.items():
        ok = [r for r in rs if "median_s" in r]
        dense = [r for r in ok if r["name"].startswith("dense")]
        if not dense:
            continue
        best = min(r["median_s"] for r in dense)
        for r in ok:
            n = r["params"]["new_tokens"]
            paired = r.get("paired_speedup")
            lines.append(f"| {group.removeprefix('decode ')} | {r['name']} | {n / r['median_s']:.2f} | "
                         f"{best / r['median_s']:.2f}x | {'' if paired is None else f'{paired:.2f}x'} |")
    return "\n".join(lines)


def main():
    p = parser(__doc__)
    p.add_argument("--parts", default="bandwidth,gemv,decode", help="comma-separated subset of bandwidth,gemv,decode")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the Llama-2-7B-shaped model (default 2)")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per decode (default 16)")
    args = p.parse_args()
    parts = args.parts.split(",")
    out = args.output
    dram = float("nan")
    if "bandwidth" in parts or "gemv" in parts:
        args.output = out and f"{out}.bandwidth.json"
        res = run("quant-bandwidth", bandwidth_cases(args.quick), args)
        dram = res[0]["GB_per_s"]
        dram_best = dram * res[0]["median_s"] / res[0]["min_s"]
    if "gemv" in parts:
        args.output = out and f"{out}.gemv.json"
        res = run("quant-gemv", gemv_cases(args.quick), args)
        print(f"## packed kernels vs the best dense path (medians; DRAM read {dram:.1f} GB/s)\n\n"
              + gemv_summary(res, dram) + "\n")
        print(f"## the same, best of the repeats (DRAM read, best: {dram_best:.1f} GB/s)\n\n"
              + gemv_summary(res, dram_best, "min_s") + "\n")
    if "decode" in parts:
        args.output = out and f"{out}.decode.json"
        args.warmup, args.repeat, args.min_seconds = 0, 2, 0.0
        big = llama7b_shaped(args.layers)
        prune_decoder_linears(big)
        cases = decode_cases(f"llama-2-7b-shaped, {args.layers} layers", big,
                             torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(0)), args.tokens)
        res = run("quant-decode", cases, args)
        print("## decode tokens/s\n\n" + decode_summary(res) + "\n")


if __name__ == "__main__":
    main()
