"""Reusable host buffers for the temporaries of a sync (Note [Buffer reuse]).

Note [Buffer reuse]
-------------------
A local-SGD sync needs flat temporaries as large as the fragment it sends: the packed progress,
the fp32 stage of a quantised reduce, its residual staging, the quantised segments, the received
chunks. Allocated afresh at every sync on a CPU, each one is a new ``mmap`` from glibc (buffers
above its dynamic threshold, 32 MiB at most, or heap memory trimmed back to the kernel once freed),
so the first write to every 4 KiB page faults. On this project's 2-core host that was a large
part of a quantised sync's CPU time: ``python -m benchmarks.sync_cost --mode floor --rounds 3
--cycles 8`` gave 139 ms (int8), 199 ms (int4) and 173 ms (int2) per fragment of 6.3M elements
with fresh buffers, 118, 135 and 128 ms with this pool (docs/benchmarks.md, "The local-SGD sync
against its memory-traffic floor").

:data:`POOL` keeps the large CPU temporaries a sync gives back and hands them out again at the
next sync: a request takes the smallest free buffer that holds it and wastes at most half of it,
else allocates one. Only CPU tensors of at least :data:`MIN_BYTES` are pooled; CUDA tensors come
from PyTorch's caching allocator already (``take`` is then ``torch.empty`` and ``give`` does
nothing). The pool holds at most :data:`MAX_FREE` buffers per dtype, so its memory is bounded by
what one sync had in use at once: the temporaries a sync would have allocated anyway, kept
instead of returned. ``POOL.clear()`` returns them.

Only code that knows a buffer is no longer referenced gives it back (the sync, once a bucket is
applied; the quantised and sparse reduces, once their stages are done): a buffer handed out twice
would be two live tensors over one memory, so ``give`` accepts only what ``take`` handed out.
"""

from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["MAX_FREE", "MIN_BYTES", "POOL", "BufferPool"]

MIN_BYTES = 1 << 20
"""Smaller temporaries come from the heap cheaply: not pooled."""

MAX_FREE = 8
"""Free buffers kept per (dtype, device); the smallest is dropped beyond that."""


class BufferPool:
    """Flat CPU buffers reused across syncs; thread-safe (the quantised reduce's worker uses it)."""

    def __init__(self) -> None:
        self._free: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        # data_ptr of a handed-out buffer -> a weak reference to it: one never given back is freed
        # as usual once its views are gone
        self._out: dict[int, weakref.ref] = {}
        self._lock = threading.Lock()

    def take(self, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """An uninitialised 1-D tensor of ``numel`` elements (a view of a pooled buffer, or new)."""
        device = torch.device(device)
        if device.type != "cpu" or numel * dtype.itemsize < MIN_BYTES:
            return torch.empty(numel, dtype=dtype, device=device)
        key = (dtype, device)
        with self._lock:
            free = self._free.get(key, [])
            fits = [i for i, b in enumerate(free) if numel <= b.numel() <= 2 * numel]
            if fits:
                base = free.pop(min(fits, key=lambda i: free[i].numel()))
            else:
                base = torch.empty(numel, dtype=dtype, device=device)
            if len(self._out) > 64:
                self._out = {p: r for p, r in self._out.items() if r() is not None}
            self._out[base.data_ptr()] = weakref.ref(base)
        return base[:numel]

    def zeros(self, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """:meth:`take`, zero-filled."""
        return self.take(numel, dtype, device).zero_()

    def give(self, *tensors: torch.Tensor | None) -> None:
        """Return tensors :meth:`take` handed out (others, and None, are ignored); the caller must
        hold no other reference into them."""
        with self._lock:
            for t in tensors:
                if t is None or t.device.type != "cpu":
                    continue
                ref = self._out.pop(t.data_ptr(), None)
                base = ref() if ref is not None else None
                if base is None or base.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
                    continue
                free = self._free.setdefault((base.dtype, base.device), [])
                free.append(base)
                if len(free) > MAX_FREE:
                    # by position: list.remove would compare tensors with == (elementwise, and an
                    # error for two sizes) on the way to the smallest
                    del free[min(range(len(free)), key=lambda i: free[i].numel())]

    def clear(self) -> None:
        """Drop the free buffers (handed-out ones stay valid and are dropped when given back)."""
        with self._lock:
            self._free.clear()

    def free_bytes(self) -> int:
        """Bytes held in free buffers."""
        with self._lock:
            return sum(b.numel() * b.element_size() for free in self._free.values() for b in free)


POOL = BufferPool()
"""The process's pool (Note [Buffer reuse])."""
