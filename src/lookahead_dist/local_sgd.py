"""Local-SGD mode (the implementation lives in :mod:`lookahead_dist.sync.local_sgd`).

This module keeps the documented import path ``lookahead_dist.local_sgd``.
"""

from .sync.local_sgd import OUTER_MOMENTUM_KEY, LocalSGD, LocalSGDOptions, make_local_sgd

__all__ = ["LocalSGDOptions", "LocalSGD", "OUTER_MOMENTUM_KEY", "make_local_sgd"]
