"""Crash and resume under real torchrun: kill -9 one rank mid-run, torchrun restarts the job from
the last checkpoint, and the final state is bit-identical to a run that was never interrupted.

launch/train_resumable.py trains 20 steps on 2 gloo ranks (Lookahead(AdamW), k=3, so the
checkpoints at steps 5, 10, 15, 20 are all mid-cycle) and checkpoints every 5 steps with
lookahead_dist.checkpointing. With ``--crash-at 12`` rank 1 SIGKILLs itself after step 12 on the
first attempt; torchrun (``--max-restarts 1``) stops rank 0, starts both again, and they resume
from step 10. Each mode runs twice, killed and uninterrupted; both ranks' final model *and
optimizer state* (slow weights, counters, Adam moments) must be equal bit for bit.

The six torchrun jobs start together (each spends most of its time starting Python and torch).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "train_resumable.py"
MODES = ("ddp", "zero2", "local-sgd")
STEPS, EVERY, CRASH_AT = 20, 5, 12
pytestmark = [pytest.mark.distributed]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               # Note [torchrun's shared store] in lookahead_dist.checkpointing: else restarts cannot connect.
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _launch(mode: str, root: Path, crash: bool) -> tuple[subprocess.Popen, Path]:
    root.mkdir(parents=True)
    log = root / "log.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", str(SCRIPT), "--mode", mode, "--ckpt", str(root / "ckpt"),
           "--out", str(root / "out"), "--steps", str(STEPS), "--every", str(EVERY), "--events"]
    if crash:
        cmd += ["--crash-at", str(CRASH_AT)]
    with open(log, "w") as f:  # a file, not a pipe: a job can never block on its output
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, bool], dict[str, Any]]:
    """(mode, crashed) -> {"rc", "log", "dir"} for all six jobs, run concurrently."""
    if "zero2" in MODES:
        pytest.importorskip("deepspeed")
    base = tmp_path_factory.mktemp("crash_resume")
    jobs = {(mode, crash): _launch(mode, base / f"{mode}-{'crash' if crash else 'ref'}", crash)
            for mode in MODES for crash in (False, True)}
    deadline = time.monotonic() + 200
    out: dict[tuple[str, bool], dict[str, Any]] = {}
    try:
        for key, (proc, log) in jobs.items():
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = None
            out[key] = {"rc": rc, "log": log.read_text(), "dir": log.parent}
    finally:
        for proc, _ in jobs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the agent and its workers
    return out


def _events(log: str) -> list[tuple[int, str, dict[str, str]]]:
    """(rank, what, fields) of the script's EVENT lines, in order."""
    found = []
    for m in re.finditer(r"^EVENT t=\S+ rank=(\d+) (\w+)((?: \w+=\S+)*)$", log, re.M):
        fields = dict(kv.split("=", 1) for kv in m.group(3).split())
        found.append((int(m.group(1)), m.group(2), fields))
    return found


def _assert_equal(a: Any, b: Any, path: str = "") -> int:
    """Bit-for-bit equality of nested state; returns the number of tensors compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{path}: max |diff| {(a.double() - b.double()).abs().max().item():.3e}"
        return 1
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        return sum(_assert_equal(a[k], b[k], f"{path}/{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        return sum(_assert_equal(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    assert a == b, f"{path}: {a!r} vs {b!r}"
    return 0


def _final(run: dict[str, Any], rank: int) -> dict[str, Any]:
    return torch.load(run["dir"] / "out" / f"final_rank{rank}.pt", weights_only=False)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", MODES)
def test_kill9_restart_resumes_bit_identical(runs, mode):
    ref, crashed = runs[(mode, False)], runs[(mode, True)]
    for name, run in (("uninterrupted", ref), ("killed", crashed)):
        assert run["rc"] == 0, f"{mode} {name} run: exit {run['rc']}\n{run['log'][-5000:]}"

    # The kill and the restart really happened: rank 1 died after step 12 of attempt 0; attempt 1
    # resumed both ranks from the step-10 checkpoint. The reference run never restarted.
    ev = _events(crashed["log"])
    assert (1, "crash", {"step": str(CRASH_AT)}) in ev, crashed["log"][-3000:]
    assert "exitcode: -9" in crashed["log"], crashed["log"][-3000:]  # torchrun saw the SIGKILL
    resumed = sorted((r, f["attempt"], f["step"]) for r, what, f in ev if what == "resumed")
    assert resumed == [(0, "0", "0"), (0, "1", "10"), (1, "0", "0"), (1, "1", "10")], resumed
    assert all(f.get("attempt") == "0" for _, what, f in _events(ref["log"]) if what in ("start", "resumed"))

    # Same final weights and optimizer state on both ranks, bit for bit.
    finals = []
    for rank in (0, 1):
        a, b = _final(ref, rank), _final(crashed, rank)
        assert _assert_equal(a, b, f"{mode} rank {rank}") >= 4
        finals.append(a)
    # Data parallel replicas agree; local SGD's replicas are mid-cycle (20 % 3 = 2 steps apart) and
    # differ, so each rank's own checkpoint file was needed.
    differ = [not torch.equal(finals[0]["model"][k], finals[1]["model"][k]) for k in finals[0]["model"]]
    assert any(differ) == (mode == "local-sgd"), differ

    # The commit left `latest` on the last step and pruned all but the newest two checkpoints.
    ckpt = crashed["dir"] / "ckpt"
    assert (ckpt / "latest").read_text() == f"step_{STEPS:08d}"
    assert sorted(p.name for p in ckpt.glob("step_*")) == [f"step_{STEPS - EVERY:08d}", f"step_{STEPS:08d}"]


def _disagree(rank: int, world: int, tmp: Path) -> list[str]:
    from lookahead_dist.checkpointing import load_latest, save_checkpoint

    model = torch.nn.Linear(2, 1)
    errors = []
    try:
        save_checkpoint(tmp / "shared", model, None, 5 + rank)  # ranks at different steps
    except ValueError as exc:
        errors.append(str(exc))
    # A directory per rank, as on nodes without a shared file system: only rank 0's gets `latest`.
    save_checkpoint(tmp / f"own{rank}", model, None, 5)
    try:
        load_latest(tmp / f"own{rank}", model, None)
    except RuntimeError as exc:
        errors.append(str(exc))
    return errors


@pytest.mark.timeout(120)
def test_ranks_that_disagree_fail_clearly(tmp_path):
    """save_checkpoint with different steps per rank, and load_latest on directories that are not
    shared, raise on every rank with the per-rank values instead of committing a broken checkpoint."""
    from ._spawn import run_ranks

    for errors in run_ranks(_disagree, 2, (tmp_path,)):
        assert errors == [
            "save_checkpoint: the ranks passed different steps [5, 6]; every rank must save the same step, "
            "at the same point of the loop",
            "ranks found different latest checkpoints (step per rank: [5, 'none']); the checkpoint directory "
            "must be one shared file system that every rank reads",
        ]
    assert not (tmp_path / "shared" / "latest").exists()
