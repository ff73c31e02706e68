"""Blockwise absmax quantisation to int8 / int4 / int2 and a quantised all-reduce that sums in fp32.

Used by the local-SGD sync to send pseudo-gradients in 8, 4 or 2 bits. Nothing here knows about
optimizers: the functions take flat fp32 tensors and a process group.

Format
------
A flat tensor ``x`` of ``n`` elements (computed in fp32) is zero-padded to a multiple of the block
size ``B`` (default :data:`DEFAULT_BLOCK_SIZE` = 512, any positive even number; a multiple of 4
for int2) and cut into
``ceil(n / B)`` consecutive blocks. For each block::

    qmax  = 127 (bits=8), 7 (bits=4) or 1 (bits=2), i.e. 2**(bits-1) - 1
    scale = max(|x_i| over the block) / qmax        one fp32 per block
    q_i   = round_half_to_even(x_i / scale)         an integer in [-qmax, qmax]
    x_i  ~= q_i * scale                              (dequantised, fp32)

- **Symmetric grid**: 255 levels for int8 (-128 is never produced), 15 levels for int4, 3 levels
  for int2 (ternary: ``{-scale, 0, +scale}``, ``scale = absmax``; the fourth 2-bit code is never
  produced). Zero is exact, signs are symmetric, and the element with the largest magnitude is
  reproduced exactly up to fp32 rounding of ``scale``. For int2 an element rounds to zero when
  ``|x_i| < absmax / 2`` (ties to even: exactly ``absmax / 2`` also gives 0); with error feedback
  (Note [Error feedback]) what was rounded away is sent at a later sync.
- **Error bound**: ``|x_i - q_i * scale| <= scale / 2`` (plus fp32 rounding of the division),
  i.e. at most ``absmax / 254`` (int8), ``absmax / 14`` (int4) or ``absmax / 2`` (int2) of the
  block's largest magnitude.
- **Storage**: int8 codes are one ``torch.int8`` per element. int4 codes are stored offset-binary,
  ``u_i = q_i + 8`` in ``[1, 15]``, two per ``torch.uint8`` byte: element ``2j`` in the low nibble,
  element ``2j + 1`` in the high nibble (``byte_j = u_2j | u_2j+1 << 4``). int2 codes are
  offset-binary too, ``u_i = q_i + 2`` in ``[1, 3]``, four per byte, element ``4j + m`` in bits
  ``2m .. 2m+1`` (``byte_j = u_4j | u_4j+1 << 2 | u_4j+2 << 4 | u_4j+3 << 6``). Scales are fp32,
  one per block, in block order.
- **Padding**: the zero padding of the last block does not change its scale; :func:`dequantize`
  returns exactly ``n`` elements.
- **All-zero block**: scale 0, codes 0, dequantised as exact zeros.
- **Non-finite values**: a block containing NaN or +-inf gets scale NaN and codes 0, so the whole
  dequantised block is NaN. A NaN or inf therefore never disappears in the round trip (nor in
  :func:`quantized_all_reduce`: the summed block, its requantised scale and every rank's output
  block become NaN), and a caller's ``isfinite`` guard sees it. Blocks without non-finite values
  are unaffected.
- A block whose absmax is so small (below ``qmax`` times the smallest fp32 subnormal) that the
  scale underflows to 0 is sent as zeros.

Note [Scale overhead]
---------------------
Per block the payload is ``B * bits / 8`` code bytes plus a 4-byte fp32 scale, so the scale
overhead is ``32 / (bits * B)`` of the code bytes (:func:`scale_overhead`):

========  ========  ===========  ===========
block B   bits      code bytes   overhead
========  ========  ===========  ===========
512       8         512          0.78 %
512       4         256          1.56 %
512       2         128          3.13 %
256       4         128          3.13 %
========  ========  ===========  ===========

hence the default ``B = 512``: at int4 it keeps the scales under the 2 % budget with exact fp32
scales (a bf16 scale at ``B = 256`` would cost the same bytes but round the scale).

Note [Quantised all-reduce]
---------------------------
Quantised values cannot be added by an all-reduce, so :func:`quantized_all_reduce` runs a
reduce-scatter/all-gather pipeline by hand over a group of ``N`` ranks:

1. pad the flat buffer of ``P`` elements to ``N * C`` elements, ``C`` = :func:`reduce_chunk_numel`
   (a multiple of ``B``, so every chunk holds whole blocks and the blocks are those of the flat
   buffer), and quantise it; chunk ``r`` is ``C * bits / 8`` code bytes followed by ``C / B``
   scales, packed in one uint8 segment;
2. **all-to-all** the ``N`` segments: rank ``r`` receives every rank's chunk ``r``;
3. dequantise the ``N`` chunks and add them in fp32 in rank order (0, 1, ..., N-1), divide by
   ``N`` for the mean;
4. requantise the result (same block layout) and **all-gather** the quantised chunks;
5. dequantise all ``N`` chunks into the output, so every rank, the owner of chunk ``r``
   included, ends with bit-identical values.

Bytes: each collective moves ``N * S`` payload bytes, ``S = C * bits / 8 + 4 * C / B`` per
chunk; with the ring model of :mod:`lookahead_dist._comm` (factor ``(N-1)/N`` for both ops)
the two together put ``2 (N-1)/N * N * S`` bytes on the wire per rank -- an fp32 all-reduce of
the same buffer costs ``2 (N-1)/N * 4 P``, so the ratio is ``bits / 32`` times ``1 +``
:func:`scale_overhead`, plus the padding (fewer than ``N * B`` elements).
The bytes are recorded in the ``stats`` passed (ops ``all_to_all`` and ``all_gather``, under
``label``) when the reduce is launched.

Note [Error feedback]
---------------------
Quantising ``x`` alone every sync loses the rounding error each time, and the losses add up.
With a persistent residual ``e`` (zeros at first, same shape as ``x``) the sender quantises
``x + e`` and keeps what did not make it: ``q = Q(x + e)``, ``e <- (x + e) - deQ(q)``. Summed over
steps, ``sum deQ(q_t) = sum x_t + e_0 - e_T``: the sent values track the true values within one
quantisation step instead of drifting like a random walk. :func:`quantize_with_feedback` does this
for one tensor; :func:`quantized_all_reduce` takes ``residual=`` (the sender's, shaped like the
flat buffer, for stage 1) and ``owner_residual=`` (shape ``(C,)``, for the requantisation of the
chunk this rank owns in stage 4); with both, the running sum of the outputs tracks the running
sum of the true means. A residual that once absorbed a NaN stays NaN: zero it after a skipped
non-finite sync.

Note [Asynchronous quantised all-reduce]
----------------------------------------
:func:`quantized_all_reduce_async` quantises the input (and updates ``residual``) on the calling
thread before it returns, so the caller may overwrite the input immediately and checkpoint the
residual at any time. On a host-blocking backend (gloo) stages 2-5 (two collectives and the fp32
sum) run on a background thread, one per process group, which takes the launched reduces in order;
``wait()`` returns the result.
A thread, not launch-then-finish-in-``wait()``, because stage 4 must run between the two
collectives: with gloo only a thread lets both transfers overlap the caller's compute.

The group must be dedicated to these reduces (``torch.distributed.new_group(...)``, created on
every rank): collectives on one group must be issued in the same order on every rank, which the
single worker thread guarantees for its own group but not against the caller's thread. The
default group is refused. The blocking :func:`quantized_all_reduce` on a group that has a worker
goes through that worker, so the two can be mixed. The ``stats`` counters are updated at launch,
on the caller's thread.

Which of two paths runs is decided by :func:`lookahead_dist._backend.traits` of the group, not here:

- **host-blocking backends** (gloo; ``needs_worker_thread``): stages 2-5 run on the worker thread
  described above; ``wait(timeout)`` waits for its future.
- **stream-ordered backends** (NCCL and other device backends): no thread. Every stage is enqueued
  from the caller's thread, so the collectives on this group keep the caller's program order
  relative to every other communicator (FSDP2/HSDP, DDP, a user's all-reduce) on every rank; a
  worker issuing NCCL collectives concurrently with the main thread could interleave them
  differently on different ranks, which NCCL documents as a hang. Stages 2-5 run on a side stream
  (one per device) that first waits for the caller's stream; the tensors crossing streams are
  ``record_stream``-ed and an event is recorded after the last stage. Since nothing blocks the
  host, launching returns at once. ``is_completed()`` queries that event (it is honest: True
  only when the result is there), ``wait()`` makes the caller's current stream wait for it, and
  ``wait(timeout)`` first polls the event on the host until the deadline and raises
  ``TimeoutError`` then, before anything reads the result: a dead peer gives an error naming the
  sync instead of a host blocked in a read until NCCL's watchdog kills the process.

Forced onto gloo (``_backend.forced(STREAM_ORDERED)``, in the tests) the caller-thread path runs the
same arithmetic with blocking collectives, and equals the worker path bit for bit.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lookahead_dist import _backend, _comm
from lookahead_dist._buffers import POOL
from lookahead_dist._comm import CommStats

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "Quantized",
    "QuantizedAllReduceWork",
    "dequantize",
    "quantize",
    "quantize_with_feedback",
    "quantized_all_reduce",
    "quantized_all_reduce_async",
    "quantized_reduce_scatter_async",
    "quantized_nbytes",
    "reduce_chunk_numel",
    "run_stages",
    "scale_overhead",
]

DEFAULT_BLOCK_SIZE = 512
"""Elements per block: fp32 scales cost 0.78 % (int8) and 1.56 % (int4); see Note [Scale overhead]."""

_QMAX = {8: 127, 4: 7, 2: 1}
_SCALE_BYTES = 4  # fp32


def _check(bits: int, block_size: int) -> int:
    if bits not in _QMAX:
        raise ValueError(f"bits must be 8, 4 or 2, got {bits!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2 or block_size % 2:
        raise ValueError(
            f"block_size must be a positive even number of elements, got {block_size!r}; "
            f"the default is {DEFAULT_BLOCK_SIZE}"
        )
    if bits == 2 and block_size % 4:
        raise ValueError(f"block_size must be a multiple of 4 with bits=2 (four codes per byte), got {block_size}")
    return _QMAX[bits]


def scale_overhead(bits: int, block_size: int = DEFAULT_BLOCK_SIZE) -> float:
    """Scale bytes over code bytes, ``32 / (bits * block_size)``; see Note [Scale overhead]."""
    _check(bits, block_size)
    return _SCALE_BYTES / (block_size * bits / 8)


def quantized_nbytes(numel: int, *, bits: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes of :func:`quantize`'s output for ``numel`` elements: codes plus scales (with padding)."""
    _check(bits, block_size)
    blocks = -(-numel // block_size)
    return blocks * (block_size * bits // 8 + _SCALE_BYTES)


@dataclass(frozen=True)
class Quantized:
    """A blockwise-quantised flat tensor; the format is in the module docstring.

    Attributes:
        codes: ``torch.int8`` of ``blocks * block_size`` elements (bits=8), or ``torch.uint8`` of
            ``blocks * block_size * bits / 8`` packed bytes (bits=4: two per byte, bits=2: four).
        scales: fp32, one per block.
        numel: elements of the original tensor (the rest of the last block is padding).
        bits: 8, 4 or 2.
        block_size: elements per block.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    numel: int
    bits: int
    block_size: int

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


# -- the block kernels (2-D: one row per block) ------------------------------------------------
def _quantize_blocks(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` fp32 ``(blocks, B)`` -> integer codes as fp32 ``(blocks, B)`` (a pooled buffer: Note
    [Buffer reuse] in _buffers.py) and fp32 scales ``(blocks,)``."""
    buf = torch.abs(x, out=POOL.take(x.numel(), torch.float32, x.device).view_as(x))
    absmax = buf.amax(dim=1)  # NaN if the block holds a NaN, inf if it holds an inf
    finite = torch.isfinite(absmax)
    scale = absmax / qmax
    usable = finite & (scale > 0)
    # Divide (not multiply by a reciprocal): correctly rounded, so a reference can reproduce it.
    # Dividing by inf sends the blocks with scale 0 (and the finite values of a non-finite block)
    # to codes 0; only the NaN/inf elements of a non-finite block leave NaNs (NaN / inf, inf / inf),
    # cleared in place with no host read (about 9 % of the quantisation on a CPU).
    q = torch.div(x, torch.where(usable, scale, math.inf).unsqueeze(1), out=buf).round_().clamp_(-qmax, qmax)
    q.nan_to_num_(0.0)
    scale = torch.where(finite, scale, math.nan)  # the NaN that carries a non-finite block
    return q, scale


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer-valued fp32 codes -> int8 codes (bits=8) or offset-binary nibble pairs (bits=4) or
    offset-binary 2-bit quadruples (bits=2); the element count must be a multiple of ``8 / bits``."""
    codes = POOL.take(q.numel(), torch.int8, q.device)
    codes.copy_(q.reshape(-1))
    if bits == 8:
        return codes
    if bits == 4:
        u = codes.add_(8).view(torch.uint8).view(-1, 2)  # [1, 15]; the byte ops are 4x cheaper than fp32 ones
        packed = u[:, 0] | (u[:, 1] << 4)
    else:
        u = codes.add_(2).view(torch.uint8).view(-1, 4)  # [1, 3]
        packed = u[:, 0] | (u[:, 1] << 2) | (u[:, 2] << 4) | (u[:, 3] << 6)
    POOL.give(codes)
    return packed


def _unpack(codes: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`_pack` on the last dimension: fp32 integer values, ``8 / bits`` x longer
    (into ``out``, of as many elements, if given)."""
    if bits == 8:
        return _to_fp32(codes.view(torch.int8), out)
    codes = codes.view(torch.uint8)
    if bits == 4:
        nibbles = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)  # uint8, interleaved
        return _to_fp32(nibbles.view(torch.int8).sub_(8), out)
    pairs = torch.stack((codes & 3, (codes >> 2) & 3, (codes >> 4) & 3, codes >> 6), dim=-1).flatten(-2)
    return _to_fp32(pairs.view(torch.int8).sub_(2), out)


def _to_fp32(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 -> fp32 into ``out`` or a pooled buffer (``copy_`` into an existing buffer: half the
    time of ``.to``)."""
    if out is None:
        out = POOL.take(codes.numel(), torch.float32, codes.device)
    return out.view(codes.shape).copy_(codes)


def _padded_fp32(x: torch.Tensor, numel: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (+ ``residual``) as fp32, zero-padded to ``numel`` elements (a fresh tensor)."""
    n = x.numel()
    out = POOL.take(numel, torch.float32, x.device)
    if residual is not None and n == numel:
        return torch.add(x.reshape(-1), residual.view(-1), out=out)
    out[n:].zero_()
    out[:n] = x.reshape(-1)
    if residual is not None:
        out[:n] += residual.view(-1)
    return out


# -- single tensor ----------------------------------------------------------------------------
def quantize(x: torch.Tensor, *, bits: int, block_size: int = DEFAULT_BLOCK_SIZE) -> Quantized:
    """Blockwise absmax quantisation of the elements of ``x`` (any shape, floating; read as fp32).

    Args:
        x: the tensor; its elements are taken in ``reshape(-1)`` order.
        bits: 8 (int8 codes), 4 (two codes per byte) or 2 (four codes per byte).
        block_size: elements per scale, a positive even number (default 512; a multiple of 4 for bits=2).

    Returns:
        :class:`Quantized` with ``numel = x.numel()``. Round trip: ``dequantize(quantize(x))``.
    """
    qmax = _check(bits, block_size)
    _check_float(x)
    n = x.numel()
    blocks = -(-n // block_size)
    padded = n % block_size or x.dtype != torch.float32
    xf = _padded_fp32(x, blocks * block_size) if padded else x.reshape(-1)
    q, scales = _quantize_blocks(xf.view(blocks, block_size), qmax)
    codes = _pack(q, bits)
    POOL.give(q, xf if padded else None)  # never the caller's x (it may be a pooled dequantize output)
    return Quantized(codes, scales, n, bits, block_size)


def dequantize(q: Quantized, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 values of ``q``: a 1-D tensor of ``q.numel`` elements, written into ``out`` if given."""
    vals = _unpack(q.codes, q.bits).view(-1, q.block_size).mul_(q.scales.unsqueeze(1)).view(-1)[: q.numel]
    if out is None:
        return vals
    if out.numel() != q.numel:
        raise ValueError(f"out has {out.numel()} elements, the quantised tensor {q.numel}")
    out.view(-1).copy_(vals)
    return out


def quantize_with_feedback(x: torch.Tensor, residual: torch.Tensor, *, bits: int,
                           block_size: int = DEFAULT_BLOCK_SIZE) -> Quantized:
    """``q = Q(x + residual)``, then ``residual <- (x + residual) - deQ(q)`` in place.

    See Note [Error feedback]. ``residual`` is fp32, shaped like ``x``, zeros at the start, and
    kept by the caller between calls (e.g. in optimizer state, per fragment).
    """
    qmax = _check(bits, block_size)
    _check_float(x)
    _check_residual(residual, x.numel(), "residual")
    n = x.numel()
    blocks = -(-n // block_size)
    y = _padded_fp32(x, blocks * block_size, residual)
    q, scales = _quantize_blocks(y.view(blocks, block_size), qmax)
    codes = _pack(q, bits)
    sent = q.mul_(scales.unsqueeze(1)).view(-1)[:n]  # == dequantize of the result
    torch.sub(y[:n], sent, out=residual.view(-1))
    POOL.give(y, q)
    return Quantized(codes, scales, n, bits, block_size)


def _check_float(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor, got dtype {x.dtype}")


def _check_residual(residual: torch.Tensor, numel: int, name: str) -> None:
    if residual.dtype != torch.float32 or not residual.is_contiguous() or residual.numel() != numel:
        raise ValueError(
            f"{name} must be a contiguous fp32 tensor of {numel} elements, got dtype {residual.dtype}, "
            f"{residual.numel()} elements, contiguous={residual.is_contiguous()}; create it with "
            f"torch.zeros({numel}) and keep it between calls"
        )


# -- the quantised all-reduce -----------------------------------------------------------------
def reduce_chunk_numel(numel: int, group_size: int, *, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Elements per rank's chunk in :func:`quantized_all_reduce`: ``ceil(numel / (N B)) * B``.

    This is the shape of ``owner_residual``; ``group_size * chunk - numel`` is the zero padding.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return -(-numel // (group_size * block_size)) * block_size


@dataclass(frozen=True)
class _Plan:
    n: int  # ranks
    numel: int  # P
    chunk: int  # C elements per rank
    bits: int
    block_size: int
    code_bytes: int  # per chunk
    scale_bytes: int  # per chunk
    fused: bool = False  # stages 1 and 3-4 as compiled kernels (Note [Fused quantisation kernels])

    @property
    def seg_bytes(self) -> int:
        return self.code_bytes + self.scale_bytes


def _plan(numel: int, n: int, bits: int, block_size: int, fused: bool = False) -> _Plan:
    chunk = reduce_chunk_numel(numel, n, block_size=block_size)
    return _Plan(n, numel, chunk, bits, block_size, chunk * bits // 8, chunk // block_size * _SCALE_BYTES, fused)


def _to_segments(q: torch.Tensor, scales: torch.Tensor, rows: int, plan: _Plan) -> torch.Tensor:
    """Pack the fp32 codes and the scales of ``rows`` chunks into a ``(rows, seg_bytes)`` uint8 buffer."""
    codes = _pack(q, plan.bits)
    buf = _segments(codes, scales, rows, plan)
    POOL.give(codes)
    return buf


def _from_segments(buf: torch.Tensor, plan: _Plan, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, seg_bytes)`` uint8 -> fp32 ``(rows, chunk)`` dequantised values (into ``out``, a
    contiguous fp32 tensor of ``rows * chunk`` elements, if given; else a pooled buffer)."""
    rows = buf.shape[0]
    scales = buf[:, plan.code_bytes:].contiguous().view(torch.float32)  # (rows, chunk / B)
    vals = _unpack(buf[:, : plan.code_bytes], plan.bits, out).view(rows, -1, plan.block_size)
    return vals.mul_(scales.unsqueeze(2)).view(rows, plan.chunk)


def _segments(codes: torch.Tensor, scales: torch.Tensor, rows: int, plan: _Plan) -> torch.Tensor:
    """Packed codes and fp32 scales of ``rows`` chunks -> a ``(rows, seg_bytes)`` uint8 buffer."""
    buf = POOL.take(rows * plan.seg_bytes, torch.uint8, codes.device).view(rows, plan.seg_bytes)
    buf[:, : plan.code_bytes] = codes.view(torch.uint8).view(rows, plan.code_bytes)
    buf[:, plan.code_bytes:] = scales.view(torch.uint8).view(rows, plan.scale_bytes)
    return buf


def _code_view(buf: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """The codes of a ``(rows, seg_bytes)`` buffer as ``(rows, blocks per chunk, B * bits / 8)``
    (int8 for bits=8, packed uint8 otherwise): the input of the fused owner kernel."""
    codes = buf[:, : plan.code_bytes]
    if plan.bits == 8:
        codes = codes.view(torch.int8)
    return codes.view(buf.shape[0], plan.chunk // plan.block_size, plan.block_size * plan.bits // 8)


def _stage_send(flat: torch.Tensor, plan: _Plan, residual: torch.Tensor | None) -> torch.Tensor:
    """Stage 1: quantise the padded (flat + residual), update the residual; the all-to-all input."""
    if plan.fused and flat.numel() == plan.n * plan.chunk:  # no padding: the blocks are views of flat
        from . import _fused

        b = plan.block_size
        codes, scales = _fused.send(flat.view(-1, b), None if residual is None else residual.view(-1, b), plan.bits)
        return _segments(codes, scales, plan.n, plan)
    y = _padded_fp32(flat, plan.n * plan.chunk, residual)
    q, scales = _quantize_blocks(y.view(-1, plan.block_size), _QMAX[plan.bits])
    send = _to_segments(q, scales, plan.n, plan)
    if residual is not None:
        sent = q.mul_(scales.unsqueeze(1)).view(-1)[: plan.numel]  # q is packed: reuse its memory
        torch.sub(y[: plan.numel], sent, out=residual.view(-1))
    POOL.give(y, q)
    return send


def warm_fused(bits: int, n: int, block_size: int, with_residual: bool, device: torch.device | str) -> None:
    """Compile the fused kernels (Note [Fused quantisation kernels] in _fused.py) for a reduce over
    ``n`` ranks, on buffers laid out as the reduce lays them out (the kernels are then not compiled
    again: the block count is dynamic). No communication. The sync calls this at construction, so
    that its first reduce does not stall for the compilation while its peers wait, and a missing
    compiler is reported before training starts."""
    plan = _plan(n * 4 * block_size, n, bits, block_size, fused=True)  # 4 blocks per chunk: > 1, dynamic
    flat = torch.zeros(plan.numel, device=device)
    res = torch.zeros_like(flat) if with_residual else None
    send = _stage_send(flat, plan, res)
    owner = torch.zeros(plan.chunk, device=device) if with_residual else None
    POOL.give(_fused_owner(send, plan, owner, True))


def _fused_owner(recv: torch.Tensor, plan: _Plan, owner_residual: torch.Tensor | None, average: bool) -> torch.Tensor:
    """Stages 3-4 with the fused kernel on the received ``(N, seg_bytes)`` segments: this rank's
    requantised chunk as a ``(1, seg_bytes)`` segment."""
    from . import _fused

    res = None if owner_residual is None else owner_residual.view(-1, plan.block_size)
    scales = recv[:, plan.code_bytes:].contiguous().view(torch.float32)
    codes, scales = _fused.owner(_code_view(recv, plan), scales, res, plan.bits, average)
    return _segments(codes, scales, 1, plan)


def _stage_reduce(send: torch.Tensor, plan: _Plan, group, average: bool, owner_residual: torch.Tensor | None,
                  out: torch.Tensor | None, label: str) -> torch.Tensor:
    """Stages 2-5 of Note [Quantised all-reduce]. Bytes were counted at launch (stats=None here)."""
    recv = POOL.take(send.numel(), torch.uint8, send.device).view_as(send)
    _comm.all_to_all(recv.view(-1), send.view(-1), group, None, label)
    POOL.give(send)
    if plan.fused:
        mine = _fused_owner(recv, plan, owner_residual, average)
        POOL.give(recv)
        return _gather_result(mine, plan, group, out, label)
    parts = _from_segments(recv, plan)  # (N, C): every rank's chunk r (a pooled buffer of ours)
    POOL.give(recv)
    acc = _rank_order_sum(parts, average, parts[0])
    if owner_residual is not None:
        acc += owner_residual.view(-1)
    q, scales = _quantize_blocks(acc.view(-1, plan.block_size), _QMAX[plan.bits])
    mine = _to_segments(q, scales, 1, plan)
    if owner_residual is not None:
        torch.sub(acc, q.mul_(scales.unsqueeze(1)).view(-1), out=owner_residual.view(-1))
    POOL.give(q, parts)
    return _gather_result(mine, plan, group, out, label)


def _gather_result(mine: torch.Tensor, plan: _Plan, group, out: torch.Tensor | None, label: str) -> torch.Tensor:
    """Stage 5: all-gather the requantised chunks and dequantise them (into ``out``)."""
    gathered = POOL.take(plan.n * plan.seg_bytes, torch.uint8, mine.device).view(plan.n, plan.seg_bytes)
    _comm.all_gather(gathered.view(-1), mine.view(-1), group, None, label)
    POOL.give(mine)
    if out is not None and out.numel() == plan.n * plan.chunk and out.is_contiguous():  # no padding: in place
        _from_segments(gathered, plan, out)
        POOL.give(gathered)
        return out
    vals = _from_segments(gathered, plan).view(-1)[: plan.numel]
    POOL.give(gathered)
    if out is None:
        return vals
    out.copy_(vals)
    POOL.give(vals)
    return out


def _validate(flat, group, bits, block_size, residual, owner_residual, out, fused=False) -> _Plan:
    _check(bits, block_size)
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool, got {fused!r}")
    if flat.dim() != 1 or flat.dtype != torch.float32:
        raise ValueError(
            f"quantized_all_reduce expects a 1-D fp32 tensor, got shape {tuple(flat.shape)} and dtype "
            f"{flat.dtype}; pass flat.reshape(-1).float()"
        )
    n = dist.get_world_size(group)
    plan = _plan(flat.numel(), n, bits, block_size, fused)
    if residual is not None:
        _check_residual(residual, flat.numel(), "residual")
    if owner_residual is not None:
        _check_residual(owner_residual, plan.chunk, "owner_residual (reduce_chunk_numel(numel, N, block_size=B))")
    if out is not None and (out.dim() != 1 or out.dtype != torch.float32 or out.numel() != flat.numel()):
        raise ValueError(f"out must be a 1-D fp32 tensor of {flat.numel()} elements, got {tuple(out.shape)} {out.dtype}")
    return plan


def _record(stats: CommStats | None, plan: _Plan, label: str) -> None:
    if stats is not None:
        total = plan.n * plan.seg_bytes
        stats.record("all_to_all", label, total, plan.n)
        stats.record("all_gather", label, total, plan.n)


class QuantizedAllReduceWork:
    """Handle of a :func:`quantized_all_reduce_async`: ``wait()`` returns the reduced tensor.

    Built either around the worker thread's future (host-blocking backends) or around the result
    enqueued on the caller's thread and the event recorded after its last stage (stream-ordered
    backends); see Note [Asynchronous quantised all-reduce].
    """

    #: ``wait(seconds)`` enforces a host deadline itself (read by ``_backend.wait_within``)
    enforces_deadline = True

    def __init__(self, future: Future | None, device: torch.device, *, result: torch.Tensor | None = None,
                 done: Any = None) -> None:
        self._future = future
        self._device = device
        self._inline = None if future is not None else (result, done)
        self._result: torch.Tensor | None = None

    def _done_event(self) -> Any:
        if self._inline is not None:
            return self._inline[1]
        return self._future.result()[1]

    def is_completed(self) -> bool:
        """True once the result is there: the stages have run (and, on a device, their event has
        completed). Never blocks."""
        if self._future is not None and (not self._future.done() or self._future.exception() is not None):
            return self._future.done()  # a failed stage is complete: wait() raises it
        done = self._done_event()
        return done is None or bool(done.query())

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """Return the result (the same tensor on repeated calls), ordering the caller's current
        stream after the stages on a device.

        Re-raises an exception of the stages. ``timeout`` (seconds) is a host deadline: it raises
        ``TimeoutError`` if the stages have not finished by then (polling the device event, which
        never blocks); the work itself goes on and a later ``wait()`` may still return it.
        """
        if self._result is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            if self._future is not None:
                result, done_event = self._future.result(timeout)
            else:
                result, done_event = self._inline
            if done_event is not None:
                if deadline is not None:
                    _backend.poll_until(done_event.query, deadline)
                if isinstance(done_event, torch.cuda.Event):  # order the caller's stream after the stages
                    stream = torch.cuda.current_stream(self._device)
                    stream.wait_event(done_event)
                    result.record_stream(stream)
            self._result = result
        return self._result


class _GroupWorker:
    """One daemon thread per process group running launched reduces in launch order."""

    def __init__(self, group) -> None:
        self.group = group
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._thread = threading.Thread(target=self._run, name="lookahead_dist-quantized-reduce", daemon=True)
        self._thread.start()

    def submit(self, fn) -> Future:
        fut: Future = Future()
        self._queue.put((fn, fut))
        return fut

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self._streams:
            self._streams[idx] = torch.cuda.Stream(device=idx)
        return self._streams[idx]

    def _run(self) -> None:
        while True:
            fn, fut = self._queue.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to wait()
                fut.set_exception(exc)


_WORKERS: dict[int, _GroupWorker] = {}
_WORKERS_LOCK = threading.Lock()
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}  # caller-thread path: one side stream per device


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with _WORKERS_LOCK:
        if idx not in _SIDE_STREAMS:
            _SIDE_STREAMS[idx] = torch.cuda.Stream(device=idx)
        return _SIDE_STREAMS[idx]


def _worker_for(group, create: bool) -> _GroupWorker | None:
    with _WORKERS_LOCK:
        w = _WORKERS.get(id(group))
        if w is not None and w.group is not group:  # an id reused after the group was freed
            w = None
        if w is None and create:
            w = _WORKERS[id(group)] = _GroupWorker(group)
        return w


def _is_default_group(group) -> bool:
    return group is None or group is dist.GroupMember.WORLD


def _refuse_default_group(group, name: str) -> None:
    if _is_default_group(group):
        raise ValueError(
            f"{name} runs its collectives on a background thread and needs a process group that nothing else "
            "uses, got the default group; create one on every rank with torch.distributed.new_group(ranks) and "
            "pass it as `group`")


def quantized_all_reduce_async(flat: torch.Tensor, group: dist.ProcessGroup, *, bits: int,
                               block_size: int = DEFAULT_BLOCK_SIZE, average: bool = True,
                               residual: torch.Tensor | None = None,
                               owner_residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                               stats: CommStats | None = None,
                               label: str = "quantized", fused: bool = False) -> QuantizedAllReduceWork:
    """Launch :func:`quantized_all_reduce` and return a handle; see Note [Asynchronous quantised all-reduce].

    ``flat`` is read (and ``residual`` updated) before this returns; ``out`` and
    ``owner_residual`` belong to the background work until ``wait()`` returns. ``group`` must be a
    process group used only by these reduces (not the default group).
    """
    _refuse_default_group(group, "quantized_all_reduce_async")
    plan = _validate(flat, group, bits, block_size, residual, owner_residual, out, fused)
    if plan.numel == 0:  # the same on every rank: nothing to send
        done: Future = Future()
        done.set_result((flat.new_empty(0) if out is None else out, None))
        return QuantizedAllReduceWork(done, flat.device)  # (a finished future: no thread involved)
    send = _stage_send(flat, plan, residual)
    _record(stats, plan, label)
    device = flat.device
    if not _backend.traits(group, device).needs_worker_thread:
        return _launch_inline(send, plan, group, average, owner_residual, out, label, device)
    return run_stages(group, device, lambda: _stage_reduce(send, plan, group, average, owner_residual, out, label),
                      (send, out, owner_residual))


def quantized_reduce_scatter_async(flat: torch.Tensor, group: dist.ProcessGroup, out: torch.Tensor, *, bits: int,
                                   block_size: int = DEFAULT_BLOCK_SIZE, average: bool = True,
                                   residual: torch.Tensor | None = None, stats: CommStats | None = None,
                                   label: str = "quantized", fused: bool = False) -> QuantizedAllReduceWork:
    """Launch a quantised reduce-scatter: stages 1-3 of Note [Quantised all-reduce], no requantisation.

    Rank ``r`` of ``group`` receives into ``out`` (fp32, ``C = reduce_chunk_numel(flat.numel(), N,
    block_size=block_size)`` elements) chunk ``r`` of the zero-padded buffer, summed over the ranks
    in fp32 in rank order (divided by ``N`` with ``average``): ``sum_i deQ(Q(flat_i + e_i))`` on
    that chunk, exact in fp32 past the one quantisation each sender applies. Only the all-to-all
    moves bytes (``N * S`` per collective, recorded as ``all_to_all``); the result stays in fp32
    with its owner, so there is no owner residual. ``residual`` (the sender's error feedback,
    ``flat``'s length) is updated before this returns; ``fused`` runs the sender's quantisation as
    the compiled kernel. The group rules and the two execution paths are those of
    :func:`quantized_all_reduce_async`.
    """
    _refuse_default_group(group, "quantized_reduce_scatter_async")
    plan = _validate(flat, group, bits, block_size, residual, None, None, fused)
    if out.dim() != 1 or out.dtype != torch.float32 or out.numel() != plan.chunk or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous 1-D fp32 tensor of {plan.chunk} elements (this rank's chunk), "
                         f"got {tuple(out.shape)} {out.dtype}")
    device = flat.device
    if plan.numel == 0:
        done: Future = Future()
        done.set_result((out, None))
        return QuantizedAllReduceWork(done, device)
    send = _stage_send(flat, plan, residual)
    if stats is not None:
        stats.record("all_to_all", label, plan.n * plan.seg_bytes, plan.n)
    return run_stages(group, device, lambda: _stage_scatter(send, plan, group, average, out, label), (send, out))


def _stage_scatter(send: torch.Tensor, plan: _Plan, group, average: bool, out: torch.Tensor,
                   label: str) -> torch.Tensor:
    """Stages 2-3 of the quantised reduce-scatter: every rank's chunk r, dequantised and summed in
    fp32 in rank order (the same arithmetic as the all-reduce's owner), into ``out``."""
    recv = POOL.take(send.numel(), torch.uint8, send.device).view_as(send)
    _comm.all_to_all(recv.view(-1), send.view(-1), group, None, label)
    POOL.give(send)
    parts = _from_segments(recv, plan)  # (N, C)
    POOL.give(recv)
    _rank_order_sum(parts, average, out.copy_(parts[0]))
    POOL.give(parts)
    return out


def _rank_order_sum(parts: torch.Tensor, average: bool, acc: torch.Tensor) -> torch.Tensor:
    """``acc`` (holding ``parts[0]``) += ``parts[1..N-1]`` in rank order, then / N with ``average``:
    a fixed order, so every rank and a reference add the same way."""
    for s in range(1, parts.shape[0]):
        acc += parts[s]
    if average:
        acc /= parts.shape[0]
    return acc


def run_stages(group, device: torch.device, stages: Any,
               touched: tuple[torch.Tensor | None, ...]) -> QuantizedAllReduceWork:
    """Run ``stages()`` (the collectives and arithmetic after a send was packed on the caller's
    thread; it returns the result tensor) the way the backend of ``group`` needs, and return the
    handle: on the group's worker thread (host-blocking backends), or enqueued now from the
    caller's thread on a side stream (stream-ordered ones); see Note [Asynchronous quantised
    all-reduce]. ``touched``: the tensors the stages use (``record_stream``-ed on a device).
    Shared by the quantised reduce and the sparse one (:mod:`lookahead_dist._sparse`), so the
    two keep one order of collectives per group."""
    if not _backend.traits(group, device).needs_worker_thread:
        return _run_inline(stages, touched, device)
    worker = _worker_for(group, create=True)
    if device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))

        def job():
            side = worker.stream(device)
            side.wait_event(ready)
            return _stage_reduce_on(side, stages, touched, device)
    else:
        def job():
            return stages(), None
    return QuantizedAllReduceWork(worker.submit(job), device)


def _launch_inline(send: torch.Tensor, plan: _Plan, group, average: bool, owner_residual: torch.Tensor | None,
                   out: torch.Tensor | None, label: str, device: torch.device) -> QuantizedAllReduceWork:
    """Stages 2-5 of the quantised reduce enqueued from the caller's thread (:func:`_run_inline`)."""
    return _run_inline(lambda: _stage_reduce(send, plan, group, average, owner_residual, out, label),
                       (send, out, owner_residual), device)


def _run_inline(stages: Any, touched: tuple[torch.Tensor | None, ...],
                device: torch.device) -> QuantizedAllReduceWork:
    """The stages enqueued from the caller's thread (stream-ordered backends): on a side stream
    after the caller's, with an event after the last stage. Nothing here blocks the host on NCCL
    (its ``async_op=False`` collectives only order the current stream)."""
    if device.type != "cuda":  # a device without streams (or gloo forced here in tests): in order
        return QuantizedAllReduceWork(None, device, result=stages())
    side = _side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    result, done = _stage_reduce_on(side, stages, touched, device)
    return QuantizedAllReduceWork(None, device, result=result, done=done)


def _stage_reduce_on(side: Any, stages: Any, touched: tuple[torch.Tensor | None, ...],
                     device: torch.device) -> tuple[Any, Any]:
    """The stages on the CUDA stream ``side`` (already ordered after the caller's work); the tensors
    they touch are marked as used there, and an event recorded after the last stage is returned."""
    with torch.cuda.device(device), torch.cuda.stream(side):
        for t in touched:
            if t is not None:
                t.record_stream(side)
        result = stages()
        done = torch.cuda.Event()
        done.record(side)
    return result, done


def quantized_all_reduce(flat: torch.Tensor, group: dist.ProcessGroup | None, *, bits: int,
                         block_size: int = DEFAULT_BLOCK_SIZE, average: bool = True,
                         residual: torch.Tensor | None = None, owner_residual: torch.Tensor | None = None,
                         out: torch.Tensor | None = None, stats: CommStats | None = None,
                         label: str = "quantized", fused: bool = False) -> torch.Tensor:
    """Mean (or sum) of ``flat`` over ``group``, sent in ``bits``-bit blocks and added in fp32.

    The pipeline, the bytes and the result's rounding are in Note [Quantised all-reduce]: the
    result is ``deQ(Q(sum_r deQ(Q(flat_r)) / N))`` with the blocks of the flat buffer, identical
    on every rank.

    Args:
        flat: 1-D fp32 tensor, the same length on every rank; not modified (unless it is ``out``).
        group: the process group (``None``: the default group).
        bits: 8, 4 or 2.
        block_size: elements per scale (default 512); the same on every rank.
        average: divide the fp32 sum by the group size before requantising (default); ``False``
            returns the sum.
        residual: optional error-feedback residual of the sent values (fp32, ``flat``'s length),
            updated in place; see Note [Error feedback].
        owner_residual: optional error-feedback residual of the requantised chunk this rank owns
            (fp32, ``reduce_chunk_numel(flat.numel(), N, block_size=block_size)`` elements).
        out: optional fp32 tensor of ``flat``'s length for the result (may be ``flat``).
        stats: if given, records the ``all_to_all`` and ``all_gather`` bytes under ``label``.
        label: the ``record_function``/stats label.
        fused: run the quantisation of stage 1 and the owner's stages 3-4 as ``torch.compile``d
            kernels (Note [Fused quantisation kernels] in _fused.py: the same numbers, fewer passes;
            the first call compiles). Every rank may choose for itself.

    Returns:
        The reduced fp32 tensor (``out`` if given).
    """
    plan = _validate(flat, group, bits, block_size, residual, owner_residual, out, fused)
    if plan.numel == 0:  # the same on every rank: nothing to send
        return flat.new_empty(0) if out is None else out
    worker = _worker_for(group, create=False) if not _is_default_group(group) else None
    if worker is not None:  # keep the order of collectives on the worker's group
        return quantized_all_reduce_async(flat, group, bits=bits, block_size=block_size, average=average,
                                          residual=residual, owner_residual=owner_residual, out=out,
                                          stats=stats, label=label, fused=fused).wait()
    send = _stage_send(flat, plan, residual)
    _record(stats, plan, label)
    return _stage_reduce(send, plan, group, average, owner_residual, out, label)
