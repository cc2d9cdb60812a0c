"""Data parallelism on torch.distributed: process-group setup, sharding, and collectives that fail clearly.

`torchrun --nproc-per-node N -m lmsqueeze compress|eval ...` starts N processes with RANK, WORLD_SIZE,
MASTER_ADDR/PORT in their environment; `init_from_env` joins them into one process group (NCCL when
the compute device is CUDA, gloo on CPU) with a timeout. Nothing here runs when WORLD_SIZE is 1 or
unset: every helper is then the identity, so single-process code paths are the distributed ones with
one rank.

Sharding is contiguous: with n items and R ranks, rank r holds items [r*n//R, (r+1)*n//R) (sizes differ
by at most one). Contiguous blocks keep the global order recoverable by concatenating per-rank
results in rank order, which is how `gather_concat` restores single-process ordering.

A dead rank: torchrun notices a worker that exits non-zero and terminates the others (its default
--max-restarts 0), so the run ends with the dead rank's traceback. If the launcher does not (e.g. a
worker that hangs without dying), the survivors' collectives give up after the process-group timeout
(`LMSQUEEZE_DIST_TIMEOUT` seconds, default 600) and raise an LmsqueezeError naming the operation.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger("lmsqueeze")

DEFAULT_TIMEOUT_S = 600.0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise LmsqueezeError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def init_from_env(device: str | torch.device = "cpu", timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes in the environment; False when running alone.

    backend: nccl for a CUDA compute device, gloo otherwise. timeout_s: how long a collective waits
    for a missing rank (default LMSQUEEZE_DIST_TIMEOUT, else 600 s).
    """
    if env_world_size() <= 1:
        return False
    if dist.is_initialized():
        return True
    if timeout_s is None:
        timeout_s = float(os.environ.get("LMSQUEEZE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if timeout_s <= 0:
        raise LmsqueezeError(f"the distributed timeout must be > 0 seconds, got {timeout_s}")
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        # a failed NCCL collective aborts the communicator instead of hanging in the kernel
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    log.info("rank %d of %d joined the %s process group", rank(), world_size(), backend)
    return True


def join(device: str | torch.device = "cpu", timeout_s: float | None = None) -> bool:
    """Under torchrun: join the process group (`init_from_env`) and silence progress bars on ranks other
    than 0. True when this process is one of several ranks."""
    joined = init_from_env(device, timeout_s)
    if joined and not is_main():
        from lmsqueeze.progress import set_quiet

        set_quiet(True)
    return joined


_local_depth = 0


def active() -> bool:
    """A process group of more than one rank, outside any `local()` block."""
    return _local_depth == 0 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def local():
    """`with local():` the code inside works on this rank's shard alone (nested calls do not shard again)."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard_bounds(n: int, r: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of rank r's contiguous block of n items."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    return r * n // world, (r + 1) * n // world


def _run(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as exc:  # gloo/NCCL timeouts and closed connections
        raise LmsqueezeError(f"rank {rank()} of {world_size()}: {what} failed; another rank probably died or "
                             f"stalled (its own error is above; the process group gives up after its timeout, "
                             f"LMSQUEEZE_DIST_TIMEOUT): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                             ) from exc


def all_reduce_sum_(t: torch.Tensor, what: str = "all-reduce") -> torch.Tensor:
    if active():
        _run(what, dist.all_reduce, t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, src: int, what: str = "broadcast") -> torch.Tensor:
    """Broadcast t in place from rank src (bytes: works for every dtype on every backend)."""
    if active():
        flat = t if t.is_contiguous() else t.contiguous()
        _run(what, dist.broadcast, flat.view(-1).view(torch.uint8), src=src)
        if flat is not t:
            t.copy_(flat)
    return t


def broadcast_object(obj, src: int, what: str = "broadcast"):
    if not active():
        return obj
    box = [obj]
    _run(what, dist.broadcast_object_list, box, src=src)
    return box[0]


def gather_concat(items: list, what: str = "gather") -> list:
    """Every rank's list, concatenated in rank order (the single-process order for contiguous shards)."""
    if not active():
        return list(items)
    out = [None] * world_size()
    _run(what, dist.all_gather_object, out, list(items))
    return [x for part in out for x in part]


def barrier(what: str = "barrier") -> None:
    if active():
        _run(what, dist.barrier)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        # Every rank arrives before any tears down: rank 0 hosts the TCP store, and a rank that leaves
        # while another still talks to it can abort that process ("terminate called without an
        # active exception", seen in CI). The barrier is bounded so a dead rank cannot hang shutdown.
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=30))
            else:
                dist.barrier()
        except Exception as exc:  # a rank already gone: nothing left to wait for
            log.warning("distributed shutdown: not every rank reached the final barrier (%s)",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        dist.destroy_process_group()
