"""End-to-end compression benchmark and the perplexity table.

    python bench/bench_compress.py [--ppl-windows 40] [--threads 1] [--only sparsegpt-0.5,wanda-0.5]

Each configuration runs once (a whole sequential compression is too costly to repeat on a 2-core
machine) in its own subprocess, so that its peak RSS is its own: load SmolLM2 (not timed), draw the
calibration windows, compress (time per phase from the driver), save the checkpoint (timed), check
it (exact sparsity per module, the N:M pattern, the saved checkpoint reloaded by plain transformers
gives the same logits), then, with --ppl-windows N, perplexity on the first N windows of 512 tokens
of wikitext2:test. The floor of any sequential method is timed too: two plain calibration forward
passes through the decoder (no lm_head) over the same batches.

Prints markdown tables (timing, perplexity, per-module reconstruction error of SparseGPT vs Wanda vs
magnitude at 50%) and writes JSON with bench.harness.machine_info() to bench/results/ or --output.

    python bench/bench_compress.py --phases [--phase-layers 0,15] [--repeat 3] [--dtype fp32]

The phase table (issue 22): per decoder layer, on the same calibration batches, the plain layer
forward against the driver's hooked statistics pass (compressor.driver._statistics) for each kind of
statistic (col_sq_norm: Wanda; hessian: SparseGPT, GPTQ), and the statistic kernels alone on the
captured distinct inputs. Each round runs plain, hooked, kernels back to back; the table gives the
median over rounds of wall and process CPU seconds and the paired ratio hooked / plain, plus the
FLOP floor of the Hessian statistics (one triangle: tokens * d^2 per distinct input) against the
layer's linear FLOPs, the ratio that no implementation of the same GEMM efficiency can go below.
"""
from __future__ import annotations

import argparse
import datetime as dt
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

# name -> config dict (None: the dense model, "floor": two plain forward passes); "_measure_error": False
# skips the per-module error measurement (and with it every calibration pass of a data-free method)
CONFIGS = {
    "dense": None,
    "floor": "floor",
    "sparsegpt-0.5": {"method": "sparsegpt", "sparsity": 0.5},
    "wanda-0.5": {"method": "wanda", "sparsity": 0.5},
    "magnitude-0.5": {"method": "magnitude", "sparsity": 0.5},
    "gptq-3b-g128": {"method": "gptq", "bits": 3, "group_size": 128},
    "rtn-3b-g128": {"method": "rtn", "bits": 3, "group_size": 128, "_measure_error": False},
    "magnitude-2:4": {"method": "magnitude", "sparsity": "2:4", "_measure_error": False},
    "wanda-2:4": {"method": "wanda", "sparsity": "2:4"},
    "sparsegpt-2:4": {"method": "sparsegpt", "sparsity": "2:4"},
    "magnitude-4:8": {"method": "magnitude", "sparsity": "4:8", "_measure_error": False},
    "wanda-4:8": {"method": "wanda", "sparsity": "4:8"},
    "sparsegpt-4:8": {"method": "sparsegpt", "sparsity": "4:8"},
    "sparsegpt-2:4+4b-g128": {"method": "sparsegpt", "sparsity": "2:4", "bits": 4, "group_size": 128},
}
TIMING_ROWS = ("magnitude-0.5", "wanda-0.5", "sparsegpt-0.5", "gptq-3b-g128", "rtn-3b-g128")


def _calib(tok, args):
    from lmsqueeze.data import calibration_batches

    return calibration_batches(tok, args.calib, args.nsamples, args.seqlen, args.seed)


