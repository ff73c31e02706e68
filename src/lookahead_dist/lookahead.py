"""The Lookahead optimizer (Zhang, Lucas, Hinton, Ba 2019), built to live inside sharded hosts.

Note [Where slow weights live]
------------------------------
A slow weight is per-parameter optimizer state, so it is kept in the *inner* optimizer's
``state[p]`` under :data:`SLOW_KEY`, shaped and typed like ``p``. Whatever a host does to that
state (DeepSpeed ZeRO partitions it as flat fp32 tensors, FSDP2 makes it a DTensor shard,
ZeroRedundancyOptimizer keeps only the owned parameters, checkpointers save and reshard it), the
slow weight gets too: 1/N of the memory per rank, no extra communication, nothing to special-case.

One wrinkle: most torch optimizers initialise their own state lazily with
``if len(state) == 0:``. A slow weight written into an empty ``state[p]`` would make Adam skip its
initialisation and crash. So a new slow weight waits in a side table (``_pending``) until the inner
optimizer has taken a step with ``p`` (then it either created its own state, or it keeps none for
``p``); from then on it lives in ``state[p]``. ``state_dict()`` and ``slow_weight()`` see both.

Note [When a slow weight is taken]
----------------------------------
Algorithm 1 starts the slow weights at theta_0, the value the fast weights start the inner loop
from. We capture it at the start of the first ``step()`` in which a tensor takes part. That equals
its value when it joined the optimizer (construction or ``add_param_group``) unless something
changed it in between -- a checkpoint loaded into the model, DDP's initial broadcast, DeepSpeed
replacing the parameters by flat fp32 partitions -- and in each of those cases the new value is
the real theta_0. It also means no slow weight is ever allocated for a tensor the host discards.

Note [Step counting]
--------------------
k counts *applied* inner steps of a step unit: the tensors that one ``step()`` call steps for a
param group. Normally that is the whole group. Hosts narrow ``param_groups`` (DeepSpeed ZeRO-1/2
steps one group per call) or step a group piecewise (ZeRO-3 sets ``params`` to one fp32 sub-group
partition per call); either way each unit counts its own steps, so k keeps meaning k optimizer
steps. The counter (steps since the last sync, in ``[0, k)``) is kept in the state entry of the
unit's first tensor, under :data:`STEP_KEY`, so it is sharded and checkpointed with the slow
weights. The fake step of ``torch.distributed.checkpoint`` (all learning rates 0, all gradients
0) is passed to the inner optimizer without counting.

Skipped steps. DeepSpeed skips an overflowing step on every rank at once (it never reaches
``step()``). ``torch.amp.GradScaler`` decides per rank, so Lookahead declares
``_step_supports_amp_scaling``: GradScaler then hands ``step()`` its ``found_inf`` and
``grad_scale`` instead of skipping the call, and Lookahead unscales the gradients exactly as
GradScaler would (or passes both to a fused inner optimizer), skips the inner step on overflow, and
then counts the call or not by the sync strategy: the in-place update does not count a skipped step
(the cycle is k *applied* steps), while a communicating strategy (local SGD) counts every call, so
that all ranks reach each sync -- a collective -- on the same ``step()`` call whatever each of them
skipped. No collective is added per step. The fake-step test is likewise rank-independent for a
communicating strategy (see ``_is_fake_step``).

Note [Non-finite syncs]
-----------------------
A sync that would move a slow weight to NaN/inf would poison every later cycle, so each strategy
checks what it is about to apply: the in-place update checks the fast weights (one foreach max-norm
per bucket, once per k steps), local SGD checks the *averaged* pseudo-gradient, which every rank
receives identically, so all ranks decide the same way with no extra collective. On a hit the
strategy restores the fast weights from the slow weights (the cycle's steps are dropped), and
:meth:`Lookahead.on_nonfinite` resets the inner optimizer's state of those tensors, counts
(``nonfinite_syncs``) and warns once -- or raises ``FloatingPointError`` with
``on_nonfinite="raise"``. Training goes on from the last good slow weights.

Under a sharding host (ZeRO, FSDP, ZeroRedundancyOptimizer) each rank checks only its own shard
and decides for it alone. That is enough: the slow update is elementwise, so every element either
takes its outer step or keeps its previous slow value, and both are valid points; the fast
weights are re-assembled from the shards by the host as always. No rank waits for another, so no
collective is added to the in-place sync.

Note [Host syncs]
-----------------
A step that does not sync should cost what the inner optimizer costs, and on a GPU the dearest
thing Python can do is wait for the device (``bool(tensor)``, ``.item()``). So a ``step()`` that
neither launches nor applies a sync reads no tensor on the host: the fake-step test looks at the
inner state (a host dict) before it looks at a tensor ``lr`` (only an empty state, i.e. the first
step or DCP's template step, reads it); under GradScaler with a fused inner optimizer and a strategy
that counts every call (local SGD) ``found_inf`` is handed to the inner optimizer and never read.
Where the count depends on it (the in-place update counts applied steps only) the flag is not
read either: each unit adds it, on the device, to a skip tally, and the tally is read once on the
call whose *call* count reaches k -- the only call that could sync. The skipped calls are then
taken off the count, so the cycle still ends after k applied steps; when there were none, that
call syncs as before. So quiet steps read nothing, and a sync step reads the tally besides the
non-finite decision (two reads, only in this combination). A checkpoint, a pickle or
:meth:`Lookahead.sync_now` folds the tally in first, so the saved counter means what it always did.
With GradScaler's unfused path (an inner optimizer without ``_step_supports_amp_scaling``)
GradScaler reads ``found_inf`` itself, and so does Lookahead, once. ``tests/unit/test_host_syncs.py``
counts the reads.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _optim_module

from . import _sync
from ._keys import ALPHA_KEY, K_KEY, MOMENTUM_KEY, SLOW_KEY, STEP_KEY, is_lookahead_key
from ._sync import local_tensor
from .sync import SyncStrategy, make_strategy

if TYPE_CHECKING:
    from .sync.local_sgd import LocalSGDOptions

__all__ = [
    "Lookahead",
    "find_lookahead",
    "check_k",
    "check_alpha",
    "SLOW_KEY",
    "STEP_KEY",
    "MOMENTUM_KEY",
    "K_KEY",
    "ALPHA_KEY",
    "PULLBACK_MODES",
]

#: Accepted values of ``pullback``.
PULLBACK_MODES = ("none", "reset", "pullback")
# Inner-state keys that hold a first-moment (momentum) buffer, in lookup order.
_MOMENTUM_BUFFER_KEYS = ("momentum_buffer", "exp_avg")

PullbackMode = Literal["none", "reset", "pullback"]
#: Accepted values of ``on_nonfinite``.
NONFINITE_POLICIES = ("skip", "raise")
NonFinitePolicy = Literal["skip", "raise"]


def check_k(k: Any, name: str = "k") -> int:
    """``k`` as a sync period (an int >= 1, not a bool), or a TypeError/ValueError naming ``name``."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"Lookahead `{name}` must be an int >= 1, got {k!r} ({type(k).__name__})")
    if k < 1:
        raise ValueError(f"Lookahead `{name}` must be >= 1, got {k}")
    return k


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    """``alpha`` as a slow step size in (0, 1], or a TypeError/ValueError naming ``name``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"Lookahead `{name}` must be a float in (0, 1], got {alpha!r}")
    if not (0.0 < alpha <= 1.0) or math.isnan(alpha):
        raise ValueError(f"Lookahead `{name}` must be in (0, 1], got {alpha}")
    return float(alpha)


class Lookahead(Optimizer):
    r"""Lookahead: k steps forward with any inner optimizer, then one step back.

    .. math::
        \begin{aligned}
            &\textbf{input}: \theta_0 \text{ (params)}, A \text{ (inner optimizer)}, k, \alpha \\
            &\phi_0 \leftarrow \theta_0 \quad \text{(slow weights)} \\
            &\textbf{for } t = 1, 2, \ldots \\
            &\quad \theta \leftarrow A(\theta) \quad \text{(one inner step)} \\
            &\quad \textbf{if } t \bmod k = 0: \\
            &\qquad \phi \leftarrow \phi + \alpha (\theta - \phi) \\
            &\qquad \theta \leftarrow \phi
        \end{aligned}

    After the first k steps, :math:`\phi = \theta_0 + \alpha(\theta_k - \theta_0)` exactly
    (Algorithm 1 of the paper). ``alpha=1`` makes Lookahead the inner optimizer itself.

    The wrapper is a real :class:`torch.optim.Optimizer` whose ``param_groups`` and ``state`` *are*
    the inner optimizer's (the same objects, also after :meth:`load_state_dict`), so LR schedulers,
    GradScaler and frameworks that rewrite ``param_groups`` reach the inner optimizer. Slow weights
    are entries of the inner optimizer's per-parameter state (key :data:`SLOW_KEY`), so they are
    sharded exactly like that state under DeepSpeed ZeRO, FSDP and ZeroRedundancyOptimizer, and the
    sync runs in place on each rank's own shard with no communication.

    The sync is two foreach kernels per (device, dtype) bucket (``_foreach_lerp_`` then
    ``_foreach_copy_``) over tensor lists built once; between syncs a step costs a few dict lookups
    per param group.

    Args:
        optimizer: the inner ("fast") optimizer, already built over the parameters.
        k: sync period, in applied inner steps (default 5). Per group: ``"lookahead_k"``.
        alpha: slow step size in (0, 1] (default 0.5). Per group: ``"lookahead_alpha"``.
        pullback: what happens to the inner optimizer's momentum at a sync.

            - ``"none"`` (default): nothing; allocates nothing beyond the slow weights.
            - ``"reset"``: the inner optimizer's per-parameter state is cleared, so it
              re-initialises on its next step (Adam's moments and step count start afresh).
            - ``"pullback"``: the momentum buffer (SGD ``momentum_buffer``, Adam ``exp_avg``) is
              interpolated like the weights, ``m <- alpha * m + (1 - alpha) * m_cached``, with a
              cached *copy* of it from the previous sync (zeros at first).
        slow_dtype: keep slow weights of ``float16``/``bfloat16`` parameters in this dtype
            (typically ``torch.float32``), so that small slow steps are not rounded away.
            ``None`` (default) keeps every slow weight in its parameter's dtype.
        local_sgd: ``True`` or a :class:`~lookahead_dist.local_sgd.LocalSGDOptions`: local-SGD
            mode, where ranks train without a per-step gradient all-reduce and the sync averages
            the fast weights over ``process_group`` before the slow step (optionally with outer
            momentum, sharded slow weights, compressed communication, streamed over fragments,
            hierarchically). See :mod:`lookahead_dist.sync.local_sgd` and ``docs/local-sgd.md``.
        process_group: the local-SGD group (default: the world); implies ``local_sgd=True``.
        on_nonfinite: what a sync does when the fast weights (or, in local SGD, the averaged
            pseudo-gradient) hold NaN/inf. ``"skip"`` (default): the outer update is skipped, the
            fast weights are restored from the slow weights and the inner state of those tensors
            is reset; a warning names the first bad tensor once, and ``nonfinite_syncs`` counts it.
            ``"raise"``: ``FloatingPointError``. See Note [Non-finite syncs].
        sync: a :class:`~lookahead_dist.sync.SyncStrategy` instance deciding what a sync does
            (default: the in-place slow step, no communication). ``local_sgd``/``process_group``
            are a shorthand for the local-SGD strategy; pass one or the other.

    Example:
        >>> import torch
        >>> from lookahead_dist import Lookahead
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = Lookahead(torch.optim.SGD([w], lr=0.1), k=2, alpha=0.5)
        >>> for _ in range(2):
        ...     w.grad = torch.tensor([1.0])  # each inner step moves w by -0.1
        ...     opt.step()
        >>> w  # theta_0 + 0.5 * (theta_2 - theta_0) = 1 + 0.5 * (0.8 - 1)
        Parameter containing:
        tensor([0.9000], requires_grad=True)

    References:
        Zhang, Lucas, Hinton, Ba. *Lookahead Optimizer: k steps forward, 1 step back*.
        NeurIPS 2019. https://arxiv.org/abs/1907.08610
    """

    # GradScaler passes found_inf/grad_scale to step() instead of skipping it (Note [Step counting]).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: Optimizer,
        k: int = 5,
        alpha: float = 0.5,
        *,
        pullback: PullbackMode = "none",
        slow_dtype: torch.dtype | None = None,
        local_sgd: bool | LocalSGDOptions = False,
        process_group: Any = None,
        sync: SyncStrategy | None = None,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        if isinstance(optimizer, Lookahead):
            raise TypeError(
                "Lookahead got an optimizer that is already a Lookahead; wrap the inner "
                "optimizer once (nested Lookahead would keep two sets of slow weights)"
            )
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "Lookahead wraps a torch.optim.Optimizer instance, got "
                f"{type(optimizer).__name__}: {optimizer!r}"
            )
        check_k(k)
        alpha = check_alpha(alpha)
        if pullback not in PULLBACK_MODES:
            raise ValueError(f"Lookahead `pullback` must be one of {PULLBACK_MODES}, got {pullback!r}")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Lookahead `on_nonfinite` must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
        if slow_dtype is not None and (
            not isinstance(slow_dtype, torch.dtype) or not slow_dtype.is_floating_point
        ):
            raise TypeError(f"Lookahead `slow_dtype` must be a floating torch.dtype or None, got {slow_dtype!r}")

        self.optimizer = optimizer
        self.pullback: PullbackMode = pullback
        self.slow_dtype = slow_dtype
        self.nonfinite_policy: NonFinitePolicy = on_nonfinite
        #: Syncs whose outer update was skipped because of NaN/inf (Note [Non-finite syncs]).
        self.nonfinite_syncs = 0
        #: ``step()`` calls so far (skipped and fake steps included); errors and warnings cite it.
        self.step_calls = 0
        self._nonfinite_warned = False
        # What a sync does (sync/): set before adoption, whose add_param_group calls its align().
        self._strategy: SyncStrategy = make_strategy(sync, local_sgd, process_group)
        self._reset_caches()
        # Optimizer.__init__ assigns empty `state`/`param_groups` and calls add_param_group for
        # each group; while adopting, the property setters ignore the former and
        # add_param_group only annotates the inner optimizer's own group dicts.
        self._adopting = True
        try:
            super().__init__(optimizer.param_groups, {**optimizer.defaults, K_KEY: k, ALPHA_KEY: alpha})
        finally:
            self._adopting = False

    def _reset_caches(self) -> None:
        # param -> {SLOW_KEY: ..., ...}: entries not yet placed in the inner state (Note above).
        self._pending: dict[torch.Tensor, dict[str, Any]] = {}
        # Tensors whose slow weight was taken this step; placed after the inner step.
        self._fresh: list[torch.Tensor] = []
        # id(group) -> (group, params list, len): the parameter sets already scanned.
        self._scanned: dict[int, tuple[dict, list, int]] = {}
        # unit -> device tally of GradScaler-skipped calls not yet taken off its count (Note [Host syncs]).
        self._skips: dict[torch.Tensor, torch.Tensor] = {}
        self._strategy.reset_cache()

    # -- the inner optimizer's objects, not copies -------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if not getattr(self, "_adopting", False):
            self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        if not getattr(self, "_adopting", False):
            self.optimizer.state = value

    def __getstate__(self) -> dict[str, Any]:
        # Work in flight is parked in per-parameter state first; the strategy drops its process
        # groups (a copy of a communicating Lookahead is detached: SyncStrategy.__getstate__).
        self._strategy.flush(self)
        self._fold_skips()  # the tally is keyed by identity, which pickling does not keep
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        pending = state.get("_pending", {})
        fresh = state.get("_fresh", [])
        # Optimizer.__setstate__ restores the hook tables and re-patches step for profiling.
        Optimizer.__setstate__(self, state)
        # Caches are keyed by object identity, which pickling does not keep.
        self._reset_caches()
        self._pending, self._fresh = pending, fresh

    def __repr__(self) -> str:
        inner = "\n".join("  " + line for line in repr(self.optimizer).splitlines())
        return (
            f"Lookahead(k={self.defaults[K_KEY]}, alpha={self.defaults[ALPHA_KEY]}, "
            f"pullback={self.pullback!r}, slow_dtype={self.slow_dtype})\n{inner}"
        )

    # -- construction helpers --------------------------------------------------------------------
    @classmethod
    def wrap(
        cls, optimizer_class: type[Optimizer] | Callable[..., Optimizer], k: int = 5, alpha: float = 0.5, **kwargs: Any
    ) -> Callable[..., Lookahead]:
        """A factory ``build(params, **inner_kwargs) -> Lookahead(optimizer_class(params, ...))``.

        For hosts that construct the optimizer themselves from a class, e.g.
        ``ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Lookahead.wrap(torch.optim.AdamW,
        k=5, alpha=0.5), lr=1e-3)``. ``kwargs`` go to :class:`Lookahead` (``pullback``, ``slow_dtype``).
        """
        check_k(k)
        check_alpha(alpha)

        def build(params: Any, *args: Any, **inner_kwargs: Any) -> Lookahead:
            return cls(optimizer_class(params, *args, **inner_kwargs), k, alpha, **kwargs)

        name = getattr(optimizer_class, "__name__", type(optimizer_class).__name__)
        build.__name__ = build.__qualname__ = f"Lookahead[{name}]"
        return build

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; ``"lookahead_k"``/``"lookahead_alpha"`` override k/alpha.

        Its tensors start their own cycle: their slow weights are taken at the next step.
        """
        if K_KEY in param_group:
            check_k(param_group[K_KEY], K_KEY)
        if ALPHA_KEY in param_group:
            param_group[ALPHA_KEY] = check_alpha(param_group[ALPHA_KEY], ALPHA_KEY)
        if not self._adopting:
            self.optimizer.add_param_group(param_group)
            param_group = self.optimizer.param_groups[-1]
        param_group.setdefault(K_KEY, self.defaults[K_KEY])
        param_group.setdefault(ALPHA_KEY, self.defaults[ALPHA_KEY])
        self._strategy.align(param_group["params"])  # local SGD: same starting weights everywhere

    def close(self) -> None:
        """Release what the sync strategy holds beyond the step: local SGD's forward hook on a DDP
        module (Note [DDP still all-reducing] in ``sync/_replicas.py``). Call it when the optimizer is done with, e.g. before
        building another optimizer over the same model; stepping after ``close()`` is undefined."""
        self._strategy.close()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def sync_strategy(self) -> SyncStrategy:
        """The :class:`~lookahead_dist.sync.SyncStrategy` that performs the syncs."""
        return self._strategy

    @property
    def local_sgd(self) -> SyncStrategy | None:
        """The sync strategy if it communicates (local SGD; statistics in ``.stats``), else None."""
        return self._strategy if self._strategy.communicates else None

    # -- the step --------------------------------------------------------------------------------
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """One inner step; after every k-th applied step of a unit, the slow update for it."""
        self.step_calls += 1
        groups = self.optimizer.param_groups
        self._scan(groups)
        strategy = self._strategy
        if self._is_fake_step(groups, strategy.communicates):
            return self._inner_step(closure)
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step(): Note [Step counting]
        applied: bool | None = True
        if found_inf is None:
            loss = self._inner_step(closure)
        else:
            loss, applied = self._scaled_inner_step(closure, found_inf, getattr(self, "grad_scale", None),
                                                    strategy.communicates)
            if applied is False and not strategy.communicates:
                return loss  # a skipped step does not count, unless ranks must stay in lockstep
        if self._fresh and applied:  # after a skipped step the inner optimizer has not seen them
            self._place(self._fresh)
            self._fresh = []
        for group in groups:
            params = group["params"]
            if not params:  # ZeRO-3 empties the groups it is not stepping
                continue
            unit = params[0]
            n = self.state_entry(unit).get(STEP_KEY, 0) + 1
            k = group.get(K_KEY, self.defaults[K_KEY])
            if applied is None:  # not known on the host: tally it, read it only where n could sync
                n = self._count_skip(unit, n, k, found_inf)
            strategy.advance(self, params, n, k, group.get(ALPHA_KEY, self.defaults[ALPHA_KEY]))
            self.state_entry(unit)[STEP_KEY] = 0 if n >= k else n  # re-fetched: "reset" moves entries
        return loss

    def _inner_step(self, closure: Callable[[], float] | None) -> Any:
        # Global optimizer hooks (register_optimizer_step_pre/post_hook) fire for this step() call;
        # the inner optimizer's step must not fire them a second time. Its own hooks still run.
        pre, post = _optim_module._global_optimizer_pre_hooks, _optim_module._global_optimizer_post_hooks
        if not pre and not post:
            return self.optimizer.step() if closure is None else self.optimizer.step(closure)
        saved = (pre.copy(), post.copy())
        pre.clear()
        post.clear()
        try:
            return self.optimizer.step() if closure is None else self.optimizer.step(closure)
        finally:
            pre.update(saved[0])
            post.update(saved[1])

    def _count_skip(self, unit: torch.Tensor, n: int, k: int, found_inf: torch.Tensor) -> int:
        """The unit's count after a call whose skip flag stays on the device (Note [Host syncs])."""
        tally = self._skips.get(unit)
        if tally is None:
            tally = self._skips[unit] = torch.zeros((), dtype=torch.float32, device=found_inf.device)
        tally.add_(found_inf.to(tally.device, torch.float32))
        if n < k:
            return n
        skipped = int(tally.item())  # the one read, on the call that would sync
        tally.zero_()
        return n - skipped

    def _fold_skips(self) -> None:
        """Take every tallied skip off its unit's count (checkpoints, pickles, sync_now)."""
        for unit, tally in self._skips.items():
            skipped = int(tally.item())
            if skipped:
                entry = self.state_entry(unit)
                entry[STEP_KEY] = max(0, entry.get(STEP_KEY, 0) - skipped)
        self._skips.clear()

    @torch.no_grad()
    def _scaled_inner_step(self, closure: Callable[[], float] | None, found_inf: torch.Tensor,
                           grad_scale: torch.Tensor | None, lockstep: bool) -> tuple[Any, bool | None]:
        """The inner step under GradScaler: (loss, whether it was applied). Note [Step counting].

        With a fused inner optimizer (it unscales and skips on the device) ``found_inf`` is not
        read (Note [Host syncs]): a strategy that counts every call (``lockstep``) does not need it
        and gets True; the in-place update gets None ("not known on the host") and tallies the
        flag on the device. Only the placement of newly joined tensors reads the flag here."""
        inner = self.optimizer
        if getattr(inner, "_step_supports_amp_scaling", False):  # fused optimizers unscale and skip
            inner.grad_scale, inner.found_inf = grad_scale, found_inf
            try:
                loss = self._inner_step(closure)
            finally:
                del inner.grad_scale, inner.found_inf
            if not self._fresh:
                return loss, (True if lockstep else None)
            return loss, not bool(found_inf)
        if bool(found_inf):  # GradScaler's own unfused path reads found_inf on the host too
            return None, False
        if grad_scale is not None:  # GradScaler left the gradients scaled: unscale as it would
            inv_scale = grad_scale.double().reciprocal().float()
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for g in inner.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        grad = local_tensor(p.grad)
                        by_device.setdefault(grad.device, []).append(grad)
            for device, grads in by_device.items():
                unused = torch.zeros((), dtype=torch.float32, device=device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, unused, inv_scale.to(device))
        return self._inner_step(closure), True

    def _scan(self, groups: list[dict[str, Any]]) -> None:
        """Take theta_0 for tensors that have no slow weight yet (O(#groups) when none are new)."""
        state = self.optimizer.state
        for group in groups:
            params = group["params"]
            seen = self._scanned.get(id(group))
            if seen is not None and seen[0] is group and seen[1] is params and seen[2] == len(params):
                continue
            self._scanned[id(group)] = (group, params, len(params))
            for p in params:
                st = state.get(p)
                if (st is not None and SLOW_KEY in st) or p in self._pending:
                    continue
                with torch.no_grad():
                    entry = self._strategy.new_entry(p, self._slow_dtype_for(p))
                if self.pullback == "pullback":
                    # The paper's initial cache (zeros), allocated now rather than at the first
                    # sync so that state-dict templates made before then (DCP) carry the key.
                    entry[MOMENTUM_KEY] = torch.zeros_like(p.detach())
                if st:  # the inner optimizer already keeps state for p: safe to join it
                    st.update(entry)
                else:
                    self._pending[p] = entry
                    self._fresh.append(p)
            if params:
                # The counter exists (at 0) from the start, so a state-dict template made before
                # the first step (DCP's fake step on a fresh optimizer) has the key to load into.
                self.state_entry(params[0]).setdefault(STEP_KEY, 0)

    def _slow_dtype_for(self, p: torch.Tensor) -> torch.dtype:
        if self.slow_dtype is not None and p.dtype in (torch.float16, torch.bfloat16):
            return self.slow_dtype
        return p.dtype

    def _place(self, params: list[torch.Tensor]) -> None:
        """Move pending entries into the inner state once the inner optimizer has stepped p."""
        state = self.optimizer.state
        for p in params:
            entry = self._pending.get(p)
            if entry is None:
                continue
            st = state.get(p)
            # After an applied inner step, a tensor with a gradient has been seen by the inner
            # optimizer: it either created its state (non-empty) or keeps none for it.
            if st or p.grad is not None:
                state[p].update(entry)
                del self._pending[p]

    def state_entry(self, p: torch.Tensor) -> dict[str, Any]:
        """The dict holding ``p``'s Lookahead state (its inner-state entry, or the side table's).

        For sync strategies; ``p`` must have a slow weight (it took part in a step).
        """
        st = self.optimizer.state.get(p)
        if st is not None and SLOW_KEY in st:
            return st
        return self._pending[p]

    def _is_fake_step(self, groups: list[dict[str, Any]], lockstep: bool) -> bool:
        # torch.distributed.checkpoint initialises an empty optimizer state by a step with lr 0 and
        # zero gradients; it must not advance a cycle. Gradients are only looked at when every
        # learning rate is 0, which a real run hits at most at the start of a warmup. Where ranks
        # must count in lockstep (a communicating strategy) the decision may not depend on this
        # rank's gradients: there the test is "every lr is 0 and the inner state is empty", which
        # is the same on every rank (DCP fakes a step only for an empty state).
        # DCP fakes a step only on an empty state, and the state is tested first: it is a host-side
        # dict, while a tensor lr would cost a device->host sync at every step (Note [Host syncs]).
        if any(self.optimizer.state.values()):
            return False
        for g in groups:
            lr = g.get("lr")
            if lr is None or bool(lr != 0):
                return False
        if lockstep:
            return True
        for g in groups:
            for p in g["params"]:
                if p.grad is not None and bool(local_tensor(p.grad).any()):
                    return False
        return True

    # -- after a sync ----------------------------------------------------------------------------
    @torch.no_grad()
    def on_synced(self, params: Sequence[torch.Tensor], alpha: float) -> None:
        """The inner state's part of a sync, called by the strategy once ``params`` hold the new
        slow weights: ``pullback`` (interpolate momentum) or ``reset`` (clear the inner state)."""
        if self._pending:  # entries of tensors stepped since they joined move into the inner state
            # ... except those a "reset" sync of another group just cleared in this step(): they
            # wait for the inner optimizer's next step (it must see an empty state to re-initialise).
            waiting = set(self._fresh)
            self._place([p for p in self._pending if p not in waiting])
        if self.pullback == "pullback":
            self._pull_back_momentum(params, alpha)
        elif self.pullback == "reset":
            self._reset_inner_state(params)

    @torch.no_grad()
    def on_nonfinite(self, params: Sequence[torch.Tensor], what: str) -> None:
        """Called by the strategy when a sync found NaN/inf and has restored ``params``' fast
        weights from their slow weights (no outer update). Resets the inner optimizer's state of
        ``params`` (it is likely non-finite too), counts, and warns once or raises.

        ``what`` names the first bad tensor and the step, e.g. ``"fast weight param_groups[0][3]"``.
        """
        self.nonfinite_syncs += 1
        msg = (f"Lookahead: non-finite values at the sync of step() call {self.step_calls} ({what}); the outer update was skipped, the fast "
               "weights were restored from the slow weights and the inner optimizer state of the unit was reset")
        if self.nonfinite_policy == "raise":
            raise FloatingPointError(msg)
        self._reset_inner_state(params)
        if not self._nonfinite_warned:
            self._nonfinite_warned = True
            warnings.warn(msg + " (warned once; count in `nonfinite_syncs`)", RuntimeWarning, stacklevel=4)

    def _pull_back_momentum(self, params: list[torch.Tensor], alpha: float) -> None:
        state = self.optimizer.state
        momenta: list[torch.Tensor] = []
        cached: list[torch.Tensor] = []
        for p in params:
            st = state.get(p) or {}
            m = next((st[key] for key in _MOMENTUM_BUFFER_KEYS if isinstance(st.get(key), torch.Tensor)), None)
            if m is None:
                continue
            entry = self.state_entry(p)
            c = entry.get(MOMENTUM_KEY)
            if c is None or c.shape != m.shape or c.dtype != m.dtype:
                entry[MOMENTUM_KEY] = torch.zeros_like(m)  # the paper's initial cache
            momenta.append(local_tensor(m))
            cached.append(local_tensor(entry[MOMENTUM_KEY]))
        if momenta:
            # m <- alpha * m + (1 - alpha) * m_cached, then the cache takes a copy (not an alias).
            torch._foreach_lerp_(momenta, cached, 1.0 - alpha)
            torch._foreach_copy_(cached, momenta)

    def _reset_inner_state(self, params: list[torch.Tensor]) -> None:
        state = self.optimizer.state
        for p in params:
            st = state.get(p)
            if not st or SLOW_KEY not in st:
                continue
            ours = {key: v for key, v in st.items() if is_lookahead_key(key)}
            st.clear()  # the inner optimizer re-initialises lazily on its next step
            self._pending[p] = ours
            self._fresh.append(p)  # back into the inner state after its next step

    # -- public helpers --------------------------------------------------------------------------
    def slow_weight(self, p: torch.Tensor) -> torch.Tensor | None:
        """The slow weight of ``p`` (as stored: a local shard or DTensor), or None before p's first step."""
        st = self.optimizer.state.get(p)
        if st is not None and SLOW_KEY in st:
            return st[SLOW_KEY]
        entry = self._pending.get(p)
        return None if entry is None else entry[SLOW_KEY]

    @torch.no_grad()
    def sync_now(self) -> None:
        """Run the slow update for every group now and start a new cycle (e.g. before export).

        Tensors that have not taken a step yet have no slow weight and are left as they are.
        """
        self._strategy.flush(self)
        self._skips.clear()  # every count restarts at 0 below
        if self._pending:
            self._place(list(self._pending))
        for group in self.optimizer.param_groups:
            params = group["params"]
            ready = [p for p in params if self.slow_weight(p) is not None]
            if not ready:
                continue
            self._strategy.sync(self, params if len(ready) == len(params) else ready,
                                group.get(ALPHA_KEY, self.defaults[ALPHA_KEY]))
            self.state_entry(ready[0])[STEP_KEY] = 0  # ready[0] is params[0] unless params was edited

    @contextmanager
    def use_slow_weights(self) -> Iterator[None]:
        """Within the block the parameters hold the slow weights; on exit the fast weights return.

        For evaluating the slow weights mid-cycle without disturbing training::

            with opt.use_slow_weights():
                val_loss = evaluate(model)
        """
        # A sharding strategy gathers the slow weights here: all its ranks call this together.
        self._strategy.flush(self)
        fast, slow = self._strategy.slow_pairs(self)
        with torch.no_grad():
            backup = [f.clone() for f in fast]
            _sync.copy_(fast, slow)
        try:
            yield
        finally:
            with torch.no_grad():
                _sync.copy_(fast, backup)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, with Lookahead's entries in it.

        Per-parameter state carries :data:`SLOW_KEY` (and :data:`STEP_KEY`, :data:`MOMENTUM_KEY`);
        each param group carries :data:`K_KEY` and :data:`ALPHA_KEY`. The layout is the inner
        optimizer's own, so hosts that save, shard or reshard that state handle these entries too.
        """
        self._strategy.flush(self)
        self._fold_skips()
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.optimizer.state
        shown: list[tuple[torch.Tensor, Any]] = []
        for p, entry in self._pending.items():
            before = state[p] if p in state else None
            shown.append((p, before))
            state[p] = {**(before or {}), **entry}
        try:
            # The inner optimizer's own method, so its hooks and any override of it run.
            state_dict = self.optimizer.state_dict()
        finally:
            for p, before in shown:
                if before is None:
                    del state[p]
                else:
                    state[p] = before
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            out = post_hook(self, state_dict)
            if out is not None:
                state_dict = out
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a Lookahead or a plain inner-optimizer state dict.

        - Lookahead state dict: slow weights, counters and cached momenta are restored exactly
          (slow weights keep their own dtype, e.g. fp32 for bf16 parameters); resuming is
          bit-identical to not having stopped.
        - Plain inner state dict: the inner state is restored, and each tensor starts a new
          cycle at the next step with its current value as slow weight.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        # Everything is checked before anything is loaded: a bad checkpoint leaves the optimizer as it was.
        saved_groups = self._check_loadable(state_dict)
        groups = self.optimizer.param_groups
        index_to_param = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in groups),
            )
        )
        names = {idx: f"param_groups[{gi}].params[{pi}] (state index {idx!r})"
                 for gi, g in enumerate(saved_groups) for pi, idx in enumerate(g["params"])}
        entries: dict[torch.Tensor, dict[str, Any]] = {}
        inner_state: dict[Any, dict[str, Any]] = {}
        for idx, s in state_dict["state"].items():
            s = dict(s)
            mine = {key: s.pop(key) for key in list(s) if is_lookahead_key(key)}
            if mine:
                p = index_to_param.get(idx)
                if p is None:
                    raise ValueError(f"Lookahead checkpoint: state for parameter index {idx!r} matches no parameter "
                                     f"of the saved param_groups, which list {len(index_to_param)} parameter(s)")
                entries[p] = self._restore_entry(p, mine, names[idx])
            if s:
                inner_state[idx] = s
        self.optimizer.load_state_dict({**state_dict, "state": inner_state})

        groups = self.optimizer.param_groups  # the inner load replaced the list
        for g in groups:
            g.setdefault(K_KEY, self.defaults[K_KEY])
            g.setdefault(ALPHA_KEY, self.defaults[ALPHA_KEY])
        self._reset_caches()
        state = self.optimizer.state
        for p, entry in entries.items():
            if state.get(p):
                state[p].update(entry)
            else:
                self._pending[p] = entry
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_loadable(self, state_dict: Any) -> list[dict[str, Any]]:
        """The saved param groups, after checking the layout and the Lookahead group keys."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError("Lookahead.load_state_dict needs an optimizer state dict with keys 'state' and "
                             f"'param_groups', got {got}")
        saved = state_dict["param_groups"]
        groups = self.optimizer.param_groups
        if len(saved) != len(groups):
            raise ValueError(f"Lookahead checkpoint has {len(saved)} param group(s), this optimizer has {len(groups)}; "
                             "was it saved from another model or optimizer set-up?")
        for i, (sg, g) in enumerate(zip(saved, groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"Lookahead checkpoint: param_groups[{i}] has {len(sg['params'])} parameter(s), this "
                                 f"optimizer's has {len(g['params'])}")
            if K_KEY in sg:
                check_k(sg[K_KEY], f"param_groups[{i}].{K_KEY}")
            if ALPHA_KEY in sg:
                check_alpha(sg[ALPHA_KEY], f"param_groups[{i}].{ALPHA_KEY}")
        return saved

    def _restore_entry(self, p: torch.Tensor, saved: dict[str, Any], name: str) -> dict[str, Any]:
        # The strategy restores (and checks) the slow weight and its own keys; the rest is ours.
        entry = self._strategy.restore_entry(p, saved, self._slow_dtype_for(p), name)
        if STEP_KEY in saved:
            entry[STEP_KEY] = int(saved[STEP_KEY])
        if MOMENTUM_KEY in saved:
            entry[MOMENTUM_KEY] = saved[MOMENTUM_KEY].to(device=local_tensor(p).device, copy=True)
        return entry


def find_lookahead(obj: Any) -> Lookahead | None:
    """The Lookahead inside a host's optimizer wrapper (or ``obj`` itself), or None.

    Follows the attributes hosts keep the optimizer they step in: DeepSpeed's engine and ZeRO/bf16
    wrappers (``optimizer``, ``basic_optimizer``, ZeRO-3's ``backup_optimizer``) and
    ``ZeroRedundancyOptimizer`` (``optim``).
    """
    seen: set[int] = set()
    todo = [obj]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, Lookahead):
            return cur
        for attr in ("optimizer", "basic_optimizer", "backup_optimizer", "optim"):
            todo.append(getattr(cur, attr, None))
    return None
