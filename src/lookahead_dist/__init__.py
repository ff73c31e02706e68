"""lookahead-dist: the Lookahead optimizer for sharded and local-SGD distributed training."""

from .lookahead import (
    ALPHA_KEY,
    K_KEY,
    MOMENTUM_KEY,
    PULLBACK_MODES,
    SLOW_KEY,
    STEP_KEY,
    Lookahead,
)
from ._checkpoint import strip_lookahead_state
from .sync import OUTER_MOMENTUM_KEY, InPlaceSync, LocalSGD, LocalSGDOptions, SyncStrategy

__all__ = [
    "Lookahead",
    "strip_lookahead_state",
    "LocalSGDOptions",
    "LocalSGD",
    "SyncStrategy",
    "InPlaceSync",
    "OUTER_MOMENTUM_KEY",
    "SLOW_KEY",
    "STEP_KEY",
    "MOMENTUM_KEY",
    "K_KEY",
    "ALPHA_KEY",
    "PULLBACK_MODES",
]

__version__ = "0.1.0"