def run_one(name: str, args) -> dict:
    """One configuration, in this process; returns a JSON-able dict."""
    import torch

    from lmsqueeze.models import load_model

    torch.set_num_threads(args.threads)
    spec = CONFIGS[name]
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype)
    out: dict = {"name": name, "load_s": time.perf_counter() - t0}
    calib = _calib(tok, args)
    if spec == "floor":
        base = model.base_model
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(2):
                for i in range(0, calib.shape[0], args.batch_size):
                    base(input_ids=calib[i:i + args.batch_size], use_cache=False)
        out["two_forwards_s"] = time.perf_counter() - t0
        return out
    if spec is not None:
        from transformers import AutoModelForCausalLM

        from lmsqueeze.compressor import compress, from_dict, save_compressed

        # data-free runs whose per-module errors no table uses skip the calibration passes altogether
        measure_error = spec.get("_measure_error", True)
        config = from_dict({k: v for k, v in spec.items() if not k.startswith("_")})
        info = {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed}
        t0 = time.perf_counter()
        report = compress(model, config, calib, batch_size=args.batch_size, calibration_info=info,
                          measure_error=measure_error)
        compress_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(dir=args.tmp_dir) as d:
            save_compressed(model, tok, Path(d) / "ckpt", report, model_name=args.model)
            reloaded = AutoModelForCausalLM.from_pretrained(Path(d) / "ckpt", dtype=model.dtype).eval()
            with torch.no_grad():
                ids = calib[:1, :128]
                diff = (reloaded(input_ids=ids).logits.float() - model(input_ids=ids).logits.float()).abs().max()
            del reloaded
        out.update(config=config.to_dict(), describe=config.describe(), compress_s=compress_s,
                   timings=report.timings, peak_rss_mib=report.peak_rss_mib, reload_max_abs_logit_diff=float(diff),
                   modules=[{"name": m.name, "sparsity": m.sparsity, "zeros": m.zeros, "recon_error": m.recon_error}
                            for m in report.modules])
        out["checks"] = _checks(model, config, report)
    if args.ppl_windows:
        from lmsqueeze.evaluation import perplexity

        t0 = time.perf_counter()
        res = perplexity(model, tok, "wikitext2:test", seqlen=512, limit=args.ppl_windows, batch_tokens=2048)
        out["ppl"] = res["ppl"]
        out["ppl_tokens"] = res["tokens"]
        out["ppl_s"] = time.perf_counter() - t0
    return out


def _checks(model, config, report) -> dict:
    """Exact sparsity per module (mask), N:M pattern in the stored weights, joint zeros kept."""
    from lmsqueeze.compressor.driver import weight_of

    mods = dict(model.named_modules())
    exact, nm_ok = True, True
    nm = getattr(config, "nm", None)
    for rec in report.modules:
        W = weight_of(mods[rec.name])
        if rec.sparsity is not None:
            want = config.fraction
            # exact count: round(s * numel) pruned (per row for N:M and Wanda: the same total)
            if abs(rec.sparsity * W.numel() - round(want * W.numel())) > 0.5:
                exact = False
        if nm:
            n, m = nm
            if not bool(((W != 0).reshape(W.shape[0], -1, m).sum(-1) <= n).all()):
                nm_ok = False
    pruned = any(rec.sparsity is not None for rec in report.modules)
    return {"exact_sparsity": exact if pruned else None, "nm_pattern": nm_ok if nm else None}


