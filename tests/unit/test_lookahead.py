"""Single-process Lookahead: exact trajectories, counting, state, checkpoints, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from lookahead_dist import (
    ALPHA_KEY,
    K_KEY,
    MOMENTUM_KEY,
    SLOW_KEY,
    STEP_KEY,
    Lookahead,
    strip_lookahead_state,
)

INNER = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw_foreach_off": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
}


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def grads_at(t: int, params):
    """Deterministic pseudo-gradients that depend on the step and the current weights."""
    g = torch.Generator().manual_seed(1000 + t)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.1 * p.detach() for p in params]


def set_grads(t, params):
    for p, g in zip(params, grads_at(t, params)):
        p.grad = g


def reference_trajectory(inner_name, steps, k, alpha, params=None):
    """Algorithm 1 written as a plain loop over parameters (the test oracle)."""
    params = params if params is not None else make_params()
    inner = INNER[inner_name](params)
    slow = [p.detach().clone() for p in params]  # phi_0 = theta_0
    history = []
    for t in range(1, steps + 1):
        set_grads(t, params)
        inner.step()
        if t % k == 0:
            with torch.no_grad():
                for s, p in zip(slow, params):
                    s.lerp_(p, alpha)  # phi <- phi + alpha * (theta - phi)
                    p.copy_(s)  # theta <- phi
        history.append([p.detach().clone() for p in params])
    return history


def lookahead_trajectory(inner_name, steps, k, alpha, **kw):
    params = make_params()
    opt = Lookahead(INNER[inner_name](params), k=k, alpha=alpha, **kw)
    history = []
    for t in range(1, steps + 1):
        set_grads(t, params)
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt, params


def assert_bitwise(a, b):
    for step, (xs, ys) in enumerate(zip(a, b, strict=True), 1):
        for x, y in zip(xs, ys, strict=True):
            assert torch.equal(x, y), f"differs at step {step}: max |diff| {(x - y).abs().max()}"


@pytest.mark.parametrize("inner_name", list(INNER))
@pytest.mark.parametrize("k,alpha", [(5, 0.5), (3, 0.8), (1, 0.3), (4, 1.0)])
def test_trajectory_matches_algorithm_1_bitwise(inner_name, k, alpha):
    steps = 3 * k + 2
    ref = reference_trajectory(inner_name, steps, k, alpha)
    got, _, _ = lookahead_trajectory(inner_name, steps, k, alpha)
    assert_bitwise(got, ref)


def test_first_sync_is_theta0_plus_alpha_delta():
    """After k steps, slow == theta_0 + alpha * (theta_k - theta_0) (timm's first sync is a no-op)."""
    k, alpha = 5, 0.5
    params = make_params()
    theta0 = [p.detach().clone() for p in params]
    plain = make_params()
    plain_opt = torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.1)
    opt = Lookahead(INNER["adamw"](params), k=k, alpha=alpha)
    for t in range(1, k + 1):
        set_grads(t, params)
        set_grads(t, plain)
        plain_opt.step()
        opt.step()
    for p, p0, pk in zip(params, theta0, plain):
        expected = p0 + alpha * (pk.detach() - p0)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(opt.slow_weight(p), expected, rtol=0, atol=1e-6)


def test_alpha_one_k_any_equals_inner_optimizer():
    got, _, _ = lookahead_trajectory("adamw", 12, 4, 1.0)
    params = make_params()
    inner = INNER["adamw"](params)
    ref = []
    for t in range(1, 13):
        set_grads(t, params)
        inner.step()
        ref.append([p.detach().clone() for p in params])
    assert_bitwise(got, ref)


def test_slow_weights_live_in_inner_state_and_adam_initialises():
    params = make_params()
    theta0 = [p.detach().clone() for p in params]
    inner = torch.optim.Adam(params, lr=1e-2)
    opt = Lookahead(inner, k=5)
    set_grads(1, params)
    opt.step()
    for p, p0 in zip(params, theta0):
        st = inner.state[p]
        assert {"step", "exp_avg", "exp_avg_sq"} <= set(st)
        assert torch.equal(st[SLOW_KEY], p0)  # the real theta_0, not theta_1
        assert st[SLOW_KEY].data_ptr() != p.data_ptr()
    assert not opt._pending
    assert opt.state is inner.state


