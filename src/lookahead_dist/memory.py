"""Measure the optimizer-state memory a rank holds, from the state tensors themselves.

Only local storage counts: a DTensor contributes its local shard, a ZeRO partition is already
local. That makes the numbers comparable across hosts: under a sharding host the slow-weight bytes
on each rank are about ``total / N``, under DDP they are ``total``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._sync import nbytes
from ._keys import SLOW_KEY, is_lookahead_key
from .lookahead import Lookahead, find_lookahead

__all__ = ["StateBytes", "optimizer_state_bytes", "slow_weight_bytes"]


@dataclass(frozen=True)
class StateBytes:
    """Bytes of optimizer state held on this rank.

    Attributes:
        slow: Lookahead slow weights (:data:`~lookahead_dist.SLOW_KEY`).
        lookahead_other: Lookahead's other tensors (cached momenta of ``pullback="pullback"``).
        inner: the inner optimizer's own state tensors (e.g. Adam's ``exp_avg``, ``exp_avg_sq``).
    """

    slow: int
    lookahead_other: int
    inner: int

    @property
    def total(self) -> int:
        return self.slow + self.lookahead_other + self.inner


def _unwrap(optimizer: Any) -> Any:
    # The Lookahead inside a host's wrapper; else ZeroRedundancyOptimizer's per-rank `.optim`.
    found = find_lookahead(optimizer)
    if found is not None:
        return found
    inner = getattr(optimizer, "optim", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def optimizer_state_bytes(optimizer: Any) -> StateBytes:
    """Per-rank state bytes of ``optimizer`` (a Lookahead, a plain optimizer, or a ZeroRedundancyOptimizer).

    Slow weights still waiting to join the inner state (taken before the inner optimizer's first
    step with that tensor) are counted too.
    """
    opt = _unwrap(optimizer)
    slow = other = inner = 0
    entries = list(opt.state.values())
    if isinstance(opt, Lookahead):  # slow weights that have not joined the inner state yet
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state.get(p)
                if (st is None or SLOW_KEY not in st) and opt.slow_weight(p) is not None:
                    entries.append(opt.state_entry(p))
    for entry in entries:
        for key, value in entry.items():
            n = nbytes(value) if isinstance(value, torch.Tensor) else 0
            if key == SLOW_KEY:
                slow += n
            elif is_lookahead_key(key):
                other += n
            else:
                inner += n
    return StateBytes(slow=slow, lookahead_other=other, inner=inner)


def slow_weight_bytes(optimizer: Any) -> int:
    """Bytes of Lookahead slow weights held on this rank (local shards only)."""
    return optimizer_state_bytes(optimizer).slow
