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
weights. A step GradScaler or DeepSpeed skips on overflow never reaches ``step()`` and so does not
count; the fake step of ``torch.distributed.checkpoint`` (all learning rates 0, all gradients 0)
is passed to the inner optimizer without counting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import chain
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.optim import Optimizer

from . import _sync
from ._sync import Bucket, local_tensor

if TYPE_CHECKING:
    from .local_sgd import LocalSGD, LocalSGDOptions

__all__ = [
    "Lookahead",
    "SLOW_KEY",
    "STEP_KEY",
    "MOMENTUM_KEY",
    "K_KEY",
    "ALPHA_KEY",
    "PULLBACK_MODES",
]

#: Per-parameter state key of the slow weight (a tensor shaped like the parameter's local shard).
SLOW_KEY = "lookahead_slow"
#: Per-parameter state key (first tensor of a step unit) of the steps taken since the last sync.
STEP_KEY = "lookahead_step"
#: Per-parameter state key of the cached momentum used by ``pullback="pullback"``.
MOMENTUM_KEY = "lookahead_momentum"
#: Param-group key of the sync period k.
K_KEY = "lookahead_k"
#: Param-group key of the slow step size alpha.
ALPHA_KEY = "lookahead_alpha"
#: Per-parameter state key of the outer momentum of the local-SGD mode (shaped like the slow weight).
OUTER_MOMENTUM_KEY = "lookahead_outer_momentum"
#: Every per-parameter state key Lookahead owns.
STATE_KEYS = (SLOW_KEY, STEP_KEY, MOMENTUM_KEY, OUTER_MOMENTUM_KEY)
#: Accepted values of ``pullback``.
PULLBACK_MODES = ("none", "reset", "pullback")
# Inner-state keys that hold a first-moment (momentum) buffer, in lookup order.
_MOMENTUM_BUFFER_KEYS = ("momentum_buffer", "exp_avg")

PullbackMode = Literal["none", "reset", "pullback"]


def _check_k(k: Any, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"Lookahead `{name}` must be an int >= 1, got {k!r} ({type(k).__name__})")
    if k < 1:
        raise ValueError(f"Lookahead `{name}` must be >= 1, got {k}")
    return k