def test_pending_param_without_grad_does_not_break_adam():
    params = make_params()
    inner = torch.optim.Adam(params, lr=1e-2)
    opt = Lookahead(inner, k=2)
    frozen = params[1]
    for t in range(1, 6):
        set_grads(t, params)
        if t < 4:
            frozen.grad = None  # no gradient for the first three steps
        opt.step()
    assert "exp_avg" in inner.state[frozen]
    assert SLOW_KEY in inner.state[frozen]


def test_param_groups_are_the_inner_list_also_after_load():
    params = make_params()
    inner = torch.optim.AdamW(params, lr=1e-3)
    opt = Lookahead(inner)
    assert opt.param_groups is inner.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    set_grads(1, params)
    opt.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(5e-4)
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is inner.param_groups
    set_grads(2, params)
    opt.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(2.5e-4)


def test_is_a_real_optimizer_hooks_zero_grad_repr_defaults():
    params = make_params()
    opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=3, alpha=0.4)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.defaults["lr"] == 0.1 and opt.defaults[K_KEY] == 3 and opt.defaults[ALPHA_KEY] == 0.4
    calls = []
    opt.register_step_pre_hook(lambda o, a, kw: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, kw: calls.append("post"))
    set_grads(1, params)
    opt.step()
    assert calls == ["pre", "post"]
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    assert "Lookahead(k=3, alpha=0.4" in repr(opt) and "SGD" in repr(opt)
    clone = copy.deepcopy(opt)
    assert clone.param_groups is clone.optimizer.param_groups


def test_closure_is_passed_through():
    params = make_params()
    opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=2)
    calls = []

    def closure():
        calls.append(1)
        set_grads(1, params)
        return torch.tensor(3.0)

    assert opt.step(closure).item() == 3.0
    assert calls == [1]


def test_add_param_group_per_group_k_alpha_and_own_cycle():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(3))
    opt = Lookahead(torch.optim.SGD([a], lr=1.0), k=2, alpha=0.5)
    a.grad = torch.full((3,), -1.0)
    opt.step()  # a: 1
    opt.add_param_group({"params": [b], K_KEY: 3, ALPHA_KEY: 0.25})
    assert opt.param_groups[1][K_KEY] == 3
    for _ in range(3):
        a.grad = torch.full((3,), -1.0)
        b.grad = torch.full((3,), -1.0)
        opt.step()
    # group a (k=2): 0 -> 1 -> 2, sync: 0 + .5 * 2 = 1 -> 2 -> 3, sync: 1 + .5 * (3 - 1) = 2
    assert torch.allclose(a.detach(), torch.full((3,), 2.0))
    # group b: joined at 0, three steps to 3, sync: 0 + .25 * 3 = .75
    assert torch.allclose(b.detach(), torch.full((3,), 0.75))
    assert opt.slow_weight(b) is not None


def test_narrowed_param_groups_count_per_group():
    """DeepSpeed ZeRO-1/2 call step() once per group with param_groups narrowed to that group."""
    params = make_params()
    k = 3
    ref_params = make_params()
    ref = Lookahead(torch.optim.SGD([{"params": ref_params[:2]}, {"params": ref_params[2:]}], lr=0.1), k=k)
    opt = Lookahead(torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1), k=k)
    for t in range(1, 2 * k + 2):
        set_grads(t, params)
        set_grads(t, ref_params)
        ref.step()
        groups = opt.param_groups
        for g in groups:
            opt.param_groups = [g]
            opt.step()
        opt.param_groups = groups
    assert opt.param_groups is opt.optimizer.param_groups
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)


def test_piecewise_group_steps_count_per_piece():
    """ZeRO-3 sets a group's params to one sub-group partition per step() call."""
    pieces = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
    opt = Lookahead(torch.optim.SGD([pieces[0]], lr=1.0), k=2, alpha=0.5)
    group = opt.param_groups[0]
    for t in range(4):
        for piece in pieces:
            group["params"] = [piece]
            piece.grad = torch.full((4,), -1.0)
            opt.step()
        group["params"] = []
    # each piece: 0 -> 1 -> 2 sync(1) -> 2 -> 3 sync(2): like a plain Lookahead on one tensor
    for piece in pieces:
        assert torch.allclose(piece.detach(), torch.full((4,), 2.0))


