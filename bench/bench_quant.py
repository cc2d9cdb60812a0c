"""Low-bit and 2:4 + low-bit inference against the best dense path: GEMV/GEMM per layer shape, then decode.

    python bench/bench_quant.py [--parts bandwidth,gemv,decode,llamacpp] [--quick] [--layers 2] [--tokens 16]
                                [--paired 15] [--llama-python /work/llama-venv/bin/python]

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
           validated first: its last-position logits against its fake-quantized dense model in fp32
           (whose packed layers round their input as the int8-activation kernels do, where those apply),
           no further off than 2x (the dense bf16 model's distance from its fp32 copy + what int8
           activations move the fp32 logits by), plus 0.1% of scale.
llamacpp   the outside anchor: the same 2:4-pruned Llama-2-7B-shaped model written as a pure Q4_0 GGUF
           (every matrix, the embedding and the head too; norms fp32) and decoded greedily by llama.cpp
           with the same prompt, tokens and thread count (bench/llamacpp_decode.py, run by the anchor
           environment's Python: --llama-python, default /work/llama-venv/bin/python; its docstring says
           how to install it). Skipped with the reason when that environment is missing. Checked first:
           llama.cpp's last prompt-position logits against the dense fp32 model's with every weight
           rounded through Q4_0 by gguf (cosine >= 0.999, the same arg max; measured 0.99985), which catches a wrong tensor
           layout (the RoPE row order of q/k) in the file.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_sparse24 import bandwidth_cases, llama7b_shaped, prune_decoder_linears
from bench.harness import ROOT, Case, parser, run
from lmsqueeze.kernels import nm_mask
from lmsqueeze.kernels.quant import (
    dequantize,
    int8_act_applies,
    quant_act,
    quant_matmul,
    quant_pack,
    quantize_act_int8,
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


def _x_seen(x: torch.Tensor, packed) -> torch.Tensor:
    """x [rows, in] as the C++ kernel multiplies it: rounded to int8 blocks where int8 activations apply."""
    if quant_act() == "int8" and int8_act_applies(packed, x.shape[0]):
        return quantize_act_int8(x.float(), getattr(packed, "perm", None))
    return x


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

            def checker(Wref, x=x, packed=None):
                # the packed kernels multiply x as rounded by int8 activations where those apply
                xs = _x_seen(x, packed) if packed is not None else x
                expected = F.linear(xs.float(), Wref.float()).to(torch.bfloat16)
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
                              dict(params, dtype="bf16", bits=4, group_size=GROUP), check=checker(dequantize(q4), packed=q4),
                              bytes=q4.nbytes() + xb, flops=flops, baseline="dense F.linear bf16"))
            cases.append(Case("2:4 + 4-bit g128", group, lambda x=x, p=s24q4: sparse24_quant_matmul(x, p, backend="cpu"),
                              dict(params, dtype="bf16", bits=4, group_size=GROUP), check=checker(dequantize(s24q4), packed=s24q4),
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
        rows = prompt.shape[1]
        # layers whose kernel rounds x to int8 for the prompt's rows: the reference rounds their input alike
        rounded = {n for n, m in packed_model.named_modules()
                   if hasattr(m, "packed") and quant_act() == "int8" and int8_act_applies(m.packed, rows)}
        fake_quantize_model(ref_model)
        ref_model.float()
        exact = last_logits(ref_model)
        for n in rounded:
            ref_model.get_submodule(n).register_forward_pre_hook(
                lambda _, a: (quantize_act_int8(a[0].reshape(-1, a[0].shape[-1]).float()).reshape(a[0].shape),))
        reference = last_logits(ref_model)
        del ref_model
        scale = float(reference.abs().max())
        # what int8 activations move the fp32 logits by: the bf16 model's activations round to other int8
        # neighbours than the fp32 reference's, which re-rounds up to that much (measured: 2.4x bf16's error)
        i8_err = float((reference - exact).abs().max())

        def check(_):
            err = float((last_logits(packed_model) - reference).abs().max())
            bound = 2 * (bf16_err + i8_err) + 1e-3 * scale
            return None if err <= bound else (f"{group}: max logit error {err:.3g} > {bound:.3g} (dense bf16 "
                                              f"{bf16_err:.3g}, int8 activations {i8_err:.3g})")
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
    lines = ["| model | case | tokens/s (median) | speedup vs best dense | paired vs dense bf16 | tokens/s vs llama.cpp Q4_0 |",
             "|---|---|---|---|---|---|"]
    by_group: dict[str, list[dict]] = {}
    for r in results:
        by_group.setdefault(r["group"], []).append(r)
    for group, rs in by_group.items():
        ok = [r for r in rs if "median_s" in r]
        dense = [r["median_s"] for r in ok if r["name"].startswith("dense")]
        best = min(dense) if dense else None
        anchor = next((r["median_s"] for r in ok if r["name"] == "llama.cpp Q4_0"), None)
        for r in ok:
            n = r["params"]["new_tokens"]
            paired, t = r.get("paired_speedup"), r["median_s"]
            lines.append(f"| {group.removeprefix('decode ')} | {r['name']} | {n / r['median_s']:.2f} | "
                         f"{'' if best is None else f'{best / t:.2f}x'} | "
                         f"{'' if paired is None else f'{paired:.2f}x'} | "
                         f"{'' if anchor is None else f'{anchor / t:.2f}x'} |")
    return "\n".join(lines)


# ---- llama.cpp anchor -----------------------------------------------------------------------------
LLAMA_PYTHON = "/work/llama-venv/bin/python"


def _rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k weight [heads * head_dim, in] from Hugging Face's rotate-half row order to llama.cpp's
    interleaved pairs: HF rotates row i with row i + head_dim/2 of its head, llama.cpp rows 2i, 2i+1."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_gguf_q4_0(model, path: Path) -> int:
    """Write a Hugging Face LlamaForCausalLM as a pure Q4_0 GGUF file (llama.cpp's tensor names; every
    2-D weight Q4_0 in blocks of 32 with one fp16 scale, norms fp32; a synthetic 32000-piece
    SentencePiece-style vocabulary, enough for llama.cpp to load; the decode feeds token ids).
    Returns the bytes written. GGUF and Q4_0: ggml's gguf-py (the `gguf` package) and its spec
    (github.com/ggml-org/ggml/blob/master/docs/gguf.md)."""
    import gguf
    import numpy as np

    c = model.config
    if c.model_type != "llama":
        raise ValueError(f"write_gguf_q4_0 writes Llama models, got model_type={c.model_type}")
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("lmsqueeze llama-2-7b-shaped random")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_tokenizer_model("llama")
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    pieces += [f"\u2581t{i}" for i in range(c.vocab_size - len(pieces))]
    types += [gguf.TokenType.NORMAL] * (c.vocab_size - len(types))
    w.add_token_list(pieces)
    w.add_token_scores([-float(i) for i in range(c.vocab_size)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def q4_0(name, t):
        a = t.detach().float().numpy()
        w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q4_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q4_0)

    def f32(name, t):
        w.add_tensor(name, np.ascontiguousarray(t.detach().float().numpy()))

    m = model.model
    q4_0("token_embd.weight", m.embed_tokens.weight)
    f32("output_norm.weight", m.norm.weight)
    q4_0("output.weight", model.lm_head.weight)
    for i, layer in enumerate(m.layers):
        a, f = layer.self_attn, layer.mlp
        f32(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        f32(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        q4_0(f"blk.{i}.attn_q.weight", _rope_rows(a.q_proj.weight, c.num_attention_heads))
        q4_0(f"blk.{i}.attn_k.weight", _rope_rows(a.k_proj.weight, c.num_key_value_heads))
        q4_0(f"blk.{i}.attn_v.weight", a.v_proj.weight)
        q4_0(f"blk.{i}.attn_output.weight", a.o_proj.weight)
        q4_0(f"blk.{i}.ffn_gate.weight", f.gate_proj.weight)
        q4_0(f"blk.{i}.ffn_up.weight", f.up_proj.weight)
        q4_0(f"blk.{i}.ffn_down.weight", f.down_proj.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path.stat().st_size


def _q4_0_reference_logits(model, prompt: torch.Tensor) -> torch.Tensor:
    """Last-position logits [vocab] of `model` in fp32 with every 2-D weight rounded through Q4_0 (gguf's
    own quantize/dequantize): what llama.cpp should compute from the file, up to its Q8_0 activations."""
    import gguf

    ref = copy.deepcopy(model).float()
    q = gguf.GGMLQuantizationType.Q4_0
    with torch.no_grad():
        for prm in ref.parameters():
            if prm.dim() == 2:
                prm.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(prm.numpy(), q), q)))
        return ref(prompt).logits[0, -1].float()


def llamacpp_anchor(model, prompt: torch.Tensor, tokens: int, python: str, workdir: Path,
                    repeat: int = 3) -> dict:
    """Decode `model` written as Q4_0 GGUF with llama.cpp (bench/llamacpp_decode.py under `python`).

    Returns {"skipped": reason} when the anchor environment is missing or cannot load the file, else
    the runner's JSON plus tokens_per_s (median) and its check against the dense fp32 logits."""
    import subprocess

    if not Path(python).exists():
        return {"skipped": f"no llama.cpp anchor environment at {python} (see bench/llamacpp_decode.py to install "
                           "one, or pass --llama-python)"}
    probe = subprocess.run([python, "-c", "import ctransformers"], capture_output=True, text=True)
    if probe.returncode:
        return {"skipped": f"{python} cannot import ctransformers: {probe.stderr.strip().splitlines()[-1:]}"}
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"llama7b-shaped-{model.config.num_hidden_layers}l-q4_0.gguf"
    size = write_gguf_q4_0(model, path)
    threads = torch.get_num_threads()
    cmd = [python, str(Path(__file__).resolve().parent / "llamacpp_decode.py"), str(path),
           "--prompt", ",".join(str(int(t)) for t in prompt[0]), "--tokens", str(tokens),
           "--threads", str(threads), "--repeat", str(repeat)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    path.unlink()
    if r.returncode:
        return {"skipped": f"llama.cpp failed on the GGUF file: {r.stderr.strip()[-500:]}"}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    logits = torch.tensor(res.pop("logits"))
    ref = _q4_0_reference_logits(model, prompt)
    res["cosine_vs_q4_0_fp32"] = float(F.cosine_similarity(logits, ref, dim=0))
    res["argmax_agrees"] = int(logits.argmax()) == int(ref.argmax())
    res["gguf_bytes"] = size
    res["threads"] = threads
    times = sorted(res["times_s"])
    res["median_s"] = times[len(times) // 2]
    res["tokens_per_s"] = tokens / res["median_s"]
    if res["cosine_vs_q4_0_fp32"] < 0.999 or not res["argmax_agrees"]:
        res["error"] = (f"llama.cpp's logits disagree with the Q4_0-rounded fp32 model's (cosine "
                        f"{res['cosine_vs_q4_0_fp32']:.4f}, same arg max: {res['argmax_agrees']}): the GGUF layout is wrong")
    return res


def main():
    p = parser(__doc__)
    p.add_argument("--parts", default="bandwidth,gemv,decode,llamacpp",
                   help="comma-separated subset of bandwidth,gemv,decode,llamacpp")
    p.add_argument("--llama-python", default=LLAMA_PYTHON,
                   help=f"Python of the llama.cpp anchor environment (default {LLAMA_PYTHON})")
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
    if "decode" in parts or "llamacpp" in parts:
        args.output = out and f"{out}.decode.json"
        args.warmup, args.repeat, args.min_seconds = 0, 2, 0.0
        big = llama7b_shaped(args.layers)
        prune_decoder_linears(big)
        prompt = torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(0))
        name = f"llama-2-7b-shaped, {args.layers} layers"
        res = run("quant-decode", decode_cases(name, big, prompt, args.tokens), args) if "decode" in parts else []
        if "llamacpp" in parts:
            anchor = llamacpp_anchor(big, prompt, args.tokens, args.llama_python,
                                     Path(out).parent if out else ROOT / "bench" / "results")
            if "skipped" in anchor:
                print(f"llama.cpp anchor skipped: {anchor['skipped']}", file=sys.stderr)
            elif "error" in anchor:
                print(f"llama.cpp anchor failed its check: {anchor['error']}", file=sys.stderr)
            else:
                res.append({"name": "llama.cpp Q4_0", "group": f"decode {name}", "median_s": anchor["median_s"],
                            "params": {"new_tokens": args.tokens, "threads": anchor["threads"],
                                       "engine": anchor["engine"], "cosine_vs_q4_0_fp32": anchor["cosine_vs_q4_0_fp32"],
                                       "gguf_bytes": anchor["gguf_bytes"]}})
            if out:
                Path(f"{out}.llamacpp.json").write_text(json.dumps(anchor, indent=2))
        print("## decode tokens/s\n\n" + decode_summary(res) + "\n")


if __name__ == "__main__":
    main()
