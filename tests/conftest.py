import os

# Keep every test process to one intra-op thread: the CI machine has 2 cores and the
# distributed tests run several ranks at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys
from pathlib import Path

import pytest

# `benchmarks` is a package at the repository root; tests reuse its reference computations.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture
def one_rank_group():
    """A gloo process group of this process alone (an in-memory store: no files, no ports), for the
    duration of the test."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from tests.distributed._spawn import test_backend

    if test_backend() == "nccl":  # LOOKAHEAD_TEST_BACKEND: CPU tensors still need gloo beside NCCL
        import torch

        if not torch.cuda.is_available():
            pytest.skip("LOOKAHEAD_TEST_BACKEND=nccl and no GPU is visible")
        dist.init_process_group("cpu:gloo,cuda:nccl", store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
