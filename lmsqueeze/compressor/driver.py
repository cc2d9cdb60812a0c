"""One sequential driver for every Hugging Face decoder-only model.

    capture   run the model on the calibration batches until the first decoder layer, which a
              forward pre-hook stops with a sentinel: its hidden states and every keyword the model
              gave it (attention mask, position ids, rotary embeddings, ...) are kept per batch
    per layer move the layer to the compute device; hook its linear modules and run the calibration
              forward (statistics: one per distinct input tensor, so q/k/v share one Hessian and
              gate/up another); compress each module; run the forward again so that the next layer
              sees the compressed layer's outputs (and measure each module's output error on the
              way); move the layer back home

Memory: the model stays where it is (e.g. CPU) while one layer sits on the compute device, with the
calibration activations of that one layer and its statistics. Padding never enters a statistic or
an error: hooks pass the token mask to the kernels. Decoder layers are found generically: the
nn.ModuleList holding most of the model's parameters. GPT-2's Conv1D keeps its weight as [in, out];
the driver hands the methods the [out, in] view.
"""
from __future__ import annotations

import logging
import math
import resource
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmsqueeze import distributed as ddp
from lmsqueeze.compressor.calibration import calibration_tokens
from lmsqueeze.compressor.methods import check_finite, check_result
from lmsqueeze.compressor.methods import get as get_method
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels import col_sq_norm_update, hessian_finalize, hessian_update
from lmsqueeze.models import check_sequence_length
from lmsqueeze.progress import progress

log = logging.getLogger("lmsqueeze")

PHASES = ("forward", "statistics", "solve", "propagate", "error", "save")


class _Captured(Exception):
    """Raised by the pre-hook on the first decoder layer: the inputs are in hand, stop the forward."""


@dataclass
class ModuleRecord:
    name: str
    shape: list[int]                # [out, in]
    sparsity: float | None          # fraction pruned by the mask (None: nothing pruned)
    zeros: float                    # fraction of stored weights that are exactly 0
    recon_error: float | None       # sum ||(W - W') x||^2 / sum ||W x||^2 over the measured calibration tokens
    loss: float | None = None       # OBS loss estimate (sparsegpt, gptq)
    percdamp: float | None = None   # damping used (after any retry)
    dead: int = 0                   # inputs never active in calibration
    shares_input_with: str | None = None
    info: dict | None = None        # what the method reports per module (AWQ: alpha, where its scale went)


@dataclass
class CompressionReport:
    method: str
    config: dict
    modules: list[ModuleRecord] = field(default_factory=list)
    timings: dict = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    peak_rss_mib: float = 0.0
    peak_cuda_mib: float | None = None
    calibration: dict = field(default_factory=dict)
    device: str = "cpu"
    offload: str = "none"
    dtype: str = ""
    num_layers: int = 0
    # per decoder layer: {"mode": "uniform"|"owl", "target", "ratios" [layers], OWL's "outlier_ratios", ...}
    layer_sparsity: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def mean(self, key: str) -> float | None:
        vals = [getattr(m, key) for m in self.modules if getattr(m, key) is not None]
        return sum(vals) / len(vals) if vals else None

    def summary_markdown(self) -> str:
        t = self.timings
        total = sum(t.values())
        sp, err = self.mean("sparsity"), self.mean("recon_error")
        lines = [
            f"| method | modules | mean sparsity | mean rel. recon. error | {' | '.join(PHASES)} | total | "
            f"peak RSS | peak CUDA |",
            "|" + "---|" * (len(PHASES) + 7),
            f"| {self.config.get('method')} {_describe(self.config)} | {len(self.modules)} | "
            f"{'-' if sp is None else f'{sp:.4f}'} | {'-' if err is None else f'{err:.4g}'} | "
            + " | ".join(f"{t[p]:.1f} s" for p in PHASES)
            + f" | {total:.1f} s | {self.peak_rss_mib:.0f} MiB"
            + (f" ({self.offload} offload)" if self.offload != "none" else "") + " | "
            + ("-" if self.peak_cuda_mib is None else f"{self.peak_cuda_mib:.0f} MiB") + " |",
        ]
        return "\n".join(lines)


def _describe(config: dict) -> str:
    from lmsqueeze.compressor.config import from_dict

    return from_dict(config).describe().removeprefix(config.get("method", "")).strip()


# ---- model structure --------------------------------------------------------------------------------

def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # transformers without Conv1D: nothing to special-case
        return ()


def check_causal_lm(model) -> None:
    """A decoder-only causal LM (what AutoModelForCausalLM loads), else one clear error."""
    name = type(model).__name__
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal = set()
        for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            causal.update(v if isinstance(v, (tuple, list)) else (v,))
    except ImportError:
        causal = None
    config = getattr(model, "config", None)
    if (config is None or getattr(config, "is_encoder_decoder", False)
            or (causal is not None and name not in causal)):
        raise LmsqueezeError(f"{name} is not a decoder-only causal language model; lmsqueeze compresses models "
                             f"that AutoModelForCausalLM loads (Llama, Mistral, Qwen2, Gemma, Phi-3, OPT, GPT-2, ...)")


