"""Kernel benchmarks: every fast path against its reference, validated first.

    python bench/bench_kernels.py [--ops col_sq_norm,obs] [--quick] [--threads N]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import Case, parser, run
from lmsqueeze.kernels import col_sq_norm_update, col_sq_norm_update_ref
from lmsqueeze.testing import compare


def col_sq_norm_cases(quick: bool) -> list[Case]:
    cases = []
    tokens = 2048 if quick else 16384
    backends = ["cuda", "triton"] if torch.cuda.is_available() else ["cpu"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for d in (576, 1536, 4096):
        x = torch.randn(tokens, d, device=device).to(torch.bfloat16)
        expected = torch.zeros(d, device=device)
        col_sq_norm_update_ref(expected, x, 0)
        s = torch.zeros(d, device=device)
        params = {"tokens": tokens, "d": d, "dtype": "bf16"}
        group = f"col_sq_norm d={d}"

        def reset(s=s):
            s.zero_()

        def checker(_, s=s, expected=expected):
            return compare(s, expected, atol=1e-5 * float(expected.max()), rtol=1e-5)

        cases.append(Case("ref (fp32 upcast)", group, lambda x=x, s=s: col_sq_norm_update_ref(s, x, 0), params,
                          check=checker, bytes=x.numel() * 2, setup=reset))
        for b in backends:
            cases.append(Case(b, group, lambda x=x, s=s, b=b: col_sq_norm_update(s, x, 0, backend=b), params,
                              check=checker, bytes=x.numel() * 2, baseline="ref (fp32 upcast)", setup=reset))
        copy_src = torch.empty_like(x)
        cases.append(Case("memory copy of x (bandwidth floor)", group, lambda x=x, c=copy_src: c.copy_(x), params,
                          bytes=x.numel() * 4))
    return cases


def obs_cases(quick: bool) -> list[Case]:
    """obs_update per layer shape and mode: ref (the published loop) vs the fused CPU sweep.

    The reference's own first call (untimed, as for every case) is kept and the fast path is
    validated against it: identical mask, weights within 1e-5 * max|W| (see test_obs_fast.py).
    The 4096 x 4096 reference takes tens of seconds per call: run with --warmup 0 --repeat 1.
    """
    from lmsqueeze.kernels.obs import PruneSpec, QuantSpec, obs_update, obs_update_ref

    cases = []
    shapes = ((576, 1536), (1536, 576)) if quick else ((576, 1536), (1536, 576), (4096, 4096))
    modes = {"unstructured 50%": (PruneSpec(sparsity=0.5), None), "2:4": (PruneSpec(n=2, m=4), None),
             "gptq 4b g128": (None, QuantSpec(bits=4, group_size=128))}
    g = torch.Generator().manual_seed(0)
    for rows, cols in shapes:
        W = torch.randn(rows, cols, generator=g)
        X = torch.randn(2048, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
                                                    / cols ** 0.5)
        H = 2 * X.T @ X / X.shape[0]
        H += 0.01 * torch.diag(H).mean() * torch.eye(cols)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        del X, H
        for mode, (prune, quant) in modes.items():
            group = f"obs {rows}x{cols} {mode}"
            params = {"rows": rows, "cols": cols, "mode": mode, "blocksize": 128}
            expected = {}

            def keep_ref(out, expected=expected):
                expected["out"] = out
                return None

            def checker(out, expected=expected):
                ref = expected["out"]
                if (out[1] is None) != (ref[1] is None) or (ref[1] is not None and not torch.equal(out[1], ref[1])):
                    return "masks differ from the reference"
                return compare(out[0], ref[0], atol=1e-5 * float(ref[0].abs().max()), rtol=1e-5)

            flops = 2.0 * rows * cols * cols  # trailing GEMMs ~ rows * cols^2 multiply-adds, in-block work aside
            cases.append(Case("ref (published loop)", group,
                              lambda W=W, H=Hinv, p=prune, q=quant: obs_update_ref(W, H, prune=p, quant=q),
                              params, check=keep_ref, flops=flops))
            cases.append(Case("cpu (fused C++)", group,
                              lambda W=W, H=Hinv, p=prune, q=quant: obs_update(W, H, prune=p, quant=q, backend="cpu"),
                              params, check=checker, flops=flops, baseline="ref (published loop)"))
    return cases


OPS = {"col_sq_norm": col_sq_norm_cases, "obs": obs_cases}


def main():
    p = parser(__doc__)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of: {', '.join(OPS)}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = []
    for op in args.ops.split(","):
        cases += OPS[op](args.quick)
    run("kernels", cases, args)


if __name__ == "__main__":
    main()
