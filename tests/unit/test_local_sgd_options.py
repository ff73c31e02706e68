"""Local-SGD mode without spawning: option validation, flat layouts, byte counts, and the engine
on a one-rank gloo group (where the outer step can be checked against torch.optim.SGD)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from lookahead_dist import OUTER_MOMENTUM_KEY, Lookahead, LocalSGDOptions
from lookahead_dist._comm import CommStats, ShardLayout, chunk_sizes, flat_view, plan_buckets


@pytest.mark.parametrize(
    "kwargs,exc,needle",
    [
        (dict(outer_momentum=1.0), ValueError, "outer_momentum` must be in [0, 1), got 1.0"),
        (dict(outer_momentum=-0.1), ValueError, "got -0.1"),
        (dict(outer_momentum=math.nan), ValueError, "got nan"),
        (dict(outer_momentum="0.9"), TypeError, "'0.9'"),
        (dict(outer_momentum=True), TypeError, "True"),
        (dict(nesterov=True), ValueError, "nesterov=True` needs `outer_momentum` > 0"),
        (dict(nesterov=1), TypeError, "nesterov` must be a bool, got 1"),
        (dict(sharded="yes"), TypeError, "'yes'"),
        (dict(comm_dtype=torch.int8), ValueError, "torch.int8"),
        (dict(sharded=True, comm_dtype=torch.bfloat16), ValueError, "comm_dtype=torch.bfloat16"),
        (dict(init="rank0"), ValueError, "'rank0'"),
        (dict(on_ddp_sync="ignore"), ValueError, "'ignore'"),
        (dict(bucket_cap_mb=0), ValueError, "got 0"),
        (dict(bucket_cap_mb=math.inf), ValueError, "got inf"),
        (dict(module=torch.zeros(1)), TypeError, "got Tensor"),
        (dict(buffers=[torch.zeros(1), 3]), TypeError, "['int']"),
        (dict(process_group="world"), TypeError, "process_group` must be a torch.distributed.ProcessGroup"),
    ],
)
def test_options_name_the_bad_value(kwargs, exc, needle):
    with pytest.raises(exc) as info:
        LocalSGDOptions(**kwargs)
    assert needle in str(info.value)


def test_buffers_iterator_is_kept():
    m = torch.nn.BatchNorm1d(3)
    opts = LocalSGDOptions(buffers=m.buffers())
    assert len(opts.buffer_list()) == 3 and len(opts.buffer_list()) == 3  # not spent after one read
    assert len(LocalSGDOptions(module=m).buffer_list()) == 3


def test_needs_initialised_process_group_and_a_valid_flag():
    w = torch.nn.Parameter(torch.ones(2))
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        Lookahead(torch.optim.SGD([w], lr=0.1), local_sgd=True)
    with pytest.raises(TypeError, match="must be a bool or LocalSGDOptions, got 'yes'"):
        Lookahead(torch.optim.SGD([w], lr=0.1), local_sgd="yes")


# -- layouts and counts --------------------------------------------------------------------------
def test_chunk_sizes_match_tensor_split():
    for numel in (0, 1, 5, 8, 13):
        for n in (1, 2, 3, 4):
            assert chunk_sizes(numel, n) == [c.numel() for c in torch.arange(numel).tensor_split(n)]


def test_shard_layout_reduce_scatter_hands_each_rank_its_chunks():
    numels, n = [5, 3, 1, 4], 3
    lay = ShardLayout(numels, n)
    assert lay.numel == n * lay.segment and lay.segment == sum(c[0] for c in lay.chunks)
    # Two "ranks" pack their tensors; the sum's segment r must be chunk r of each summed tensor.
    tensors = [[torch.randn(x) for x in numels] for _ in range(2)]
    bufs = []
    for ts in tensors:
        buf = torch.zeros(lay.numel)
        torch._foreach_copy_(lay.chunk_views(buf), [t.tensor_split(n)[r] for r in range(n) for t in ts])
        bufs.append(buf)
    total = bufs[0] + bufs[1]
    for r in range(n):
        seg = total[r * lay.segment:(r + 1) * lay.segment]
        got = lay.own_views(seg, r)
        want = [(a + b).tensor_split(n)[r] for a, b in zip(*tensors)]
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert sum(lay.pads) == lay.numel - sum(numels)


def test_flat_view_is_memory_order_and_refuses_gaps():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    v = flat_view(x)
    v.add_(1.0)  # a view, not a copy
    assert torch.equal(v, x.permute(0, 2, 3, 1).reshape(-1))
    slow = x.detach().to(dtype=torch.float64, copy=True)  # how slow weights are taken
    assert torch.equal(flat_view(slow).float(), v)
    with pytest.raises(ValueError, match="dense"):
        flat_view(torch.randn(4, 4)[:, ::2])


def test_plan_buckets_by_key_and_cap():
    keys = ["a", "a", "b", "a", "a", "b"]
    nbytes = [40, 40, 10, 100, 10, 10]
    assert plan_buckets(keys, nbytes, cap_bytes=80) == [[0, 1], [2, 5], [3], [4]]
    assert plan_buckets(keys, nbytes, cap_bytes=10**9) == [[0, 1, 3, 4], [2, 5]]


def test_comm_stats_ring_model():
    s = CommStats()
    s.record("all_reduce", "params", 1000, 4)
    s.record("reduce_scatter", "params", 1000, 4)
    s.record("all_gather", "params", 1000, 4)
    assert s.total("wire", op="all_reduce") == s.total("wire", op="reduce_scatter") + s.total("wire", op="all_gather")
    assert s.total("payload") == 3000 and s.total("calls") == 3
    s.reset()
    assert s.total("payload") == 0


# -- the engine on a one-rank group --------------------------------------------------------------
@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _trajectory(opt_factory, steps=9):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = opt_factory(params)
    for t in range(steps):
        g = torch.Generator().manual_seed(t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) + 0.1 * p.detach()
        opt.step()
    return params, opt


@pytest.mark.parametrize("sharded", [False, True])
def test_one_rank_matches_plain_lookahead_and_outer_sgd(one_rank_group, sharded):
    inner = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
    ref, _ = _trajectory(lambda ps: Lookahead(inner(ps), k=3, alpha=0.5))
    ours, opt = _trajectory(lambda ps: Lookahead(inner(ps), k=3, alpha=0.5,
                                                 local_sgd=LocalSGDOptions(sharded=sharded, bucket_cap_mb=1e-5)))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    # Nesterov outer momentum: with one worker the pseudo-gradient is slow - fast.
    ours, opt = _trajectory(lambda ps: Lookahead(inner(ps), k=3, alpha=0.7, local_sgd=LocalSGDOptions(
        outer_momentum=0.9, nesterov=True, sharded=sharded)))
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    slow = [p.detach().clone().requires_grad_(True) for p in ps]
    fast_opt, outer = inner(ps), torch.optim.SGD(slow, lr=0.7, momentum=0.9, nesterov=True)
    for t in range(9):
        g = torch.Generator().manual_seed(t)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) + 0.1 * p.detach()
        fast_opt.step()
        if (t + 1) % 3 == 0:
            with torch.no_grad():
                for s, p in zip(slow, ps):
                    s.grad = s - p
                outer.step()
                for s, p in zip(slow, ps):
                    p.copy_(s)
    for a, b in zip(ours, ps):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for p, s in zip(ours, slow):
        mom = opt.state[p][OUTER_MOMENTUM_KEY]
        torch.testing.assert_close(mom.reshape(-1), outer.state[s]["momentum_buffer"].reshape(-1), rtol=0, atol=1e-6)


def test_process_group_given_twice_must_agree(one_rank_group):
    w = torch.nn.Parameter(torch.ones(2))
    other = dist.new_group([0])
    with pytest.raises(ValueError, match="give it in one place"):
        Lookahead(torch.optim.SGD([w], lr=0.1), local_sgd=LocalSGDOptions(process_group=other),
                  process_group=dist.group.WORLD)
    opt = Lookahead(torch.optim.SGD([w], lr=0.1), process_group=other)  # a group implies the mode
    assert opt.local_sgd is not None and opt.local_sgd.group is other
