"""Kernel benchmarks: every fast path against its reference, validated first.

    python bench/bench_kernels.py [--ops col_sq_norm] [--quick]
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


OPS = {"col_sq_norm": col_sq_norm_cases}


def main():
    p = parser(__doc__)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of: {', '.join(OPS)}")
    args = p.parse_args()
    cases = []
    for op in args.ops.split(","):
        cases += OPS[op](args.quick)
    run("kernels", cases, args)


if __name__ == "__main__":
    main()
