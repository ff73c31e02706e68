"""Communication for the local-SGD sync: flat buckets, shard layouts, counted and labelled collectives.

Nothing here knows about optimizers. The local-SGD mode (:mod:`lookahead_dist.local_sgd`) packs
tensors into flat buffers laid out by :class:`ShardLayout`, and moves them with the collective
wrappers below, which

- put a ``record_function`` label on every collective (``lookahead_dist/<op>/<label>``), so a
  profiler trace shows what the optimizer sent and when;
- count every call in a :class:`CommStats` (calls, payload bytes and a ring-model estimate of the
  bytes each rank puts on the wire), which tests and benchmarks read back.

Note [Payload and wire bytes]
-----------------------------
*Payload* is the size of the logical tensor a collective works on: the buffer for an all-reduce or
broadcast, the full (input) buffer for a reduce-scatter, the full (output) buffer for an all-gather.
*Wire* bytes estimate what one rank sends under the bandwidth-optimal ring algorithms over a group
of N ranks: all-reduce ``2 (N-1)/N * S``, reduce-scatter and all-gather ``(N-1)/N * S`` each,
broadcast ``S`` (the root's view), all-to-all (payload = the full input) ``(N-1)/N * S``. Hence a
reduce-scatter followed by an all-gather of the same buffer costs exactly one all-reduce on the
wire -- the claim the sharded mode rests on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function

from ._sync import nbytes

__all__ = [
    "CommStats",
    "ShardLayout",
    "chunk_sizes",
    "flat_view",
    "plan_buckets",
    "all_reduce",
    "reduce_scatter",
    "all_gather",
    "all_to_all",
    "broadcast",
    "all_gather_rows",
    "split_by_key",
]

Work = Any  # torch.distributed Work handle (its class is not public API)

# torch >= 2.13 renamed the *_tensor collectives; keep working on the older names.
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def wire_factor(op: str, group_size: int) -> float:
    """Bytes one rank sends per payload byte with the bandwidth-optimal (ring) algorithm on N ranks.

    all_reduce 2(N-1)/N; reduce_scatter (payload = full input) and all_gather (payload = gathered
    output) (N-1)/N; anything else (broadcast, send, reduce) 1, or 0 on a single rank.
    """
    n = max(group_size, 1)
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("reduce_scatter", "all_gather", "all_to_all"):
        return (n - 1) / n
    return 1.0 if n > 1 else 0.0


@dataclass
class CommStats:
    """Counts of the collectives issued, keyed by ``(op, label)``; see Note [Payload and wire bytes]."""

    calls: Counter = field(default_factory=Counter)
    payload_bytes: Counter = field(default_factory=Counter)
    wire_bytes: Counter = field(default_factory=Counter)
    # Host seconds the caller spent blocked waiting for its syncs' collectives (the exposed part
    # of the communication; on a stream-ordered backend without a timeout the wait is enqueued on
    # the stream and costs the host ~0), and how many waits.
    wait_seconds: float = 0.0
    waits: int = 0

    def record(self, op: str, label: str, nbytes: int, group_size: int) -> None:
        factor = wire_factor(op, group_size)
        key = (op, label)
        self.calls[key] += 1
        self.payload_bytes[key] += nbytes
        self.wire_bytes[key] += int(round(factor * nbytes))

    def total(self, kind: str = "payload", label: str | None = None, op: str | None = None) -> int:
        """Sum of ``payload`` or ``wire`` bytes, optionally for one label and/or one op."""
        table = {"payload": self.payload_bytes, "wire": self.wire_bytes, "calls": self.calls}[kind]
        return sum(v for (o, lab), v in table.items() if (label is None or lab == label) and (op is None or o == op))

    def record_wait(self, seconds: float) -> None:
        self.wait_seconds += seconds
        self.waits += 1

    def reset(self) -> None:
        self.calls.clear()
        self.payload_bytes.clear()
        self.wire_bytes.clear()
        self.wait_seconds, self.waits = 0.0, 0


def _size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, stats: CommStats | None, label: str,
               async_op: bool = True) -> Work | None:
    """Sum ``t`` in place over ``group``."""
    if stats is not None:
        stats.record("all_reduce", label, nbytes(t), _size(group))
    with record_function(f"lookahead_dist/all_reduce/{label}"):
        return dist.all_reduce(t, group=group, async_op=async_op)


def reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None,
                   stats: CommStats | None, label: str, async_op: bool = True) -> Work | None:
    """``out`` <- this rank's segment of the sum over ``group`` of ``inp`` (``inp.numel() == N * out.numel()``)."""
    if stats is not None:
        stats.record("reduce_scatter", label, nbytes(inp), _size(group))
    with record_function(f"lookahead_dist/reduce_scatter/{label}"):
        return _REDUCE_SCATTER(out, inp, group=group, async_op=async_op)


def all_gather(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None,
               stats: CommStats | None, label: str, async_op: bool = False) -> Work | None:
    """``out`` <- the concatenation over the ranks of ``group`` of their ``inp``."""
    if stats is not None:
        stats.record("all_gather", label, nbytes(out), _size(group))
    with record_function(f"lookahead_dist/all_gather/{label}"):
        return _ALL_GATHER(out, inp, group=group, async_op=async_op)