def find_decoder_layers(model) -> nn.ModuleList:
    """The nn.ModuleList that holds most parameters: the stack of decoder layers in every HF decoder."""
    best, best_params = None, 0
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_params:
                best, best_params = mod, n
    if best is None:
        raise LmsqueezeError(f"found no stack of decoder layers (an nn.ModuleList) in {type(model).__name__}")
    return best


def linear_modules(layer: nn.Module, prefix: str, config) -> dict[str, nn.Module]:
    """The layer's linear modules (nn.Linear, GPT-2's Conv1D) that the config selects, by full name."""
    kinds = (nn.Linear,) + ((_conv1d_type(),) if _conv1d_type() else ())
    out = {}
    for name, mod in layer.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if isinstance(mod, kinds) and config.selects(full):
            out[full] = mod
    return out


def is_conv1d(mod) -> bool:
    kind = _conv1d_type()
    return bool(kind) and isinstance(mod, kind)


def weight_of(mod) -> torch.Tensor:
    """The module's weight as [out, in] (a view; Conv1D stores [in, out])."""
    return mod.weight.t() if is_conv1d(mod) else mod.weight


def _outside(module: nn.Module, layers: nn.ModuleList):
    """The largest submodules that do not contain the decoder layers (embeddings, rotary, norms, head)."""
    for child in module.children():
        if child is layers:
            continue
        if any(m is layers for m in child.modules()):
            yield from _outside(child, layers)
        else:
            yield child


# ---- calibration --------------------------------------------------------------------------------------