def test_grad_scaler_skipped_step_does_not_count():
    k = 3
    params = make_params()
    ref_params = make_params()
    opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=k)
    ref = Lookahead(torch.optim.SGD(ref_params, lr=0.1), k=k)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1000)
    t_ref = 0
    for t in range(1, 9):
        scaler.scale(torch.ones(()))  # what scaler.scale(loss).backward() does first
        set_grads(t, params)
        for p in params:  # the gradients a scaled loss would give (scale is a power of two)
            p.grad.mul_(scaler.get_scale())
        if t == 4:
            params[0].grad[0, 0] = float("inf")  # this step is skipped by the scaler
        scaler.step(opt)
        scaler.update()
        if t != 4:
            t_ref += 1
            set_grads(t, ref_params)
            ref.step()
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("skipped", [{4}, {3}, {2, 3}, {1, 2, 3}, {3, 6}], ids=str)
@pytest.mark.parametrize("resume_at", [None, 5])
def test_grad_scaler_fused_skips_are_tallied_on_the_device(skipped, resume_at):
    """A fused inner optimizer: found_inf stays on the device and the cycle still ends after k applied steps.

    Skips on the k-th call itself, on every call of a cycle, and a checkpoint taken with skips
    still tallied (resume_at) all give the run that never took the skipped steps.
    """
    k = 3

    def fused(ps):
        return torch.optim.AdamW(ps, lr=0.05, fused=True)

    params, ref_params = make_params(), make_params()
    opt = Lookahead(fused(params), k=k)
    ref = Lookahead(fused(ref_params), k=k)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1000)
    for t in range(1, 11):
        scaler.scale(torch.ones(()))
        set_grads(t, params)
        for p in params:  # the gradients a scaled loss would give (the scale stays a power of two)
            p.grad.mul_(scaler.get_scale())
        if t in skipped:
            params[0].grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        if t not in skipped:
            set_grads(t, ref_params)
            ref.step()
        if t == resume_at:
            saved = copy.deepcopy(opt.state_dict())
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = Lookahead(fused(params), k=k)
            opt.load_state_dict(saved)
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
    assert opt.state_dict()["state"][0][STEP_KEY] == ref.state_dict()["state"][0][STEP_KEY]


def test_dcp_style_fake_step_does_not_count():
    params = make_params()
    inner = torch.optim.AdamW(params, lr=1e-3)
    opt = Lookahead(inner, k=2)
    for p in params:  # what torch.distributed.checkpoint does to initialise empty state
        p.grad = torch.zeros_like(p)
    inner.param_groups[0]["lr"] = 0.0
    opt.step()
    inner.param_groups[0]["lr"] = 1e-3
    assert all(opt.slow_weight(p) is None or opt.state_entry(p).get(STEP_KEY, 0) == 0 for p in params)
    set_grads(1, params)
    opt.step()
    assert opt.state_entry(params[0])[STEP_KEY] == 1


def test_lr_zero_warmup_step_with_real_grads_counts():
    params = make_params()
    opt = Lookahead(torch.optim.SGD(params, lr=0.0), k=4)
    set_grads(1, params)
    opt.step()
    assert opt.state_entry(params[0])[STEP_KEY] == 1


# -- checkpoints --------------------------------------------------------------------------------


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("inner_name", ["sgd", "sgd_momentum", "adamw"])
@pytest.mark.parametrize("pullback", ["none", "reset", "pullback"])
@pytest.mark.parametrize("stop_at", [7, 10])  # mid-cycle, and right after a sync
def test_checkpoint_resume_is_bitwise_identical(inner_name, pullback, stop_at):
    k, alpha, total = 5, 0.5, 17
    ref, _, _ = lookahead_trajectory(inner_name, total, k, alpha, pullback=pullback)

    params = make_params()
    opt = Lookahead(INNER[inner_name](params), k=k, alpha=alpha, pullback=pullback)
    for t in range(1, stop_at + 1):
        set_grads(t, params)
        opt.step()
    saved = roundtrip({"model": [p.detach() for p in params], "opt": opt.state_dict()})

    params2 = make_params(seed=123)  # different weights: everything must come from the checkpoint
    with torch.no_grad():
        for p, v in zip(params2, saved["model"]):
            p.copy_(v)
    opt2 = Lookahead(INNER[inner_name](params2), k=k, alpha=alpha, pullback=pullback)
    opt2.load_state_dict(saved["opt"])
    history = []
    for t in range(stop_at + 1, total + 1):
        set_grads(t, params2)
        opt2.step()
        history.append([p.detach().clone() for p in params2])
    assert_bitwise(history, ref[stop_at:])


