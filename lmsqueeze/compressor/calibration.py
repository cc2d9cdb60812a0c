"""What a user may pass as calibration data, turned into the tokens the driver takes.

`compress(model, config, calibration, tokenizer=None, nsamples=None, seqlen=None, seed=0)` accepts:

- a source name (`"wikitext2:valid"`, `"pydoc"`, `"alpaca"`, a `.txt/.json/.jsonl` path, `"hf:..."`; see
  lmsqueeze.data): `nsamples` disjoint windows of `seqlen` tokens drawn at random (seeded) from its text,
  as `lmsqueeze compress --calib` does (data.calibration_batches);
- a list of strings, or a `datasets.Dataset` with a text column (`text_column`, default "text") or an
  `input_ids` column: one sample per text, cut to `seqlen` tokens, right-padded with an attention mask
  (padding never enters a statistic); more than `nsamples` texts: `nsamples` of them drawn (seeded);
- token tensors: a [nsamples, seqlen] integer tensor, a dict / BatchEncoding with `input_ids` (and
  `attention_mask`), or a list of 1-D token sequences (padded as texts are); `nsamples` / `seqlen`, when
  given, keep the first samples / tokens.

Texts are tokenized without special tokens (as the source-name windows are), with `tokenizer` or, when
none is given, the tokenizer of the model's `name_or_path` (models.load_tokenizer).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger("lmsqueeze")

NSAMPLES, SEQLEN = 128, 2048  # the CLI's defaults, for sources and texts


def calibration_tokens(calibration, model=None, *, tokenizer=None, nsamples: int | None = None,
                       seqlen: int | None = None, seed: int = 0, data_dir=None,
                       text_column: str = "text") -> tuple[torch.Tensor | Mapping | None, dict]:
    """(tokens for the driver, what they are for the report's calibration record).

    The tokens are a [n, t] long tensor or a dict with `input_ids` and `attention_mask` (0 = padding);
    the driver checks their shape. None stays None (data-free methods).
    """
    for name, v in (("nsamples", nsamples), ("seqlen", seqlen)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise LmsqueezeError(f"calibration {name} must be a positive integer, got {v!r}")
    if seqlen is not None and seqlen < 2:
        raise LmsqueezeError(f"calibration seqlen must be >= 2, got {seqlen}")
    if calibration is None:
        return None, {}
    if isinstance(calibration, str):
        from lmsqueeze.data import calibration_batches

        n, t = nsamples or NSAMPLES, seqlen or SEQLEN
        tok = _tokenizer(tokenizer, model)
        ids = calibration_batches(tok, calibration, n, t, seed, data_dir=data_dir)
        return ids, {"source": calibration, "nsamples": n, "seqlen": t, "seed": seed}
    if isinstance(calibration, torch.Tensor):
        return _cut(calibration, nsamples, seqlen), {"source": "token tensor"}
    if isinstance(calibration, Mapping) or _is_batch_encoding(calibration):
        if "input_ids" not in calibration:
            raise LmsqueezeError("a calibration dict needs 'input_ids' (and optionally 'attention_mask')")
        out = {"input_ids": _cut(torch.as_tensor(calibration["input_ids"]), nsamples, seqlen)}
        if calibration.get("attention_mask") is not None:
            out["attention_mask"] = _cut(torch.as_tensor(calibration["attention_mask"]), nsamples, seqlen)
        return out, {"source": "token tensor"}
    if _is_dataset(calibration):
        columns = list(calibration.column_names)
        if "input_ids" in columns:
            return _samples([list(x) for x in calibration["input_ids"]], nsamples, seqlen, seed, tokenizer, model,
                            "datasets.Dataset (input_ids)")
        if text_column not in columns:
            raise LmsqueezeError(f"the calibration Dataset has no '{text_column}' column; columns: "
                                 f"{', '.join(columns)} (name the text column with text_column=)")
        return _samples(list(calibration[text_column]), nsamples, seqlen, seed, tokenizer, model,
                        f"datasets.Dataset ({text_column})")
    if isinstance(calibration, Sequence) and not isinstance(calibration, (bytes, bytearray)):
        if not calibration:
            raise LmsqueezeError("the calibration list is empty")
        if all(isinstance(x, str) for x in calibration):
            return _samples(list(calibration), nsamples, seqlen, seed, tokenizer, model, "list of texts")
        if all(_is_token_sequence(x) for x in calibration):
            return _samples([torch.as_tensor(x).reshape(-1).tolist() for x in calibration], nsamples, seqlen,
                            seed, tokenizer, model, "list of token sequences")
        kinds = sorted({type(x).__name__ for x in calibration})
        raise LmsqueezeError(f"a calibration list must hold only strings or only 1-D token sequences, got "
                             f"{', '.join(kinds)}")
    raise LmsqueezeError(f"calibration of type {type(calibration).__name__} is not understood; give a source name "
                         f"(e.g. 'wikitext2:valid', 'pydoc'), a list of strings, a datasets.Dataset, a [nsamples, "
                         f"seqlen] token tensor or a dict with input_ids")


def _is_dataset(x) -> bool:
    return type(x).__module__.split(".")[0] == "datasets" and hasattr(x, "column_names")


def _is_batch_encoding(x) -> bool:
    return type(x).__name__ == "BatchEncoding" and hasattr(x, "keys")


def _is_token_sequence(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 1 and not x.dtype.is_floating_point and not x.dtype.is_complex
    return isinstance(x, Sequence) and not isinstance(x, str) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in x)


def _cut(t: torch.Tensor, nsamples: int | None, seqlen: int | None) -> torch.Tensor:
    if t.dim() != 2:
        return t  # the driver names the expected shape
    return t[:nsamples, :seqlen]


def _tokenizer(tokenizer, model):
    if tokenizer is not None:
        return tokenizer
    name = ""
    if model is not None:
        name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not name:
        raise LmsqueezeError("calibration text needs a tokenizer: the model does not say where it came from "
                             "(its name_or_path is empty); pass tokenizer=")
    from lmsqueeze.models import load_tokenizer

    return load_tokenizer(str(name))


def _samples(samples: list, nsamples, seqlen, seed, tokenizer, model, what: str) -> tuple[dict, dict]:
    """One sample per text (or token list), drawn down to nsamples, cut to seqlen, right-padded with a mask."""
    n = nsamples or NSAMPLES
    t = seqlen or SEQLEN
    given = len(samples)
    if given > n:
        gen = torch.Generator().manual_seed(seed)
        picks = torch.randperm(given, generator=gen)[:n].sort().values.tolist()
        samples = [samples[i] for i in picks]
    if isinstance(samples[0], str):
        tok = _tokenizer(tokenizer, model)
        samples = tok(samples, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    samples = [list(s)[:t] for s in samples]
    empty = sum(1 for s in samples if not s)
    samples = [s for s in samples if s]
    if not samples:
        raise LmsqueezeError(f"the calibration {what} holds no tokens")
    if empty:
        log.info("calibration: %d empty sample(s) left out", empty)
    width = max(len(s) for s in samples)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    ids = torch.full((len(samples), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    info = {"source": what, "nsamples": len(samples), "seqlen": width, "seed": seed, "given": given}
    return {"input_ids": ids, "attention_mask": mask}, info
