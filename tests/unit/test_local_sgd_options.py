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
    s.record_wait(0.25)
    s.record_wait(0.5)
    assert (s.wait_seconds, s.waits) == (0.75, 2)
    s.reset()
    assert s.total("payload") == 0 and (s.wait_seconds, s.waits) == (0.0, 0)


# -- the engine on a one-rank group --------------------------------------------------------------
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


# -- streaming: options, schedule, fragments, suggestion --------------------------------------------
from lookahead_dist.sync import streaming  # noqa: E402
from lookahead_dist.sync.local_sgd import (  # noqa: E402
    EF_OWNER_KEY,
    EF_RESIDUAL_KEY,
    INFLIGHT_DUE_KEY,
    INFLIGHT_KEY,
    OUTER_STATE_PREFIX,
    OUTER_STEPS_KEY,
)


@pytest.mark.parametrize(
    "kwargs,exc,needle",
    [
        (dict(num_fragments=0), ValueError, "`num_fragments` must be >= 1, got 0"),
        (dict(num_fragments=2.0), TypeError, "`num_fragments` must be an int, got 2.0"),
        (dict(fragment_sync_delay=-1), ValueError, "`fragment_sync_delay` must be >= 0, got -1"),
        (dict(fragment_sync_delay=True), TypeError, "`fragment_sync_delay` must be an int, got True"),
        (dict(fragment_update_alpha=1.5), ValueError, "`fragment_update_alpha` must be a float in [0, 1], got 1.5"),
        (dict(fragment_update_alpha=math.nan), ValueError, "got nan"),
        (dict(fragments=[["a"]]), ValueError, "pass `module=` too"),
        (dict(fragments="a", module=torch.nn.Linear(1, 1)), TypeError, "list of non-empty lists"),
        (dict(fragments=[["a"], []], module=torch.nn.Linear(1, 1)), TypeError, "list of non-empty lists"),
        (dict(fragments=[["a"], ["b"]], num_fragments=3, module=torch.nn.Linear(1, 1)), ValueError,
         "`num_fragments=3` disagrees with the 2 lists"),
        (dict(outer_optimizer=torch.optim.SGD([torch.zeros(1)], lr=1.0)), TypeError, "got SGD"),
        (dict(outer_optimizer=lambda ps: None, outer_momentum=0.9), ValueError, "drop `outer_momentum`"),
        (dict(comm_dtype="int3"), ValueError, "'int3'"),
        (dict(comm_dtype="int8", sharded=True), ValueError, "comm_dtype=int8` needs the full slow weights"),
        (dict(quant_block_size=7), ValueError, "`quant_block_size` must be an even number >= 2, got 7"),
        (dict(error_feedback=1), TypeError, "`error_feedback` must be a bool, got 1"),
        (dict(timeout=0), ValueError, "`timeout` must be None, a number of seconds > 0"),
        (dict(timeout="1s"), ValueError, "got '1s'"),
    ],
)
def test_streaming_options_name_the_bad_value(kwargs, exc, needle):
    with pytest.raises(exc) as info:
        LocalSGDOptions(**kwargs)
    assert needle in str(info.value)


def test_explicit_fragments_set_num_fragments():
    o = LocalSGDOptions(fragments=[("0",), ["2", "4.weight"]], module=torch.nn.Linear(1, 1))
    assert o.num_fragments == 2 and o.fragments == [["0"], ["2", "4.weight"]]
    assert LocalSGDOptions(comm_dtype="int4").quant_bits == 4 and LocalSGDOptions().quant_bits is None


def test_split_fragments_midpoint_rule():
    # Equal tensors: exact halves / quarters.
    assert streaming.split_fragments([4, 4, 4, 4], 2) == [[0, 1], [2, 3]]
    assert streaming.split_fragments([4, 4, 4, 4], 4) == [[0], [1], [2], [3]]
    # Tensor i goes to floor(F * midpoint_i / total): midpoints 24, 52, 72, 90 of 92 bytes.
    assert streaming.split_fragments([48, 8, 32, 4], 2) == [[0], [1, 2, 3]]
    # A tensor bigger than total / F leaves a neighbour empty; order is kept.
    assert streaming.split_fragments([100, 1, 1], 3) == [[], [0], [1, 2]]
    assert streaming.split_fragments([0, 0], 2) == [[0], [1]]