def test_checkpoint_before_first_step_and_keys():
    params = make_params()
    opt = Lookahead(torch.optim.AdamW(params, lr=1e-3), k=5)
    sd = opt.state_dict()
    assert sd["state"] == {}
    assert sd["param_groups"][0][K_KEY] == 5
    set_grads(1, params)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", SLOW_KEY, STEP_KEY}
    assert sd["state"][0][STEP_KEY] == 1
    assert all(STEP_KEY not in s for i, s in sd["state"].items() if i != 0)


def test_fp32_slow_weights_for_bf16_params_survive_checkpoint():
    params = make_params(torch.bfloat16)
    opt = Lookahead(torch.optim.SGD(params, lr=0.01), k=3, slow_dtype=torch.float32)
    for t in range(1, 5):
        set_grads(t, params)
        opt.step()
    assert all(opt.slow_weight(p).dtype == torch.float32 for p in params)
    sd = roundtrip(opt.state_dict())
    params2 = make_params(torch.bfloat16)
    opt2 = Lookahead(torch.optim.SGD(params2, lr=0.01), k=3, slow_dtype=torch.float32)
    opt2.load_state_dict(sd)
    for p, q in zip(params, params2):
        s, s2 = opt.slow_weight(p), opt2.slow_weight(q)
        assert s2.dtype == torch.float32 and torch.equal(s, s2)


def test_fp32_slow_weights_keep_small_updates_that_bf16_loses():
    """A slow step much smaller than a bf16 ulp of the weight is kept by fp32 slow weights."""
    results = {}
    for slow_dtype in (None, torch.float32):
        w = torch.nn.Parameter(torch.full((4,), 256.0, dtype=torch.bfloat16))
        opt = Lookahead(torch.optim.SGD([w], lr=1.0), k=1, alpha=0.1, slow_dtype=slow_dtype)
        for _ in range(10):
            w.grad = torch.full((4,), -4.0, dtype=torch.bfloat16)  # fast moves +4; slow moves +0.4
            opt.step()
        results[slow_dtype] = opt.slow_weight(w).float()[0].item()
    assert results[None] == 256.0  # 256 + 0.4 rounds back to 256 in bf16 every time
    assert results[torch.float32] > 259.0


def test_plain_inner_checkpoint_into_lookahead_starts_new_cycle():
    params = make_params()
    plain = torch.optim.AdamW(params, lr=1e-2)
    for t in range(1, 4):
        set_grads(t, params)
        plain.step()
    sd = roundtrip(plain.state_dict())
    opt = Lookahead(torch.optim.AdamW(params, lr=1e-2), k=2)
    opt.load_state_dict(sd)
    assert torch.equal(opt.state[params[0]]["exp_avg"], plain.state[params[0]]["exp_avg"])
    theta = [p.detach().clone() for p in params]
    set_grads(4, params)
    opt.step()
    assert all(torch.equal(opt.slow_weight(p), t0) for p, t0 in zip(params, theta))
    assert opt.param_groups[0][K_KEY] == 2


def test_lookahead_checkpoint_into_plain_inner():
    params = make_params()
    opt = Lookahead(torch.optim.AdamW(params, lr=1e-2), k=5)
    for t in range(1, 4):
        set_grads(t, params)
        opt.step()
    sd = roundtrip(opt.state_dict())
    stripped = strip_lookahead_state(sd)
    assert all(SLOW_KEY not in s for s in stripped["state"].values())
    assert K_KEY not in stripped["param_groups"][0]
    plain = torch.optim.AdamW(params, lr=1e-2)
    plain.load_state_dict(stripped)
    assert torch.equal(plain.state[params[0]]["exp_avg"], opt.state[params[0]]["exp_avg"])
    raw = torch.optim.AdamW(params, lr=1e-2)
    raw.load_state_dict(sd)  # the raw dict loads too; the extra entries are ignored by AdamW
    set_grads(4, params)
    raw.step()


