"""Counting the bytes a rank communicates, where every collective passes: the dispatcher.

Whoever issues a collective -- DDP's C++ reducer, FSDP2, DeepSpeed, a local-SGD sync, torch's
``PostLocalSGDOptimizer``, a worker thread -- it reaches a ``c10d`` operator (``c10d.allreduce_``,
``c10d._reduce_scatter_base_``, ...), or a functional collective (``_c10d_functional.*``, the path of
DTensor), through the dispatcher. While a :class:`CommCounter` is active those operators (and
only those) get a kernel of ours at the ``ADInplaceOrView`` dispatch key -- a key every dense
tensor's call passes, just below autograd, where no collective has a kernel of its own (so
autograd formulas, such as the functional collectives', still run above it) -- which adds up
their tensor sizes and hands the call on to the real kernel, unchanged. Nothing is patched, and
a call made inside another (an object collective pickling into tensors) is seen once, at the
operator it becomes.

Why not a ``TorchDispatchMode`` (torch's ``CommDebugMode`` is one): a mode sees *every* operator
of the training step, one Python call each. On the demo's 4.8M-parameter transformer on one CPU
thread that made a step about 17% slower (``python -m benchmarks.commcount_overhead``; results in
docs/benchmarks.md), and so made every throughput the demo reports lower and let compute hide
communication that a real run would not hide. The kernel here runs only at collectives, on
whichever thread issues them (a mode is thread-local and misses a worker thread's collectives).
Collectives issued under ``torch.inference_mode()`` (inference tensors skip this key) are not
seen; nothing in the demo communicates there.

What is counted, per call, is the estimated number of bytes *this rank sends* with the standard
bandwidth-optimal algorithms on N ranks (:func:`lookahead_dist._comm.wire_factor`), for a tensor
payload of S bytes:

==========================================  ===============================
all_reduce                                  2 (N-1)/N * S   (ring)
all_gather (S = gathered output)            (N-1)/N * S
reduce_scatter (S = full input)             (N-1)/N * S
all_to_all (S = input)                      (N-1)/N * S
broadcast, reduce, gather, scatter, send    S
==========================================  ===============================

torchft's ``Manager.allreduce`` (its own process group, its own threads) reaches the same
operators and is counted like any other collective.
:func:`interface_tx_bytes` reads what the network interface itself sent, for comparison.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from .._comm import wire_factor
from .._sync import nbytes

__all__ = ["CommCounter", "interface_tx_bytes"]

# operator name -> (op for wire_factor and by_op, index of the payload argument)
_C10D = {
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "_allgather_base_": ("all_gather", 0),  # payload: the gathered output
    "allgather_": ("all_gather", 0),
    "allgather_coalesced_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1),  # payload: the full input
    "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "alltoall_": ("all_to_all", 1),
    "alltoall_base_": ("all_to_all", 1),
    "broadcast_": ("broadcast", 0),
    "reduce_": ("reduce", 0),
    "gather_": ("gather", 1),
    "scatter_": ("scatter", 0),
    "send": ("send", 0),
}
# Functional collectives (DTensor, torch.compile): (op, payload index, index of group_size or None).
_FUNCTIONAL = {
    "all_reduce": ("all_reduce", 0, None),
    "all_reduce_coalesced": ("all_reduce", 0, None),
    "all_gather_into_tensor": ("all_gather", 0, 1),  # payload: input x group size
    "all_gather_into_tensor_coalesced": ("all_gather", 0, 1),
    "reduce_scatter_tensor": ("reduce_scatter", 0, 2),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 0, 2),
    "all_to_all_single": ("all_to_all", 0, None),
    "broadcast": ("broadcast", 0, None),
}


def _packets(namespace: str, names: dict[str, tuple]) -> dict[Any, tuple]:
    ops = getattr(torch.ops, namespace)
    found = {}
    for name, spec in names.items():
        try:
            found[getattr(ops, name)] = spec
        except (AttributeError, RuntimeError):  # an operator this torch build does not have
            pass
    return found


_C10D_OPS = _packets("c10d", _C10D)
_FUNCTIONAL_OPS = _packets("_c10d_functional", _FUNCTIONAL)


def _group_size_c10d(func: Any, args: tuple) -> int:
    for arg, value in zip(func._schema.arguments, args):
        if "ProcessGroup" in str(arg.type):
            return dist.ProcessGroup.unbox(value).size()
    return dist.get_world_size()


def _group_size_functional(args: tuple, size_index: int | None) -> int:
    if size_index is not None:
        return int(args[size_index])
    try:  # group_name is the last argument
        return dist.distributed_c10d._resolve_process_group(args[-1]).size()
    except Exception:  # an unnamed or foreign group: the default group's size
        return dist.get_world_size()


#: Counters inside their ``with`` block, innermost last.
_ACTIVE: list[CommCounter] = []


def _record_call(namespace: str, spec: tuple, func: Any, args: tuple) -> None:
    if namespace == "c10d":
        op, at = spec
        payload, world = nbytes(args[at]), _group_size_c10d(func, args)
    else:
        op, at, size_at = spec
        world = _group_size_functional(args, size_at)
        payload = nbytes(args[at]) * (world if op == "all_gather" else 1)
    for counter in list(_ACTIVE):
        if not counter._paused:
            counter._record(op, op, payload, world)


def _kernel(namespace: str, func: Any, spec: tuple) -> Any:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        if _ACTIVE:
            _record_call(namespace, spec, func, args)
        # On to the real kernel. Below this key, this thread's nested collectives (a functional
        # collective's c10d call, if it makes one) skip this kernel: counted once.
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return func(*args, **kwargs)

    return kernel


_LOCK = threading.Lock()
_LIBRARIES: list[Any] = []  # the registrations, while any counter is active


def _register() -> None:
    for namespace, ops in (("c10d", _C10D_OPS), ("_c10d_functional", _FUNCTIONAL_OPS)):
        lib = torch.library.Library(namespace, "IMPL")
        for packet, spec in ops.items():
            lib.impl(packet._qualified_op_name.split("::")[1], _kernel(namespace, packet.default, spec), "ADInplaceOrView")
        _LIBRARIES.append(lib)


def _unregister() -> None:
    while _LIBRARIES:
        _LIBRARIES.pop()._destroy()


class CommCounter:
    """Adds up the bytes this rank sends in collectives while it is active (see the module docstring).

    Use as a context manager around the whole run; :meth:`paused` excludes bookkeeping traffic
    (metrics, evaluation) and :meth:`reset` zeroes the totals (e.g. after set-up)::

        with CommCounter() as comm:
            setup(); comm.reset()
            for step in ...: train_step()
            per_step = comm.bytes / steps

    Attributes:
        bytes: estimated bytes sent since the last :meth:`reset` (see the module docstring).
        payload: raw tensor bytes handed to collectives since the last reset.
        calls: number of counted collective calls since the last reset.
        by_op: ``{op: estimated bytes}``, op one of ``all_reduce``, ``all_gather``,
            ``reduce_scatter``, ``all_to_all``, ``broadcast``, ``reduce``, ``gather``, ``scatter``,
            ``send``, or a name given to :func:`record_external`.
    """

    def __init__(self) -> None:
        self._paused = 0
        self.reset()

    def reset(self) -> None:
        self.bytes = 0.0
        self.payload = 0
        self.calls = 0
        self.by_op: dict[str, float] = defaultdict(float)

    def _record(self, name: str, op: str, payload: int, world: int) -> None:
        sent = wire_factor(op, world) * payload
        self.bytes += sent
        self.payload += payload
        self.calls += 1
        self.by_op[name] += sent

    def __enter__(self) -> CommCounter:
        with _LOCK:
            if self in _ACTIVE:
                raise RuntimeError("CommCounter is already active; use one `with` block at a time")
            if not _ACTIVE:
                _register()
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        with _LOCK:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
            if not _ACTIVE:
                _unregister()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Collectives inside the block are not counted."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


def interface_tx_bytes() -> int | None:
    """Bytes sent so far by the network interface the process group uses (``GLOO_SOCKET_IFNAME``
    or ``NCCL_SOCKET_IFNAME``, as set by a multi-node launcher such as tools/netcluster.py), or
    None when neither is set or the counter cannot be read. All processes on the interface count."""
    ifname = os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME")
    if not ifname:
        return None
    try:
        with open(f"/sys/class/net/{ifname}/statistics/tx_bytes", encoding="ascii") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return None