def test_schedule_launches_and_errors():
    # k=8, F=4: fragment 1 at n=2, 2 at n=4, 3 at n=6, 0 at n=8.
    assert [streaming.launch_fragment(n, 8, 4) for n in range(1, 9)] == [None, 1, None, 2, None, 3, None, 0]
    assert [streaming.launch_fragment(n, 4, 1) for n in range(1, 5)] == [None, None, None, 0]
    assert streaming.check_schedule(8, 4, 1, "param group 0") == 2
    with pytest.raises(ValueError, match=r"`num_fragments=3` needs k \(param group 0: lookahead_k=8\) to be a multiple"):
        streaming.check_schedule(8, 3, 0, "param group 0")
    with pytest.raises(ValueError, match=r"`fragment_sync_delay=2` must be < k / num_fragments = 8 / 4 = 2"):
        streaming.check_schedule(8, 4, 2, "param group 0")


def test_fragments_from_prefixes():
    names = ["0.weight", "0.bias", "2.weight", "20.weight"]
    assert streaming.fragments_from_prefixes(names, [["0"], ["2", "20"]], "u") == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match=r"'20.weight' \(u\) matches no fragment"):
        streaming.fragments_from_prefixes(names, [["0"], ["2"]], "u")
    with pytest.raises(ValueError, match=r"'0.bias' \(u\) matches fragments \[0, 1\]"):
        streaming.fragments_from_prefixes(names, [["0"], ["0.bias", "2", "20"]], "u")
    with pytest.raises(ValueError, match="tensor 1 of u is not a parameter of `module`"):
        streaming.fragments_from_prefixes(["0.weight", None], [["0"]], "u")


def test_suggest_schedule_formula():
    # 2 ranks, 100 MB fp32 on 100 MB/s: a whole-model all-reduce puts 100 MB on the wire (1 s).
    s = streaming.suggest_schedule(100e6, 100e6, 0.1, k=16, verbose=False)
    f = s.num_fragments
    assert s.fragment_seconds == pytest.approx(1.0 / f)
    assert s.fragment_sync_delay < 16 // f
    assert s.blocking_utilisation == pytest.approx(1.6 / 2.6)
    # Fast link: the fragment hides behind one step; the smallest staleness wins.
    fast = streaming.suggest_schedule(25e6, 125e6, 0.05, k=16, verbose=False)
    assert (fast.num_fragments, fast.fragment_sync_delay, fast.utilisation) == (4, 1, 1.0)
    # 4-bit values (+ scales) are 1/8 of the bytes: smaller fragments suffice.
    q = streaming.suggest_schedule(100e6, 100e6, 0.1, k=16, bits=4, verbose=False)
    assert q.utilisation >= s.utilisation
    with pytest.raises(ValueError, match="link_bytes_per_s=0"):
        streaming.suggest_schedule(1e6, 0, 0.1, k=4)
    with pytest.raises(ValueError, match="`bits` must be 32, 16, 8 or 4, got 2"):
        streaming.suggest_schedule(1e6, 1e6, 0.1, k=4, bits=2)


# -- streaming on a one-rank group -----------------------------------------------------------------
def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def _train(model, opt, start, stop, sched=None):
    for t in range(start, stop):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("opts,waits", [(dict(), 3), (dict(num_fragments=2, fragment_sync_delay=1), 6),
                                        (dict(comm_dtype="int8", eager_update=True), 2)])
def test_each_sync_records_its_wait(one_rank_group, opts, waits):
    # k=4, 13 steps: blocking syncs at 4, 8, 12; F=2 tau=1 applies 6 fragments (launched at 2..12);
    # eager F=1 applies at 8 and 12 what was launched at 4 and 8. One wait per bucket applied, timed.
    model = _net()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=4, local_sgd=LocalSGDOptions(**opts))
    _train(model, opt, 0, 13)
    stats = opt.local_sgd.stats
    assert stats.waits == waits and stats.wait_seconds >= 0.0


