r"""The outer step of local SGD, shared by :class:`~lookahead_dist.sync.local_sgd.LocalSGD` and the
torchft strategy (:mod:`lookahead_dist.sync.ft`), the proxy that steps a user's outer optimizer,
and the eager / naive delayed outer updates (:class:`EagerOuter`, Note [Eager outer updates]).

Note [The outer step]
---------------------
With N ranks holding fast weights :math:`\theta^{(i)}` after k inner steps from the shared slow
weights :math:`\phi`, the sync computes the *pseudo-gradient* (the average progress, negated)

.. math::
    d = \phi - \frac{1}{N}\sum_i \theta^{(i)}

and an outer SGD step with learning rate :math:`\alpha` and momentum :math:`\beta` (state
:math:`u`, zero at first):

.. math::
    \begin{aligned}
        u &\leftarrow \beta u + d \\
        \phi &\leftarrow \phi - \alpha\,(d + \beta u) \quad &\text{(nesterov=True)} \\
        \phi &\leftarrow \phi - \alpha\,u \quad &\text{(nesterov=False)} \\
        \theta^{(i)} &\leftarrow \phi \quad &\text{(every rank)}
    \end{aligned}

:math:`\beta = 0` (the default) is Lookahead's own step, :math:`\phi \leftarrow \phi +
\alpha(\bar\theta - \phi)`; with :math:`\alpha = 1` as well it is periodic model averaging
(local SGD). :math:`\beta > 0` is SlowMo's slow momentum (without its division by the inner LR:
fold that into :math:`\alpha`), and ``nesterov=True`` is the DiLoCo outer optimizer (typically
:math:`\alpha = 0.7, \beta = 0.9`). Both are exactly ``torch.optim.SGD(lr=alpha, momentum=beta,
nesterov=...)`` applied to :math:`\phi` with gradient :math:`d`.

Note [Outer optimizer]
----------------------
``outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True)`` is called
once, at construction, with one param-group dict per Lookahead param group. Its parameters are
*proxies*: empty tensors that, at each outer step, alias this rank's slow weights
(``proxy.data = slow``; a chunk when sharded) and get the averaged pseudo-gradient
``d = phi - mean theta`` as ``.grad``; the step updates the slow weights in place. So the
optimizer exists before the first step (build an LR scheduler on ``opt.local_sgd.outer_optimizer``
right away), survives ``load_state_dict`` (which replaces the slow tensors), and its state is keyed
by objects that never change. Its per-parameter state is mirrored into the Lookahead state under
``lookahead_outer_state_<key>`` (same tensor objects), with ``lookahead_outer_steps`` counting its
steps, so checkpoints and DCP carry it with the slow weights; template slots are allocated with the
slow weights, shaped as a twin optimizer on a 2-element probe reveals them (state of another shape
appears after the first outer step). The learning rate and other hyperparameters live in its
``param_groups``: checkpoint the LR scheduler as usual. Each bucket steps once per sync of its
fragment; tensors of other fragments have ``grad=None`` and are skipped. ``alpha`` is then unused by
the outer step (it still drives ``pullback="pullback"``). The built-in step (Note [The outer step])
equals ``SGD(lr=alpha, momentum=outer_momentum, nesterov=nesterov)`` here (tested).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch

from .. import _sync
from .._keys import (
    EAGER_INFLIGHT_KEY,
    EAGER_START_KEY,
    EF_OWNER_KEY,
    EF_RESIDUAL_KEY,
    INFLIGHT_KEY,
    OUTER_STATE_PREFIX,
    OUTER_STEPS_KEY,
)
from .._sync import local_tensor
from . import streaming
from ._plan import Reduced, cut, shaped_like

if TYPE_CHECKING:
    from ._plan import Launched, Plan, Unit
    from .base import SyncHost

__all__ = ["EAGER_INFLIGHT_KEY", "EAGER_START_KEY", "EagerOuter", "OuterOptimizerProxy", "outer_step_"]


def outer_step_(slow: list[torch.Tensor], mom: list[torch.Tensor], d: list[torch.Tensor], alpha: float,
                beta: float, nesterov: bool) -> None:
    """Note [The outer step], in place on the slow weights (flat views are taken here); ``mom``
    holds the outer momenta (unused when ``beta == 0``); ``d`` may be overwritten."""
    s = [t.view(-1) for t in slow]
    if beta == 0.0:
        torch._foreach_add_(s, d, alpha=-alpha)
        return
    u = [t.view(-1) for t in mom]
    torch._foreach_mul_(u, beta)
    torch._foreach_add_(u, d)
    if nesterov:
        torch._foreach_add_(d, u, alpha=beta)
        torch._foreach_add_(s, d, alpha=-alpha)
    else:
        torch._foreach_add_(s, u, alpha=-alpha)


class OuterOptimizerProxy:
    """``outer_optimizer=`` (Note [Outer optimizer]) for :class:`~lookahead_dist.sync.local_sgd.LocalSGD`
    (a mixin: it keeps ``_proxies``, ``_outer_opt`` and ``_outer_spec`` on the strategy)."""

    def _add_outer_group(self, params: list[torch.Tensor]) -> None:
        proxies = []
        for p in params:
            if p not in self._proxies:
                local = local_tensor(p)
                self._proxies[p] = torch.empty(0, dtype=local.dtype, device=local.device)
            proxies.append(self._proxies[p])
        if self._outer_opt is None:
            opt = self.options.outer_optimizer([{"params": proxies}])
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"LocalSGDOptions `outer_optimizer` must return a torch.optim.Optimizer, got "
                                f"{type(opt).__name__}")
            self._outer_opt = opt
        else:
            self._outer_opt.add_param_group({"params": proxies})

    def _outer_placeholders(self, slow: torch.Tensor) -> dict[str, Any]:
        """Template slots for the outer optimizer's state, shaped as a probe step reveals them."""
        if self._outer_spec is None:
            self._outer_spec = {}
            try:  # a twin of the outer optimizer on a 2-element probe: which keys, which shapes
                probe = torch.zeros(2)
                opt = self._outer_opt
                popt = type(opt)([probe], **opt.defaults)
                probe.grad = torch.zeros(2)
                popt.step()
                for key, v in popt.state[probe].items():
                    if isinstance(v, torch.Tensor) and v.shape == probe.shape:
                        self._outer_spec[key] = "param"
                    elif isinstance(v, torch.Tensor) and v.dim() == 0:
                        self._outer_spec[key] = torch.zeros_like(v)
            except Exception:  # noqa: BLE001 - an optimizer that cannot step on a CPU probe: no slots
                self._outer_spec = {}
        out: dict[str, Any] = {}
        for key, kind in self._outer_spec.items():
            out[OUTER_STATE_PREFIX + key] = torch.zeros_like(slow) if kind == "param" else kind.clone()
        return out

    def _restore_outer(self, p: torch.Tensor, saved: dict[str, Any], name: str) -> dict[str, Any]:
        steps = int(saved.get(OUTER_STEPS_KEY, 0))
        device = local_tensor(p).device
        shape = self.expected_shape(p)
        out: dict[str, Any] = {OUTER_STEPS_KEY: steps}
        live: dict[str, Any] = {}
        for key, v in saved.items():
            if not (isinstance(key, str) and key.startswith(OUTER_STATE_PREFIX)):
                continue
            if isinstance(v, torch.Tensor):
                if v.dim() > 0 and v.numel() != shape.numel():
                    raise ValueError(
                        f"Lookahead checkpoint: {name} `{key}` has shape {tuple(v.shape)} where the slow weight "
                        f"has {tuple(shape)}; was it saved with another world size or sharding?")
                v = v.to(device=device, copy=True).reshape(shape) if v.dim() > 0 else v.clone()
            out[key] = v
            live[key[len(OUTER_STATE_PREFIX):]] = v
        proxy = self._proxies.get(p)
        if steps > 0 and proxy is not None and self._outer_opt is not None:
            self._outer_opt.state[proxy] = live
        for key, v in self._outer_placeholders(torch.zeros(shape, device=device)).items():
            out.setdefault(key, v)
        return out

    def _outer_user(self, host: SyncHost, plan: Plan, d: list[torch.Tensor]) -> None:
        """One step of the user's outer optimizer on the bucket's slow weights, gradient ``d``."""
        opt = self._outer_opt
        proxies = [self._proxies[p] for p in plan.params]
        for px, s, g in zip(proxies, plan.slow_t, d):
            px.data = s  # alias: the step updates the slow weight in place
            px.grad = shaped_like(g, s)
        opt.step()
        for px, p in zip(proxies, plan.params):
            px.grad = None
            entry = host.state_entry(p)
            for key, v in opt.state.get(px, {}).items():
                entry[OUTER_STATE_PREFIX + key] = v
            entry[OUTER_STEPS_KEY] = entry.get(OUTER_STEPS_KEY, 0) + 1