def _check_alpha(alpha: Any, name: str = "alpha") -> float:
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
            momentum, sharded slow weights, bf16 communication, hierarchically). See
            :mod:`lookahead_dist.local_sgd` and ``docs/local-sgd.md``.
        process_group: the local-SGD group (default: the world); implies ``local_sgd=True``.

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
        _check_k(k)
        alpha = _check_alpha(alpha)
        if pullback not in PULLBACK_MODES:
            raise ValueError(f"Lookahead `pullback` must be one of {PULLBACK_MODES}, got {pullback!r}")
        if slow_dtype is not None and (
            not isinstance(slow_dtype, torch.dtype) or not slow_dtype.is_floating_point
        ):
            raise TypeError(f"Lookahead `slow_dtype` must be a floating torch.dtype or None, got {slow_dtype!r}")

        self.optimizer = optimizer
        self.pullback: PullbackMode = pullback
        self.slow_dtype = slow_dtype
        # Local-SGD mode (local_sgd.py): set before adoption, whose add_param_group aligns ranks.
        self._local_sgd: LocalSGD | None = None
        if local_sgd is not False or process_group is not None:
            from .local_sgd import make_local_sgd

            self._local_sgd = make_local_sgd(local_sgd, process_group)
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
        # first tensor of a step unit -> (params list, len, buckets) for the sync.
        self._buckets: dict[torch.Tensor, tuple[list, int, list[Bucket]]] = {}
        if getattr(self, "_local_sgd", None) is not None:
            self._local_sgd.reset_cache()

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
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        pending = state.get("_pending", {})
        self.__dict__.update(state)
        # Caches are keyed by object identity, which pickling does not keep.
        self._reset_caches()
        self._pending = pending

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
        _check_k(k)
        _check_alpha(alpha)

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
            _check_k(param_group[K_KEY], K_KEY)
        if ALPHA_KEY in param_group:
            param_group[ALPHA_KEY] = _check_alpha(param_group[ALPHA_KEY], ALPHA_KEY)
        if not self._adopting:
            self.optimizer.add_param_group(param_group)
            param_group = self.optimizer.param_groups[-1]
        param_group.setdefault(K_KEY, self.defaults[K_KEY])
        param_group.setdefault(ALPHA_KEY, self.defaults[ALPHA_KEY])
        if self._local_sgd is not None:  # same starting weights on every rank (local_sgd.py)
            self._local_sgd.align(param_group["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def local_sgd(self) -> LocalSGD | None:
        """The local-SGD engine (communication statistics in ``.stats``), or None outside that mode."""
        return self._local_sgd

    # -- the step --------------------------------------------------------------------------------
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """One inner step; after every k-th applied step of a unit, the slow update for it."""
        groups = self.optimizer.param_groups
        self._scan(groups)
        if self._is_fake_step(groups):
            return self.optimizer.step() if closure is None else self.optimizer.step(closure)
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        if self._fresh:
            self._place(self._fresh)
            self._fresh = []
        for group in groups:
            params = group["params"]
            if not params:  # ZeRO-3 empties the groups it is not stepping
                continue
            unit = params[0]
            n = self._entry(unit).get(STEP_KEY, 0) + 1
            if n >= group.get(K_KEY, self.defaults[K_KEY]):
                self._sync(params, group.get(ALPHA_KEY, self.defaults[ALPHA_KEY]))
                n = 0
            self._entry(unit)[STEP_KEY] = n  # re-fetched: a "reset" sync moves entries
        return loss

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
                entry = {SLOW_KEY: self._new_slow(p)}
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
                self._entry(params[0]).setdefault(STEP_KEY, 0)

    def _new_slow(self, p: torch.Tensor) -> torch.Tensor:
        if self._local_sgd is not None:  # sharded local SGD keeps only this rank's chunk
            with torch.no_grad():
                return self._local_sgd.new_slow(p, self._slow_dtype_for(p))
        with torch.no_grad():
            return p.detach().to(dtype=self._slow_dtype_for(p), copy=True)

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

    def _entry(self, p: torch.Tensor) -> dict[str, Any]:
        st = self.optimizer.state.get(p)
        if st is not None and SLOW_KEY in st:
            return st
        return self._pending[p]

    @staticmethod
    def _is_fake_step(groups: list[dict[str, Any]]) -> bool:
        # torch.distributed.checkpoint initialises empty optimizer state by a step with lr 0 and
        # zero gradients; it must not advance a cycle. Gradients are only looked at when every
        # learning rate is 0, which a real run hits at most at the start of a warmup.
        for g in groups:
            lr = g.get("lr")
            if lr is None or bool(lr != 0):
                return False
        for g in groups:
            for p in g["params"]:
                if p.grad is not None and bool(local_tensor(p.grad).any()):
                    return False
        return True

    # -- the sync --------------------------------------------------------------------------------
    def _unit_buckets(self, params: list[torch.Tensor]) -> list[Bucket]:
        cached = self._buckets.get(params[0])
        # The identity check on the first slow tensor catches state entries replaced behind our
        # back (ZeroRedundancyOptimizer.load_state_dict writes the local optimizer's state directly).
        if (cached is not None and cached[0] is params and cached[1] == len(params)
                and cached[2][0].slow[0] is local_tensor(self._entry(params[0])[SLOW_KEY])):
            return cached[2]
        buckets = _sync.build_buckets((p, self._entry(p)[SLOW_KEY]) for p in params)
        self._buckets[params[0]] = (params, len(params), buckets)
        return buckets

    @torch.no_grad()
    def _sync(self, params: list[torch.Tensor], alpha: float) -> None:
        if self._pending:
            self._place(list(self._pending))
        if self._local_sgd is not None:  # average over the group, then the outer step
            self._local_sgd.sync(self, params, alpha)
        else:
            self._slow_update(self._unit_buckets(params), alpha)
        if self.pullback == "pullback":
            self._pull_back_momentum(params, alpha)
        elif self.pullback == "reset":
            self._reset_inner_state(params)

    def _slow_update(self, buckets: list[Bucket], alpha: float) -> None:
        """The in-place slow step on this rank's tensors; no communication."""
        _sync.slow_update_(buckets, alpha)

    def _pull_back_momentum(self, params: list[torch.Tensor], alpha: float) -> None:
        state = self.optimizer.state
        momenta: list[torch.Tensor] = []
        cached: list[torch.Tensor] = []
        for p in params:
            st = state.get(p) or {}
            m = next((st[key] for key in _MOMENTUM_BUFFER_KEYS if isinstance(st.get(key), torch.Tensor)), None)
            if m is None:
                continue
            entry = self._entry(p)
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
            ours = {key: st[key] for key in STATE_KEYS if key in st}
            st.clear()  # the inner optimizer re-initialises lazily on its next step
            self._pending[p] = ours

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
        for group in self.optimizer.param_groups:
            params = group["params"]
            ready = [p for p in params if self.slow_weight(p) is not None]
            if not ready:
                continue
            self._sync(params if len(ready) == len(params) else ready,
                       group.get(ALPHA_KEY, self.defaults[ALPHA_KEY]))
            self._entry(ready[0])[STEP_KEY] = 0  # ready[0] is params[0] unless params was edited

    @contextmanager
    def use_slow_weights(self) -> Iterator[None]:
        """Within the block the parameters hold the slow weights; on exit the fast weights return.

        For evaluating the slow weights mid-cycle without disturbing training::

            with opt.use_slow_weights():
                val_loss = evaluate(model)
        """
        fast, slow = [], []
        if self._local_sgd is not None and self._local_sgd.sharded:
            # Each rank holds a chunk of the slow weights: gather them (all ranks call this together).
            fast, slow = self._local_sgd.slow_pairs(self)
        else:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    s = self.slow_weight(p)
                    if s is not None:
                        fast.append(local_tensor(p))
                        slow.append(local_tensor(s))
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
        state = self.optimizer.state
        shown: list[tuple[torch.Tensor, Any]] = []
        for p, entry in self._pending.items():
            before = state[p] if p in state else None
            shown.append((p, before))
            state[p] = {**(before or {}), **entry}
        try:
            return super().state_dict()
        finally:
            for p, before in shown:
                if before is None:
                    del state[p]
                else:
                    state[p] = before

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
        ours: dict[Any, dict[str, Any]] = {}
        inner_state: dict[Any, dict[str, Any]] = {}
        for idx, s in state_dict["state"].items():
            s = dict(s)
            mine = {key: s.pop(key) for key in STATE_KEYS if key in s}
            if mine:
                ours[idx] = mine
            if s:
                inner_state[idx] = s
        self.optimizer.load_state_dict({**state_dict, "state": inner_state})

        groups = self.optimizer.param_groups
        for g in groups:
            g.setdefault(K_KEY, self.defaults[K_KEY])
            g.setdefault(ALPHA_KEY, self.defaults[ALPHA_KEY])
        index_to_param = dict(
            zip(
                chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                chain.from_iterable(g["params"] for g in groups),
            )
        )
        self._reset_caches()
        state = self.optimizer.state
        for idx, mine in ours.items():
            p = index_to_param.get(idx)
            if p is None:
                raise KeyError(f"Lookahead state for parameter index {idx!r} has no parameter in param_groups")
            entry = self._restore_entry(p, mine)
            if state.get(p):
                state[p].update(entry)
            else:
                self._pending[p] = entry
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _restore_entry(self, p: torch.Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        if SLOW_KEY in saved:
            entry[SLOW_KEY] = saved[SLOW_KEY].to(device=p.device, dtype=self._slow_dtype_for(p), copy=True)
        if STEP_KEY in saved:
            entry[STEP_KEY] = int(saved[STEP_KEY])
        if MOMENTUM_KEY in saved:
            entry[MOMENTUM_KEY] = saved[MOMENTUM_KEY].to(device=p.device, copy=True)
        if OUTER_MOMENTUM_KEY in saved:  # local-SGD outer momentum: the slow weight's dtype
            entry[OUTER_MOMENTUM_KEY] = saved[OUTER_MOMENTUM_KEY].to(
                device=p.device, dtype=self._slow_dtype_for(p), copy=True)
        return entry
