"""Scale out: calibration time with 1 vs 2 gloo processes, and peak memory with --offload disk.

    scaling  `torchrun --nproc-per-node P -m lmsqueeze compress` for P = 1, 2 (one thread per process,
             so P processes use P cores), on SmolLM2-135M; compared: how many mask entries of the
             2-process checkpoint differ from the 1-process one (SparseGPT near-ties; see _compare). Reported: the compress
             phases' time (calibration + solve + propagate, from lmsqueeze.json) and the wall time of
             the whole command (process start and model load included).
    offload  a randomly initialised Llama-shaped model larger than the memory budget (default 12
             layers of d=2048, ff=5632, fp32: 2.5 GB, budget 1.5 GB) compressed with Wanda in a fresh
             process with --offload none and with --offload disk; the disk run's layers are written
             to safetensors one at a time from a meta-device model, so the model is never whole in
             memory. Reported: peak resident memory (VmHWM) of each process against the budget;
             validated: the two checkpoints are identical.

Timings are from a shared 2-core machine: run it twice. Results: markdown on stdout, JSON in
bench/results/ (or --output).
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

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import SCHEMA, machine_info  # noqa: E402


def _env(threads: int = 1) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), LMSQUEEZE_QUIET="1")


# ---- scaling --------------------------------------------------------------------------------------

def run_scaling(args, work: Path) -> list[dict]:
    rows = []
    outs = {}
    for procs in (1, 2):
        out = work / f"scale-{procs}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               "-m", "lmsqueeze", "--quiet", "compress", "--model", args.model, "--method", args.method,
               "--sparsity", "0.5", "--dtype", "fp32", "--calib", args.calib, "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size), "--output-dir", str(out)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=_env(1), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"{procs} process(es) failed:\n{res.stderr[-3000:]}")
        meta = json.loads((out / "lmsqueeze.json").read_text())
        t = meta["timings"]
        compress_s = sum(v for k, v in t.items() if k != "save")
        rows.append({"procs": procs, "compress_s": compress_s, "wall_s": wall,
                     "phases": {k: round(v, 2) for k, v in t.items()},
                     "peak_rss_mib": meta["peak_rss_mib"]})
        outs[procs] = out
    rows[1]["check"] = _compare(outs[1], outs[2], exact=False)
    rows[1]["speedup"] = rows[0]["compress_s"] / rows[1]["compress_s"]
    return rows


def _compare(a: Path, b: Path, exact: bool) -> str:
    import torch
    from safetensors.torch import load_file

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys():
        return "FAILED: different tensors"
    worst, flipped, total = 0.0, 0, 0
    for k in ta:
        flipped += int(((ta[k] == 0) != (tb[k] == 0)).sum())
        total += ta[k].numel()
        if exact and not torch.equal(ta[k], tb[k]):
            return f"FAILED: {k} differs"
        diff = (ta[k].float() - tb[k].float()).abs().max().item()
        worst = max(worst, diff / max(ta[k].float().abs().max().item(), 1e-30))
    if worst == 0:
        return "identical"
    # SparseGPT picks each block's mask from OBS-updated weights: near-ties fall either way under another
    # fp32 summation order and the flips grow layer by layer through the propagated activations. Measured
    # on SmolLM2 (3 layers, 8 x 128 tokens): one process with batch size 4 vs 8 differs as much as 1 vs 2
    # processes (0 flips in layer 0's q/k/v, ~1-3% of entries by layer 2), so this is reported, not failed.
    return f"mask entries differing {flipped} of {total} ({flipped / total:.1e}), max rel. weight diff {worst:.1e}"


# ---- offload ----------------------------------------------------------------------------------------

def big_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                       num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 128,
                       vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=False,
                       bos_token_id=256, eos_token_id=257, pad_token_id=258)


def _init_(module, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norms
            else:
                p.normal_(0.0, 0.02, generator=g)


def offload_worker(args) -> None:
    """One compress in this process; prints the JSON of what it measured."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmsqueeze.compressor import WandaConfig, compress, save_compressed
    from lmsqueeze.compressor.driver import find_decoder_layers
    from lmsqueeze.compressor.offload import DiskOffload

    torch.set_num_threads(args.threads)
    config = big_config(args)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    layers = find_decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    # outside the layers (embeddings, final norm, head): real tensors in memory
    outside = [m for m in model.model.children() if m is not layers] + [model.lm_head]
    for i, m in enumerate(outside):
        m.to_empty(device="cpu")
        _init_(m, 1000 + i)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # inv_freq computed on CPU
    offload = None
    if args.worker == "disk":
        offload = DiskOffload(layers, prefix, Path(args.work) / "layers")
    for i, layer in enumerate(layers):
        layer.to_empty(device="cpu")
        _init_(layer, i)
        if offload is not None:
            offload.write_layer(i)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 256, (args.offload_samples, args.offload_seqlen), generator=g)
    report = compress(model, WandaConfig(sparsity=0.5), calib, batch_size=args.offload_samples, offload=offload)
    save_compressed(model, None, Path(args.work) / f"out-{args.worker}", report, offload=offload)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"mode": args.worker, "params": params, "model_mib": params * 4 / 2 ** 20,
                      "vmhwm_mib": hwm, "report_peak_rss_mib": report.peak_rss_mib, "build_s": build_s,
                      "compress_s": sum(v for k, v in report.timings.items() if k != "save"),
                      "save_s": report.timings.get("save", 0.0)}))


