"""Property test: for random k, alpha, pullback, inner optimizer, param-group layout and a
checkpoint/reload at a random step, Lookahead follows a plain reference loop written from the
paper's Algorithm 1 and the pullback rules of the ``Lookahead`` docstring.

Everything runs in float64. The reference writes the documented formulas directly
(``phi + alpha * (theta - phi)``, ``alpha * m + (1 - alpha) * m_cached``) where the library uses
``torch.lerp``; the two round differently in the last bit, so trajectories are compared to float64
exactness (relative 1e-10) rather than bit for bit. A wrong k, alpha, counter, pullback or a lost
slow weight moves them by more than 1e-3.

Profiles: ``ci`` (default) is derandomized, 40 examples, no example database, so CI runs the same
cases every time; ``HYPOTHESIS_PROFILE=dev`` draws 300 fresh ones.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import pytest
import torch

from lookahead_dist import PULLBACK_MODES, Lookahead

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

settings.register_profile("ci", max_examples=40, derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

INNERS = ("sgd", "sgd_momentum", "adam", "adamw")
SHAPES = ((3,), (2, 3), (4, 1, 2), (1,))
# Inner momentum-buffer keys, in the order the Lookahead docstring names them.
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


@dataclass(frozen=True)
class Group:
    shapes: tuple[tuple[int, ...], ...]
    lr_scale: float
    k: int | None          # "lookahead_k" override, None = the optimizer's k
    alpha: float | None    # "lookahead_alpha" override
    add_before: int        # added before this step (0: present from the start)


@dataclass(frozen=True)
class Case:
    k: int
    alpha: float
    pullback: str
    inner: str
    nesterov: bool
    weight_decay: float
    groups: tuple[Group, ...]
    grad_holes: frozenset[tuple[int, int]]  # (step, tensor index) without a gradient
    steps: int
    checkpoint_before: int | None  # state_dict/reload into fresh objects after this many steps


alphas = st.one_of(st.just(1.0), st.floats(0.05, 1.0))


@st.composite
def cases(draw) -> Case:
    k = draw(st.integers(1, 5))
    steps = draw(st.integers(1, 14))
    n_groups = draw(st.integers(1, 3))
    groups = []
    for i in range(n_groups):
        groups.append(Group(
            shapes=tuple(draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3))),
            lr_scale=draw(st.sampled_from([1.0, 0.5, 2.0])),
            k=None if i == 0 else draw(st.one_of(st.none(), st.integers(1, 5))),
            alpha=None if i == 0 else draw(st.one_of(st.none(), alphas)),
            add_before=0 if i == 0 else draw(st.integers(0, steps)),
        ))
    n_tensors = sum(len(g.shapes) for g in groups)
    holes = draw(st.frozensets(st.tuples(st.integers(1, steps), st.integers(0, n_tensors - 1)), max_size=6))
    return Case(
        k=k, alpha=draw(alphas), pullback=draw(st.sampled_from(PULLBACK_MODES)),
        inner=draw(st.sampled_from(INNERS)), nesterov=draw(st.booleans()),
        weight_decay=draw(st.sampled_from([0.0, 0.05])), groups=tuple(groups), grad_holes=holes,
        steps=steps, checkpoint_before=draw(st.one_of(st.none(), st.integers(0, steps))),
    )


# -- shared by both loops ---------------------------------------------------------------------------
def initial_params(case: Case) -> list[list[torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    return [[torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in grp.shapes]
            for grp in case.groups]


def inner_group(case: Case, grp: Group, params: list[torch.Tensor]) -> dict:
    base = 0.05 if case.inner.startswith("sgd") else 0.02
    return {"params": params, "lr": base * grp.lr_scale}


def build_inner(case: Case, first: dict) -> torch.optim.Optimizer:
    if case.inner == "sgd":
        return torch.optim.SGD([first], lr=0.05, weight_decay=case.weight_decay)
    if case.inner == "sgd_momentum":
        return torch.optim.SGD([first], lr=0.05, momentum=0.9, nesterov=case.nesterov,
                               weight_decay=case.weight_decay)
    if case.inner == "adam":
        return torch.optim.Adam([first], lr=0.02, weight_decay=case.weight_decay)
    return torch.optim.AdamW([first], lr=0.02, weight_decay=case.weight_decay + 0.1)


def set_grads(case: Case, step: int, params: list[list[torch.Tensor]], active: list[int]) -> None:
    """The gradient of tensor i at step t: a function of (t, i) and the current weights."""
    i = 0
    for gi, grp in enumerate(params):
        for p in grp:
            if gi in active and (step, i) not in case.grad_holes:
                gen = torch.Generator().manual_seed(1000 * step + i)
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) + 0.1 * p.detach()
            else:
                p.grad = None
            i += 1


def snapshot(params: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [p.detach().clone() for grp in params for p in grp]


# -- the reference: Algorithm 1 per param group, pullback rules of the docstring ----------------------
def reference(case: Case) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    params = initial_params(case)
    inner = None
    active: list[int] = []
    slow: dict[torch.Tensor, torch.Tensor] = {}
    cache: dict[torch.Tensor, torch.Tensor] = {}
    count = {gi: 0 for gi in range(len(case.groups))}
    history = []
    for t in range(1, case.steps + 1):
        for gi, grp in enumerate(case.groups):
            if gi not in active and grp.add_before <= t - 1:
                spec = inner_group(case, grp, params[gi])
                if inner is None:
                    inner = build_inner(case, spec)
                else:
                    inner.add_param_group(spec)
                active.append(gi)
        for gi in active:  # phi_0 = theta_0: the value at the start of a tensor's first step
            for p in params[gi]:
                if p not in slow:
                    slow[p] = p.detach().clone()
        set_grads(case, t, params, active)
        inner.step()
        for gi in active:
            count[gi] += 1
            k = case.groups[gi].k or case.k
            if count[gi] < k:
                continue
            count[gi] = 0
            alpha = case.groups[gi].alpha if case.groups[gi].alpha is not None else case.alpha
            with torch.no_grad():
                for p in params[gi]:
                    slow[p] = slow[p] + alpha * (p.detach() - slow[p])  # phi <- phi + alpha (theta - phi)
                    p.copy_(slow[p])                                     # theta <- phi
                    if case.pullback == "reset":
                        inner.state.pop(p, None)  # the inner optimizer re-initialises
                    elif case.pullback == "pullback":
                        st_p = inner.state.get(p, {})
                        m = next((st_p[key] for key in MOMENTUM_KEYS if isinstance(st_p.get(key), torch.Tensor)),
                                 None)
                        if m is None:
                            continue
                        c = cache.get(p, torch.zeros_like(m))  # zeros at the first sync
                        m.copy_(alpha * m + (1 - alpha) * c)
                        cache[p] = m.clone()
        history.append(snapshot(params))
    return history, [slow.get(p) for grp in params for p in grp]


# -- the library, with a checkpoint and reload into fresh objects -------------------------------------
def build_lookahead(case: Case, params: list[list[torch.Tensor]], groups: list[int]) -> Lookahead:
    first = inner_group(case, case.groups[groups[0]], params[groups[0]])
    opt = Lookahead(build_inner(case, first), k=case.k, alpha=case.alpha, pullback=case.pullback)
    for gi in groups[1:]:
        add_group(opt, case, params, gi)
    return opt


def add_group(opt: Lookahead, case: Case, params: list[list[torch.Tensor]], gi: int) -> None:
    grp = case.groups[gi]
    spec = inner_group(case, grp, params[gi])
    if grp.k is not None:
        spec["lookahead_k"] = grp.k
    if grp.alpha is not None:
        spec["lookahead_alpha"] = grp.alpha
    opt.add_param_group(spec)


def library(case: Case) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    params = initial_params(case)
    opt = None
    active: list[int] = []
    history = []
    for t in range(1, case.steps + 1):
        for gi, grp in enumerate(case.groups):
            if gi not in active and grp.add_before <= t - 1:
                if opt is None:
                    opt = build_lookahead(case, params, [gi])
                else:
                    add_group(opt, case, params, gi)
                active.append(gi)
        if case.checkpoint_before == t - 1:  # as a fresh process would: new tensors, new optimizer
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            params = [[torch.nn.Parameter(p.detach().clone()) for p in grp] for grp in params]
            opt = build_lookahead(case, params, active)
            buf.seek(0)
            opt.load_state_dict(torch.load(buf, weights_only=False))
        set_grads(case, t, params, active)
        opt.step()
        history.append(snapshot(params))
    return history, [opt.slow_weight(p) for grp in params for p in grp]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@settings(settings.get_profile(PROFILE))
@given(cases())
def test_lookahead_matches_reference_loop(case: Case):
    want, want_slow = reference(case)
    got, got_slow = library(case)
    for t, (xs, ys) in enumerate(zip(got, want, strict=True), 1):
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            assert close(x, y), f"step {t}, tensor {i}: max |diff| {(x - y).abs().max().item():.3e}"
    for i, (x, y) in enumerate(zip(got_slow, want_slow, strict=True)):
        assert (x is None) == (y is None), f"tensor {i}: slow weight {x} vs reference {y}"
        if x is not None:
            assert close(x, y), f"slow weight {i}: max |diff| {(x - y).abs().max().item():.3e}"


def test_reference_loop_is_not_trivially_equal():
    """The oracle is sharp: the same case with another alpha, k or pullback gives another trajectory."""
    grp = Group(shapes=((2, 3),), lr_scale=1.0, k=None, alpha=None, add_before=0)
    base = Case(k=2, alpha=0.5, pullback="pullback", inner="sgd_momentum", nesterov=False, weight_decay=0.0,
                groups=(grp,), grad_holes=frozenset(), steps=6, checkpoint_before=3)
    got = library(base)[0][-1][0]
    assert close(got, reference(base)[0][-1][0])
    for change in (dict(alpha=0.6), dict(k=3), dict(pullback="none"), dict(pullback="reset")):
        other = reference(Case(**{**base.__dict__, **change}))[0][-1][0]
        assert (got - other).abs().max() > 1e-3, change


def test_reset_with_two_groups_syncing_in_one_step():
    """Found by the property test: Adam, pullback="reset", two param groups, both syncing at step 1
    (the second group's sync put the entries the first group's reset had moved aside back into the
    cleared inner state, and Adam then found a state without exp_avg)."""
    grp = Group(shapes=((3,),), lr_scale=1.0, k=None, alpha=None, add_before=0)
    case = Case(k=1, alpha=0.5, pullback="reset", inner="adam", nesterov=False, weight_decay=0.0,
                groups=(grp, grp), grad_holes=frozenset(), steps=2, checkpoint_before=None)
    got, _ = library(case)
    want, _ = reference(case)
    assert all(close(x, y) for x, y in zip(got[-1], want[-1]))