def all_to_all(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None,
               stats: CommStats | None, label: str, async_op: bool = False) -> Work | None:
    """Segment s of ``inp`` goes to rank s; ``out``'s segment s comes from rank s (N equal segments)."""
    if stats is not None:
        stats.record("all_to_all", label, nbytes(inp), _size(group))
    with record_function(f"lookahead_dist/all_to_all/{label}"):
        return dist.all_to_all_single(out, inp, group=group, async_op=async_op)


def broadcast(t: torch.Tensor, group: dist.ProcessGroup | None, stats: CommStats | None, label: str) -> None:
    """Overwrite ``t`` with the value on the group's first rank."""
    if stats is not None:
        stats.record("broadcast", label, nbytes(t), _size(group))
    src = dist.get_global_rank(group, 0) if group is not None else 0
    with record_function(f"lookahead_dist/broadcast/{label}"):
        dist.broadcast(t, src=src, group=group)


def all_gather_rows(row: torch.Tensor, group: dist.ProcessGroup | None, stats: CommStats | None,
                    label: str) -> torch.Tensor:
    """Stack a small 1-D tensor from every rank of ``group``: shape ``(N, len(row))``."""
    n = _size(group)
    out = torch.empty(n * row.numel(), dtype=row.dtype, device=row.device)
    all_gather(out, row.contiguous(), group, stats, label)
    return out.view(n, row.numel())


# -- layouts -----------------------------------------------------------------------------------
def flat_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``t``'s elements in memory order (no copy); ``t`` must be dense.

    Tensors cloned with ``preserve_format`` (the slow weights, the outer momenta) share the
    memory order of their parameter, so equal positions in the flat views are equal elements --
    also for channels-last parameters.
    """
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expected = 1
    for d in order:
        if t.size(d) != 1 and t.stride(d) != expected:
            raise ValueError(
                f"local SGD needs dense tensors (no gaps or overlaps in memory); got shape "
                f"{tuple(t.shape)} with strides {t.stride()}"
            )
        expected *= t.size(d)
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def chunk_sizes(numel: int, n: int) -> list[int]:
    """Sizes of ``torch.tensor_split(x, n)`` for a 1-D ``x`` of ``numel`` elements."""
    q, r = divmod(numel, n)
    return [q + 1 if i < r else q for i in range(n)]


class ShardLayout:
    """Flat-buffer layout of m tensors split into n chunks each (n = 1: plain concatenation).

    The buffer is n equal segments; segment r holds chunk r of every tensor, in order, then zero
    padding up to the segment length L (chunk 0 is the largest, so ``L = sum_i chunk_0(t_i)``;
    padding is below m elements per segment). A reduce-scatter of such a buffer hands rank r
    exactly the chunks it owns, and an all-gather of the segments rebuilds the buffer. Splitting
    every tensor (rather than the concatenation) makes a rank's chunk of a tensor depend only on
    that tensor's size, so the owned slow weights can be taken one tensor at a time.
    """

    def __init__(self, numels: Sequence[int], n: int) -> None:
        self.m = len(numels)
        self.n = n
        self.chunks = [chunk_sizes(x, n) for x in numels]  # [tensor][rank]
        self.segment = sum(c[0] for c in self.chunks)
        self.pads = [self.segment - sum(c[r] for c in self.chunks) for r in range(n)]
        self.numel = n * self.segment
        # Sizes for one Tensor.split of the whole buffer: per segment, the m chunks then the pad.
        self.split_sizes = [s for r in range(n) for s in ([c[r] for c in self.chunks] + [self.pads[r]])]
        self.segment_sizes = [c[0] for c in self.chunks]  # sizes inside segment 0 (no pad)

    def chunk_views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Views ``[chunk r of tensor i for r in range(n) for i in range(m)]`` into the full buffer."""
        parts = buf.split(self.split_sizes)
        return [parts[r * (self.m + 1) + i] for r in range(self.n) for i in range(self.m)]

    def pad_views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        parts = buf.split(self.split_sizes)
        return [parts[r * (self.m + 1) + self.m] for r in range(self.n) if self.pads[r]]

    def own_views(self, seg: torch.Tensor, r: int) -> list[torch.Tensor]:
        """Views of rank r's m chunks in a buffer holding only segment r (length L)."""
        sizes = [c[r] for c in self.chunks] + [self.pads[r]]
        return list(seg.split(sizes)[: self.m])


def plan_buckets(keys: Sequence[Any], nbytes: Sequence[int], cap_bytes: int) -> list[list[int]]:
    """Group indices by key, in order, closing a bucket when it would exceed ``cap_bytes``.

    A tensor larger than the cap gets a bucket of its own. Every rank computes the same plan
    from the same parameter list, so collectives line up.
    """
    open_: dict[Any, tuple[list[int], int]] = {}
    done: list[list[int]] = []
    for i, (key, nb) in enumerate(zip(keys, nbytes)):
        idx, size = open_.get(key, ([], 0))
        if idx and size + nb > cap_bytes:
            done.append(idx)
            idx, size = [], 0
        idx.append(i)
        open_[key] = (idx, size + nb)
    done.extend(idx for idx, _ in open_.values() if idx)
    # Buckets are issued in order of their first tensor, the same on every rank.
    return sorted(done, key=lambda b: b[0])


def split_by_key(tensors: Iterable[torch.Tensor], key) -> dict[Any, list[torch.Tensor]]:
    out: dict[Any, list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault(key(t), []).append(t)
    return out