def test_k_not_divisible_by_fragments_fails_at_the_first_step(one_rank_group):
    model = _net()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=6,
                    local_sgd=LocalSGDOptions(num_fragments=4))
    with pytest.raises(ValueError, match="`num_fragments=4` needs k .param group 0: lookahead_k=6."):
        _train(model, opt, 0, 1)


@pytest.mark.parametrize("opts", [dict(), dict(num_fragments=2, fragment_sync_delay=1), dict(sharded=True)])
def test_builtin_outer_step_is_bitwise_torch_sgd(one_rank_group, opts):
    runs = []
    for outer in (dict(outer_momentum=0.9, nesterov=True),
                  dict(outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True))):
        model = _net()
        opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5), k=4, alpha=0.7,
                        local_sgd=LocalSGDOptions(**outer, **opts))
        _train(model, opt, 0, 10)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_explicit_fragments_sync_their_modules(one_rank_group):
    model = _net()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=4, local_sgd=LocalSGDOptions(
        module=model, fragments=[["2"], ["0"]]))
    stats, per_step = opt.local_sgd.stats, []
    for t in range(4):
        before = stats.total("payload", label="params")
        _train(model, opt, t, t + 1)
        per_step.append(stats.total("payload", label="params") - before)
    # Fragment 1 (module "0": 3*4+4 values) at n=2, fragment 0 (module "2": 4*2+2) at n=4.
    assert per_step == [0, 16 * 4, 0, 10 * 4]


def test_dcp_template_before_the_first_sync_and_resume_in_flight(one_rank_group, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def build():
        model = _net()
        opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=0.01), k=4, alpha=0.5, local_sgd=LocalSGDOptions(
            num_fragments=2, fragment_sync_delay=1, comm_dtype="int8", quant_block_size=4,
            outer_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1, eps=1e-3)))
        return model, opt

    # A template of a fresh optimizer (DCP's fake step) already has every key the strategy needs.
    model, opt = build()
    template = get_optimizer_state_dict(model, opt)
    keys = set(template["state"]["0.weight"])
    assert {INFLIGHT_KEY, INFLIGHT_DUE_KEY, EF_RESIDUAL_KEY, EF_OWNER_KEY, OUTER_STEPS_KEY,
            OUTER_STATE_PREFIX + "exp_avg", OUTER_STATE_PREFIX + "exp_avg_sq", OUTER_STATE_PREFIX + "step"} <= keys

    straight, straight_opt = build()
    _train(straight, straight_opt, 0, 12)
    model, opt = build()
    _train(model, opt, 0, 6)  # fragment 1 launched at step 6, due at step 7
    assert opt.local_sgd.in_flight() == [(1, 1)]
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(tmp_path / "ckpt"))
    model2, opt2 = build()
    state = {"model": model2.state_dict(), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    model2.load_state_dict(state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])
    _train(model2, opt2, 6, 12)
    for a, b in zip(model2.parameters(), straight.parameters()):
        assert torch.equal(a, b)
    with opt2.use_slow_weights():
        slow2 = [p.detach().clone() for p in model2.parameters()]
    with straight_opt.use_slow_weights():
        assert all(torch.equal(a, b) for a, b in zip(slow2, straight.parameters()))


