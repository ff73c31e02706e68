"""Counting the bytes a rank communicates, where every collective passes: the dispatcher.

Whoever issues a collective -- DDP's C++ reducer, FSDP2, DeepSpeed, a local-SGD sync, torch's
``PostLocalSGDOptimizer`` -- it reaches a ``c10d`` operator (``c10d.allreduce_``,
``c10d._reduce_scatter_base_``, ...), or a functional collective (``_c10d_functional.*``, the path of
DTensor), through the dispatcher. :class:`CommCounter` is a ``TorchDispatchMode`` that sees those
operators and adds up their tensor sizes; nothing is patched, and a call made inside another
(an object collective pickling into tensors) is seen once, at the operator it becomes.

torch's own ``CommDebugMode`` works the same way and sees the same operators (also under gloo on
CPU, DDP's reducer included), but it counts calls, not bytes, installs module hooks and keeps a
record of every operator of the run; a timed training loop should pay for none of that, so this is
a thin mode of its own. Like any dispatch mode it still costs one Python call per operator while
active, the same for every mode the demo compares.

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

A collective issued where the counter may not see it (a torchft ``Manager`` all-reduce, which can
run on a thread of its own) is counted once with :func:`counted_as` around the call.
:func:`interface_tx_bytes` reads what the network interface itself sent, for comparison.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from .._comm import wire_factor
from .._sync import nbytes

__all__ = ["CommCounter", "counted_as", "interface_tx_bytes", "record_external"]

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


#: Counters inside their ``with`` block, innermost last (see :func:`record_external`).
_ACTIVE: list[CommCounter] = []


def record_external(name: str, op: str, payload: int, world: int) -> None:
    """Count a collective that the dispatcher does not show (e.g. a torchft ``Manager.allreduce``
    on its own thread) in the active counters, under ``name``; ``op`` is ``all_reduce``,
    ``all_gather``, ``reduce_scatter``, ``all_to_all`` or anything else for a point-to-point
    transfer; ``payload`` in bytes, ``world`` the group size."""
    for counter in _ACTIVE:
        if not counter._paused:
            counter._record(name, op, payload, world)


@contextmanager
def counted_as(name: str, op: str, payload: int, world: int) -> Iterator[None]:
    """Count one collective a library issues on its own terms (a torchft ``Manager.allreduce``) as
    :func:`record_external` does, and nothing the dispatcher shows while the block runs, so that
    it is counted once whichever thread carries it out."""
    record_external(name, op, payload, world)
    with ExitStack() as stack:
        for counter in list(_ACTIVE):
            stack.enter_context(counter.paused())
        yield


class _Mode(TorchDispatchMode):
    def __init__(self, counter: CommCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor turn itself into collectives on plain tensors first
        packet = getattr(func, "_overloadpacket", None)
        counter = self.counter
        if not counter._paused:
            spec = _C10D_OPS.get(packet)
            if spec is not None:
                op, at = spec
                counter._record(op, op, nbytes(args[at]), _group_size_c10d(func, args))
            else:
                fspec = _FUNCTIONAL_OPS.get(packet)
                if fspec is not None:
                    op, at, size_at = fspec
                    world = _group_size_functional(args, size_at)
                    payload = nbytes(args[at]) * (world if op == "all_gather" else 1)
                    counter._record(op, op, payload, world)
        return func(*args, **kwargs)


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
        self._mode: _Mode | None = None
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
        if self._mode is not None:
            raise RuntimeError("CommCounter is already active; use one `with` block at a time")
        self._mode = _Mode(self)
        self._mode.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(*exc)

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
