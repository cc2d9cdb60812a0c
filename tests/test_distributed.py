"""Data parallelism on 2 gloo processes (CPU) against one process: compression and sharded evaluation.

Workers are spawned (torch.multiprocessing) or launched with torchrun for the CLI; each uses one
thread. Tolerance: the statistics are summed across ranks in a different order than one process
accumulates them (fp32 running means vs per-rank sums), and each rank runs its samples in smaller
batches; weights of the methods that update them (sparsegpt, gptq) match to FP32_TOL, and the masks
(Wanda, SparseGPT) match exactly.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lmsqueeze import compress
from lmsqueeze.compressor import GPTQConfig, SparseGPTConfig, WandaConfig
from lmsqueeze.models import load_model
from lmsqueeze.testing import assert_close

ROOT = Path(__file__).resolve().parents[1]
FP32_TOL = dict(rtol=1e-4, atol=1e-5)   # fp32 reduction order through two layers of OBS updates
CONFIGS = {
    "wanda": WandaConfig(sparsity=0.5),
    "sparsegpt": SparseGPTConfig(sparsity="2:4", blocksize=32),
    "gptq": GPTQConfig(bits=4, group_size=16, blocksize=32),
}
NSAMPLES, SEQLEN = 8, 64


def calib():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (NSAMPLES, SEQLEN), generator=g)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def _compress_worker(rank, world, port, out_dir):
    from lmsqueeze import distributed as ddp

    _env(rank, world, port)
    ddp.init_from_env("cpu", timeout_s=60)
    try:
        for method, cfg in CONFIGS.items():
            model, _ = load_model("tiny-llama")
            report = compress(model, cfg, calib(), batch_size=2)
            torch.save({"state": model.state_dict(), "report": report.to_dict()},
                       os.path.join(out_dir, f"{method}-{rank}.pt"))
    finally:
        ddp.shutdown()


def _spawn(fn, *args, world=2):
    mp.start_processes(fn, args=(world, _free_port()) + args, nprocs=world, join=True, start_method="spawn")


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _spawn(_compress_worker, str(out))
    return out


@pytest.mark.parametrize("method", list(CONFIGS))
def test_two_ranks_equal_one_process(distributed_runs, method):
    torch.set_num_threads(1)
    model, _ = load_model("tiny-llama")
    report = compress(model, CONFIGS[method], calib(), batch_size=8)
    single = model.state_dict()
    r0 = torch.load(distributed_runs / f"{method}-0.pt")
    r1 = torch.load(distributed_runs / f"{method}-1.pt")
    for name, w in single.items():
        # the ranks hold bit-identical models: each module is solved once and broadcast
        assert torch.equal(r0["state"][name], r1["state"][name]), name
        got = r0["state"][name]
        if method != "gptq":
            assert torch.equal(got == 0, w == 0), f"{method}: mask of {name} differs from one process"
        assert_close(got, w, **FP32_TOL)
    rep = r0["report"]
    assert rep["calibration"]["ranks"] == 2 and rep["calibration"]["nsamples"] == NSAMPLES
    assert [m["name"] for m in rep["modules"]] == [m.name for m in report.modules]
    for got, want in zip(rep["modules"], report.modules):
        assert got["sparsity"] == want.sparsity
        # the error covers the first 8 samples on both sides, summed over ranks
        assert got["recon_error"] == pytest.approx(want.recon_error, rel=1e-3, abs=1e-7)
        if want.loss is not None:
            assert got["loss"] == pytest.approx(want.loss, rel=1e-3, abs=1e-6)


def _stall_worker(rank, world, port, out_dir):
    """Rank 1 joins and then leaves without taking part: rank 0 must fail with a clear error, not hang."""
    from lmsqueeze import distributed as ddp
    from lmsqueeze.errors import LmsqueezeError

    _env(rank, world, port)
    ddp.init_from_env("cpu", timeout_s=5)
    if rank == 1:
        return  # exits without its collectives
    model, _ = load_model("tiny-llama")
    try:
        compress(model, CONFIGS["wanda"], calib(), batch_size=4)
    except LmsqueezeError as exc:
        Path(out_dir, "error.txt").write_text(str(exc))


def test_missing_rank_fails_clearly_after_the_timeout(tmp_path):
    _spawn(_stall_worker, str(tmp_path))
    msg = (tmp_path / "error.txt").read_text()
    assert "rank 0 of 2" in msg and "another rank probably died" in msg


def _torchrun(args, tmp_path, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), LMSQUEEZE_QUIET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] + args
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_cli_compress_matches_one_process(tmp_path):
    common = ["--quiet", "compress", "--model", "tiny-llama", "--method", "sparsegpt", "--sparsity", "0.5", "--dtype",
              "fp32", "--calib", "pydoc", "--nsamples", "4", "--calib-seqlen", "32", "--batch-size", "2"]
    res = _torchrun(["-m", "lmsqueeze"] + common + ["--output-dir", str(tmp_path / "two")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compressed tiny-llama") == 1  # rank 0 alone prints and saves
    one = subprocess.run([sys.executable, "-m", "lmsqueeze"] + common + ["--output-dir", str(tmp_path / "one")],
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "two" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), k
        assert_close(a[k], b[k], **FP32_TOL)
    meta = json.loads((tmp_path / "two" / "lmsqueeze.json").read_text())
    assert meta["calibration"]["ranks"] == 2


def test_torchrun_stops_when_a_rank_dies(tmp_path):
    script = tmp_path / "dies.py"
    script.write_text(
        "import os, sys\n"
        "from lmsqueeze.cli import main\n"
        "if os.environ['RANK'] == '1':\n"
        "    sys.exit('rank 1 dies on purpose')\n"
        "sys.exit(main(sys.argv[1:]))\n")
    args = ["--quiet", "compress", "--model", "tiny-llama", "--method", "wanda", "--sparsity", "0.5",
            "--calib", "pydoc", "--nsamples", "4", "--calib-seqlen", "32", "--dist-timeout", "30",
            "--output-dir", str(tmp_path / "out")]
    res = _torchrun([str(script)] + args, tmp_path, timeout=150)
    assert res.returncode != 0
    assert "rank 1 dies on purpose" in res.stderr or "rank 1 dies on purpose" in res.stdout
    assert not (tmp_path / "out").exists()


EVAL_TASKS = "ppl:pydoc,divergence:pydoc,piqa,alpaca,crows"


def _mc_file(tmp) -> str:
    path = Path(tmp, "mc.jsonl")
    g = torch.Generator().manual_seed(3)
    lines = []
    for i in range(7):  # odd: the ranks hold 3 and 4 items
        n = 2 + i % 3
        words = ["red", "blue", "green", "seven", "cat", "walks", "the", "river", "of", "stone"]
        pick = torch.randint(0, len(words), (n, 3), generator=g).tolist()
        lines.append(json.dumps({"context": f"Item {i}: which one?", "choices": [" ".join(words[j] for j in p)
                                                                                  for p in pick], "label": i % n}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _eval_worker(rank, world, port, out_dir, mc):
    from lmsqueeze import distributed as ddp
    from lmsqueeze.evaluation.api import evaluate

    _env(rank, world, port)
    ddp.init_from_env("cpu", timeout_s=60)
    try:
        rep = evaluate("tiny-llama", tasks=f"{EVAL_TASKS},mc:{mc}", base="tiny-llama", seqlen=48, limit=11,
                       batch_tokens=256, max_new_tokens=3, resamples=50, cache_dir=str(Path(out_dir, "cache-ddp")))
        Path(out_dir, f"eval-{rank}.json").write_text(json.dumps(rep["results"]))
    finally:
        ddp.shutdown()


def test_sharded_evaluation_equals_one_process(tmp_path):
    from lmsqueeze.evaluation.api import evaluate

    mc = _mc_file(tmp_path)
    _spawn(_eval_worker, str(tmp_path), mc)
    torch.set_num_threads(1)
    want = evaluate("tiny-llama", tasks=f"{EVAL_TASKS},mc:{mc}", base="tiny-llama", seqlen=48, limit=11,
                    batch_tokens=256, max_new_tokens=3, resamples=50,
                    cache_dir=str(tmp_path / "cache-one"))["results"]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"eval-{rank}.json").read_text())
        assert [r["task"] for r in got] == [r["task"] for r in want]
        for g, w in zip(got, want):
            # every task sharded, generation and safety included: the same items and metrics as one process
            assert len(g["items"]) == len(w["items"]) == (11 if g["task"] != f"mc:{mc}" else 7)
            for key, m in w["metrics"].items():
                assert g["metrics"][key]["n"] == m["n"], (g["task"], key)
                assert g["metrics"][key]["value"] == pytest.approx(m["value"], rel=1e-5, abs=1e-6), (g["task"], key)
            for gi, wi in zip(g["items"], w["items"]):
                for key, val in wi.items():
                    if isinstance(val, float):
                        assert gi[key] == pytest.approx(val, rel=1e-5, abs=1e-6), (g["task"], key)
                    elif isinstance(val, list):
                        assert gi[key] == pytest.approx(val, rel=1e-5, abs=1e-6), (g["task"], key)
                    else:
                        assert gi[key] == val, (g["task"], key)


def test_torchrun_cli_eval(tmp_path):
    out = tmp_path / "report.json"
    res = _torchrun(["-m", "lmsqueeze", "--quiet", "eval", "--model", "tiny-llama", "--tasks", "ppl:pydoc",
                     "--eval-seqlen", "64", "--limit", "5", "--output", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("ppl:pydoc") >= 1
    assert len(json.loads(out.read_text())["results"][0]["items"]) == 5
