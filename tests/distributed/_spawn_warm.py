"""``run_ranks`` of :mod:`tests.distributed._spawn`, with the ranks forked from a warm server.

Every rank that ``_spawn.run_ranks`` starts is a fresh interpreter that imports torch, DeepSpeed and --
through DeepSpeed's optimizers or ``torch.use_deterministic_algorithms`` -- torch's compiler stack
(dynamo, inductor, sympy): several CPU-seconds per rank, most of the time of a small DeepSpeed test on a
2-core machine, paid again by every rank of every spawn. Here the ranks come from multiprocessing's
*forkserver*: one server process, started on the first call and kept for the test session, imports those
modules once (nothing else: no process group, no model, no state of a test), and each rank is a new
process forked from it. A rank still starts with nothing of an earlier rank or test, and is set up exactly
as ``_spawn``'s (its ``_worker``: environment, one thread, the process group); the parent's current
environment is handed to it, as a spawned child inherits it (a forked one would have the server's).
Under ``LOOKAHEAD_TEST_BACKEND=nccl`` it is ``_spawn.run_ranks`` itself (CUDA and forking do not mix).

Same signature, results and failure reporting as ``_spawn.run_ranks``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch.multiprocessing as mp

from tests.distributed import _spawn

__all__ = ["run_ranks"]

# Imported once by the server: what the DeepSpeed and plain torch tests' ranks import that costs (the
# compiler stack comes with torch.use_deterministic_algorithms, DeepSpeed's engine and its Muon module).
# A module that cannot be imported (DeepSpeed not installed) is skipped by the server; a rank imports
# whatever it needs itself, as under spawn -- the list only decides what is already there.
_PRELOAD = [
    "numpy",
    "pytest",
    "torch",
    "torch.distributed",
    "torch._dynamo",
    "torch._inductor.config",
    "torch._inductor.compile_fx",
    "deepspeed",
    "deepspeed.comm",
    "deepspeed.runtime.engine",
    "deepspeed.runtime.zero.stage_1_and_2",
    "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.zero.muon.muon_optimizer",
    "deepspeed.module_inject",
    "deepspeed.ops.op_builder.all_ops",
    "lookahead_dist",
    "lookahead_dist.distributed",
    "lookahead_dist.deepspeed",
    "lookahead_dist.demo.commcount",
]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any,
            env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)
    _spawn._worker(rank, world_size, port, fn, args, queue)


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (the first call)
    return ctx


def run_ranks(fn: Callable, world_size: int = 2, args: tuple = (), timeout: float = 240.0) -> list[Any]:
    if _spawn.test_backend() == "nccl":  # CUDA and a forked server do not mix: spawned ranks, as before
        return _spawn.run_ranks(fn, world_size, args, timeout)
    env = dict(os.environ)
    return _spawn.start_and_collect(_context(), _worker,
                                    lambda r, port, queue: (r, world_size, port, fn, args, queue, env),
                                    world_size, timeout)
