"""Where the decoder layers live while the driver works on one of them: `--offload {none,cpu,disk}`.

    none  the layers stay where the model is; the layer being compressed moves to the compute device
          and back (for a CPU compute device nothing moves)
    cpu   the same with the model kept in CPU memory: what `none` already does for a model loaded on
          CPU with `--device cuda` (one layer on the GPU at a time); kept as its own name for clarity
    disk  each decoder layer is a safetensors file in a work directory; in memory the layers are
          meta tensors (no storage). The driver fetches layer i (read from its file onto the compute
          device), compresses it, writes it back compressed and drops it, so resident memory is one
          layer plus the calibration activations and statistics, on top of the parts outside the
          layers (embeddings, head, norms), which stay in memory. The final save links the layer
          files into the checkpoint as shards (one per layer, plus one for the rest, with the
          safetensors index Hugging Face reads): no layer is loaded again to save.

Files hold each tensor under its full state-dict name (model.layers.3.mlp.up_proj.weight), so a
layer file is already a checkpoint shard.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger("lmsqueeze")

OFFLOAD_MODES = ("none", "cpu", "disk")
REST_SHARD = "model-rest.safetensors"
INDEX = "model.safetensors.index.json"


def check_mode(mode: str) -> str:
    if mode not in OFFLOAD_MODES:
        raise LmsqueezeError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got '{mode}'")
    return mode


def _shard_name(i: int) -> str:
    return f"model-layer-{i:05d}.safetensors"


def _set(module: nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = dotted.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    sub._buffers[leaf] = tensor


class DiskOffload:
    """The decoder layers of one model as safetensors files in `workdir`; see the module docstring.

    from_model(model, layers, prefix, workdir) writes every layer of a loaded model to disk and
    frees it; `write_layer` lets a caller fill the files layer by layer (a model built on the meta
    device never exists in memory whole).
    """

    def __init__(self, layers: nn.ModuleList, prefix: str, workdir: str | os.PathLike):
        self.layers, self.prefix = layers, prefix
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # non-persistent buffers (not in a state dict): small, kept in memory per layer
        self._extra: dict[int, dict[str, torch.Tensor]] = {}
        self.bytes_written = 0

    @classmethod
    def beside(cls, model, output_dir, offload_dir=None) -> DiskOffload:
        """Offload `model`'s layers into a fresh work directory under `offload_dir`, by default the
        directory that will hold `output_dir` (so the final checkpoint can link the layer files in)."""
        import tempfile

        parent = Path(offload_dir or Path(output_dir).resolve().parent)
        parent.mkdir(parents=True, exist_ok=True)
        return cls.from_model(model, tempfile.mkdtemp(prefix=".lmsqueeze-offload-", dir=parent))

    @classmethod
    def from_model(cls, model, workdir) -> DiskOffload:
        from lmsqueeze.compressor.driver import find_decoder_layers

        layers = find_decoder_layers(model)
        prefix = next(n for n, m in model.named_modules() if m is layers)
        off = cls(layers, prefix, workdir)
        for i in range(len(layers)):
            off.write_layer(i)
        return off

    def path(self, i: int) -> Path:
        return self.workdir / _shard_name(i)

    def write_layer(self, i: int) -> None:
        """Write layer i (in memory) to its file and release its storage (meta tensors remain)."""
        from safetensors.torch import save_file

        layer = self.layers[i]
        sd = layer.state_dict()
        persistent = set(sd)
        self._extra[i] = {n: b.detach().cpu() for n, b in layer.named_buffers() if n not in persistent}
        tensors = {f"{self.prefix}.{i}.{k}": v.detach().to("cpu").contiguous() for k, v in sd.items()}
        tmp = self.path(i).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.path(i))
        self.bytes_written += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors, sd
        layer.to("meta")
        _trim()

    def fetch(self, i: int, device: torch.device) -> None:
        """Materialise layer i on `device` from its file (memory-mapped read)."""
        from safetensors import safe_open

        layer = self.layers[i]
        head = f"{self.prefix}.{i}."
        sd = {}
        with safe_open(str(self.path(i)), framework="pt", device="cpu") as f:
            for key in f.keys():
                sd[key.removeprefix(head)] = f.get_tensor(key).to(device)
        layer.load_state_dict(sd, strict=True, assign=True)
        for name, b in self._extra.get(i, {}).items():
            _set(layer, name, b.to(device))

    def release(self, i: int) -> None:
        """Write layer i back (compressed) and drop it from memory."""
        self.write_layer(i)

    def save_weights(self, model, directory: Path) -> None:
        """Checkpoint weights into `directory`: the layer files (hard links where possible) as shards,
        everything outside the layers as one more shard, and the index."""
        from safetensors.torch import save_file

        weight_map, total = {}, 0
        for i in range(len(self.layers)):
            src, dst = self.path(i), directory / _shard_name(i)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
            from safetensors import safe_open

            with safe_open(str(dst), framework="pt") as f:
                for key in f.keys():
                    weight_map[key] = dst.name
                    sl = f.get_slice(key)
                    total += _nbytes(sl.get_dtype(), sl.get_shape())
        rest, seen = {}, set()
        head = self.prefix + "."
        for key, t in model.state_dict().items():
            if key.startswith(head):
                continue
            ptr = (t.data_ptr(), t.dtype, tuple(t.shape))
            if ptr in seen:  # tied weights (lm_head = embeddings): Hugging Face ties them again on load
                continue
            seen.add(ptr)
            rest[key] = t.detach().cpu().contiguous()
            weight_map[key] = REST_SHARD
            total += t.numel() * t.element_size()
        save_file(rest, str(directory / REST_SHARD), metadata={"format": "pt"})
        model.config.save_pretrained(directory)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(directory)
        with open(directory / INDEX, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc): layer-sized tensors freed one after another
    otherwise stay in the allocator's arenas (its mmap threshold adapts upward to their size), and the
    resident memory grows with every layer although only one is alive."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None

_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(dtype: str, shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * _SIZES.get(dtype, 4)