def run_offload(args, work: Path) -> list[dict]:
    rows = []
    for mode in ("none", "disk"):
        cmd = [sys.executable, __file__, "--worker", mode, "--work", str(work)] + _shape_args(args)
        res = subprocess.run(cmd, env=_env(args.threads), capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"offload {mode} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    rows[1]["check"] = _compare(work / "out-none", work / "out-disk", exact=True)
    return rows


def _shape_args(args) -> list[str]:
    return ["--layers", str(args.layers), "--hidden", str(args.hidden), "--ffn", str(args.ffn),
            "--offload-samples", str(args.offload_samples), "--offload-seqlen", str(args.offload_seqlen),
            "--threads", str(args.threads), "--budget-mib", str(args.budget_mib)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="all", choices=["all", "scaling", "offload"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--calib", default="wikitext2:valid")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--offload-samples", type=int, default=8)
    p.add_argument("--offload-seqlen", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget-mib", type=float, default=1536)
    p.add_argument("--output", default=None)
    p.add_argument("--worker", default=None, choices=["none", "disk"], help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        offload_worker(args)
        return
    payload = {"schema": SCHEMA, "title": "bench_scale", "machine": machine_info(), "settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        if args.part in ("all", "scaling"):
            rows = run_scaling(args, work)
            payload["scaling"] = rows
            print(f"## Calibration scaling: {args.method} 50% on {args.model}, {args.nsamples} x {args.seqlen} "
                  f"tokens, gloo, 1 thread per process\n")
            print("| processes | compress phases | wall (incl. start, load, save) | speedup | peak RSS / rank | check |")
            print("|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['procs']} | {r['compress_s']:.1f} s | {r['wall_s']:.1f} s | "
                      f"{r.get('speedup', 1.0):.2f}x | {r['peak_rss_mib']:.0f} MiB | {r.get('check', 'reference')} |")
            print()
        if args.part in ("all", "offload"):
            rows = run_offload(args, work)
            payload["offload"] = rows
            print(f"## Offload: random Llama-shaped model, {args.layers} layers d={args.hidden} ff={args.ffn} fp32 "
                  f"({rows[0]['model_mib']:.0f} MiB), wanda 50%, budget {args.budget_mib:.0f} MiB\n")
            print("| offload | peak RSS (VmHWM) | within budget | compress | save | check |")
            print("|---|---|---|---|---|---|")
            for r in rows:
                ok = "yes" if r["vmhwm_mib"] <= args.budget_mib else "no"
                print(f"| {r['mode']} | {r['vmhwm_mib']:.0f} MiB | {ok} | {r['compress_s']:.1f} s | "
                      f"{r['save_s']:.1f} s | {r.get('check', 'reference')} |")
            print()
    out = Path(args.output) if args.output else ROOT / "bench" / "results" / f"bench_scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"JSON: {out}", file=sys.stderr)
    bad = [r for part in ("scaling", "offload") for r in payload.get(part, []) if "FAILED" in str(r.get("check", ""))]
    if bad:
        raise SystemExit(f"{len(bad)} case(s) failed validation")


if __name__ == "__main__":
    main()
