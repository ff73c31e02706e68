"""Fused kernels for the quantised all-reduce (opt-in: ``LocalSGDOptions(fused_kernels=True)``).

Note [Fused quantisation kernels]
---------------------------------
In eager PyTorch every op of :mod:`lookahead_dist._quant` is one pass over the fragment: the
sender's quantise-with-feedback alone is about ten (the residual added, ``abs``, the block max,
the division, rounding, clamping, the NaN clean-up, the cast, the dequantised send, the new
residual), and the owner's stage and the final dequantisation add as many on their share.
``python -m benchmarks.sync_cost --mode floor`` measured the whole int8 sync at 6-8x its
memory-traffic floor on a CPU, most of it these passes.

Here the same arithmetic is written once per stage as a function of whole blocks (a ``(rows, B)``
view, one block per row) and compiled with ``torch.compile`` (C++/OpenMP on a CPU, Triton on a
GPU), so that each stage reads its inputs and writes its outputs about once:

- :func:`send` -- stage 1: ``y = x + e``, the block scales, the codes (packed), ``e <- y - deQ``;
- :func:`owner` -- stages 3-4: dequantise the ``N`` received chunks, add them in rank order,
  divide by ``N``, add the owner residual, requantise and pack, update the owner residual.

Stage 5 (the gathered codes times their scales) stays eager: written the same way and compiled,
it ran slower than the eager ``_from_segments`` in our trials (the unpacking of packed codes
does not vectorise well in inductor's C++). What the two kernels save:
``python -m benchmarks.sync_cost --mode quant --numel 6291456 --blocks 512 --compiled`` (the
sender's stage alone) and ``--mode floor`` (the whole sync, ``-fused`` rows); the figures are in
docs/benchmarks.md.

**Same numbers as the eager path.** Every element goes through the same fp32 operations in the
same order (a true division by the scale, round half to even, the clamp; the sum over ranks
left to right; ``acc / N``; the residual as ``y - q * scale``), and non-finite blocks give scale
NaN and codes 0 as in :mod:`lookahead_dist._quant`'s format. The one difference is the sign of a
zero: a block whose scale is 0 (all zeros, or an underflow) is sent as codes ``+0`` computed
without the eager path's division by ``inf`` (which gives ``-0`` for a negative element), so where
an element is ``-0.0`` its residual may hold ``-0.0`` where the eager path holds ``0.0``. Nothing
it sends or sums differs. ``tests/unit/test_fused.py`` checks codes, scales,
residuals and the reduce against the eager stages bit for bit (``torch.equal``). That is on a CPU
(inductor's C++ kernels divide and round as ATen does); on a GPU the Triton kernels' division
has not been compared yet: ``python -m benchmarks.gpu_check --device cuda`` reports whether the
fused run equals the eager one there (case ``fused/flat/int4/F4tau1``).

**Cost.** Each kernel compiles once per process and configuration (bits, ranks, residual or
not): a few seconds on a small CPU, shortened in later processes by inductor's on-disk cache. The
block count is marked dynamic, so every fragment size reuses the kernel. The sync compiles both
kernels when it is built (:func:`lookahead_dist._quant.warm_fused`), not inside its first reduce,
where a rank would stall while its peers wait. Both run without grad and read no Python builtins,
so the caller's thread and the reduce's worker thread share one compiled kernel (dynamo guards on
the grad mode and on the builtins a function reads). A CPU build needs a C++ compiler (inductor's
requirement). Hence opt-in.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch

__all__ = ["owner", "send"]

_QMAX = {8: 127, 4: 7, 2: 1}
_OFFSET = {4: 8.0, 2: 2.0}  # offset-binary codes (_quant's storage); no builtins in the kernels: see _owner_fn


# -- the arithmetic, on (rows, B) views: one block per row ---------------------------------------
def _quantize_rows(y: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer-valued fp32 codes and the fp32 scale column (NaN for a non-finite block)."""
    absmax = y.abs().amax(dim=-1, keepdim=True)
    finite = torch.isfinite(absmax)
    scale = absmax / qmax
    usable = finite & (scale > 0)
    q = torch.where(usable, y / torch.where(usable, scale, 1.0), 0.0).round().clamp(-qmax, qmax)
    return q, torch.where(finite, scale, math.nan)


