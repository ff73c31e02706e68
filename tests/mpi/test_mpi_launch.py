"""Run under MPI: ``mpiexec -n 2 python -m pytest --with-mpi tests/mpi`` (launch/test.sh does).

Each rank is a process started by mpiexec (MPICH's Hydra from PyPI); torch.distributed is
initialised from MPI's environment by ``init_distributed`` and then trains with gloo. Every rank
computes the single-process reference itself and compares.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from launch.train_example import build_model, checksum, global_batch, shard
from lookahead_dist import Lookahead
from lookahead_dist.distributed import detect_launch, init_distributed
from tests.distributed import _example_ref as ref

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def world():
    from mpi4py import MPI

    torch.set_num_threads(1)
    assert "RANK" not in os.environ or dist.is_initialized(), "these tests must be started by mpiexec, not torchrun"
    # These tests reduce CPU tensors: gloo, even where CUDA is visible (init_distributed's default
    # would pick NCCL there); LOOKAHEAD_TEST_BACKEND=nccl adds NCCL for CUDA tensors beside gloo.
    from tests.distributed._spawn import test_backend

    rank, size = init_distributed("cpu:gloo,cuda:nccl" if test_backend() == "nccl" else "gloo")
    yield rank, size, MPI.COMM_WORLD
    dist.destroy_process_group()


def test_init_from_mpi_environment(world):
    rank, size, comm = world
    assert (rank, size) == (comm.Get_rank(), comm.Get_size())
    assert detect_launch().launcher in ("env", "mpi")  # "env" once init_distributed exported RANK
    assert dist.get_backend() in ("gloo", "cpu:gloo,cuda:nccl"), dist.get_backend()
    # Every rank agreed on one rendezvous, and the group really connects them.
    assert len(set(comm.allgather((os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])))) == 1
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == size * (size + 1) / 2
    assert init_distributed() == (rank, size)  # idempotent


def _train(rank: int, size: int, local_sgd: bool, steps: int = 12, k: int = 5) -> float:
    model = build_model(0)
    net = model if local_sgd else DDP(model)
    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-2), k=k, alpha=0.5, local_sgd=local_sgd)
    for step in range(1, steps + 1):
        x, y = (shard(t, rank, size) for t in global_batch(0, step, 16))
        loss = nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return checksum(model)


@pytest.mark.parametrize("local_sgd", [False, True], ids=["ddp", "local_sgd"])
def test_lookahead_matches_single_process_reference(world, local_sgd):
    rank, size, comm = world
    got = _train(rank, size, local_sgd)
    want = ref.local_sgd(size) if local_sgd else ref.data_parallel()
    # The ranks end identical (DDP steps on averaged gradients; local SGD just synced at step 10
    # and then diverges for 2 local steps, so there only rank 0's replica is compared).
    sums = comm.allgather(got)
    if not local_sgd:
        assert len(set(sums)) == 1, sums
    assert ref.close(got if not local_sgd else sums[0], want), (got, want)
