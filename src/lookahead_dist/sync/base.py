"""The seam between the Lookahead optimizer and what a sync does.

:class:`~lookahead_dist.Lookahead` counts applied inner steps per step unit and keeps per-parameter
state; it never asks *how* a sync happens. A :class:`SyncStrategy` decides that:

- :class:`InPlaceSync` (the default): the paper's slow step on this rank's own tensors -- a full
  parameter, a DTensor shard, a ZeRO flat partition -- with no communication.
- :class:`~lookahead_dist.sync.local_sgd.LocalSGD`: average the fast weights over a process group
  first (blocking, or streamed over fragments), then an outer step.
- the torchft-managed variant, and whatever a user plugs in.

Note [The strategy interface]
-----------------------------
A strategy is handed the optimizer as a :class:`SyncHost`: the param groups, ``state_entry(p)``
(the per-parameter dict that holds the slow weight; placing it into the inner state if needed),
``slow_weight(p)``, ``on_synced(params, alpha)`` (pullback/reset of the inner state, which a
strategy calls for the tensors whose fast weights it has just reset) and ``on_nonfinite(params,
what)`` (a sync found NaN/inf and restored the fast weights from the slow ones instead of updating:
the host resets the inner state, counts, warns once or raises). The optimizer calls:

========================  ==========================================================================
``new_entry(p, dtype)``   state for a tensor joining: :data:`SLOW_KEY` and every key the strategy will
                          ever need (allocated now, so a DCP template made before the first sync
                          has a slot for each)
``align(params)``         a param group was added (local SGD: same starting weights everywhere)
``advance(host, params,   after every counted step of a unit, with the new count n in 1..k; the
n, k, alpha)``            default syncs the unit when n == k
``sync(host, params,      sync the whole unit now (the schedule above, and ``sync_now()``)
alpha)``
``slow_pairs(host)``      (fast, slow) local tensors for ``use_slow_weights()``
``restore_entry(p,        turn a saved entry back into live state (device, dtype, shape checks)
saved)``
``flush(host)``           finish work in flight (before ``state_dict()``/``use_slow_weights()``)
``reset_cache()``         identity-keyed caches are stale (load_state_dict, unpickling)
``close()``               remove hooks
========================  ==========================================================================

Each strategy owns its per-parameter keys (all prefixed ``lookahead_``, named in ``_keys.py``) and its
statistics (``stats``); ``lookahead.py`` holds no strategy-specific key and no strategy branch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch

from .. import _sync
from .._keys import SLOW_KEY
from .._sync import Bucket, local_tensor

__all__ = ["SyncHost", "SyncStrategy", "InPlaceSync"]


def _first_new_nonfinite(b: Bucket) -> int | None:
    """Index of the first fast weight with NaN/inf where its slow weight is finite, or None.

    Values that were non-finite already when the slow weight was taken (theta_0) are not a divergence
    of this cycle: DeepSpeed ZeRO-3 leaves the padding at the end of a rank's flat partition
    uninitialised, and a NaN/inf bit pattern there would otherwise skip every sync of the unit
    (docs/deepspeed.md, "Partition padding"). The common case costs what first_nonfinite costs.
    """
    start = 0
    while start < len(b.fast):
        rel = _sync.first_nonfinite(b.fast[start:], b.probe if start == 0 else None)
        if rel is None:
            return None
        i = start + rel
        fast, slow = b.fast[i], b.slow[i]
        if bool((~torch.isfinite(fast) & torch.isfinite(slow)).any()):
            return i
        start = i + 1
    return None


class SyncHost(Protocol):
    """What a sync strategy may use of the optimizer it serves (a :class:`~lookahead_dist.Lookahead`)."""

    @property
    def param_groups(self) -> list[dict[str, Any]]: ...

    #: ``step()`` calls so far, for messages.
    step_calls: int

    def state_entry(self, p: torch.Tensor) -> dict[str, Any]: ...

    def slow_weight(self, p: torch.Tensor) -> torch.Tensor | None: ...

    def on_synced(self, params: Sequence[torch.Tensor], alpha: float) -> None: ...

    def on_nonfinite(self, params: Sequence[torch.Tensor], what: str) -> None: ...


class SyncStrategy:
    """Base class of sync strategies: the no-communication slow update of the paper.

    Subclasses override what differs; see Note [The strategy interface] in this module.
    """

    #: Whether the sync communicates (local SGD): ``Lookahead.local_sgd`` returns the strategy then.
    communicates: bool = False
    #: Communication statistics (a :class:`~lookahead_dist._comm.CommStats`), or None.
    stats: Any = None
    #: Attributes holding what cannot be pickled (process groups, hook handles, a torchft
    #: manager, identity-keyed caches): dropped by pickling. See :meth:`__getstate__`.
    _unpicklable: tuple[str, ...] = ()

    # -- pickling ----------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Pickle (or deep-copy) without the communication objects.

        The copy keeps its state and statistics but is *detached*: its sync raises a clear error,
        since a process group belongs to the processes that made it. To go on training, build a
        new Lookahead with a strategy on live groups and ``load_state_dict`` the old one's state.
        """
        if self._unpicklable and self.pending():
            raise RuntimeError(f"{type(self).__name__}: a collective is in flight; call opt.state_dict() (which "
                               "waits for it) before pickling or copying the optimizer")
        state = self.__dict__.copy()
        for name in self._unpicklable:
            state.pop(name, None)
        state["_detached"] = bool(self._unpicklable)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in self._unpicklable:
            self.__dict__.setdefault(name, None)
        if state.get("_detached"):
            self.reset_cache()
            # Instance attributes shadow the methods: no check on the normal path.
            self.advance = self.sync = self.slow_pairs = self.align = self._detached_error  # type: ignore[method-assign]

    def _detached_error(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"this {type(self).__name__} was unpickled or deep-copied, which drops its process groups (they "
            "belong to the processes that made them); build a new Lookahead with live groups and load this "
            "one's state_dict() into it")

    def pending(self) -> bool:
        """Whether a collective is in flight (only streaming strategies ever have one)."""
        return False

    # -- state -------------------------------------------------------------------------------
    def new_entry(self, p: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Per-parameter state for ``p`` joining the optimizer: its slow weight = theta_0.

        A copy of ``p`` itself: a DTensor parameter gets a DTensor slow weight with the same
        placement, which is what DCP's resharding works on.
        """
        return {SLOW_KEY: p.detach().to(dtype=dtype, copy=True)}

    def restore_entry(self, p: torch.Tensor, saved: dict[str, Any], dtype: torch.dtype,
                      name: str) -> dict[str, Any]:
        """Live state from a saved entry: :data:`SLOW_KEY` here; a subclass adds its own keys (others are ignored).

        ``name`` identifies the parameter in errors (``"param_groups[0].params[3]"``).
        """
        out: dict[str, Any] = {}
        if SLOW_KEY in saved:
            out[SLOW_KEY] = self._restore_tensor(p, saved[SLOW_KEY], dtype, name, SLOW_KEY)
        return out

    def expected_shape(self, p: torch.Tensor) -> torch.Size:
        """Shape of ``p``'s slow weight under this strategy (``p``'s own, global for a DTensor)."""
        return p.shape

    def _restore_tensor(self, p: torch.Tensor, value: Any, dtype: torch.dtype, name: str, key: str,
                        shape: torch.Size | None = None) -> torch.Tensor:
        """``value`` checked (a floating tensor of ``shape``, default the slow weight's) and copied."""
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"Lookahead checkpoint: {name} `{key}` must be a tensor, got {type(value).__name__}")
        want = self.expected_shape(p) if shape is None else shape
        if value.shape != want:
            raise ValueError(
                f"Lookahead checkpoint: {name} `{key}` has shape {tuple(value.shape)} where the parameter needs "
                f"{tuple(want)}; was it saved from another model, world size or sharding?"
            )
        if not value.is_floating_point():
            raise TypeError(f"Lookahead checkpoint: {name} `{key}` has dtype {value.dtype}; expected a floating "
                            f"dtype like {dtype}")
        return value.to(device=p.device, dtype=dtype, copy=True)

    # -- life cycle --------------------------------------------------------------------------
    def align(self, params: Iterable[torch.Tensor]) -> None:
        """A param group joined; nothing to do without communication."""

    def reset_cache(self) -> None:
        """Drop identity-keyed caches (after load_state_dict or unpickling)."""

    def flush(self, host: SyncHost) -> None:
        """Finish any work in flight; nothing is ever in flight here."""

    def close(self) -> None:
        """Remove hooks the strategy registered; nothing here."""

    # -- the sync ----------------------------------------------------------------------------
    def advance(self, host: SyncHost, params: list[torch.Tensor], n: int, k: int, alpha: float) -> None:
        """Called after each counted step of a unit, ``n`` in 1..k; syncs the unit at ``n == k``."""
        if n >= k:
            self.sync(host, params, alpha)

    def sync(self, host: SyncHost, params: list[torch.Tensor], alpha: float) -> None:
        raise NotImplementedError

    def slow_pairs(self, host: SyncHost) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(fast, slow) local tensors of every parameter that has a slow weight."""
        fast: list[torch.Tensor] = []
        slow: list[torch.Tensor] = []
        for group in host.param_groups:
            for p in group["params"]:
                s = host.slow_weight(p)
                if s is not None:
                    fast.append(local_tensor(p))
                    slow.append(local_tensor(s))
        return fast, slow


class InPlaceSync(SyncStrategy):
    """The paper's slow step, in place on each rank's own tensors, with no communication.

    .. math::
        \\phi \\leftarrow \\phi + \\alpha(\\theta - \\phi), \\qquad \\theta \\leftarrow \\phi

    Two foreach kernels per (device, dtype) bucket over lists built once per unit. Under a sharding
    host (ZeRO, FSDP, ZeroRedundancyOptimizer) each rank updates only its shard, which is all the
    sync needs: the update is elementwise.
    """

    def __init__(self) -> None:
        # first tensor of a step unit -> (params list, len, buckets)
        self._buckets: dict[torch.Tensor, tuple[list, int, list[Bucket]]] = {}

    def reset_cache(self) -> None:
        self._buckets = {}

    def _unit_buckets(self, host: SyncHost, params: list[torch.Tensor]) -> list[Bucket]:
        cached = self._buckets.get(params[0])
        # The identity check on the first slow tensor catches state entries replaced behind our
        # back (ZeroRedundancyOptimizer.load_state_dict writes the local optimizer's state directly).
        if (cached is not None and cached[0] is params and cached[1] == len(params)
                and cached[2][0].slow[0] is local_tensor(host.state_entry(params[0])[SLOW_KEY])):
            return cached[2]
        buckets = _sync.build_buckets((p, host.state_entry(p)[SLOW_KEY]) for p in params)
        self._buckets[params[0]] = (params, len(params), buckets)
        return buckets

    @torch.no_grad()
    def sync(self, host: SyncHost, params: list[torch.Tensor], alpha: float) -> None:
        buckets = self._unit_buckets(host, params)
        for b in buckets:  # Note [Non-finite syncs] in lookahead.py
            bad = _first_new_nonfinite(b)
            if bad is not None:
                for bb in buckets:
                    _sync.copy_(bb.fast, bb.slow)  # fast <- slow: this cycle's steps are dropped
                host.on_nonfinite(params, f"fast weight of shape {tuple(b.fast[bad].shape)}")
                return
        _sync.slow_update_(buckets, alpha)
        host.on_synced(params, alpha)
