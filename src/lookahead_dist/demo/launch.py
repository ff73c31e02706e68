"""Running a function on N local ranks: spawn them, or join a launcher that already did.

If the process was started by ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``), the process group is initialised from that environment and
the function runs in this process. Otherwise :func:`run_local` spawns ``nproc`` fresh processes
on this machine, joined through a free localhost port. Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..distributed import free_port

__all__ = ["RankFailure", "launched_externally", "run_local"]

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(RuntimeError):
    """A rank raised or died. ``str()`` is one line; ``details`` holds the rank's traceback."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def launched_externally() -> bool:
    """True when a launcher (torchrun, mpiexec wrapper, ...) already set up this process as a rank."""
    return all(v in os.environ for v in _LAUNCHER_VARS)


def _threads_per_rank(nproc: int) -> int:
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // nproc)


def _init(rank: int, world: int, device: str) -> None:
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world)


def _worker(rank: int, world: int, port: int, device: str, threads: int, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    try:
        _init(rank, world, device)
        out = fn(rank, world, *args)
        # Plain pickle: tensors are copied, not shared through file descriptors that die with
        # this process.
        results.put((rank, True, pickle.dumps(out) if rank == 0 else None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        results.put((rank, False, (text, traceback.format_exc())))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_local(fn: Callable[..., Any], nproc: int, args: tuple = (), *, device: str = "cpu") -> Any:
    """``fn(rank, world_size, *args)`` on ``nproc`` ranks; returns rank 0's result.

    Under an external launcher this process is one rank (``nproc`` must match ``WORLD_SIZE``)
    and the return value is this rank's result. Raises :class:`RankFailure` with the failing
    rank's error if any rank raises or dies; the other ranks are then stopped.
    """
    if launched_externally():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != nproc:
            raise RankFailure(f"launched with WORLD_SIZE={world} but --nproc={nproc}; they must agree")
        if not dist.is_initialized():
            _init(rank, world, device)
        return fn(rank, world, *args)

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    threads = _threads_per_rank(nproc)
    procs = [ctx.Process(target=_worker, args=(r, nproc, port, device, threads, fn, args, results), daemon=True)
             for r in range(nproc)]
    for p in procs:
        p.start()
    out: Any = None
    done: set[int] = set()
    failure: str | None = None
    details = ""
    try:
        while len(done) < nproc and failure is None:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                if dead:
                    failure = f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                continue
            done.add(rank)
            if ok:
                if rank == 0:
                    out = pickle.loads(value)
            else:
                text, tb = value
                failure, details = f"rank {rank}: {text}", f"--- traceback of rank {rank} ---\n{tb}"
    finally:
        for p in procs:
            p.join(timeout=30 if failure is None else 2)
            if p.is_alive():
                p.kill()
                p.join()
    if failure is not None:
        raise RankFailure(failure, details)
    return out
