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

__all__ = ["Bucket", "build_buckets", "local_tensor", "nbytes", "slow_update_", "copy_", "first_nonfinite",
           "first_nonfinite_of", "finite_scale"]


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
    #: :func:`first_nonfinite`'s plan for ``fast`` (its groups and flat views), built at the first sync
    probe: dict[str, Any] = field(default_factory=dict, repr=False)

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


# -- the non-finite guard -----------------------------------------------------------------------
# Note [A fast non-finite probe]
# ------------------------------
# The guard asks "does any of these tensors hold NaN or inf?" once per sync, so it must cost a
# fraction of the update it guards (``_foreach_lerp_`` + ``_foreach_copy_``). A *probe* answers it
# on the device, with one reduction per tensor (or per group of small tensors) whose result is
# non-finite iff the group holds NaN/inf:
#
# - accelerators: ``torch._foreach_norm(ord=inf)``, one fused multi-tensor kernel, exact (the
#   largest magnitude of finite values is finite);
# - CPU, where that max-norm is a slow, unvectorised loop (8x a lerp over the same tensors): the
#   fp32 sum, a vectorised single read. NaN/inf propagate through a sum; a finite sum can only
#   overflow for values near 3e38 / numel, so a hit is confirmed exactly (``isfinite``) before it
#   is reported. Tensors under ``_SMALL`` elements are concatenated (up to ``_GROUP`` elements at a
#   time) and summed together, which avoids a Python-level call per tiny tensor.
#
# The common case is one host read for the whole list (the decision, Note [Host syncs] in
# lookahead.py); :func:`finite_scale` gives the decision as a device scalar (1 or NaN) for the
# sharded launch, with no host read at all (there a CPU sum that overflows counts as non-finite).
_SMALL = 1 << 15
_GROUP = 1 << 20


def _probe_groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of the non-empty tensors, grouped as the probe reduces them (one list per reduction)."""
    if tensors and tensors[0].device.type != "cpu":
        return [[i] for i, t in enumerate(tensors) if t.numel()]
    groups: list[list[int]] = []
    small: list[int] = []
    size = 0
    for i, t in enumerate(tensors):
        n = t.numel()
        if n >= _SMALL:
            groups.append([i])
        elif n:
            if size + n > _GROUP and small:
                groups.append(small)
                small, size = [], 0
            small.append(i)
            size += n
    if small:
        groups.append(small)
    return groups


def _probe_plan(tensors: Sequence[torch.Tensor], cache: dict[str, Any] | None) -> tuple[list[list[int]], list[Any]]:
    """The groups and, per group, what is reduced: a tensor, or the flat views to concatenate.
    Kept in ``cache`` (a bucket's) while it describes the same tensors."""
    if cache is not None and cache.get("n") == len(tensors) and tensors and cache.get("first") is tensors[0] \
            and cache.get("last") is tensors[-1]:
        return cache["groups"], cache["inputs"]
    groups = _probe_groups(tensors)
    inputs = [tensors[g[0]] if len(g) == 1 else [tensors[i].reshape(-1) for i in g] for g in groups]
    if cache is not None and tensors:
        cache.update(n=len(tensors), first=tensors[0], last=tensors[-1], groups=groups, inputs=inputs)
    return groups, inputs


def _sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dtype=torch.float32) if t.dtype != torch.float64 else t.sum()


def _probe(inputs: list[Any]) -> torch.Tensor:
    """1-D device tensor, one value per group: non-finite iff the group holds NaN/inf (CPU: or its
    fp32 sum overflows). No host read."""
    first = inputs[0] if isinstance(inputs[0], torch.Tensor) else inputs[0][0]
    if first.device.type != "cpu":
        norms = torch._foreach_norm(inputs, ord=float("inf"))
        return torch.stack([n.float() for n in norms]) if norms[0].dtype != torch.float32 else torch.stack(norms)
    out = [_sum(x) if isinstance(x, torch.Tensor) else _sum(torch.cat(x)) for x in inputs]
    return torch.stack(out).float()


def _exact_first(tensors: Sequence[torch.Tensor], candidates: Iterable[int]) -> int | None:
    """The first of ``candidates`` that really holds NaN/inf (a probe hit can be an overflowed sum)."""
    for i in candidates:
        if not bool(torch.isfinite(tensors[i]).all()):
            return i
    return None


def first_nonfinite(tensors: Sequence[torch.Tensor], cache: dict[str, Any] | None = None) -> int | None:
    """Index of the first tensor holding NaN or inf, or None: one probe and one host read
    (Note [A fast non-finite probe]); a hit costs a few more reads to locate it exactly.
    ``cache``: a dict kept with the list (``Bucket.probe``) to skip re-planning at every sync."""
    hit = first_nonfinite_of([tensors], [cache])
    return None if hit is None else hit[1]


def first_nonfinite_of(lists: Sequence[Sequence[torch.Tensor]],
                       caches: Sequence[dict[str, Any] | None] | None = None) -> tuple[int, int] | None:
    """``(list index, tensor index)`` of the first tensor with NaN/inf over several tensor lists
    (the buckets of one fragment), or None, deciding all of them with one host read."""
    parts, where = [], []
    for j, ts in enumerate(lists):
        groups, inputs = _probe_plan(ts, caches[j] if caches is not None else None)
        if groups:
            parts.append(_probe(inputs))
            where += [(j, g) for g in groups]
    if not parts:
        return None
    values = parts[0] if len(parts) == 1 else torch.cat([p.to(parts[0].device) for p in parts])
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):  # the one host read of the common case
        return None
    for k in bad.nonzero().flatten().tolist():
        j, g = where[k]
        i = _exact_first(lists[j], g)
        if i is not None:
            return j, i
    return None


def finite_scale(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A 0-d fp32 device tensor: 1.0 if every tensor is finite, else NaN; no host read. Multiplying
    a buffer by it poisons the whole buffer exactly when a tensor holds NaN/inf (``x * 1 == x`` for
    every x, signed zeros included). None for an empty list."""
    groups, inputs = _probe_plan(tensors, None)
    if not groups:
        return None
    return _probe(inputs).mul(0.0).sum().add(1.0)
