"""Single-process reliability: GradScaler hand-off, non-finite syncs, checkpoint checks, hooks, pickling."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

from torch.optim import optimizer as _optim_module

from lookahead_dist import SLOW_KEY, Lookahead



@pytest.fixture(autouse=True)
def _float64_default():
    # float64 here only: a module-level set_default_dtype leaks into every later test file.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]


def set_grads(t: int, params: list[torch.Tensor], scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(1000 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale


# -- GradScaler ---------------------------------------------------------------------------------
def test_grad_scaler_hands_scaled_grads_to_step_and_matches_unscaled_run():
    """With _step_supports_amp_scaling, step() unscales exactly as GradScaler does (power-of-two
    scale: exact), so the trajectory equals the unscaled one bit for bit."""
    params, ref_params = make_params(), make_params()
    opt = Lookahead(torch.optim.Adam(params, lr=0.05), k=3)
    ref = Lookahead(torch.optim.Adam(ref_params, lr=0.05), k=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    seen = []
    opt.register_step_pre_hook(lambda o, a, kw: seen.append(getattr(o, "found_inf", None)))
    for t in range(1, 8):
        scaler.scale(torch.ones(()))
        set_grads(t, params, scale=scaler.get_scale())
        scaler.step(opt)
        scaler.update()
        set_grads(t, ref_params)
        ref.step()
    assert all(f is not None for f in seen), "GradScaler did not hand found_inf to step()"
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)


def test_grad_scaler_after_explicit_unscale_is_not_unscaled_twice():
    params, ref_params = make_params(), make_params()
    opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=2)
    ref = Lookahead(torch.optim.SGD(ref_params, lr=0.1), k=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1000)
    for t in range(1, 6):
        scaler.scale(torch.ones(()))
        set_grads(t, params, scale=scaler.get_scale())
        scaler.unscale_(opt)  # e.g. for gradient clipping
        scaler.step(opt)
        scaler.update()
        set_grads(t, ref_params)
        ref.step()
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)


# -- non-finite syncs ---------------------------------------------------------------------------
def _nan_run(policy: str = "skip"):
    params = make_params()
    opt = Lookahead(torch.optim.Adam(params, lr=0.05), k=3, on_nonfinite=policy)
    for t in range(1, 4):  # first cycle: clean
        set_grads(t, params)
        opt.step()
    slow_before = [opt.slow_weight(p).clone() for p in params]
    set_grads(4, params)
    opt.step()
    with torch.no_grad():
        params[1][0] = float("nan")  # the fast weights go bad mid-cycle
    return params, opt, slow_before


def test_nonfinite_sync_is_skipped_restored_counted_and_warned_once():
    params, opt, slow_before = _nan_run()
    with pytest.warns(RuntimeWarning, match=r"non-finite values at the sync of step\(\) call 6"):
        for t in (5, 6):
            set_grads(t, params)
            opt.step()
    assert opt.nonfinite_syncs == 1
    for p, s in zip(params, slow_before):  # fast <- the previous slow weights, slow unchanged
        assert torch.equal(p.detach(), s)
        assert torch.equal(opt.slow_weight(p), s)
    assert all("exp_avg" not in opt.state[p] for p in params), "inner state was not reset"
    with warnings.catch_warnings():  # training goes on, and the warning is not repeated
        warnings.simplefilter("error")
        for t in range(7, 13):
            set_grads(t, params)
            opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert opt.nonfinite_syncs == 1


def test_values_nonfinite_since_the_slow_weight_was_taken_do_not_skip_syncs():
    # DeepSpeed ZeRO-3 leaves the padding of a rank's flat partition uninitialised: a NaN/inf there
    # is in theta_0 already, has zero gradient, and must not skip the unit's syncs (docs/deepspeed.md,
    # "Partition padding"). A value that turns non-finite during a cycle still does.
    ref = make_params()
    ref_opt = Lookahead(torch.optim.SGD(ref, lr=0.1), k=2)
    params = [torch.nn.Parameter(torch.cat([p.detach().reshape(-1), torch.tensor([float("nan"), float("-inf")])]))
              for p in make_params()]
    opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=2)
    for t in range(1, 7):
        set_grads(t, ref)
        for p, r in zip(params, ref):
            p.grad = torch.cat([r.grad.reshape(-1), torch.zeros(2)])
        ref_opt.step()
        opt.step()
    assert opt.nonfinite_syncs == 0
    for p, r in zip(params, ref):
        assert torch.equal(p.detach()[:-2], r.detach().reshape(-1))
        assert torch.equal(opt.slow_weight(p)[:-2], ref_opt.slow_weight(r).reshape(-1))
    with torch.no_grad():
        params[0][0] = float("nan")  # new: the next sync is skipped
    with pytest.warns(RuntimeWarning, match="non-finite values at the sync"):
        for t in (7, 8):
            for p, r in zip(params, ref):
                p.grad = torch.zeros_like(p)
            opt.step()
    assert opt.nonfinite_syncs == 1


def test_nonfinite_raise_policy():
    params, opt, _ = _nan_run("raise")
    set_grads(5, params)
    opt.step()
    set_grads(6, params)
    with pytest.raises(FloatingPointError, match="non-finite values at the sync"):
        opt.step()


def test_on_nonfinite_is_validated():
    with pytest.raises(ValueError, match=r"`on_nonfinite` must be one of \('skip', 'raise'\), got 'ignore'"):
        Lookahead(torch.optim.SGD(make_params(), lr=0.1), on_nonfinite="ignore")


# -- checkpoints ------------------------------------------------------------------------------
def _trained(params, k=3, steps=2):
    opt = Lookahead(torch.optim.AdamW(params, lr=0.01), k=k)
    for t in range(1, steps + 1):
        set_grads(t, params)
        opt.step()
    return opt


def test_load_rejects_slow_weight_of_wrong_shape_naming_the_parameter():
    sd = _trained(make_params()).state_dict()
    sd["state"][1][SLOW_KEY] = torch.zeros(5)
    fresh = Lookahead(torch.optim.AdamW(make_params(), lr=0.01), k=3)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\.params\[1\] .*`lookahead_slow` has shape \(5,\) "
                                         r"where the parameter needs \(3,\)"):
        fresh.load_state_dict(sd)


def test_load_rejects_non_tensor_and_integer_slow_weights():
    sd = _trained(make_params()).state_dict()
    sd["state"][0][SLOW_KEY] = [1.0, 2.0]
    fresh = Lookahead(torch.optim.AdamW(make_params(), lr=0.01), k=3)
    with pytest.raises(TypeError, match=r"`lookahead_slow` must be a tensor, got list"):
        fresh.load_state_dict(sd)
    sd["state"][0][SLOW_KEY] = torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"has dtype torch.int64; expected a floating dtype"):
        fresh.load_state_dict(sd)


def test_state_dict_goes_through_the_inner_optimizers_method_and_hooks():
    params = make_params()
    opt = _trained(params)
    calls = []
    opt.optimizer.register_state_dict_post_hook(lambda o, sd: calls.append("inner"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("outer-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("outer-post"))
    sd = opt.state_dict()
    assert calls == ["outer-pre", "inner", "outer-post"]
    assert all(SLOW_KEY in s for s in sd["state"].values())


def test_no_stale_side_table_after_reset_sync():
    params = make_params()
    opt = Lookahead(torch.optim.Adam(params, lr=0.01), k=2, pullback="reset")
    for t in range(1, 4):  # a reset sync at t=2, then one more step
        set_grads(t, params)
        opt.step()
    assert not opt._pending, "entries stayed in the side table after the inner optimizer re-stepped"
    assert all(SLOW_KEY in opt.state[p] and "exp_avg" in opt.state[p] for p in params)


# -- hooks and pickling --------------------------------------------------------------------------
def test_global_step_hooks_fire_once_per_step():
    params = make_params()
    opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=2)
    fired = []
    h1 = _optim_module.register_optimizer_step_pre_hook(lambda o, a, kw: fired.append(("pre", type(o).__name__)))
    h2 = _optim_module.register_optimizer_step_post_hook(lambda o, a, kw: fired.append(("post", type(o).__name__)))
    try:
        set_grads(1, params)
        opt.step()
    finally:
        h1.remove()
        h2.remove()
    assert fired == [("pre", "Lookahead"), ("post", "Lookahead")]


def _count_hook(optimizer, args, kwargs):  # module level: picklable
    optimizer.defaults["hook_calls"] = optimizer.defaults.get("hook_calls", 0) + 1


def test_pickle_and_deepcopy_keep_hooks_and_resume_identically():
    params = make_params()
    opt = _trained(params, steps=2)
    opt.register_step_pre_hook(_count_hook)
    clone = pickle.loads(pickle.dumps(opt))
    twin = copy.deepcopy(opt)
    for o in (clone, twin):
        assert len(o._optimizer_step_pre_hooks) == 1
        assert o.state_dict()["state"][0][SLOW_KEY].shape == (4, 3)
    # The copies step their own (copied) parameters exactly like the original.
    copies = [[p for g in o.param_groups for p in g["params"]] for o in (clone, twin)]
    for t in range(3, 7):
        for o, ps in zip((opt, clone, twin), (params, *copies)):
            set_grads(t, ps)
            o.step()
    for ps in copies:
        for p, q in zip(params, ps):
            assert torch.equal(p, q)
    assert clone.defaults["hook_calls"] == 4
