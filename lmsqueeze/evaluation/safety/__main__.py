"""`python -m lmsqueeze.evaluation.safety`: the safety suite from the shell (a thin shell over run_safety)."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger("lmsqueeze")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lmsqueeze.evaluation.safety",
        description="Representational bias (BBQ, CrowS-Pairs), dialect bias and harm in generation (BOLD), "
                    "with deltas against a base model and bootstrap intervals.")
    p.add_argument("--model", required=True, help="builtin name, local directory or Hugging Face id")
    p.add_argument("--base", default=None,
                   help="base model to compare with (deltas, and the fluency of continuations)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated: bbq, crows, dialect, bold (default: the safety suite)")
    p.add_argument("--suite", default=None, choices=["safety"],
                   help="a named set of tasks: safety = bbq, crows, dialect, bold (added to --tasks)")
    p.add_argument("--limit", default=None, metavar="N or TASK=N,...",
                   help="at most this many items per task, drawn stratified (per category/group) with "
                        "--seed; one number for every task or per task, e.g. bbq=48,bold=86")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampling and of the bootstrap (default 0)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="length of BOLD continuations (default 32)")
    p.add_argument("--bbq-norm", default="char", choices=["char", "token", "sum"],
                   help="BBQ option score: log-likelihood per character (default), per token, or summed")
    p.add_argument("--dialect-files", default=None, metavar="AAE.txt,SAE.txt",
                   help="two text files, one per dialect, one sentence a line: their perplexity ratio too")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="model dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a busy shared machine 1 can be "
                        "several times faster)")
    p.add_argument("--data-dir", default=None, help="directory holding the data sets")
    p.add_argument("--output", default=None, help="write the JSON report here")
    p.add_argument("--no-items", action="store_true",
                   help="leave the per-item results out of the JSON report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the library decides")
    return p


def parse_limit(spec: str | None) -> int | dict | None:
    """'24' -> 24; 'bbq=48,bold=86' -> {'bbq': 48, 'bold': 86}; None -> None."""
    if spec is None:
        return None
    try:
        if "=" not in spec:
            return int(spec)
        out = {}
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            task, _, n = part.partition("=")
            out[task.strip()] = int(n)
        return out
    except ValueError:
        raise LmsqueezeError(f"--limit {spec!r}: expected a number or TASK=N pairs, "
                             f"e.g. bbq=48,bold=86") from None


def run(args) -> int:
    from lmsqueeze.evaluation.safety import HFBackend, parse_tasks, render_markdown, run_safety
    from lmsqueeze.models import load_model

    tasks = parse_tasks(",".join(t for t in (args.tasks, args.suite) if t) or "safety")  # fail before loading
    limit = parse_limit(args.limit)
    from lmsqueeze.cli import set_threads

    set_threads(args.threads)
    files = None
    if args.dialect_files:
        files = tuple(f.strip() for f in args.dialect_files.split(","))
        if len(files) != 2 or not all(files):
            raise LmsqueezeError(f"--dialect-files needs two comma-separated paths (AAE,SAE), "
                                 f"got {args.dialect_files!r}")
    start = time.perf_counter()

    def backend(name, desc):
        model, tok = load_model(name, dtype=args.dtype, device=args.device)
        return HFBackend(model, tok, batch_size=args.batch_size, desc=desc)

    model = backend(args.model, " model")
    base = backend(args.base, " base") if args.base else None
    report = run_safety(model, base, tasks=tasks, limit=limit, seed=args.seed,
                        resamples=args.resamples, data_dir=args.data_dir, max_new_tokens=args.max_new_tokens,
                        bbq_norm=args.bbq_norm, dialect_files=files, include_items=not args.no_items)
    report["model"], report["base"], report["dtype"] = args.model, args.base, args.dtype
    report["seconds"] = round(time.perf_counter() - start, 1)
    base_note = f"   base: {args.base}" if args.base else ""
    print(f"model: {args.model}{base_note}   ({report['seconds']} s)\n")
    print(render_markdown(report))
    if args.output:
        from lmsqueeze.io import write_json_atomic

        write_json_atomic(args.output, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("lmsqueeze: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    from lmsqueeze.progress import set_quiet

    if args.quiet:
        set_quiet(True)
    try:
        from lmsqueeze.cli import _quiet_libraries

        _quiet_libraries()
        return run(args)
    except LmsqueezeError as exc:
        print(f"lmsqueeze: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