def _calibration(calibration) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids [n, t] long, token mask [n, t] bool or None when nothing is padded)."""
    mask = None
    if isinstance(calibration, dict) or hasattr(calibration, "keys"):
        if "input_ids" not in calibration:
            raise LmsqueezeError("calibration dict needs 'input_ids' (and optionally 'attention_mask')")
        ids, mask = calibration["input_ids"], calibration.get("attention_mask")
    else:
        ids = calibration
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.shape[0] < 1:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise LmsqueezeError(f"calibration must be a [nsamples, seqlen] integer token tensor (or a dict with "
                             f"input_ids/attention_mask), got {shape}")
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.shape != ids.shape:
            raise LmsqueezeError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        mask = mask.to(torch.bool)
        if int(mask.sum()) == 0:
            raise LmsqueezeError("attention_mask masks every calibration token")
        if bool(mask.all()):
            mask = None
    return ids.long(), mask


class _Stat:
    """One statistic of one distinct input, fp32: H [d, d] (hessian), or [d]: col_sq_norm (mean x^2),
    act_absmean (mean |x|), act_absmax (max |x|); the kinds of lmsqueeze.compressor.methods.STATISTICS."""

    def __init__(self, kind: str, d: int, device):
        self.kind = kind
        self.value = torch.zeros((d, d) if kind == "hessian" else (d,), dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self.kind == "hessian":
            self.n = hessian_update(self.value, x, self.n, mask)
        elif self.kind == "col_sq_norm":
            self.n = col_sq_norm_update(self.value, x, self.n, mask)
        else:  # activation scales: a [tokens, d] pass over the valid tokens, memory-bound like col_sq_norm
            rows = x.reshape(-1, x.shape[-1])
            if mask is not None:
                rows = rows[mask.reshape(-1)]
            m = rows.shape[0]
            if m == 0:
                return
            a = rows.abs().float()
            if self.kind == "act_absmax":
                torch.maximum(self.value, a.amax(0), out=self.value)
            else:
                self.value.mul_(self.n / (self.n + m)).add_(a.sum(0), alpha=1.0 / (self.n + m))
            self.n += m

    def reduce(self) -> None:
        """Data parallel: turn every rank's running mean into the mean over all ranks' tokens.

        mean * n is the unnormalised sum (exact count in fp64); the sums and counts are all-reduced
        and divided by the total. The fast Hessian paths hold only the lower triangle before
        finish(): reducing both triangles is harmless, only the lower one is read. In place, one
        statistic at a time (a Hessian may be GBs: no packed copy of the whole layer's statistics).
        A maximum (act_absmax) is all-reduced as a maximum and not divided.
        """
        if not ddp.active():
            return
        if self.kind == "act_absmax":
            import torch.distributed as dist

            ddp._run("all-reduce of an activation maximum", dist.all_reduce, self.value, op=dist.ReduceOp.MAX)
            return
        self.value.mul_(float(self.n))
        ddp.all_reduce_sum_(self.value, what=f"all-reduce of a {self.kind} statistic")

    @property
    def is_mean(self) -> bool:
        return self.kind != "act_absmax"

    def finish(self) -> torch.Tensor:
        if self.kind == "hessian":
            hessian_finalize(self.value)
        return self.value


def _token_mask(x: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor | None:
    if mask is None:
        return None
    if x.numel() // x.shape[-1] != mask.numel():
        raise LmsqueezeError(f"{name} sees {x.numel() // x.shape[-1]} tokens per batch but the batch has "
                             f"{mask.numel()}: modules that see a subset of tokens (mixture of experts) are not supported")
    return mask


class _Clock:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.t = defaultdict(float)

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


# ---- the driver ------------------------------------------------------------------------------------------

@torch.no_grad()
def compress(model, config, calibration=None, *, device: str | torch.device | None = None, batch_size: int = 8,
             measure_error: bool = True, error_samples: int | None = 8,
             calibration_info: dict | None = None, offload=None, grids: dict | None = None,
             tokenizer=None, nsamples: int | None = None, seqlen: int | None = None, seed: int = 0,
             data_dir=None) -> CompressionReport:
    """Compress `model` in place with `config`; returns a CompressionReport.

    calibration: a source name ("wikitext2:valid", "pydoc", a file), a list of strings, a datasets.Dataset, a
    [nsamples, seqlen] token tensor, or a dict with input_ids and attention_mask (0 = padding); texts are
    tokenized with `tokenizer` (default: the model's own, from its name_or_path) into `nsamples` samples of at
    most `seqlen` tokens (drawn with `seed`; compressor.calibration says how each kind is read). May be None
    for data-free methods (magnitude, rtn) with measure_error=False.
    device: where each layer is computed (None: where the layers are); the model itself stays put.
    batch_size: calibration samples per forward pass (bounds activation memory).
    measure_error: measure each module's relative output error during the propagate forward, on the
        first `error_samples` calibration samples (None: all). It costs one extra GEMM per module and
        sample, so by default it looks at 8 samples (one batch); every method is measured on the same ones.
    offload: a compressor.offload.DiskOffload holding the decoder layers on disk (each is fetched onto
        `device`, compressed, written back and dropped); None: layers live in memory.
    grids: a dict that quantizers fill with {module name: QuantGrid} (CPU tensors), the integer codes,
        scales and zeros they chose, for packed checkpoints (compressor.formats); None: not kept.

    Data parallel (torch.distributed initialised with more than one rank, e.g. under torchrun): each
    rank takes its contiguous block of the calibration samples, accumulates its own statistics, and
    the statistics are all-reduced as sums (fp32) with their token counts (fp64) before they are
    normalised, so every rank sees the statistic of all samples. The modules of a layer are solved
    round-robin (module k by rank k % world) and broadcast, so masks and weights are identical on
    every rank by construction and the solve work is shared; each rank then propagates its shard.
    The result equals one process on the same samples up to fp32 summation order.
    """
    check_causal_lm(model)
    if batch_size < 1:
        raise LmsqueezeError(f"batch size must be >= 1, got {batch_size}")
    layers = find_decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    home = next(layers.parameters()).device
    if home.type == "meta" and offload is None:
        raise LmsqueezeError("the decoder layers hold no data (meta tensors): pass the DiskOffload that holds them")
    device = torch.device(device) if device is not None else (torch.device("cpu") if offload is not None else home)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmsqueezeError("--device cuda was asked for but torch sees no CUDA device")
    dtype = next(layers.parameters()).dtype
    targets = [linear_modules(layer, f"{prefix}.{i}", config) for i, layer in enumerate(layers)]
    if not any(targets):
        raise LmsqueezeError(f"no linear layer matches include={list(config.include)} exclude={list(config.exclude)}")
    if hasattr(config, "check_width"):  # N:M: every width must divide by M; fail before any work
        for mods in targets:
            for name, mod in mods.items():
                config.check_width(weight_of(mod).shape[1], name)

    method = get_method(config.method)
    owl = getattr(config, "layer_sparsity", "uniform") == "owl"
    needs_data = bool(method.needs) or measure_error or owl
    ids = mask = None
    if needs_data:
        if calibration is None:
            raise LmsqueezeError(f"{config.method} needs calibration data (or measure_error=False for data-free methods)")
        tokens, described = calibration_tokens(calibration, model, tokenizer=tokenizer, nsamples=nsamples,
                                               seqlen=seqlen, seed=seed, data_dir=data_dir)
        calibration_info = {**described, **(calibration_info or {})}
        ids, mask = _calibration(tokens)
        # past its learned positions a model dies in the capture (IndexError), past its rotary range it
        # calibrates silently on positions it never saw: one error before any work, for both
        check_sequence_length(model, int(ids.shape[1]), "the calibration window")
    report = CompressionReport(method=config.method, config=config.to_dict(), device=str(device),
                               offload="disk" if offload is not None else "none",
                               dtype=str(dtype).removeprefix("torch."), num_layers=len(layers))
    report.calibration = dict(calibration_info or {})
    if ids is not None:
        report.calibration.update(nsamples=int(ids.shape[0]), seqlen=int(ids.shape[1]),
                                  tokens=int(ids.numel() if mask is None else mask.sum()))
    offset = 0  # global index of this rank's first calibration sample
    if ddp.active():
        report.calibration["ranks"] = ddp.world_size()
        if ids is not None:
            if ids.shape[0] < ddp.world_size():
                raise LmsqueezeError(f"{ids.shape[0]} calibration samples cannot be shared by "
                                     f"{ddp.world_size()} ranks: give at least one per rank")
            offset, stop = ddp.shard_bounds(ids.shape[0])
            ids = ids[offset:stop]
            mask = None if mask is None else mask[offset:stop]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    clock = _Clock(cuda)

    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        # the parts outside the layers (embeddings, head) stay in memory even when the layers are offloaded
        rest_home = next((p.device for n, p in model.named_parameters() if not n.startswith(prefix + ".")), home)
        batches = _capture(model, layers, ids, mask, batch_size, device, rest_home, clock) if needs_data else []
        _check_hidden(batches, f"the inputs of {prefix}.0 (the embedded calibration tokens)", dtype)
        layer_cfgs = [config] * len(layers)
        if owl:
            layer_cfgs, report.layer_sparsity = _owl_configs(model, layers, targets, config, batches, device, home,
                                                             offload, clock)
        elif hasattr(config, "layer_sparsity"):
            report.layer_sparsity = {"mode": "uniform", "target": config.fraction}
        bar = progress(range(len(layers)), desc=f"{config.method}", unit="layer", leave=True)
        for i in bar:
            layer, mods, kw_i = _enter_layer(model, layers, i, targets, batches, offload, device)
            cfg = layer_cfgs[i]
            stats, leader_of, producers = {}, {}, {}
            if method.needs and mods:
                bar.set_postfix_str(f"layer {i}: statistics")
                stats, leader_of = _statistics(layer, mods, batches, kw_i, method.needs, device, clock,
                                               producers if method.solve_group is not None else None)
            bar.set_postfix_str(f"layer {i}: solve")
            originals = {}
            t0 = clock.now()
            if measure_error:
                originals = {name: weight_of(mod).detach().clone() for name, mod in mods.items()}
            if method.solve_group is not None:
                solved = _solve_groups(method, cfg, mods, stats, leader_of, producers, originals, grids, dtype)
            else:
                solved = _solve_modules(method, cfg, mods, stats, leader_of, grids, dtype)
            del stats, producers
            if ddp.active() and method.solve_group is None:
                for k, (name, mod) in enumerate(mods.items()):
                    ddp.broadcast_(mod.weight.data, src=k % ddp.world_size(), what=f"broadcast of {name}")
                solved = dict(ddp.gather_concat(list(solved.items()), what="gather of solve results"))
                if grids is not None:
                    mine = [(n, g) for n, g in grids.items() if n in mods]
                    grids.update(ddp.gather_concat(mine, what="gather of quantization grids"))
            for name, mod in mods.items():
                stored = weight_of(mod)
                report.modules.append(ModuleRecord(
                    name=name, shape=list(stored.shape), zeros=float((stored == 0).float().mean()),
                    recon_error=None, **solved[name],
                    shares_input_with=leader_of.get(name) if leader_of.get(name) != name else None))
            clock.t["solve"] += clock.now() - t0
            if batches:
                bar.set_postfix_str(f"layer {i}: propagate")
                errors = _propagate(layer, mods, originals, batches, kw_i, clock, measure_error, error_samples,
                                    offset)
                _check_hidden(batches, f"the outputs of {prefix}.{i} after compression", dtype)
                for rec in report.modules[-len(mods):] if mods else []:
                    rec.recon_error = errors.get(rec.name)
                if errors:
                    bar.set_postfix_str(f"layer {i}: err {sum(errors.values()) / len(errors):.3g}")
            del originals
            _leave_layer(layers, i, offload, home)
            log.info("layer %d: %s", i, ", ".join(
                f"{r.name.rsplit('.', 1)[-1]} err={r.recon_error if r.recon_error is None else f'{r.recon_error:.3g}'}"
                for r in report.modules[-len(mods):]) if mods else "nothing selected")
        bar.close()
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    for p in ("forward", "statistics", "solve", "propagate", "error"):
        report.timings[p] = clock.t[p]
    report.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if ddp.active():  # the report speaks for the largest rank; the per-rank figures go into the metadata
        per_rank = ddp.gather_concat([report.peak_rss_mib], what="gather of peak memory")
        report.calibration["peak_rss_mib_per_rank"] = per_rank
        report.peak_rss_mib = max(per_rank)
    if cuda:
        report.peak_cuda_mib = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return report


def _enter_layer(model, layers, i, targets, batches, offload, device):
    """Layer i on the compute device (fetched from disk when offloaded): (layer, its selected modules by
    name, the keywords each calibration batch passes it)."""
    if offload is not None:
        offload.fetch(i, device)
    else:
        layers[i].to(device)
    return layers[i], targets[i], _kwargs_for(model, i, batches)


def _leave_layer(layers, i, offload, home) -> None:
    """Layer i back where it lives: written back to disk and dropped when offloaded, else moved home."""
    if offload is not None:
        offload.release(i)
    else:
        layers[i].to(home)


def _solved(res) -> dict:
    return dict(sparsity=None if res.mask is None else 1.0 - float(res.mask.float().mean()), loss=res.loss,
                percdamp=res.percdamp, dead=res.dead, info=res.info)


def _stat_values(stats: dict, leader: str | None) -> dict[str, torch.Tensor]:
    return {k: st.value for k, st in stats[leader].items()} if stats else {}


def _solve_modules(method, cfg, mods, stats, leader_of, grids, dtype) -> dict[str, dict]:
    """Methods that solve one module at a time; data parallel: module k on rank k % world (then broadcast)."""
    solved = {}
    for k, (name, mod) in enumerate(mods.items()):
        if k % ddp.world_size() != ddp.rank():
            continue  # data parallel: module k is solved by rank k % world, which broadcasts it
        W = weight_of(mod)
        st = _stat_values(stats, leader_of.get(name))
        _check_inputs(W, st, name, leader_of.get(name), dtype)
        res = method.solve(W.detach(), st, cfg, grids is not None)
        check_result(res, name)
        W.copy_(res.W.to(W.dtype))
        if res.grid is not None and grids is not None:
            grids[name] = _grid_to_cpu(res.grid)
        solved[name] = _solved(res)
    return solved


def _solve_groups(method, cfg, mods, stats, leader_of, producers, originals, grids, dtype) -> dict[str, dict]:
    """Methods that solve the modules reading one input together (AWQ). Every rank solves every group (the
    statistics are already all-reduced, so the results agree) and no broadcast is needed.

    A result with an input_scale s holds weights for the input divided by s: the driver divides the input's
    producer (the normalisation before the group) by s when it can (checked numerically on recorded inputs,
    see _fold_rule); the method is told beforehand whether it can (`scalable`) and otherwise returns weights
    that act on the input as it is.
    """
    groups: dict[str, list[str]] = {}
    for name in mods:
        groups.setdefault(leader_of.get(name, name), []).append(name)
    solved = {}
    for leader, members in groups.items():
        Ws = {n: weight_of(mods[n]).detach() for n in members}
        st = _stat_values(stats, leader if stats else None)
        for n in members:
            _check_inputs(Ws[n], st, n, leader, dtype)
        fold = _fold_rule(*producers[leader][1:]) if leader in producers else None
        results = method.solve_group(Ws, st, cfg, grids is not None, scalable=fold is not None)
        scale = next((r.input_scale for r in results.values() if r.input_scale is not None), None)
        if scale is not None:
            if fold is None:
                raise LmsqueezeError(f"{method.name} returned an input scale for {leader}, whose input cannot take one")
            fold(scale)
        for n in members:
            res = results[n]
            check_result(res, n)
            W = weight_of(mods[n])
            W.copy_(res.W.to(W.dtype))
            if scale is not None and n in originals:  # the original weights in the scaled input domain
                originals[n].mul_(scale.to(originals[n].device, originals[n].dtype))
            if res.grid is not None and grids is not None:
                grids[n] = _grid_to_cpu(res.grid)
            solved[n] = _solved(res)
            if scale is not None:
                solved[n]["info"] = {**(res.info or {}), "scale_folded_into": producers[leader][0]}
    return solved


def _fold_rule(module, sample: torch.Tensor):
    """A function fold(s) that divides `module`'s output by s [d] through its weight (and bias), or None.

    Two weight conventions are tried, each checked on the module's recorded input: out = norm(x) * w
    (Llama, Mistral, Qwen2, Phi-3, OPT and GPT-2 LayerNorm: w / s, bias / s) and out = norm(x) * (1 + w)
    (Gemma: w -> (1 + w) / s - 1). A module neither fits keeps its weights: the caller quantizes without a
    folded scale.
    """
    w = module.weight
    b = getattr(module, "bias", None)
    b = b if isinstance(b, torch.Tensor) else None
    with torch.no_grad():
        ref = module(sample).float()
        probe = 0.5 + torch.rand(w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device)
        w0, b0 = w.detach().clone(), None if b is None else b.detach().clone()

        def candidate(offset: float):
            def fold(s):
                s = s.to(w.device, torch.float32)
                w.copy_(((w0.float() + offset) / s - offset).to(w.dtype))
                if b is not None:
                    b.copy_((b0.float() / s).to(b.dtype))
            return fold

        for offset in (0.0, 1.0):
            fold = candidate(offset)
            fold(probe)
            got = module(sample).float()
            w.copy_(w0)
            if b is not None:
                b.copy_(b0)
            want = ref / probe
            # a wrong convention is off by O(1); bf16 rounding of the folded weight by ~0.4 %
            if float((got - want).norm()) <= 0.02 * float(want.norm()):
                return fold
    return None


def _owl_configs(model, layers, targets, config, batches, device, home, offload, clock):
    """OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity"): one pass over the dense model collects the
    squared input column norms of every linear module and counts, per decoder layer, the share of weights whose
    Wanda score |W_ij| * ||X_j|| exceeds `owl_threshold` (M) times the mean score of its module: the layer's
    outlier ratio D_l. The kept fraction of layer l is then 1 - s + lambda * (2 (D_l - min D) / (max D - min D)
    - mean over layers of the same), so layers rich in outliers are pruned less; the per-layer sparsities
    spread over 2 lambda, lie within s +- 2 lambda, and their mean over layers is the target s. The pass does not change the model; the
    calibration hidden states are restored afterwards.

    Returns (a config per layer with its own sparsity, the record for lmsqueeze.json).
    """
    import dataclasses

    saved = [b["h"].clone() for b in batches]
    ratios_out = []
    bar = progress(range(len(layers)), desc="owl outliers", unit="layer", leave=False)
    for i in bar:
        layer, mods, kw_i = _enter_layer(model, layers, i, targets, batches, offload, device)
        outliers = total = 0
        if mods:
            stats, leader_of = _statistics(layer, mods, batches, kw_i, ("col_sq_norm",), device, clock)
            for name, mod in mods.items():
                score = weight_of(mod).detach().float().abs() * stats[leader_of[name]]["col_sq_norm"].value.sqrt()
                outliers += int((score > config.owl_threshold * score.mean()).sum())
                total += score.numel()
            del stats
        ratios_out.append(outliers / total if total else 0.0)
        t0 = clock.now()
        for b, kw in zip(batches, kw_i):
            b["h"] = _layer_forward(layer, b, kw)
        clock.t["forward"] += clock.now() - t0
        _leave_layer(layers, i, offload, home)
    bar.close()
    for b, h in zip(batches, saved):
        b["h"] = h
    D = torch.tensor(ratios_out, dtype=torch.float64)
    spread = float(D.max() - D.min())
    norm = (D - D.min()) / spread if spread > 0 else torch.zeros_like(D)
    lam, target = config.owl_lambda, config.fraction
    density = (1.0 - target) + lam * (2 * norm - float((2 * norm).mean()))
    # the config checked that s +- 2 lambda stays in [0, 1), the widest these can reach
    cfgs = [dataclasses.replace(config, sparsity=round(1.0 - float(d), 6)) for d in density]
    record = {"mode": "owl", "target": target, "threshold_m": config.owl_threshold, "lambda": lam,
              "outlier_ratios": [round(r, 6) for r in ratios_out], "ratios": [c.sparsity for c in cfgs],
              "mean": sum(c.sparsity for c in cfgs) / len(cfgs)}
    log.info("OWL layer sparsities: %s", ", ".join(f"{c.sparsity:.3f}" for c in cfgs))
    return cfgs, record


def _overflow_hint(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return "; fp16 overflows past 65504: compress in bf16 or fp32 (--dtype bf16)"
    return "; check the model's weights and the calibration text"


def _check_inputs(W: torch.Tensor, stats: dict[str, torch.Tensor], name: str, leader: str | None, dtype) -> None:
    """The weights and the statistics a method is about to read: finite, or an error naming the module."""
    check_finite(W, f"the weights of {name}", "; the checkpoint itself holds nan/inf")
    words = {"hessian": "Hessian", "col_sq_norm": "column norms", "act_absmean": "mean |activation|",
             "act_absmax": "max |activation|"}
    for kind, stat in stats.items():
        shared = f" (shared with {leader})" if leader and leader != name else ""
        check_finite(stat, f"the {words.get(kind, kind)} of the calibration inputs of {name}{shared}",
                     _overflow_hint(dtype))


def _check_hidden(batches: list[dict], what: str, dtype) -> None:
    """Every valid (non-padding) token's hidden state finite, or one error saying where it went wrong.

    Data parallel: the count of bad tokens is all-reduced, so every rank stops together (a rank that
    raised alone would leave the others waiting in the next collective)."""
    if not batches:  # data-free run: the same on every rank
        return
    bad = total = 0
    for b in batches:
        h = b["h"] if b["mask"] is None else b["h"][b["mask"]]
        rows = h.reshape(-1, h.shape[-1])
        total += rows.shape[0]
        if not bool(torch.isfinite(rows).all()):
            bad += int((~torch.isfinite(rows)).any(-1).sum())
    if ddp.active():
        counts = torch.tensor([float(bad), float(total)], dtype=torch.float64, device=batches[0]["h"].device)
        ddp.all_reduce_sum_(counts, what="all-reduce of the non-finite token count")
        bad, total = int(counts[0]), int(counts[1])
    if bad:
        raise LmsqueezeError(f"{what} hold nan/inf on {bad} of {total} calibration tokens{_overflow_hint(dtype)}")


def _grid_to_cpu(grid):
    from dataclasses import replace

    return replace(grid, codes=grid.codes.cpu(), scale=grid.scale.cpu(), zero=grid.zero.cpu(), g_idx=grid.g_idx.cpu())


def _capture(model, layers, ids, mask, batch_size, device, home, clock) -> list[dict]:
    """Per batch: the first layer's hidden states, its other positional args and kwargs, the token mask.

    Models whose layers differ in attention type (config.layer_types, e.g. sliding and full) get the
    keywords of the first layer of each type captured too, so each layer sees its own mask.
    """
    outside = list(_outside(model, layers))  # embeddings, rotary, final norm, head: to the device for the capture
    if device != home:
        for m in outside:
            m.to(device)
    t0 = clock.now()
    types = getattr(model.config, "layer_types", None)
    firsts = {}
    if isinstance(types, (list, tuple)) and len(types) == len(layers) and len(set(types)) > 1:
        for i, t in enumerate(types):
            firsts.setdefault(t, i)
    batches = []
    try:
        for start in range(0, ids.shape[0], batch_size):
            b_ids = ids[start:start + batch_size].to(device)
            b_mask = None if mask is None else mask[start:start + batch_size].to(device)
            args, kwargs = _run_until(model, layers[0], b_ids, b_mask)
            hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
            rest = args[1:] if "hidden_states" not in kwargs else args
            entry = {"h": hidden, "args": rest, "kwargs": kwargs, "mask": b_mask, "by_type": {}}
            for t, idx in firsts.items():
                if idx:
                    _, kw = _run_until(model, layers[idx], b_ids, b_mask)
                    kw.pop("hidden_states", None)
                    entry["by_type"][t] = kw
                else:
                    entry["by_type"][t] = kwargs
            batches.append(entry)
    finally:
        if device != home:
            for m in outside:
                m.to(home)
    clock.t["forward"] += clock.now() - t0
    return batches


def _run_until(model, layer, ids, mask):
    got = {}

    def pre_hook(module, args, kwargs):
        got["args"], got["kwargs"] = args, dict(kwargs)
        raise _Captured

    handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        model(input_ids=ids, attention_mask=None if mask is None else mask.long(), use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "args" not in got:
        raise LmsqueezeError(f"{type(model).__name__}'s forward never reached its first decoder layer")
    return got["args"], got["kwargs"]


def _kwargs_for(model, i, batches) -> list[dict]:
    types = getattr(model.config, "layer_types", None)
    out = []
    for b in batches:
        if b["by_type"] and isinstance(types, (list, tuple)) and types[i] in b["by_type"]:
            out.append(b["by_type"][types[i]])
        else:
            out.append(b["kwargs"])
    return out


def _layer_forward(layer, batch, kwargs):
    out = layer(batch["h"], *batch["args"], **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _statistics(layer, mods, batches, kw_i, kinds, device, clock, producers: dict | None = None):
    """Run the calibration forward with hooks; returns ({leader: {kind: _Stat}}, {module name: leader name}).

    Modules that read the very same tensor (q/k/v, gate/up) share one statistic: the first batch
    records every module's input (holding them keeps identities unique), groups them by tensor
    identity, then folds them in; later batches update each group once, from its leader's hook.
    producers: a dict to fill with {leader: (name, module, its input)} for every leader whose input is
    the output of a module with a 1-D weight (a normalisation) inside the layer, recorded on the first
    batch (AWQ folds its input scales there).
    """
    current = {"mask": None, "probe": None, "outputs": None}
    leader_of: dict[str, str] = {}
    stats: dict[str, dict[str, _Stat]] = {}

    def make_hook(name):
        def hook(module, inputs, output):
            x = inputs[0]
            if current["probe"] is not None:
                current["probe"].append((name, x))
                return
            if leader_of.get(name) == name:
                t0 = clock.now()
                m = _token_mask(x, current["mask"], name)
                for st in stats[name].values():
                    st.add(x, m)
                clock.t["statistics"] += clock.now() - t0
        return hook

    def make_output_hook(name):
        def hook(module, inputs, output):
            if current["outputs"] is not None and inputs and isinstance(output, torch.Tensor):
                current["outputs"].append((name, module, inputs[0], output))
        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in mods.items()]
    if producers is not None:
        handles += [mod.register_forward_hook(make_output_hook(name)) for name, mod in layer.named_modules()
                    if isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 1]
    try:
        for bi, (batch, kw) in enumerate(zip(batches, kw_i)):
            current["mask"] = batch["mask"]
            current["probe"] = [] if bi == 0 else None
            current["outputs"] = [] if bi == 0 and producers is not None else None
            t0, in_hooks = clock.now(), clock.t["statistics"]
            _layer_forward(layer, batch, kw)
            # the hooks' own time is "statistics": forward is the layer's compute alone
            clock.t["forward"] += clock.now() - t0 - (clock.t["statistics"] - in_hooks)
            if bi == 0:
                probe, current["probe"] = current["probe"], None
                outputs, current["outputs"] = current["outputs"] or [], None
                t0 = clock.now()
                seen: list[tuple[str, torch.Tensor]] = []
                for name, x in probe:
                    lead = next((ln for ln, lx in seen if lx is x or _same_tensor(lx, x)), None)
                    if lead is None:
                        seen.append((name, x))
                        leader_of[name] = name
                        stats[name] = {k: _Stat(k, x.shape[-1], device) for k in kinds}
                        m = _token_mask(x, batch["mask"], name)
                        for st in stats[name].values():
                            st.add(x, m)
                        src = next(((pn, pm, pin) for pn, pm, pin, out in outputs
                                    if out is x or _same_tensor(out, x)), None)
                        if src is not None and producers is not None:
                            pin = src[2].reshape(-1, src[2].shape[-1])[:64].detach().clone()
                            producers[name] = (src[0], src[1], pin)
                    else:
                        leader_of[name] = lead
                del probe, seen, outputs
                clock.t["statistics"] += clock.now() - t0
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in mods if n not in leader_of]
    if missing:
        raise LmsqueezeError(f"the calibration forward never called {', '.join(missing)}")
    t0 = clock.now()
    flat = [st for group in stats.values() for st in group.values()]
    _reduce_stats(flat)
    for st in flat:
        st.finish()
    clock.t["statistics"] += clock.now() - t0
    return stats, leader_of


def _reduce_stats(stats: list) -> None:
    """Data parallel: sums and token counts over every rank (one all-reduce per statistic + one for counts)."""
    if not ddp.active() or not stats:
        return
    dev = stats[0].value.device
    counts = torch.tensor([float(s.n) for s in stats], dtype=torch.float64, device=dev)
    ddp.all_reduce_sum_(counts, what="all-reduce of the token counts")
    for s, total in zip(stats, counts.tolist()):
        s.reduce()
        if total > 0 and s.is_mean:
            s.value.div_(total)
        s.n = int(total)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _propagate(layer, mods, originals, batches, kw_i, clock, measure_error, error_samples,
               offset: int = 0) -> dict[str, float]:
    """Replace each batch's hidden states by the compressed layer's outputs; measure the output errors.

    error(module) = sum ||(W - W') x||^2 / sum ||W x||^2 over valid tokens, x the module's inputs here.
    offset: global index of the first sample here (data parallel: the error covers the first
    error_samples samples of the whole calibration set, whichever rank holds them; sums all-reduced).
    """
    num = defaultdict(float)
    den = defaultdict(float)
    current = {"mask": None, "on": False}
    # W - W' in the originals' own storage (one copy of the layer's weights, not two)
    deltas = {name: originals.pop(name).sub_(weight_of(mod)) for name, mod in mods.items() if name in originals}

    def make_hook(name, mod):
        bias = getattr(mod, "bias", None)

        def hook(module, inputs, output):
            if not current["on"]:
                return
            t0 = clock.now()
            x = inputs[0]
            m = _token_mask(x, current["mask"], name)
            # (W - W') x: the one GEMM the measurement costs, on the measured tokens only; the compressed
            # output W' x is the propagation's own. Sums run in place in the fp32 dy (no gathered copies).
            dy = F.linear(x, deltas[name]).float().reshape(-1, output.shape[-1])
            keep = None if m is None else m.reshape(-1, 1).to(dy.dtype)
            if keep is not None:
                dy.mul_(keep)                               # padding rows count for nothing
            flat = dy.view(-1)
            num[name] += float(torch.dot(flat, flat))
            dy.add_(output.reshape(-1, output.shape[-1]))  # W x (+ bias) = W' x (+ bias) + (W - W') x
            if isinstance(bias, torch.Tensor):
                dy.sub_(bias)
            if keep is not None:
                dy.mul_(keep)
            den[name] += float(torch.dot(flat, flat))
            clock.t["error"] += clock.now() - t0
        return hook

    handles = [mod.register_forward_hook(make_hook(n, mod)) for n, mod in mods.items() if n in deltas] \
        if measure_error else []
    t_start = clock.now()
    err_before = clock.t["error"]
    try:
        seen = 0
        for batch, kw in zip(batches, kw_i):
            current["mask"] = batch["mask"]
            current["on"] = error_samples is None or offset + seen < error_samples
            seen += batch["h"].shape[0]
            batch["h"] = _layer_forward(layer, batch, kw)
    finally:
        for h in handles:
            h.remove()
    clock.t["propagate"] += clock.now() - t_start - (clock.t["error"] - err_before)
    if measure_error and ddp.active():
        names = list(deltas)
        sums = torch.tensor([num[n] for n in names] + [den[n] for n in names], dtype=torch.float64,
                            device=next(layer.parameters()).device)
        ddp.all_reduce_sum_(sums, what="all-reduce of the output errors")
        for j, n in enumerate(names):
            num[n], den[n] = float(sums[j]), float(sums[len(names) + j])
    if not measure_error:
        return {}
    for n in deltas:  # a nan compares False with 0: without this a nan error would be reported as 0.0
        if not (math.isfinite(num[n]) and math.isfinite(den[n])):
            raise LmsqueezeError(f"the output error of {n} is not finite (sum |dy|^2 = {num[n]}, sum |y|^2 = {den[n]}): "
                                 f"its inputs or outputs hold nan/inf{_overflow_hint(next(layer.parameters()).dtype)}")
    return {n: (num[n] / den[n] if den[n] > 0 else 0.0) for n in deltas}
