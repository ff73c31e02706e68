"""The names Lookahead and its sync strategies store state under.

Every per-parameter state key and param-group key this library writes starts with
:data:`KEY_PREFIX`, so a checkpoint can be told apart from the inner optimizer's own state (and
stripped: :func:`~lookahead_dist.strip_lookahead_state`) without knowing which strategy wrote it.
"""

from __future__ import annotations

__all__ = ["KEY_PREFIX", "SLOW_KEY", "STEP_KEY", "MOMENTUM_KEY", "K_KEY", "ALPHA_KEY", "is_lookahead_key"]

#: Prefix of every state and param-group key owned by lookahead-dist.
KEY_PREFIX = "lookahead_"
#: Per-parameter state key of the slow weight (a tensor shaped like the parameter's local shard,
#: or a 1-D chunk of it under a sharding sync strategy).
SLOW_KEY = "lookahead_slow"
#: Per-parameter state key (first tensor of a step unit) of the steps taken since the last sync.
STEP_KEY = "lookahead_step"
#: Per-parameter state key of the cached momentum used by ``pullback="pullback"``.
MOMENTUM_KEY = "lookahead_momentum"
#: Param-group key of the sync period k.
K_KEY = "lookahead_k"
#: Param-group key of the slow step size alpha.
ALPHA_KEY = "lookahead_alpha"


def is_lookahead_key(key: object) -> bool:
    """True for a state or param-group key written by lookahead-dist."""
    return isinstance(key, str) and key.startswith(KEY_PREFIX)