def phase_table(args) -> dict:
    """Plain vs hooked calibration forward per layer (see the module docstring); returns a JSON-able dict."""
    import statistics as stats_mod

    import torch

    from lmsqueeze.compressor import SparseGPTConfig
    from lmsqueeze.compressor.driver import (
        _capture,
        _Clock,
        _kwargs_for,
        _layer_forward,
        _statistics,
        find_decoder_layers,
        linear_modules,
        weight_of,
    )
    from lmsqueeze.kernels import col_sq_norm_update, hessian_update
    from lmsqueeze.models import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype)
    calib = _calib(tok, args)
    layers = find_decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    clock = _Clock(False)
    model.config.use_cache = False
    with torch.no_grad():
        batches = _capture(model, layers, calib, None, args.batch_size, torch.device("cpu"),
                           torch.device("cpu"), clock)
    picks = [int(i) for i in args.phase_layers.split(",")] if args.phase_layers else [0]
    tokens = int(calib.numel())
    rows = []

    def timed(fn):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - w, time.process_time() - c, out

    for li in picks:
        if not 0 <= li < len(layers):
            raise SystemExit(f"--phase-layers: layer {li} does not exist; the model has {len(layers)} (0..{len(layers) - 1})")
        # the hidden states entering layer li: run the dense layers before it
        with torch.no_grad():
            for j in range(li):
                kw_j = _kwargs_for(model, j, batches)
                for b, kw in zip(batches, kw_j):
                    b["h"] = _layer_forward(layers[j], b, kw)
            layer = layers[li]
            mods = linear_modules(layer, f"{prefix}.{li}", SparseGPTConfig(sparsity=0.5))
            kw_i = _kwargs_for(model, li, batches)
            linear_flops = 2.0 * tokens * sum(weight_of(m).numel() for m in mods.values())
            for kind in ("col_sq_norm", "hessian"):
                _, leader_of = _statistics(layer, mods, batches, kw_i, (kind,), torch.device("cpu"), _Clock(False))
                widths = [weight_of(mods[n]).shape[1] for n in mods if leader_of[n] == n]
                inputs = {}

                def grab(name):
                    def hook(mod, inp, out):
                        inputs.setdefault(name, []).append(inp[0])
                    return hook

                handles = [mods[n].register_forward_hook(grab(n)) for n in mods if leader_of[n] == n]
                for b, kw in zip(batches, kw_i):
                    _layer_forward(layer, b, kw)
                for h in handles:
                    h.remove()
                update = hessian_update if kind == "hessian" else col_sq_norm_update

                def kernels():
                    for xs in inputs.values():
                        d = xs[0].shape[-1]
                        acc = torch.zeros((d, d) if kind == "hessian" else (d,))
                        n = 0
                        for x in xs:
                            n = update(acc, x, n)

                def plain():
                    for b, kw in zip(batches, kw_i):
                        _layer_forward(layer, b, kw)

                def hooked():
                    _statistics(layer, mods, batches, kw_i, (kind,), torch.device("cpu"), _Clock(False))

                plain()  # warm-up (allocator, thread pool), not counted
                rounds = []
                for _ in range(args.repeat):
                    rounds.append((timed(plain)[:2], timed(hooked)[:2], timed(kernels)[:2]))
                inputs.clear()
                row = {"layer": li, "statistic": kind, "tokens": tokens, "distinct_inputs": widths,
                       "rounds": [{"plain": r[0], "hooked": r[1], "kernels": r[2]} for r in rounds]}
                for j, k in enumerate(("plain", "hooked", "kernels")):
                    row[f"{k}_wall_s"] = stats_mod.median(r[j][0] for r in rounds)
                    row[f"{k}_cpu_s"] = stats_mod.median(r[j][1] for r in rounds)
                row["ratio_wall"] = stats_mod.median(r[1][0] / r[0][0] for r in rounds)
                row["ratio_cpu"] = stats_mod.median(r[1][1] / r[0][1] for r in rounds)
                if kind == "hessian":
                    row["floor_ratio"] = 1.0 + tokens * sum(d * d for d in widths) / linear_flops
                rows.append(row)
                print(f"  layer {li} {kind}: hooked/plain {row['ratio_cpu']:.2f} (CPU), {row['ratio_wall']:.2f} (wall)",
                      file=sys.stderr, flush=True)
            for b, kw in zip(batches, kw_i):  # on to the next layer with this layer's dense outputs
                b["h"] = _layer_forward(layer, b, kw)
    return {"rows": rows, "tokens": tokens, "threads": args.threads, "dtype": args.dtype}


