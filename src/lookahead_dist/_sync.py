"""The hot path: Lookahead's slow update over tensor lists, bucketed by device and dtype.

Everything here works on plain local tensors (a DTensor contributes its local shard, a ZeRO
partition is already a plain tensor), so the same code serves every host. The Python loops in
this module run when a bucket list is *built* (once per parameter set), never on a sync.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Bucket", "build_buckets", "local_tensor", "nbytes", "slow_update_", "copy_", "first_nonfinite"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank owns: a DTensor's local shard, otherwise the tensor itself.

    In-place ops on the returned tensor change ``t``: a DTensor's ``_local_tensor`` is its storage.
    """
    # Duck-typed so that torch.distributed.tensor is imported only when DTensors exist.
    local = getattr(t, "_local_tensor", None)
    return t if local is None else local


def nbytes(x: Any) -> int:
    """Bytes this rank holds for ``x``: a tensor (a DTensor's local shard), or the sum over a list or
    tuple of them; 0 for anything else."""
    if isinstance(x, torch.Tensor):
        t = local_tensor(x)
        return t.numel() * t.element_size()
    if isinstance(x, (list, tuple)):
        return sum(nbytes(v) for v in x)
    return 0


@dataclass
class Bucket:
    """Tensors that one foreach kernel can serve: same device, same fast dtype, same slow dtype."""

    fast: list[torch.Tensor] = field(default_factory=list)
    slow: list[torch.Tensor] = field(default_factory=list)

    @property
    def mixed(self) -> bool:
        return bool(self.fast) and self.fast[0].dtype != self.slow[0].dtype



def build_buckets(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[Bucket]:
    """Group ``(fast, slow)`` pairs by ``(device, fast dtype, slow dtype)``; local shards only."""
    buckets: dict[tuple[torch.device, torch.dtype, torch.dtype], Bucket] = {}
    for fast, slow in pairs:
        fast, slow = local_tensor(fast), local_tensor(slow)
        key = (fast.device, fast.dtype, slow.dtype)
        bucket = buckets.setdefault(key, Bucket())
        bucket.fast.append(fast)
        bucket.slow.append(slow)
    return list(buckets.values())


def slow_update_(buckets: Sequence[Bucket], alpha: float) -> None:
    """``slow <- slow + alpha * (fast - slow)`` then ``fast <- slow``, in place, per bucket.

    With equal dtypes this is one ``_foreach_lerp_`` and one ``_foreach_copy_`` per bucket, the
    memory-bound floor of the update. With fp32 slow weights for bf16/fp16 params the fast
    weights are first upcast (one temporary per tensor, freed at once) so that the interpolation
    runs in fp32.
    """
    for b in buckets:
        if not b.slow:
            continue
        if b.mixed:
            upcast = [f.to(s.dtype) for f, s in zip(b.fast, b.slow)]
            torch._foreach_lerp_(b.slow, upcast, alpha)
            del upcast
        else:
            torch._foreach_lerp_(b.slow, b.fast, alpha)
        torch._foreach_copy_(b.fast, b.slow)


def copy_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """``dst[i] <- src[i]`` for tensor lists (dtypes may differ), in one foreach call."""
    if dst:
        torch._foreach_copy_(list(dst), list(src))


def first_nonfinite(tensors: Sequence[torch.Tensor]) -> int | None:
    """Index of the first tensor holding NaN or inf, or None: one foreach max-norm and one host sync.

    The max-norm (``ord=inf``) of finite values never overflows, so only real NaN/inf are found.
    """
    index = [i for i, t in enumerate(tensors) if t.numel()]  # the max-norm of nothing is undefined
    if not index:
        return None
    norms = torch.stack(torch._foreach_norm([tensors[i] for i in index], ord=float("inf")))
    bad = ~torch.isfinite(norms)
    if not bool(bad.any()):
        return None
    return index[int(bad.nonzero()[0, 0])]