def test_checkpoint_of_pending_only_state_round_trips():
    """SGD without momentum keeps no state of its own: slow weights are the whole state."""
    params = make_params()
    opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=4)
    for t in range(1, 3):
        set_grads(t, params)
        opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {SLOW_KEY, STEP_KEY}
    assert torch.equal(sd["state"][1][SLOW_KEY], opt.slow_weight(params[1]))
    assert sd["state"][1][SLOW_KEY] is not params[1]


# -- pullback modes -----------------------------------------------------------------------------


def test_pullback_none_allocates_nothing_beyond_slow_weights():
    _, opt, params = lookahead_trajectory("sgd_momentum", 11, 5, 0.5, pullback="none")
    for p in params:
        assert set(opt.state[p]) <= {"momentum_buffer", SLOW_KEY, STEP_KEY}


def test_pullback_interpolates_momentum_with_a_cached_copy():
    k, alpha = 3, 0.5
    params = make_params()
    inner = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    opt = Lookahead(inner, k=k, alpha=alpha, pullback="pullback")
    ref_params = make_params()
    ref_inner = torch.optim.SGD(ref_params, lr=0.05, momentum=0.9)
    slow = [p.detach().clone() for p in ref_params]
    cache = [torch.zeros_like(p) for p in ref_params]
    for t in range(1, 3 * k + 1):
        set_grads(t, params)
        set_grads(t, ref_params)
        opt.step()
        ref_inner.step()
        if t % k == 0:
            with torch.no_grad():
                for i, p in enumerate(ref_params):
                    slow[i].lerp_(p, alpha)
                    p.copy_(slow[i])
                    m = ref_inner.state[p]["momentum_buffer"]
                    m.lerp_(cache[i], 1 - alpha)  # m <- alpha m + (1 - alpha) cache
                    cache[i] = m.clone()
    for p, q, c in zip(params, ref_params, cache):
        assert torch.equal(p, q)
        cached = opt.state[p][MOMENTUM_KEY]
        assert torch.equal(cached, c)
        assert cached.data_ptr() != opt.state[p]["momentum_buffer"].data_ptr()  # a copy, not an alias


def test_pullback_works_with_adam_exp_avg():
    _, opt, params = lookahead_trajectory("adam", 10, 5, 0.5, pullback="pullback")
    for p in params:
        assert torch.equal(opt.state[p][MOMENTUM_KEY], opt.state[p]["exp_avg"])


def test_reset_reinitialises_inner_state_at_sync():
    k = 3
    params = make_params()
    inner = torch.optim.Adam(params, lr=1e-2)
    opt = Lookahead(inner, k=k, pullback="reset")
    for t in range(1, k + 2):
        set_grads(t, params)
        opt.step()
    assert inner.state[params[0]]["step"].item() == 1  # restarted after the sync at step k
    ref_params = make_params()
    ref = torch.optim.Adam(ref_params, lr=1e-2)
    slow = [p.detach().clone() for p in ref_params]
    for t in range(1, k + 2):
        set_grads(t, ref_params)
        ref.step()
        if t == k:
            with torch.no_grad():
                for s, p in zip(slow, ref_params):
                    s.lerp_(p, 0.5)
                    p.copy_(s)
            ref = torch.optim.Adam(ref_params, lr=1e-2)
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)


# -- slow-weight evaluation and forced sync -------------------------------------------------------


def test_use_slow_weights_swaps_and_restores():
    _, opt, params = lookahead_trajectory("adamw", 7, 5, 0.5)
    fast = [p.detach().clone() for p in params]
    slow = [opt.slow_weight(p).clone() for p in params]
    assert not all(torch.equal(f, s) for f, s in zip(fast, slow))
    with opt.use_slow_weights():
        assert all(torch.equal(p, s) for p, s in zip(params, slow))
    assert all(torch.equal(p, f) for p, f in zip(params, fast))
    with pytest.raises(RuntimeError):
        with opt.use_slow_weights():
            raise RuntimeError("evaluation failed")
    assert all(torch.equal(p, f) for p, f in zip(params, fast))