def _pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The storage of _quant's format along the last dimension: int8, or offset-binary nibbles/pairs."""
    if bits == 8:
        return q.to(torch.int8)
    u = (q + (_QMAX[bits] + 1)).to(torch.uint8)
    if bits == 4:
        u = u.unflatten(-1, (-1, 2))
        return u[..., 0] | (u[..., 1] << 4)
    u = u.unflatten(-1, (-1, 4))
    return u[..., 0] | (u[..., 1] << 2) | (u[..., 2] << 4) | (u[..., 3] << 6)


def _unpack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_rows`: fp32 integer values, ``8 / bits`` times longer."""
    if bits == 8:
        return codes.to(torch.float32)  # int8 codes (the caller views the bytes as int8)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    u = (codes.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return u.flatten(-2).to(torch.float32) - _OFFSET[bits]


def _send_fn(bits: int, with_residual: bool) -> Callable:
    qmax = _QMAX[bits]

    def fn(x: torch.Tensor, res: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        y = x + res if with_residual else x
        q, scale = _quantize_rows(y, qmax)
        if with_residual:
            res.copy_(y - q * scale)
        return _pack_rows(q, bits), scale.squeeze(-1)
    return fn


def _owner_fn(bits: int, n: int, average: bool, with_residual: bool) -> Callable:
    qmax = _QMAX[bits]
    # Not range() inside fn: dynamo guards on the builtins it reads, and the reduce's worker thread
    # sees another builtins dict than the thread that compiled the kernel (a second compilation).
    others = tuple(range(1, n))

    def fn(codes: torch.Tensor, scales: torch.Tensor, res: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        acc = _unpack_rows(codes[0], bits) * scales[0].unsqueeze(-1)
        for s in others:  # fixed rank order, as the eager stage
            acc = acc + _unpack_rows(codes[s], bits) * scales[s].unsqueeze(-1)
        if average:
            acc = acc / n
        if with_residual:
            acc = acc + res
        q, scale = _quantize_rows(acc, qmax)
        if with_residual:
            res.copy_(acc - q * scale)
        return _pack_rows(q, bits), scale.squeeze(-1)
    return fn


# -- compiled once per process and configuration --------------------------------------------------
_COMPILED: dict[tuple, Callable] = {}
_LOCK = threading.Lock()


def _compiled(key: tuple, make: Callable[[], Callable]) -> Callable:
    with _LOCK:
        fn = _COMPILED.get(key)
        if fn is None:
            fn = _COMPILED[key] = torch.compile(make(), fullgraph=True)
        return fn


def _dynamic(*pairs: tuple[torch.Tensor | None, int]) -> None:
    """Mark the block-count dimension dynamic: one kernel for every fragment size."""
    for t, dim in pairs:
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, dim)


def _run(kernel: Callable, what: str, *args):
    try:
        # One grad mode on every thread (the caller's step runs without grad, the reduce's worker
        # thread with): dynamo guards on it and would compile each kernel twice.
        with torch.no_grad():
            return kernel(*args)
    except Exception as exc:
        raise RuntimeError(
            f"LocalSGDOptions(fused_kernels=True): torch.compile could not build or run the fused {what} "
            f"kernel ({type(exc).__name__}: {exc}). A CPU build needs a C++ compiler on PATH (inductor's "
            "requirement); set fused_kernels=False to use the eager kernels") from exc


def send(x: torch.Tensor, residual: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 on ``x`` ``(rows, B)`` fp32 (+ ``residual``, same shape, updated in place):
    packed codes ``(rows, B * bits / 8)`` uint8 and scales ``(rows,)``."""
    kernel = _compiled(("send", bits, residual is not None), lambda: _send_fn(bits, residual is not None))
    _dynamic((x, 0), (residual, 0))
    return _run(kernel, "send", x, residual)


def owner(codes: torch.Tensor, scales: torch.Tensor, residual: torch.Tensor | None, bits: int,
          average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages 3-4 on the ``N`` received chunks, ``codes`` ``(N, rows, B * bits / 8)`` uint8 and
    ``scales`` ``(N, rows)``; ``residual`` ``(rows, B)`` updated in place. Returns the packed
    codes and scales of this rank's requantised chunk."""
    n = codes.shape[0]
    kernel = _compiled(("owner", bits, n, average, residual is not None),
                       lambda: _owner_fn(bits, n, average, residual is not None))
    _dynamic((codes, 1), (scales, 1), (residual, 0))
    return _run(kernel, "owner", codes, scales, residual)