def test_streaming_docstring_examples():
    import doctest

    result = doctest.testmod(streaming, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_streaming_options_refused_with_a_torchft_manager():
    class FakeManager:
        def start_quorum(self): ...
        def allreduce(self, t): ...
        def should_commit(self): ...
        def register_state_dict_fn(self, *a): ...

    with pytest.raises(ValueError, match="`num_fragments=2` is not supported with a torchft `manager`"):
        LocalSGDOptions(manager=FakeManager(), num_fragments=2, outer_optimizer=lambda ps: None)


@pytest.mark.parametrize("sharded", [False, True])
def test_plans_are_built_once_when_each_step_hands_a_new_list(one_rank_group, monkeypatch, sharded):
    # DeepSpeed ZeRO-3 sets param_groups[i]["params"] to a new one-tensor list at every step() of a
    # sub-group. The fragment/bucket plans must be reused (the check runs at every step), and the
    # result must stay that of the unchanged list.
    from lookahead_dist.sync import local_sgd

    builds = []
    real = local_sgd.LocalSGD._build_plans
    monkeypatch.setattr(local_sgd.LocalSGD, "_build_plans", lambda self, *a: builds.append(1) or real(self, *a))

    def run(new_list_each_step: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(3))]
        opt = Lookahead(torch.optim.SGD(ps, lr=0.1, momentum=0.9), k=2, alpha=0.5,
                        local_sgd=LocalSGDOptions(sharded=sharded, num_fragments=2))
        for t in range(8):
            for p in ps:
                p.grad = torch.full_like(p, 0.1 * (t + 1))
            if new_list_each_step:
                opt.param_groups[0]["params"] = list(ps)
            opt.step()
        return [p.detach().clone() for p in ps]

    builds.clear()
    ref = run(False)
    once = len(builds)
    builds.clear()
    got = run(True)
    assert len(builds) == once  # not once per step
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


# -- eager outer updates (Note [Eager outer updates] in sync/_outer.py) -----------------------------
@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(eager_update="yes"), "`eager_update` must be True, False or 'naive', got 'yes'"),
        (dict(eager_update=1), "`eager_update` must be True, False or 'naive', got 1"),
        (dict(eager_update=False, sharded=True, comm_dtype="int8", topk_fraction=0.02),
         "`comm_dtype=int8` needs the full slow weights"),
        (dict(eager_update="naive", fragment_sync_delay=1),
         "`eager_update='naive'` cannot be combined with `fragment_sync_delay=1`"),
        (dict(eager_update=True, fragment_update_alpha=0.5),
         "`eager_update=True` cannot be combined with `fragment_update_alpha=0.5`"),
    ],
)
def test_eager_update_options_name_the_bad_value(kwargs, needle):
    with pytest.raises(ValueError) as info:
        LocalSGDOptions(**kwargs)
    assert needle in str(info.value)


def test_eager_update_rule_names():
    assert LocalSGDOptions(eager_update=True, sharded=True).eager_rule == "eager"  # sharded: accepted
    assert LocalSGDOptions(eager_update=True, sharded=True, comm_dtype=torch.bfloat16).sharded  # progress: bf16 ok
    # progress: the sparse reduce-scatter
    assert LocalSGDOptions(eager_update=True, sharded=True, comm_dtype="int8", topk_fraction=0.02).sharded
    for cd in ("int8", "int4", "int2"):  # progress: a quantised reduce-scatter
        assert LocalSGDOptions(eager_update=True, sharded=True, comm_dtype=cd, fused_kernels=True).quant_bits
    assert LocalSGDOptions().eager_rule is None
    assert LocalSGDOptions(eager_update=True).eager_rule == "eager"
    assert LocalSGDOptions(eager_update="naive").eager_rule == "naive"


def test_eager_update_refused_with_a_torchft_manager():
    class FakeManager:
        def start_quorum(self): ...
        def allreduce(self, t): ...
        def should_commit(self): ...
        def register_state_dict_fn(self, *a): ...

    with pytest.raises(ValueError, match="`eager_update=True` is not supported with a torchft `manager`"):
        LocalSGDOptions(manager=FakeManager(), eager_update=True)


def test_eager_update_state_keys_and_in_flight_on_one_rank(one_rank_group):
    from lookahead_dist._keys import EAGER_INFLIGHT_KEY, EAGER_START_KEY

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(3))]
    opt = Lookahead(torch.optim.SGD(ps, lr=0.1), k=2, alpha=0.5, local_sgd=LocalSGDOptions(eager_update=True))
    for t in range(3):
        for p in ps:
            p.grad = torch.full_like(p, 0.1 * (t + 1))
        opt.step()
    assert opt.local_sgd.in_flight() == [(0, 1)]  # launched at step 2, applied at step 4
    st = opt.state_dict()["state"][0]
    assert EAGER_START_KEY in st and st[EAGER_INFLIGHT_KEY] == 1
