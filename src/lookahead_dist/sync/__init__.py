"""Sync strategies: what a Lookahead does every k steps (Note [The strategy interface] in ``base``).

- :class:`InPlaceSync`: the paper's slow step on each rank's own shard, no communication (default).
- :class:`LocalSGD` (:class:`LocalSGDOptions`): average the fast weights over a process group, then
  an outer step; blocking or streamed.
"""

from __future__ import annotations

from typing import Any

from .base import InPlaceSync, SyncHost, SyncStrategy
from .local_sgd import OUTER_MOMENTUM_KEY, LocalSGD, LocalSGDOptions, make_local_sgd

__all__ = [
    "SyncHost",
    "SyncStrategy",
    "InPlaceSync",
    "LocalSGD",
    "LocalSGDOptions",
    "OUTER_MOMENTUM_KEY",
    "make_strategy",
]


def make_strategy(sync: SyncStrategy | None = None, local_sgd: Any = False,
                  process_group: Any = None) -> SyncStrategy:
    """The strategy for ``Lookahead(..., sync=..., local_sgd=..., process_group=...)``.

    ``sync`` (a strategy instance) and ``local_sgd``/``process_group`` (the local-SGD shorthand)
    are alternatives; with neither, the in-place update.
    """
    wants_local = local_sgd is not False or process_group is not None
    if sync is not None:
        if not isinstance(sync, SyncStrategy):
            raise TypeError(f"Lookahead `sync` must be a lookahead_dist.sync.SyncStrategy, got "
                            f"{type(sync).__name__}: {sync!r}")
        if wants_local:
            raise ValueError("Lookahead got both `sync` and `local_sgd`/`process_group`; pass one "
                             "(e.g. sync=LocalSGD(LocalSGDOptions(...)))")
        return sync
    if wants_local:
        return make_local_sgd(local_sgd, process_group)
    return InPlaceSync()