def phase_markdown(res: dict) -> str:
    lines = [f"### Calibration pass: plain vs hooked layer forward ({res['tokens']:,} tokens, {res['dtype']}, "
             f"{res['threads']} threads; median of rounds)", "",
             "| layer | statistic | plain CPU s | hooked CPU s | kernels alone CPU s | hooked / plain (CPU) | "
             "hooked / plain (wall) | FLOP floor |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['layer']} | {r['statistic']} | {r['plain_cpu_s']:.3g} | {r['hooked_cpu_s']:.3g} | "
                     f"{r['kernels_cpu_s']:.3g} | {r['ratio_cpu']:.2f} | {r['ratio_wall']:.2f} | "
                     f"{_fmt(r.get('floor_ratio'), '.2f')} |")
    return "\n".join(lines)


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def tables(results: dict) -> str:
    lines = []
    floor = results.get("floor", {}).get("two_forwards_s")
    lines += ["### Compression time (one run each)", "",
              "| method | forward | statistics | solve | propagate | error | save | total | x floor | peak RSS |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name in TIMING_ROWS:
        r = results.get(name)
        if not r or "timings" not in r:
            continue
        t = r["timings"]
        total = sum(t.values())
        lines.append(f"| {r['describe']} | " + " | ".join(f"{t[p]:.1f} s" for p in
                                                            ("forward", "statistics", "solve", "propagate", "error", "save"))
                     + f" | {total:.1f} s | {_fmt(total / floor if floor else None, '.2f')} | {r['peak_rss_mib']:.0f} MiB |")
    if floor:
        lines.append(f"| floor: two plain calibration forwards (decoder, no lm_head) | | | | | | | {floor:.1f} s | 1.00 | |")
    if any("ppl" in r for r in results.values()):
        lines += ["", "### Perplexity on wikitext2:test (512-token windows; see ppl tokens)", "",
                  "| config | ppl | ppl tokens | exact sparsity | N:M pattern | reload max abs logit diff |",
                  "|---|---|---|---|---|---|"]
        for name, r in results.items():
            if "ppl" not in r:
                continue
            c = r.get("checks", {})
            lines.append(f"| {r.get('describe', name)} | {r['ppl']:.3f} | {r['ppl_tokens']} | "
                         f"{_fmt(c.get('exact_sparsity'), '')} | {_fmt(c.get('nm_pattern'), '')} | "
                         f"{_fmt(r.get('reload_max_abs_logit_diff'), '.3g')} |")
    trio = [results.get(n) for n in ("sparsegpt-0.5", "wanda-0.5", "magnitude-0.5")]
    if all(r and "modules" in r for r in trio):
        s, w, m = ({x["name"]: x["recon_error"] for x in r["modules"]} for r in trio)
        names = list(s)
        below_both = sum(s[n] < w[n] and s[n] < m[n] for n in names)
        lines += ["", f"### Per-module relative reconstruction error at 50% unstructured "
                      f"(SparseGPT below both Wanda and magnitude in {below_both} of {len(names)} modules)", "",
                  "| module type | sparsegpt (mean) | wanda (mean) | magnitude (mean) | sparsegpt lowest |", "|---|---|---|---|---|"]
        kinds = sorted({n.split(".")[-2] + "." + n.split(".")[-1] for n in names})
        for k in kinds:
            sel = [n for n in names if n.endswith(k)]
            lines.append(f"| {k} | {sum(s[n] for n in sel) / len(sel):.4g} | {sum(w[n] for n in sel) / len(sel):.4g} | "
                         f"{sum(m[n] for n in sel) / len(sel):.4g} | "
                         f"{sum(s[n] < w[n] and s[n] < m[n] for n in sel)}/{len(sel)} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--calib", default="wikitext2:valid")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward (default 8)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--ppl-windows", type=int, default=0, help="perplexity on this many 512-token windows of "
                                                              "wikitext2:test (0: no perplexity)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    p.add_argument("--tmp-dir", default=None, help="where checkpoints are written (and deleted)")
    p.add_argument("--output", default=None, help="JSON path (default bench/results/compress-<time>.json)")
    p.add_argument("--merge", nargs="+", default=None, help="print the tables of earlier JSON results (merged)")
    p.add_argument("--phases", action="store_true", help="the plain vs hooked calibration pass table (issue 22) "
                                                            "instead of the whole-run table")
    p.add_argument("--phase-layers", default=None, help="--phases: comma-separated decoder layers (default 0)")
    p.add_argument("--repeat", type=int, default=3, help="--phases: rounds of plain, hooked, kernels (default 3)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.merge:
        merged = {}
        for path in args.merge:
            merged.update(json.loads(Path(path).read_text())["results"])
        print(tables({n: merged[n] for n in CONFIGS if n in merged}))
        return
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    os.environ.setdefault("LMSQUEEZE_QUIET", "1")
    if args.phases:
        res = phase_table(args)
        out = Path(args.output) if args.output else (
            ROOT / "bench" / "results" / f"compress-phases-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        _write(out, args, {"phases": res})
        print(phase_markdown(res))
        print(f"JSON: {out}", file=sys.stderr)
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)))
        return
    names = args.only.split(",") if args.only else list(CONFIGS)
    results = {}
    out = Path(args.output) if args.output else (
        ROOT / "bench" / "results" / f"compress-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name not in CONFIGS:
            raise SystemExit(f"unknown config '{name}'; valid: {', '.join(CONFIGS)}")
        if name == "dense" and not args.ppl_windows:
            continue
        cmd = [sys.executable, __file__, "--one", name] + [a for a in sys.argv[1:] if not a.startswith("--only")
                                                           and a not in (args.only or "",)]
        cmd += ["--threads", str(args.threads)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            results[name] = {"name": name, "error": proc.stderr.strip().splitlines()[-1:] or ["no output"]}
        else:
            results[name] = json.loads(line[len("RESULT "):])
        results[name]["wall_s"] = time.perf_counter() - t0
        r = results[name]
        status = r["error"] if "error" in r else f"{r['wall_s']:.0f} s" + (f", ppl {r['ppl']:.3f}" if "ppl" in r else "")
        print(f"  {name}: {status}", file=sys.stderr, flush=True)
        _write(out, args, results)
    print(tables(results))
    print(f"JSON: {out}", file=sys.stderr)


def _write(out: Path, args, results: dict) -> None:
    from bench.harness import SCHEMA, machine_info

    payload = {"schema": SCHEMA, "title": "compress", "machine": machine_info(),
               "settings": {k: v for k, v in vars(args).items() if k != "one"}, "results": results}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
