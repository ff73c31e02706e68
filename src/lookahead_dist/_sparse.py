"""Sparse outer gradients: top-k per block, values at 2/4/8 bits, and their exchange by all-gather.

Used by the local-SGD sync with ``LocalSGDOptions(topk_fraction=...)`` (and ``comm_dtype`` int2,
int4 or int8 for the value bits). Like :mod:`lookahead_dist._quant`, nothing here knows about
optimizers: the functions take flat fp32 tensors and a process group.

Format
------
A flat tensor ``x`` of ``n`` elements (fp32, plus the error-feedback residual if one is given) is
zero-padded to a multiple of the *scale block* ``G`` (:data:`DEFAULT_SCALE_BLOCK` = 2048, a multiple
of 1024) and cut into *index blocks* of :data:`INDEX_BLOCK` = 256 consecutive elements::

    k       = clamp(round(topk_fraction * 256), 1, 256)     the same k in every index block
    I_b     = the k positions of largest |x_i| in index block b (ties at the k-th place: any of
              the tied positions, chosen deterministically), sorted ascending
    scale_g = max |x_i| over the selected entries of scale block g  /  qmax      (fp32)
    q_i     = round_half_to_even(x_i / scale_g) in [-qmax, qmax]  for i in I_b  (the grid of _quant:
              qmax = 127 / 7 / 1 for 8 / 4 / 2 bits; int2 is ternary {-s, 0, +s})
    sent_i  = q_i * scale_g for i in I_b, 0 elsewhere

Per block the selection is "top-k per index block of 256" (not per tensor): the count is fixed, so
every rank's payload has the same size and an all-gather of equal segments carries it, and an
index fits one byte. The effective fraction is ``k / 256`` (0.02 -> 5/256 = 1.95 %).

The payload of one rank (``uint8``, :class:`SparseFormat` gives the offsets) is::

    [ scales: 4 * (P / G) bytes, fp32 ][ indices: (P / 256) * k bytes, one uint8 per selected entry,
      row-major by index block ][ value codes: (P / 256) * k * bits / 8 bytes, packed like
      _quant's codes (int8; int4 two per byte; int2 four per byte), in the order of the indices ]

with ``P`` the padded length. The values of scale block ``g`` are its ``G / 256 * k`` selected
entries, a multiple of 4, so the codes of a scale block are whole bytes.

Bits per parameter per sync (what one rank sends, :func:`bits_per_parameter`)::

    k * (8 + bits) / 256  +  32 / G
    topk_fraction = 0.02, int2, G = 2048:  5 * 10 / 256 + 32 / 2048 = 0.1953 + 0.0156 = 0.2109

(0.2500 at int4, 0.3281 at int8), plus the padding of the last scale block.

Non-finite values: a NaN or +-inf has the largest magnitude (``topk`` ranks NaN first), so it is
selected, its scale block gets scale NaN (as in :mod:`lookahead_dist._quant`) and the *whole*
decoded scale block is NaN on every rank: a caller's ``isfinite`` guard sees it.

Note [Sparse outer gradients]
-----------------------------
Sparse values cannot be summed by an all-reduce: two ranks select different positions, and an
all-reduce adds equal positions of dense buffers. The exchange is an **all-gather**: every rank
encodes its (progress + residual) into its payload on the caller's thread, the payloads of all
``N`` ranks are all-gathered (equal sizes by construction), and every rank decodes all ``N`` of
them and adds them in fp32 in rank order (0, 1, ..., N-1) into a dense buffer, then divides by
``N``. Every rank decodes the same bytes in the same order, so every rank obtains bit-identical
means and the replicas stay identical; the result is exactly "decompress each rank's contribution,
mean in fp32": no requantisation (unlike the quantised all-reduce), hence no owner residual.

Why not a sparse reduce (reduce-scatter of the sparse entries to chunk owners, then an all-gather
of the owner's sum)? The union of N ranks' positions is up to N times denser than one rank's, so
the owner's result is no longer ``k`` per block: it must be re-sparsified (losing more, with an
owner residual) or sent dense (bringing back the bytes we saved). The cost of the all-gather grows
with N, as an all-gather does: each rank receives ``(N - 1) * S`` bytes (ring), ``S`` the payload
above, against ``2 (N - 1) / N * 4 P`` for a dense fp32 all-reduce; at 2 ranks that is 0.21 bits
per parameter against 64, and the all-gather remains cheaper than the dense fp32 all-reduce up to
``N ~ 2 * 32 / 0.21 ~ 300`` ranks, cheaper than a dense int2 one (``2 * 2.06`` bits) up to about 20.
Decoding costs ``N`` scatters of ``k / 256`` of the buffer plus one dense pass.

**Sharded slow weights** (``sharded=True`` with ``eager_update``, where each chunk's owner keeps
the fp32 mean of its chunk and nothing goes back) take the reduce-scatter form
(:func:`sparse_reduce_scatter_async`): the buffer is cut into ``N`` equal segments, each rank
encodes every segment on its own (top-k rows and scale blocks start at the segment, so a segment
is encoded exactly as if it were a whole buffer), and one all-to-all sends segment ``s``'s payload
to rank ``s``, which decodes the ``N`` payloads of its segment and adds them in rank order. The
owner's sum stays in fp32 and is not re-sparsified: the density objection above is about sending
the union on, which the sharded mode does not do (its new slow chunks are all-gathered dense, as
in the other wires). Each rank now sends ``(N - 1) / N`` of its payload once instead of all of it
to every other rank: ``N`` times fewer bytes than the all-gather.

The reduce reuses the worker thread / caller-thread machinery of the quantised reduce
(:func:`lookahead_dist._quant.run_stages`): on gloo the all-gather and the decoding run on the
group's worker thread (the encoding and the residual update are done before the launch returns);
on NCCL every stage is enqueued from the caller's thread on a side stream (Note [Asynchronous
quantised all-reduce] in _quant.py).

Note [Top-k selection]
----------------------
``torch.topk`` over every 256-entry row was most of the sparse launch on a CPU (66 ms for 6.3M
entries at k = 5, one thread, against 35 ms for the selection below and 49 ms for the whole
encode now: ``python -m benchmarks.sync_cost --mode topk``): its CPU kernel partially sorts rows
for ``k <= 4`` but runs an ``nth_element`` over all 256 entries above that.
:func:`_select` narrows first: the row's 256 entries form 64 groups of 4 (group j holds entries
j, j + 64, j + 128, j + 192, so the group maxima are one vectorised ``amax`` over a middle
dimension), the k groups with the largest maxima are kept, and the top k of their 4k entries are
the row's top k. Exact: an entry outside the kept groups is at most its group's maximum, which is
at most each of the k kept maxima, so the kept groups hold k entries at least as large. NaN ranks
first at both levels (``amax`` propagates it). Only the choice among entries tied at the k-th
place can differ from one ``topk`` over the row.

Note [Sparse error feedback]
----------------------------
With a residual ``e`` the sender encodes ``y = x + e`` and keeps everything that was not sent:
``e <- y - sent`` where ``sent`` is the decoded own payload (zero at the unselected positions).
So an entry that is never selected accumulates in ``e`` until it is large enough to be, and the
quantisation error of the selected ones stays too: ``sum_t sent_t = sum_t x_t + e_0 - e_T``.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lookahead_dist import _comm, _quant
from lookahead_dist._buffers import POOL
from lookahead_dist._comm import CommStats

__all__ = [
    "DEFAULT_SCALE_BLOCK",
    "INDEX_BLOCK",
    "SparseFormat",
    "bits_per_parameter",
    "decode",
    "encode",
    "sparse_all_reduce",
    "sparse_all_reduce_async",
    "sparse_format",
    "sparse_nbytes",
    "sparse_reduce_scatter_async",
    "topk_per_block",
]

INDEX_BLOCK = 256
"""Elements per top-k selection: an index is one byte."""
_GROUP = 4  # entries per group of the two-level selection (Note [Top-k selection])
DEFAULT_SCALE_BLOCK = 2048
"""Elements per fp32 scale of the selected values: 32 / 2048 = 0.016 bits per parameter."""
_SCALE_BYTES = 4


def topk_per_block(fraction: float) -> int:
    """Entries kept per index block of 256: ``clamp(round(fraction * 256), 1, 256)``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"topk_fraction must be a float in (0, 1], got {fraction!r}")
    return min(INDEX_BLOCK, max(1, round(fraction * INDEX_BLOCK)))