def test_sync_now_syncs_and_starts_a_new_cycle():
    _, opt, params = lookahead_trajectory("adamw", 7, 5, 0.5)
    expected = [opt.slow_weight(p).lerp(p.detach(), 0.5) for p in params]
    opt.sync_now()
    assert all(torch.equal(p, e) and torch.equal(opt.slow_weight(p), e) for p, e in zip(params, expected))
    assert opt.state_entry(params[0])[STEP_KEY] == 0


# -- validation ---------------------------------------------------------------------------------

BAD_ARGS = [
    (dict(k=0), ValueError, "k.*>= 1, got 0"),
    (dict(k=2.0), TypeError, "k.*int"),
    (dict(k=True), TypeError, "k.*int"),
    (dict(alpha=0.0), ValueError, r"alpha.*\(0, 1\], got 0.0"),
    (dict(alpha=1.5), ValueError, r"alpha.*got 1.5"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha="0.5"), TypeError, "alpha"),
    (dict(pullback="momentum"), ValueError, "pullback.*'momentum'"),
    (dict(slow_dtype=torch.int32), TypeError, "slow_dtype"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_ARGS)
def test_bad_arguments_name_the_value(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Lookahead(torch.optim.SGD(make_params(), lr=0.1), **kwargs)


def test_bad_inner_and_double_wrap():
    with pytest.raises(TypeError, match="torch.optim.Optimizer instance, got list"):
        Lookahead([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(TypeError, match="torch.optim.Optimizer instance, got type"):
        Lookahead(torch.optim.SGD)
    opt = Lookahead(torch.optim.SGD(make_params(), lr=0.1))
    with pytest.raises(TypeError, match="already a Lookahead"):
        Lookahead(opt)


def test_bad_param_group_override():
    opt = Lookahead(torch.optim.SGD(make_params()[:1], lr=0.1))
    with pytest.raises(ValueError, match="lookahead_k.*got -1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], K_KEY: -1})
    assert len(opt.param_groups) == 1


def test_wrap_factory_builds_lookahead():
    build = Lookahead.wrap(torch.optim.AdamW, k=4, alpha=0.6, pullback="reset")
    opt = build(make_params(), lr=1e-3)
    assert isinstance(opt, Lookahead) and isinstance(opt.optimizer, torch.optim.AdamW)
    assert opt.defaults[K_KEY] == 4 and opt.pullback == "reset" and opt.defaults["lr"] == 1e-3
    assert "AdamW" in build.__name__
    with pytest.raises(ValueError, match="k"):
        Lookahead.wrap(torch.optim.AdamW, k=0)


def test_fake_step_leaves_a_complete_template_for_checkpoint_loaders():
    """DCP loads only keys present in the template its fake step creates: counter and slow weight must exist."""
    params = make_params()
    theta0 = [p.detach().clone() for p in params]
    inner = torch.optim.AdamW(params, lr=1e-3)
    opt = Lookahead(inner, k=3, pullback="pullback")
    for p in params:
        p.grad = torch.zeros_like(p)
    inner.param_groups[0]["lr"] = 0.0
    opt.step()
    sd = opt.state_dict()
    assert sd["state"][0][STEP_KEY] == 0
    assert all(torch.equal(sd["state"][i][SLOW_KEY], t0) for i, t0 in enumerate(theta0))
    assert MOMENTUM_KEY in sd["state"][0]


def test_sync_follows_slow_weights_replaced_in_the_state():
    """A host that writes the inner state directly (ZeroRedundancyOptimizer.load_state_dict) must not
    leave the sync updating orphaned tensors."""
    params = make_params()
    opt = Lookahead(torch.optim.SGD(params, lr=0.1, momentum=0.9), k=2)
    for t in range(1, 3):
        set_grads(t, params)
        opt.step()  # the sync at step 2 builds the cached bucket lists
    replaced = [torch.zeros_like(p) for p in params]
    for p, r in zip(params, replaced):
        opt.state[p][SLOW_KEY] = r
    for t in range(3, 5):
        set_grads(t, params)
        opt.step()
    for p, r in zip(params, replaced):
        assert opt.slow_weight(p) is r and torch.equal(p.detach(), r) and r.abs().sum() > 0
