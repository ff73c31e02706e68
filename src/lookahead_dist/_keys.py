"""The names Lookahead and its sync strategies store state under.

Every per-parameter state key and param-group key this library writes starts with
:data:`KEY_PREFIX`, so a checkpoint can be told apart from the inner optimizer's own state (and
stripped: :func:`~lookahead_dist.strip_lookahead_state`) without knowing which strategy wrote it.
"""

from __future__ import annotations

__all__ = [
    "KEY_PREFIX",
    "SLOW_KEY",
    "STEP_KEY",
    "MOMENTUM_KEY",
    "K_KEY",
    "ALPHA_KEY",
    "OUTER_MOMENTUM_KEY",
    "INFLIGHT_KEY",
    "INFLIGHT_DUE_KEY",
    "EF_RESIDUAL_KEY",
    "EF_OWNER_KEY",
    "OUTER_STATE_PREFIX",
    "OUTER_STEPS_KEY",
    "EAGER_START_KEY",
    "EAGER_INFLIGHT_KEY",
    "is_lookahead_key",
]

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

# -- keys of the local-SGD strategies (lookahead_dist.sync) -----------------------------------------
#: Per-parameter state key of the outer momentum (shaped like the slow weight; only when
#: ``outer_momentum > 0``).
OUTER_MOMENTUM_KEY = "lookahead_outer_momentum"
#: Per-parameter state (``fragment_sync_delay > 0``): the averaged pseudo-gradient of a fragment
#: whose collective was in flight at ``state_dict()``, shaped like the slow weight; applied at its
#: due step after a resume (Note [Checkpoints in flight] in sync/local_sgd.py).
INFLIGHT_KEY = "lookahead_inflight"
#: Per-parameter int: counted steps until ``INFLIGHT_KEY`` is applied; 0 = nothing in flight.
INFLIGHT_DUE_KEY = "lookahead_inflight_due"
#: Per-parameter fp32 error-feedback residual of the values this rank sends (int8/int4 with
#: ``error_feedback=True``), shaped like the slow weight.
EF_RESIDUAL_KEY = "lookahead_ef_residual"
#: Per-parameter fp32 error-feedback residual of the reduced chunk this rank owns (1-D, about 1/N
#: of the slow weight).
EF_OWNER_KEY = "lookahead_ef_owner"
#: Prefix of the per-parameter mirror of a user outer optimizer's state (``outer_optimizer=``):
#: its key ``momentum_buffer`` is kept as ``lookahead_outer_state_momentum_buffer``.
OUTER_STATE_PREFIX = "lookahead_outer_state_"
#: Per-parameter int: outer-optimizer steps taken for this tensor (0: its mirror holds placeholders).
OUTER_STEPS_KEY = "lookahead_outer_steps"


def is_lookahead_key(key: object) -> bool:
    """True for a state or param-group key written by lookahead-dist."""
    return isinstance(key, str) and key.startswith(KEY_PREFIX)


# -- eager outer updates (Note [Eager outer updates] in sync/_outer.py) ------------------------------
#: Per-parameter state (``eager_update=True``/``"naive"``): this rank's start point of the current
#: inner phase, :math:`x_i` (shaped like the slow weight, or like the parameter when sharded;
#: differs per rank under the eager rule).
EAGER_START_KEY = "lookahead_eager_start"
#: Per-parameter int: bit f set while the result of fragment f's collective is parked in
#: ``lookahead_inflight`` (written by ``flush()``, cleared when the result is applied).
EAGER_INFLIGHT_KEY = "lookahead_eager_inflight"