# -- eager outer updates (Note [Eager outer updates]) ---------------------------------------------


class EagerOuter:
    r"""``eager_update=True | "naive"`` for :class:`~lookahead_dist.sync.local_sgd.LocalSGD` (a mixin).

    Note [Eager outer updates]
    --------------------------
    Kale, Douillard & Donchev, *Eager updates for overlapped communication and computation in
    DiLoCo* (2025, arXiv 2502.12996). A fragment's collective is applied at that fragment's *next*
    sync, one whole outer step (k counted steps) after its launch, so the transfer overlaps a
    whole inner phase (``F = 1``: launched at count k of cycle t, applied at count k of cycle t+1;
    with fragments, each fragment at its own next sync). Per fragment, with N ranks, t counting the
    fragment's syncs, :math:`x_i(t)` rank i's start point after sync t (:math:`x_i(0) = \phi(0)`)
    and :math:`\theta_i(t)` its fast weights at sync t:

    .. math::
        \begin{aligned}
        \Delta_i(t) &= x_i(t-1) - \theta_i(t)
            &&\text{own outer gradient, launched at sync } t \\
        D(t) &= \tfrac{1}{N} \textstyle\sum_j \Delta_j(t)
            &&\text{arrives at sync } t+1 \ (D(0) = 0) \\
        \phi(t) &= \mathrm{Opt}\big(\phi(t-1),\, D(t-1)\big)
            &&\text{global slow weights, no step at } t = 1 \\
        x_i(t) &= \phi(t) - \tfrac{\eta}{N}\,\Delta_i(t) \quad\text{(eager)}, \qquad
        x_i(t) = \phi(t) \quad\text{(naive)}
            &&\text{the fast weights restart from } x_i(t)
        \end{aligned}

    ``Opt`` is the outer step (Note [The outer step], or the user's ``outer_optimizer``) with its
    state; :math:`\eta` is its learning rate (``alpha``, or the ``lr`` of the outer optimizer's
    param group). The paper's eager worker applies the proxy

    .. math::
        \hat\Delta_i(t) = \tfrac{1}{N}\Delta_i(t) + \tfrac{1}{N}\textstyle\sum_{j \ne i}\Delta_j(t-1)
                        = D(t-1) + \tfrac{1}{N}\big(\Delta_i(t) - \Delta_i(t-1)\big)

    (its own fresh share and the others' delayed shares) to its own copy of the outer
    parameters. With a plain SGD outer step (:math:`\beta = 0`) that copy is exactly :math:`x_i(t)`
    above: summing :math:`\hat\Delta_i` over the syncs telescopes to
    :math:`\sum_{s<t} D(s) + \frac{1}{N}\Delta_i(t)`, the global trajectory of the reduced averages
    plus this rank's own fresh share. We keep that decomposition for every outer optimizer: the
    *global* part, :math:`\phi` and the outer optimizer's state (momentum, Adam moments), is
    stepped only with the reduced averages :math:`D`, which every rank receives identically, so
    ``lookahead_slow`` and the outer state stay bit-identical across ranks; the *local* part,
    the own fresh share, enters only the restart point :math:`x_i(t)`, as a plain step of the
    outer learning rate (the outer momentum never sees it: it would make the state rank-specific).
    The naive delayed rule of the paper applies :math:`D(t-1)` alone (:math:`x_i(t) = \phi(t)`).
    The outer gradient is measured from the rank's own start point, so its own share is counted
    once: in :math:`x_i(t)` while its collective is in flight, then in :math:`\phi` through
    :math:`D(t)` at the next sync, where the local term is replaced by the next fresh one.

    Order at a fragment's sync: wait for :math:`D(t-1)` (launched k counted steps earlier; the
    quantised reduce hands back the owner's error-feedback residual that the next send reads), pack
    and launch :math:`\Delta_i(t)` (from ``lookahead_eager_start`` and the fast weights), take the
    outer step on the global slow weights with :math:`D(t-1)`, then restart the fragment's fast
    weights from :math:`x_i(t)`. The send buffer is the flat wire's, so ``comm_dtype`` (bf16,
    int8/int4 with error feedback) applies as usual.

    State: ``lookahead_eager_start`` (:math:`x_i`, per rank: save every rank's optimizer state,
    as for the error-feedback residuals); at ``state_dict()`` each collective in flight is waited
    for and its result :math:`D(t-1)` parked in ``lookahead_inflight`` with its fragment's bit in
    ``lookahead_eager_inflight`` (Note [Checkpoints in flight] in local_sgd.py): a resumed run
    applies it at the same sync, bit-identical to not stopping. ``sync_now()`` applies what is in
    flight to :math:`\phi`, then runs a blocking sync of every fragment against :math:`\phi`;
    every rank restarts from the same weights.

    Sharded (``sharded=True``, one process group): rank r owns chunk r of :math:`\phi` and the
    outer state. The ranks reduce-scatter their progress :math:`\theta_i(t) - x_i(t-1)` (the
    blocking sharded sync sends weights, but the owner of a chunk cannot know the other ranks'
    start points), so :math:`D(t)` arrives as each owner's chunk; at the next sync the owner steps
    its chunk, and the new chunks are all-gathered (blocking) to build the restart point. The
    start point :math:`x_i` stays whole on every rank (``lookahead_eager_start`` is shaped like the
    parameter; ``Plan.fsl`` indexes it). ``comm_dtype`` applies to the scatter: bf16, or
    int8/int4/int2 as a quantised reduce-scatter (each sender's whole progress quantised with a
    whole-size error-feedback residual, each owner's fp32 sum kept as it is). Hierarchical sharded
    (``intra_group``): i counts the replicas (the groups, identical inside), local rank r carries
    chunk r of its replica's progress across the groups (``comm_dtype`` applies), steps chunk r,
    and the group all-gathers the new chunks at the restart. Not supported: ``fragment_sync_delay > 0`` and
    ``fragment_update_alpha > 0`` (the delay is one outer step and the restart point is
    :math:`x_i`), a torchft ``manager``.
    A non-finite :math:`D` (every rank sees the same) skips its outer step, drops the unit's
    collectives in flight and restarts the whole unit from :math:`\phi` on every rank (Note
    [Non-finite syncs in local SGD]). Under the eager rule a rank whose own outer gradient holds
    NaN/inf restarts from a non-finite :math:`x_i(t)`; the average is then non-finite at the
    fragment's next sync, which every rank skips alike.
    """

    def _eager_start0(self, p: torch.Tensor, slow: torch.Tensor) -> torch.Tensor:
        r"""The first start point :math:`x_i(0) = \phi(0)`: the slow weight, or, sharded, the whole
        parameter (the start is per rank and whole: the eager term is this rank's own)."""
        if not self.sharded:
            return slow.clone()
        return local_tensor(p).detach().to(dtype=slow.dtype, copy=True)

    def _eager_entry(self, p: torch.Tensor, slow: torch.Tensor) -> dict[str, Any]:
        return {INFLIGHT_KEY: torch.zeros_like(slow), EAGER_INFLIGHT_KEY: 0,
                EAGER_START_KEY: self._eager_start0(p, slow)}

    def _eager_restore(self, p: torch.Tensor, saved: dict[str, Any], dtype: torch.dtype, name: str,
                       slow: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {EAGER_INFLIGHT_KEY: int(saved.get(EAGER_INFLIGHT_KEY, 0))}
        out[INFLIGHT_KEY] = (self._restore_tensor(p, saved[INFLIGHT_KEY], dtype, name, INFLIGHT_KEY)
                             if INFLIGHT_KEY in saved else torch.zeros_like(slow))
        start = saved.get(EAGER_START_KEY)
        if start is None:
            out[EAGER_START_KEY] = self._eager_start0(p, slow)
        else:  # sharded: shaped like the parameter, not like the owned chunk
            shape = local_tensor(p).shape if self.sharded else None
            out[EAGER_START_KEY] = self._restore_tensor(p, start, dtype, name, EAGER_START_KEY, shape=shape)
        return out

    def _start_views(self, host: SyncHost, plan: Plan) -> list[torch.Tensor]:
        """This rank's start points :math:`x_i`, aligned with ``plan.fast`` (whole, also sharded)."""
        return [cut(host.state_entry(p)[EAGER_START_KEY], sl)
                for p, sl in zip(plan.params, plan.fsl if self.sharded else plan.sl)]

    def _eager_launch(self, host: SyncHost, plan: Plan, describe: str) -> Launched:
        r"""Launch the outer gradient :math:`\Delta_i(t)` of one bucket, measured from the start points."""
        start = self._start_views(host, plan)
        if self.sharded and self.intra is None:
            return self.wire.launch_progress(host, plan, start)
        if self.sharded:  # hierarchical: this rank carries chunk r of the progress across the groups
            m = len(plan.fast)
            own = plan.layout.split_each(start)[self.shard_rank * m:(self.shard_rank + 1) * m]
            return self._launch(host, dataclasses.replace(plan, slow=own), describe)
        return self._launch(host, dataclasses.replace(plan, slow=start), describe)

    def _eager_restart(self, host: SyncHost, plan: Plan, scale: float, describe: str) -> None:
        r""":math:`x_i(t) = \phi(t) - s\,\Delta_i(t)` (``s = scale``; 0: naive), then fast <- x_i(t).
        Sharded, :math:`\phi(t)` is first all-gathered from the owned chunks (blocking)."""
        start = self._start_views(host, plan)
        if self.sharded:
            phi = self.wire.gather_slow(plan, describe)
            start_c, fast_c = plan.layout.split_each(start), plan.fast_chunks
        else:
            phi, start_c, fast_c = plan.slow, start, plan.fast
        if scale:
            own = torch._foreach_sub(start_c, fast_c)  # Delta_i(t) = x_i(t-1) - theta_i(t)
            torch._foreach_copy_(start_c, phi)
            torch._foreach_add_(start_c, own, alpha=-scale)  # x_i(t) = phi(t) - eta/N Delta_i(t)
        else:
            torch._foreach_copy_(start_c, phi)
        torch._foreach_copy_(plan.fast, start)

    def _eager_scale(self, plan: Plan, alpha: float) -> float:
        """:math:`\\eta / N` (eager) or 0 (naive)."""
        if self.eager_rule != "eager":
            return 0.0
        lr = alpha
        opt = self._outer_opt
        if opt is not None:
            px = self._proxies[plan.params[0]]
            lr = next(float(g["lr"]) for g in opt.param_groups if any(q is px for q in g["params"]))
        return lr / self.group_size

    def _eager_due(self, n: int, k: int, f: int) -> int:
        stride = k // self.num_fragments
        at = (f * stride - 1) % k + 1  # the count that launches fragment f
        return (at - n) % k or k

    def _eager_advance(self, host: SyncHost, unit: Unit, n: int, k: int, alpha: float) -> None:
        per = self._eager.setdefault(unit.params[0], {})
        for g, rec in per.items():
            rec.due_in = self._eager_due(n, k, g)
        f = streaming.launch_fragment(n, k, self.num_fragments)
        if f is None:
            return
        describe = (self._describe(host, unit, f, n, k)
                    + f" ({self.eager_rule} outer update, applied at the fragment's next sync)")
        self._fragment_start(host, unit, f, describe)
        old = per.pop(f, None)
        if old is not None and old.reduced is None:
            # Waited for before the new launch (launched k steps ago, it is done by now): the
            # quantised reduce hands back the owner's error-feedback residual the new send reads.
            old.reduced = [self._reduce(host, item, old.describe) for item in old.launched]
        launched = [self._eager_launch(host, plan, describe) for plan in unit.fragments[f]]
        per[f] = streaming.InFlight(fragment=f, due_in=k, launched=launched, describe=describe,
                                    works=[item.work for item in launched])
        bad = self._eager_commit(host, unit, f, old, alpha)
        if bad:
            self._eager_nonfinite(host, unit, bad)
            return
        ok: list[torch.Tensor] = []
        for plan in unit.fragments[f]:
            self._eager_restart(host, plan, self._eager_scale(plan, alpha) if plan.params else 0.0, describe)
            ok += plan.report
        if ok:
            host.on_synced(ok, alpha)

    def _eager_commit(self, host: SyncHost, unit: Unit, f: int, rec: streaming.InFlight | None,
                      alpha: float) -> list[tuple[list[torch.Tensor], str]]:
        """Wait for fragment f's previous collective and take the outer step on the global slow
        weights with its result D(t-1); the non-finite buckets are returned, not stepped."""
        bad: list[tuple[list[torch.Tensor], str]] = []
        if rec is None:
            return bad
        if rec.reduced is None:
            rec.reduced = [self._reduce(host, item, rec.describe) for item in rec.launched]
        self._decide(rec.reduced)
        for plan, red in zip(unit.fragments[f], rec.reduced):
            if rec.parked:
                for p in plan.params:
                    e = host.state_entry(p)
                    e[EAGER_INFLIGHT_KEY] = int(e.get(EAGER_INFLIGHT_KEY, 0)) & ~(1 << f)
            if red.bad is not None:
                if self._ef:  # a residual that absorbed a NaN would poison every later send
                    for p in plan.params:
                        e = host.state_entry(p)
                        e[EF_RESIDUAL_KEY].zero_()
                        e[EF_OWNER_KEY].zero_()
                bad.append((plan.params, f"{self.wire.nonfinite_what(plan, red)}; {rec.describe}"))
            elif self.options.outer_optimizer is not None:
                self._outer_user(host, plan, red.d)
            else:
                self._outer(plan, red.d, alpha)
        return bad

    def _eager_nonfinite(self, host: SyncHost, unit: Unit, bad: list[tuple[list[torch.Tensor], str]]) -> None:
        """Note [Non-finite syncs in local SGD]: the whole unit restarts from its global slow weights.
        Every rank decides alike (from a reduced average), so every rank also drops the unit's
        collectives in flight (waited for first): they were measured from start points that held
        the NaN, or that this restart replaces."""
        per = self._eager.get(unit.params[0], {})
        for f, rec in list(per.items()):
            if rec.reduced is None:
                rec.reduced = [self._reduce(host, item, rec.describe) for item in rec.launched]
            del per[f]
        for plans in unit.fragments:
            for plan in plans:
                self._eager_restart(host, plan, 0.0, bad[0][1])  # fast <- x_i <- phi
                for p in plan.params:
                    e = host.state_entry(p)
                    e[EAGER_INFLIGHT_KEY] = 0
                    if self._ef:
                        e[EF_RESIDUAL_KEY].zero_()
                        e[EF_OWNER_KEY].zero_()
        host.on_nonfinite(unit.params, bad[0][1])

    def _eager_sync(self, host: SyncHost, unit: Unit, alpha: float) -> None:
        """``sync_now()``: apply every fragment in flight to the global slow weights, then a blocking
        sync of the whole unit; every rank restarts from the same slow weights."""
        per = self._eager.pop(unit.params[0], {})
        bad: list[tuple[list[torch.Tensor], str]] = []
        for f in sorted(per):
            bad += self._eager_commit(host, unit, f, per[f], alpha)
        if bad:
            self._eager_nonfinite(host, unit, bad)
            return
        describe = self._describe(host, unit, None, None, None)
        self._sync_now(host, unit, range(len(unit.fragments)), alpha, describe)
        for plans in unit.fragments:
            for plan in plans:
                if self.sharded:  # the sync left fast = phi (in the parameters' dtype) on every rank
                    self._eager_restart(host, plan, 0.0, describe)
                else:
                    torch._foreach_copy_(self._start_views(host, plan), plan.slow)

    def _eager_flush(self, host: SyncHost) -> None:
        """Park the result of every collective in flight (Note [Checkpoints in flight] in local_sgd.py)."""
        for per in self._eager.values():
            for f, rec in per.items():
                if rec.reduced is None:
                    rec.reduced = [self._reduce(host, item, rec.describe) for item in rec.launched]
                self._decide(rec.reduced)
                for red in rec.reduced:
                    for i, p in enumerate(red.plan.params):
                        entry = host.state_entry(p)
                        if not rec.parked:
                            view = cut(entry[INFLIGHT_KEY], red.plan.sl[i])
                            view.copy_(red.d[i])
                            if red.bad is not None:
                                view.fill_(math.nan)
                        entry[EAGER_INFLIGHT_KEY] = int(entry.get(EAGER_INFLIGHT_KEY, 0)) | (1 << f)
                rec.parked = True

    def _resume_eager(self, host: SyncHost, unit: Unit) -> None:
        """Rebuild the collectives in flight at a checkpoint from per-parameter state (after a load)."""
        per: dict[int, streaming.InFlight] = {}
        for f, plans in enumerate(unit.fragments):
            bits = {bool(int(host.state_entry(p).get(EAGER_INFLIGHT_KEY, 0)) >> f & 1) for p in unit.frag_params[f]}
            if bits != {True}:
                if len(bits) > 1:
                    raise ValueError(
                        f"Lookahead checkpoint: the tensors of fragment {f} of param group {unit.index} disagree on "
                        f"bit {f} of `{EAGER_INFLIGHT_KEY}`; the checkpoint is inconsistent")
                continue
            reduced = []
            for plan in plans:
                d = [cut(host.state_entry(p)[INFLIGHT_KEY], sl) for p, sl in zip(plan.params, plan.sl)]
                reduced.append(Reduced(plan, d, bad=_sync.first_nonfinite(d)))
            per[f] = streaming.InFlight(
                fragment=f, due_in=0, launched=[], reduced=reduced, parked=True,
                describe=self._describe(host, unit, f, None, None) + " (resumed from a checkpoint)")
        self._eager[unit.params[0]] = per
