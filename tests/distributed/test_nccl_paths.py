"""The NCCL code paths, forced onto gloo: they must compute exactly what the gloo paths compute.

On NCCL the quantised reduce enqueues every stage from the caller's thread (no worker thread) and
fragments travel on a process group of their own (``lookahead_dist._backend``). Forced onto gloo
with ``_backend.forced(STREAM_ORDERED)``, the same code runs with blocking collectives; the
arithmetic is the same, so the results must be equal bit for bit. What only a GPU can show (stream
ordering, no host block, NCCL's own behaviour) is in ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed._spawn import run_ranks

pytestmark = pytest.mark.distributed


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def _train(model, opt, rank: int, steps: int) -> None:
    for t in range(steps):
        g = torch.Generator().manual_seed(100 * rank + t)
        x = torch.randn(5, 6, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


RUNS = {
    "int8-ef-f2t1": dict(comm_dtype="int8", num_fragments=2, fragment_sync_delay=1),
    "int4-ef-blocking": dict(comm_dtype="int4"),
    "fp32-f2t1": dict(num_fragments=2, fragment_sync_delay=1),
    # No timeout here: gloo's reduce-scatter Work never reports is_completed() (torch 2.13), so the
    # host poll that NCCL's reliable is_completed() serves cannot be forced onto it.
    "sharded-f2t1": dict(sharded=True, num_fragments=2, fragment_sync_delay=1, timeout=None),
    # the quantised reduce-scatter of the sharded eager sync (run_stages on the caller's thread)
    "sharded-eager-int8-f2": dict(sharded=True, eager_update=True, num_fragments=2, comm_dtype="int8",
                                  quant_block_size=64),
    # the sparse reduce-scatter of the sharded eager sync
    "sharded-eager-top10-int2": dict(sharded=True, eager_update=True, comm_dtype="int2", topk_fraction=0.1),
}


def _body(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from lookahead_dist import LocalSGDOptions, Lookahead, _backend, _quant

    out: dict = {"reduce": {}, "runs": {}}
    # 1. the quantised reduce: worker thread vs caller thread, with both error-feedback residuals
    for bits in (8, 4):
        per_path = {}
        for path in ("worker", "inline"):
            group = dist.new_group([0, 1])
            n = 1000
            res = torch.zeros(n)
            owner = torch.zeros(_quant.reduce_chunk_numel(n, world, block_size=64))
            outs = []
            ctx = _backend.forced(_backend.STREAM_ORDERED) if path == "inline" else _backend.forced(_backend.HOST_BLOCKING)
            with ctx:
                for t in range(5):
                    x = torch.randn(n, generator=torch.Generator().manual_seed(10 * rank + t)) * (t + 1)
                    work = _quant.quantized_all_reduce_async(x, group, bits=bits, block_size=64, residual=res,
                                                             owner_residual=owner)
                    assert (_quant._worker_for(group, create=False) is None) == (path == "inline")
                    outs.append(work.wait(30.0).numpy().copy())
            per_path[path] = (np.stack(outs), res.numpy().copy(), owner.numpy().copy())
        out["reduce"][bits] = per_path
    # 2. whole runs of the optimizer, the default path and the NCCL path forced
    for name, kw in RUNS.items():
        per_path = {}
        for path in ("default", "forced"):
            model = _model()
            ctx = _backend.forced(_backend.STREAM_ORDERED) if path == "forced" else _backend.forced(_backend.HOST_BLOCKING)
            with ctx:
                opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=4, alpha=0.5,
                                local_sgd=LocalSGDOptions(**{"timeout": 30.0, **kw}))
                _train(model, opt, rank, 13)
                opt.state_dict()  # flush what is in flight
            ls = opt.local_sgd
            if ls.delay > 0 or ls.quant_bits is not None:  # item 5: the sync's own group
                assert ls._frag_group is not None and ls._frag_group is not dist.group.WORLD
                assert dist.get_process_group_ranks(ls._frag_group) == [0, 1]
            per_path[path] = [p.detach().numpy().copy() for p in model.parameters()]
        out["runs"][name] = per_path
    # 3. group creation when each rank's group differs (hierarchical set-ups): a world collective
    alone = dist.new_group([0])
    alone1 = dist.new_group([1])
    mine = alone if rank == 0 else alone1
    twin = _backend.dedicated_group(mine)
    out["twin"] = dist.get_process_group_ranks(twin)
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_body, world_size=2, timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("bits", [8, 4])
def test_caller_thread_reduce_equals_worker_bit_for_bit(results, bits):
    for r in results:
        w, i = r["reduce"][bits]["worker"], r["reduce"][bits]["inline"]
        for a, b in zip(w, i):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(results[0]["reduce"][bits]["inline"][0], results[1]["reduce"][bits]["inline"][0])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(RUNS))
def test_forced_nccl_path_trains_bit_for_bit_like_gloo(results, name):
    for r in results:
        for a, b in zip(r["runs"][name]["default"], r["runs"][name]["forced"]):
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.timeout(300)
def test_dedicated_group_when_every_rank_has_another_group(results):
    assert [r["twin"] for r in results] == [[0], [1]]