@dataclass(frozen=True)
class SparseFormat:
    """Sizes and offsets of one rank's payload for ``numel`` elements (see the module docstring)."""

    numel: int
    k: int
    bits: int
    scale_block: int

    @property
    def padded(self) -> int:
        return -(-self.numel // self.scale_block) * self.scale_block

    @property
    def rows(self) -> int:  # index blocks
        return self.padded // INDEX_BLOCK

    @property
    def groups(self) -> int:  # scale blocks
        return self.padded // self.scale_block

    @property
    def per_group(self) -> int:  # selected entries per scale block
        return self.scale_block // INDEX_BLOCK * self.k

    @property
    def scale_bytes(self) -> int:
        return self.groups * _SCALE_BYTES

    @property
    def index_bytes(self) -> int:
        return self.rows * self.k

    @property
    def value_bytes(self) -> int:
        return self.rows * self.k * self.bits // 8

    @property
    def nbytes(self) -> int:
        return self.scale_bytes + self.index_bytes + self.value_bytes


def sparse_format(numel: int, *, fraction: float, bits: int, scale_block: int = DEFAULT_SCALE_BLOCK) -> SparseFormat:
    """The :class:`SparseFormat` of ``numel`` elements; validates the arguments."""
    k = topk_per_block(fraction)
    _quant._check(bits, 4)  # 8, 4 or 2
    if (isinstance(scale_block, bool) or not isinstance(scale_block, int) or scale_block < 1024
            or scale_block % 1024):
        raise ValueError(f"scale_block must be a positive multiple of 1024 elements, got {scale_block!r}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return SparseFormat(numel, k, bits, scale_block)


def sparse_nbytes(numel: int, *, fraction: float, bits: int, scale_block: int = DEFAULT_SCALE_BLOCK) -> int:
    """Bytes of one rank's payload: scales + indices + value codes (with the padding)."""
    return sparse_format(numel, fraction=fraction, bits=bits, scale_block=scale_block).nbytes


def bits_per_parameter(fraction: float, bits: int, scale_block: int = DEFAULT_SCALE_BLOCK) -> float:
    """Payload bits per parameter per sync, without padding: ``k (8 + bits) / 256 + 32 / G``."""
    f = sparse_format(0, fraction=fraction, bits=bits, scale_block=scale_block)
    return f.k * (8 + bits) / INDEX_BLOCK + 8 * _SCALE_BYTES / scale_block


# -- encode / decode ---------------------------------------------------------------------------
def _select(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (int64, ``(rows, k)``, ascending per row) of the k largest entries of each row of
    ``mag`` (``(rows, 256)`` magnitudes); see Note [Top-k selection]."""
    rows = mag.shape[0]
    width = INDEX_BLOCK // _GROUP
    # torch.topk's CPU kernel partially sorts when 64 k <= the row (k <= 4 here): fast already;
    # and with 4k candidates over half the row there is nothing to narrow
    if k * 64 <= INDEX_BLOCK or k * _GROUP * 2 > INDEX_BLOCK:
        return mag.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    groups = mag.view(rows, _GROUP, width).amax(dim=1)  # (rows, 64): group j = entries j + 64 m
    cols = groups.topk(k, dim=1, sorted=False).indices
    cand = (cols.unsqueeze(1) + width * torch.arange(_GROUP, device=mag.device).unsqueeze(1)).view(rows, -1)
    pick = mag.gather(1, cand).topk(k, dim=1, sorted=False).indices
    return cand.gather(1, pick).sort(dim=1).values


def encode(x: torch.Tensor, fmt: SparseFormat, residual: torch.Tensor | None = None) -> torch.Tensor:
    """One rank's payload (``uint8``, ``fmt.nbytes``) for the elements of ``x`` (+ ``residual``).

    With ``residual`` (fp32, ``x``'s numel, contiguous) it is updated in place to what was not
    sent (Note [Sparse error feedback]). ``x`` is not modified.
    """
    if not x.is_floating_point():
        raise TypeError(f"sparse encode expects a floating-point tensor, got dtype {x.dtype}")
    n = x.numel()
    if n != fmt.numel:
        raise ValueError(f"x has {n} elements, the format {fmt.numel}")
    if residual is not None:
        _quant._check_residual(residual, n, "residual")
    qmax = _quant._QMAX[fmt.bits]
    y = _quant._padded_fp32(x, fmt.padded, residual)  # a pooled buffer of ours (Note [Buffer reuse])
    rows = y.view(fmt.rows, INDEX_BLOCK)
    mag = torch.abs(rows, out=POOL.take(y.numel(), torch.float32, y.device).view_as(rows))
    idx = _select(mag, fmt.k)
    POOL.give(mag)
    vals = rows.gather(1, idx)  # (rows, k)
    q, scales = _quant._quantize_blocks(vals.view(fmt.groups, fmt.per_group), qmax)
    payload = torch.empty(fmt.nbytes, dtype=torch.uint8, device=x.device)
    a, b = fmt.scale_bytes, fmt.scale_bytes + fmt.index_bytes
    payload[:a] = scales.view(torch.uint8)
    payload[a:b] = idx.to(torch.uint8).view(-1)
    codes = _quant._pack(q, fmt.bits)
    payload[b:] = codes.view(torch.uint8)
    if residual is not None:
        sent = q.mul_(scales.unsqueeze(1)).view(fmt.rows, fmt.k)
        rows.scatter_(1, idx, vals.sub_(sent))  # y = (x + e) - sent
        residual.view(-1).copy_(y[:n])
    POOL.give(y, q, codes)
    return payload


def _accumulate(acc: torch.Tensor, poison: torch.Tensor, payload: torch.Tensor, fmt: SparseFormat) -> None:
    """``acc`` (fp32, ``fmt.padded``) += the decoded ``payload``; ``poison`` (per scale block) NaN
    where its scale is NaN."""
    a, b = fmt.scale_bytes, fmt.scale_bytes + fmt.index_bytes
    scales = payload[:a].clone().view(torch.float32)  # a copy: the slice may not be 4-byte aligned
    idx = payload[a:b].view(fmt.rows, fmt.k).long()
    vals = _quant._unpack(payload[b:], fmt.bits).view(fmt.groups, fmt.per_group).mul_(scales.unsqueeze(1))
    acc.view(fmt.rows, INDEX_BLOCK).scatter_add_(1, idx, vals.view(fmt.rows, fmt.k))
    POOL.give(vals)
    poison.add_(scales.mul_(0.0))  # 0, or NaN for a non-finite scale block


def _finish(acc: torch.Tensor, poison: torch.Tensor, fmt: SparseFormat) -> torch.Tensor:
    acc.view(fmt.groups, fmt.scale_block).add_(poison.unsqueeze(1))  # a NaN scale block: all NaN
    return acc[: fmt.numel]


def _decode_sum(payloads: torch.Tensor, fmt: SparseFormat, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(N, fmt.nbytes)`` payloads decoded and added in fp32 in rank order (the same sum on
    every rank and in a reference), divided by ``N`` with ``average``: ``(acc, values)``, ``acc``
    the pooled buffer behind ``values`` (``fmt.numel`` elements)."""
    acc = POOL.zeros(fmt.padded, torch.float32, payloads.device)
    poison = torch.zeros(fmt.groups, dtype=torch.float32, device=payloads.device)
    for r in range(payloads.shape[0]):
        _accumulate(acc, poison, payloads[r], fmt)
    if average:
        acc /= payloads.shape[0]
    return acc, _finish(acc, poison, fmt)


def decode(payload: torch.Tensor, fmt: SparseFormat) -> torch.Tensor:
    """The dense fp32 values (``fmt.numel``) of one payload: ``sent`` of the module docstring."""
    if payload.dtype != torch.uint8 or payload.numel() != fmt.nbytes:
        raise ValueError(f"payload must be {fmt.nbytes} uint8 bytes, got {payload.numel()} {payload.dtype}")
    acc = torch.zeros(fmt.padded, dtype=torch.float32, device=payload.device)
    poison = torch.zeros(fmt.groups, dtype=torch.float32, device=payload.device)
    _accumulate(acc, poison, payload.reshape(-1), fmt)
    return _finish(acc, poison, fmt)


# -- the exchange (Note [Sparse outer gradients]) -----------------------------------------------
def _exchange(payload: torch.Tensor, fmt: SparseFormat, n: int, group, average: bool, out: torch.Tensor | None,
              label: str) -> torch.Tensor:
    """All-gather the payloads, decode and add them in rank order in fp32 (bytes counted at launch)."""
    gathered = torch.empty(n, fmt.nbytes, dtype=torch.uint8, device=payload.device)
    _comm.all_gather(gathered.view(-1), payload, group, None, label)
    acc, vals = _decode_sum(gathered, fmt, average)
    if out is None:
        return vals
    out.copy_(vals)
    POOL.give(acc)
    return out


def _validate(flat: torch.Tensor, fraction: float, bits: int, scale_block: int, residual: torch.Tensor | None,
              out: torch.Tensor | None) -> SparseFormat:
    if flat.dim() != 1 or flat.dtype != torch.float32:
        raise ValueError(
            f"sparse_all_reduce expects a 1-D fp32 tensor, got shape {tuple(flat.shape)} and dtype {flat.dtype}; "
            "pass flat.reshape(-1).float()")
    fmt = sparse_format(flat.numel(), fraction=fraction, bits=bits, scale_block=scale_block)
    if residual is not None:
        _quant._check_residual(residual, flat.numel(), "residual")
    if out is not None and (out.dim() != 1 or out.dtype != torch.float32 or out.numel() != flat.numel()):
        raise ValueError(f"out must be a 1-D fp32 tensor of {flat.numel()} elements, got {tuple(out.shape)} {out.dtype}")
    return fmt


def _record(stats: CommStats | None, fmt: SparseFormat, n: int, label: str) -> None:
    if stats is not None:
        stats.record("all_gather", label, n * fmt.nbytes, n)


def sparse_all_reduce_async(flat: torch.Tensor, group: dist.ProcessGroup, *, fraction: float, bits: int,
                            scale_block: int = DEFAULT_SCALE_BLOCK, average: bool = True,
                            residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                            stats: CommStats | None = None, label: str = "sparse") -> _quant.QuantizedAllReduceWork:
    """Launch :func:`sparse_all_reduce` and return a handle (``wait()`` returns the result).

    ``flat`` is read (and ``residual`` updated) before this returns; ``out`` belongs to the
    background work until ``wait()`` returns. ``group`` must be a process group used only by these
    reduces (and the quantised ones): not the default group.
    """
    if _quant._is_default_group(group):
        raise ValueError(
            "sparse_all_reduce_async runs its collectives on a background thread and needs a process group "
            "that nothing else uses, got the default group; create one on every rank with "
            "torch.distributed.new_group(ranks) and pass it as `group`")
    fmt = _validate(flat, fraction, bits, scale_block, residual, out)
    if fmt.numel == 0:
        done: Future = Future()
        done.set_result((flat.new_empty(0) if out is None else out, None))
        return _quant.QuantizedAllReduceWork(done, flat.device)
    n = dist.get_world_size(group)
    payload = encode(flat, fmt, residual)
    _record(stats, fmt, n, label)
    return _quant.run_stages(group, flat.device, lambda: _exchange(payload, fmt, n, group, average, out, label),
                             (payload, out))


def sparse_all_reduce(flat: torch.Tensor, group: dist.ProcessGroup | None, *, fraction: float, bits: int,
                      scale_block: int = DEFAULT_SCALE_BLOCK, average: bool = True,
                      residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      stats: CommStats | None = None, label: str = "sparse") -> torch.Tensor:
    """Mean (or sum) over ``group`` of each rank's sparse-encoded ``flat``, added in fp32.

    The result is ``sum_r decode(encode(flat_r + residual_r)) / N``, identical on every rank
    (Note [Sparse outer gradients]).

    Args:
        flat: 1-D fp32 tensor, the same length on every rank; not modified (unless it is ``out``).
        group: the process group (``None``: the default group).
        fraction: ``topk_fraction`` in (0, 1]: ``k = round(fraction * 256)`` entries per 256 are sent.
        bits: bits per sent value, 8, 4 or 2.
        scale_block: elements per fp32 scale (a multiple of 1024; default 2048); the same on every rank.
        average: divide the sum by the group size (default); ``False`` returns the sum.
        residual: optional error-feedback residual (fp32, ``flat``'s length), updated in place.
        out: optional fp32 tensor of ``flat``'s length for the result (may be ``flat``).
        stats: if given, records the ``all_gather`` bytes (``N`` payloads) under ``label``.
        label: the ``record_function``/stats label.
    """
    fmt = _validate(flat, fraction, bits, scale_block, residual, out)
    if fmt.numel == 0:
        return flat.new_empty(0) if out is None else out
    worker = _quant._worker_for(group, create=False) if not _quant._is_default_group(group) else None
    if worker is not None:  # keep the order of collectives on the worker's group
        return sparse_all_reduce_async(flat, group, fraction=fraction, bits=bits, scale_block=scale_block,
                                       average=average, residual=residual, out=out, stats=stats,
                                       label=label).wait()
    n = dist.get_world_size(group)
    payload = encode(flat, fmt, residual)
    _record(stats, fmt, n, label)
    return _exchange(payload, fmt, n, group, average, out, label)


# -- the reduce-scatter form (sharded slow weights) ------------------------------------------------
def _encode_segments(flat: torch.Tensor, fmt: SparseFormat, n: int, residual: torch.Tensor | None) -> torch.Tensor:
    """``(n, fmt.nbytes)`` payloads: segment ``s`` (``fmt.numel`` elements of ``flat``, the last one
    zero-padded) encoded on its own, with its slice of ``residual`` updated."""
    c, total = fmt.numel, flat.numel()
    send = torch.empty(n, fmt.nbytes, dtype=torch.uint8, device=flat.device)
    for s in range(n):
        a, b = min(s * c, total), min((s + 1) * c, total)
        if b - a == c:
            send[s] = encode(flat[a:b], fmt, None if residual is None else residual[a:b])
            continue
        # the short last segment: padded copies (a pad entry is 0 and its residual stays 0)
        x = POOL.zeros(c, torch.float32, flat.device)
        x[: b - a] = flat[a:b]
        e = None
        if residual is not None:
            e = POOL.zeros(c, torch.float32, flat.device)
            e[: b - a] = residual[a:b]
        send[s] = encode(x, fmt, e)
        if e is not None:
            residual[a:b] = e[: b - a]
        POOL.give(x, e)
    return send


def _scatter(send: torch.Tensor, fmt: SparseFormat, group, average: bool, out: torch.Tensor,
             label: str) -> torch.Tensor:
    """All-to-all the segment payloads; decode the ``N`` of this rank's segment, add them in rank order."""
    recv = torch.empty_like(send)
    _comm.all_to_all(recv.view(-1), send.view(-1), group, None, label)
    acc, vals = _decode_sum(recv, fmt, average)
    out.copy_(vals)
    POOL.give(acc)
    return out


def sparse_reduce_scatter_async(flat: torch.Tensor, group: dist.ProcessGroup, out: torch.Tensor, *,
                                fraction: float, bits: int, scale_block: int = DEFAULT_SCALE_BLOCK,
                                average: bool = True, residual: torch.Tensor | None = None,
                                stats: CommStats | None = None, label: str = "sparse") -> _quant.QuantizedAllReduceWork:
    """Launch the sparse reduce-scatter (Note [Sparse outer gradients]) and return a handle.

    ``flat`` (1-D fp32, the same length on every rank) is cut into ``N`` segments of
    ``C = ceil(numel / N)`` elements (the last zero-padded); each is encoded on its own (with its
    slice of ``residual``, updated before this returns) and rank ``r`` receives into ``out`` (fp32,
    ``C`` elements) ``sum_i decode(encode(segment_r of flat_i + e_i))`` added in fp32 in rank order
    (divided by ``N`` with ``average``). One all-to-all moves ``N`` payloads of
    ``sparse_nbytes(C)`` per rank, recorded as ``all_to_all``. ``group`` must be a process group
    used only by these reduces (and the quantised ones), not the default group; the execution paths
    are those of :func:`sparse_all_reduce_async`.
    """
    _quant._refuse_default_group(group, "sparse_reduce_scatter_async")
    if flat.dim() != 1 or flat.dtype != torch.float32 or not flat.is_contiguous():
        raise ValueError(f"sparse_reduce_scatter_async expects a contiguous 1-D fp32 tensor, got shape "
                         f"{tuple(flat.shape)} and dtype {flat.dtype}")
    if residual is not None:
        _quant._check_residual(residual, flat.numel(), "residual")
    n = dist.get_world_size(group)
    c = -(-flat.numel() // n)
    fmt = sparse_format(c, fraction=fraction, bits=bits, scale_block=scale_block)
    if out.dim() != 1 or out.dtype != torch.float32 or out.numel() != c or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous 1-D fp32 tensor of {c} elements (this rank's segment of "
                         f"{flat.numel()} over {n} ranks), got {tuple(out.shape)} {out.dtype}")
    if c == 0:
        done: Future = Future()
        done.set_result((out, None))
        return _quant.QuantizedAllReduceWork(done, flat.device)
    send = _encode_segments(flat, fmt, n, None if residual is None else residual.view(-1))
    if stats is not None:
        stats.record("all_to_all", label, send.numel(), n)
    return _quant.run_stages(group, flat.device, lambda: _scatter(send, fmt, group, average, out, label),
                             (send, out))
