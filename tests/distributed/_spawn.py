"""Run a function on N real processes joined by a gloo process group.

Usage in a test::

    def _body(rank, world_size, tmp):   # module-level, so that spawn can pickle it
        ...                              # torch.distributed is initialised (gloo)
        return some_picklable_result

    results = run_ranks(_body, world_size=2, args=(tmp_path,))   # list, one per rank

Return picklable non-tensor results (numbers, lists, numpy arrays): a tensor returned through the
queue is shared memory that dies with the child process.

Exceptions in a rank are re-raised in the test with the rank's traceback; a hang fails after
``timeout`` seconds instead of stalling CI.
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lookahead_dist.distributed import free_port

__all__ = ["run_ranks", "free_port", "test_backend"]

_BACKENDS = ("gloo", "nccl")


def test_backend() -> str:
    """The backend the tests run on: ``LOOKAHEAD_TEST_BACKEND`` (``gloo`` by default, or ``nccl``).

    With ``nccl`` each rank takes the GPU of its rank, and a test that needs more ranks than there
    are visible GPUs is skipped with the reason. The scenarios themselves still build CPU tensors
    unless they ask for ``cuda``; only the tests written for a device run on NCCL as they stand."""
    name = os.environ.get("LOOKAHEAD_TEST_BACKEND", "gloo").strip().lower()
    if name not in _BACKENDS:
        raise ValueError(f"LOOKAHEAD_TEST_BACKEND must be one of {_BACKENDS}, got {name!r}")
    return name


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        backend = test_backend()
        if backend == "nccl":
            torch.cuda.set_device(rank)
            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    device_id=torch.device("cuda", rank))
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        queue.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn: Callable, world_size: int = 2, args: tuple = (), timeout: float = 240.0) -> list[Any]:
    if test_backend() == "nccl" and world_size > torch.cuda.device_count():
        import pytest

        pytest.skip(f"LOOKAHEAD_TEST_BACKEND=nccl: this test needs {world_size} ranks, one GPU each, and "
                    f"{torch.cuda.device_count()} GPU(s) are visible")
    return start_and_collect(mp.get_context("spawn"), _worker,
                             lambda r, port, queue: (r, world_size, port, fn, args, queue), world_size, timeout)


def start_and_collect(ctx: Any, target: Callable, make_args: Callable[[int, int, Any], tuple], world_size: int,
                      timeout: float) -> list[Any]:
    """Start ``world_size`` processes of ``ctx`` running ``target(*make_args(rank, port, queue))``
    and collect each rank's ``(rank, ok, result)`` from the queue; the first failure is raised with
    its traceback and the other ranks are killed (shared by _spawn_warm's forkserver ranks)."""
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=make_args(r, port, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, out = queue.get(timeout=timeout)
            if ok:
                results[rank] = out
            else:
                errors.append(f"--- rank {rank} ---\n{out}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("a rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
