"""Start torch.distributed from whatever launched this process: torchrun, mpiexec, or nothing.

``init_distributed()`` is the one call a training script needs before building its model::

    from lookahead_dist.distributed import init_distributed

    rank, world_size = init_distributed()       # gloo on CPU, nccl when CUDA is present

Note [Which launcher]
---------------------
- torchrun, ``accelerate launch`` and the DeepSpeed launcher export ``RANK``/``WORLD_SIZE`` with
  ``MASTER_ADDR``/``MASTER_PORT``: the ``env://`` rendezvous uses them as they are.
- mpiexec exports its own variables: MPICH's Hydra ``PMI_RANK``/``PMI_SIZE`` (local rank
  ``MPI_LOCALRANKID``), Open MPI ``OMPI_COMM_WORLD_RANK``/``_SIZE`` (``_LOCAL_RANK``), MVAPICH2
  ``MV2_COMM_WORLD_RANK``/``_SIZE``, PMIx ``PMIX_RANK`` with ``OMPI_COMM_WORLD_SIZE``. They are
  translated into the torchrun variables (so later code, e.g. accelerate, sees a torchrun-style
  environment). Where ``MASTER_ADDR``/``MASTER_PORT`` are not set, mpi4py agrees on them: rank 0
  takes a free port and its address (``127.0.0.1`` when every rank runs on rank 0's host), and
  broadcasts both. Without mpi4py the two variables must be set by hand.
- Nothing (a plain ``python train.py``): a one-rank group over an in-memory store, so code that
  calls collectives or wraps the model in DDP runs unchanged on one process.

torch.distributed does not use MPI as a transport here (the PyPI torch wheels have no MPI
backend); MPI only starts the processes and tells each its rank.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "detect_launch", "LaunchInfo", "default_backend", "free_port", "exit_process"]

# (rank, size, local rank) variable names of each MPI flavour, in lookup order.
_MPI_VARS = (
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Hydra (and Intel MPI)
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),  # MVAPICH2
    ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # PMIx (Open MPI 5 / srun)
)
_BACKENDS = ("gloo", "nccl", "mpi", "xccl", "cpu:gloo,cuda:nccl")


@dataclass(frozen=True)
class LaunchInfo:
    """How this process was started (before any process group exists)."""

    launcher: str  # "env" (torchrun-style variables), "mpi", or "single"
    rank: int
    world_size: int
    local_rank: int


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def detect_launch() -> LaunchInfo:
    """Read rank, world size and local rank from the environment (Note [Which launcher])."""
    rank, size = _int_env("RANK"), _int_env("WORLD_SIZE")
    if rank is not None and size is not None:
        local = _int_env("LOCAL_RANK")
        return LaunchInfo("env", rank, size, rank if local is None else local)
    for rank_var, size_var, local_var in _MPI_VARS:
        rank, size = _int_env(rank_var), _int_env(size_var)
        if rank is not None and size is not None:
            local = _int_env(local_var)
            return LaunchInfo("mpi", rank, size, rank if local is None else local)
    return LaunchInfo("single", 0, 1, 0)


def default_backend() -> str:
    """``"nccl"`` when CUDA is available, else ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port(host: str = "") -> int:
    """A TCP port that is free on ``host`` now (``""``: on every interface), e.g. for MASTER_PORT.

    Another process may take it before it is bound again; fine for a job started right away.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _mpi_rendezvous(info: LaunchInfo) -> None:
    """Agree on MASTER_ADDR/MASTER_PORT through MPI where the launcher did not set them."""
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            f"init_distributed: launched by MPI with {info.world_size} ranks, but MASTER_ADDR/MASTER_PORT "
            "are not set and mpi4py is not installed to agree on them. Export MASTER_ADDR (rank 0's "
            "address) and MASTER_PORT, or `pip install 'lookahead-dist[mpi]'`"
        ) from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size or comm.Get_rank() != info.rank:
        raise RuntimeError(
            f"init_distributed: the environment says rank {info.rank} of {info.world_size}, mpi4py says "
            f"{comm.Get_rank()} of {comm.Get_size()}; was mpi4py built for another MPI than mpiexec's?"
        )
    host = socket.gethostname()
    hosts = comm.allgather(host)
    if info.rank == 0:
        # One host: loopback always works. Several: rank 0's resolvable address (override with MASTER_ADDR).
        addr = "127.0.0.1" if all(h == host for h in hosts) else socket.gethostbyname(host)
        chosen = (os.environ.get("MASTER_ADDR") or addr, os.environ.get("MASTER_PORT") or str(free_port()))
    else:
        chosen = None
    addr, port = comm.bcast(chosen, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from the launcher's environment; return ``(rank, world_size)``.

    Args:
        backend: ``"gloo"``, ``"nccl"``, ...; None picks ``"nccl"`` when CUDA is available, else
            ``"gloo"``. With CUDA the current device becomes ``LOCAL_RANK`` (modulo the device count).

    Idempotent: when a default group exists already, its rank and size are returned and
    ``backend`` is not looked at. See Note [Which launcher] for the environments recognised.
    """
    if backend is not None and (not isinstance(backend, str) or backend not in _BACKENDS):
        raise ValueError(f"init_distributed `backend` must be None or one of {_BACKENDS}, got {backend!r}")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    info = detect_launch()
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"init_distributed: rank {info.rank} is outside a world of {info.world_size} ({info.launcher})")
    backend = backend or default_backend()
    if backend.endswith("nccl") and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if info.launcher == "single":
        # No launcher: a one-rank group over an in-memory store, no port needed.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return 0, 1
    if info.launcher == "mpi":
        _mpi_rendezvous(info)
        # Downstream code (accelerate, DeepSpeed, user scripts) reads the torchrun variables.
        os.environ.setdefault("RANK", str(info.rank))
        os.environ.setdefault("WORLD_SIZE", str(info.world_size))
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    elif not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise RuntimeError(
            "init_distributed: RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not; "
            "launch with torchrun (which sets all four) or export them"
        )
    dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size)
    return dist.get_rank(), dist.get_world_size()


def exit_process(code: int = 0) -> NoReturn:
    """Flush stdout/stderr and end the process *without* interpreter finalization (``os._exit``).

    For the last line of a training script, after ``destroy_process_group()``. With torch 2.13 a
    gloo worker thread (``pt_gloo_runloop``) can still be releasing the last collective's work
    object when the main thread reaches interpreter finalization; the object's destructor then
    needs the GIL, the thread is torn down inside it, and the process aborts with ``terminate
    called without an active exception`` (SIGABRT, exit code -6) after all its work is done (seen
    in this project's CI with DDP, DeepSpeed and accelerate scripts, more often on a loaded
    machine; backtrace in docs/torchrun.md). Leaving with ``os._exit`` skips that teardown: use it
    only when everything the process must write is written (files closed, checkpoints saved).
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream: nothing left to flush
            pass
    os._exit(code)

