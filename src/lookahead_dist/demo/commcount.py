"""Counting the bytes a rank communicates, at the ``torch.distributed`` collective calls.

Hosts reach the collectives through Python: FSDP2 calls ``dist.all_gather_single`` /
``dist.reduce_scatter_single``, DeepSpeed calls ``torch.distributed[.distributed_c10d].*``, a
local-SGD sync calls ``dist.all_reduce``. :class:`CommCounter` wraps those module attributes, so
every such call is counted wherever it comes from. DDP's reducer is the exception (it calls the
process group from C++); :func:`counting_ddp_hook` is a DDP communication hook that does the
default all-reduce through ``dist.all_reduce`` so it is counted too. Names that a module bound
to a collective at import time (``lookahead_dist._comm``'s ``_REDUCE_SCATTER``/``_ALL_GATHER``)
are wrapped as well.

What is counted, per call, is the estimated number of bytes *this rank sends* with the standard
bandwidth-optimal algorithms on N ranks, for a tensor payload of S bytes:

==========================================  ===============================
all_reduce                                  2 (N-1)/N * S   (ring)
all_gather (S = gathered output)            (N-1)/N * S
reduce_scatter (S = full input)             (N-1)/N * S
all_to_all (S = input)                      (N-1)/N * S
broadcast, reduce, send                     S
==========================================  ===============================

Calls made *inside* another counted call (``_all_gather_base`` -> ``all_gather_into_tensor``)
are counted once, at the outermost call. Object collectives (``all_gather_object``,
``broadcast_object_list``) are bookkeeping, not training traffic, and are not counted.
"""

from __future__ import annotations

import functools
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from lookahead_dist._comm import wire_factor

__all__ = ["CommCounter", "counting_ddp_hook", "record_external"]

#: Counters inside their ``with`` block, innermost last (see :func:`record_external`).
_ACTIVE: list["CommCounter"] = []


def record_external(name: str, op: str, payload: int, world: int) -> None:
    """Count a collective that does not go through ``torch.distributed`` (e.g. a torchft
    ``Manager.allreduce`` on its own process group) in the active counters, under ``name``;
    ``op`` is ``all_reduce``, ``all_gather``, ``reduce_scatter`` or ``p2p``, ``payload`` in bytes."""
    kind = {"all_reduce": "allreduce", "all_gather": "gather", "reduce_scatter": "scatter"}.get(op, "p2p")
    for counter in _ACTIVE:
        if not counter._paused:
            counter._record(name, kind, payload, world)


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _world(kwargs: dict[str, Any], args_group: Any = None) -> int:
    group = kwargs.get("group", args_group)
    try:
        return dist.get_world_size(group)
    except Exception:  # not part of the group, or a group object the size of which is unknown
        return dist.get_world_size()


# name -> (index of the payload argument, its keyword, index of the group argument, kind)
# kind: "allreduce" | "gather" (payload = output) | "scatter" (payload = input) | "p2p"
_SPECS: dict[str, tuple[int, str, int, str]] = {
    "all_reduce": (0, "tensor", 2, "allreduce"),
    "all_reduce_coalesced": (0, "tensors", 2, "allreduce"),
    "all_gather": (0, "tensor_list", 2, "gather"),
    "all_gather_into_tensor": (0, "output_tensor", 2, "gather"),
    "all_gather_single": (0, "output_tensor", 2, "gather"),
    "_all_gather_base": (0, "output_tensor", 2, "gather"),
    "all_gather_coalesced": (0, "output_tensor_lists", 2, "gather"),
    "reduce_scatter": (1, "input_list", 3, "scatter"),
    "reduce_scatter_tensor": (1, "input", 3, "scatter"),
    "reduce_scatter_single": (1, "input", 3, "scatter"),
    "_reduce_scatter_base": (1, "input", 3, "scatter"),
    "all_to_all": (1, "input_tensor_list", 2, "scatter"),
    "all_to_all_single": (1, "input", 4, "scatter"),
    "broadcast": (0, "tensor", 2, "p2p"),
    "reduce": (0, "tensor", 3, "p2p"),
    "send": (0, "tensor", 2, "p2p"),
    "isend": (0, "tensor", 2, "p2p"),
    "gather": (0, "tensor", 3, "p2p"),
    "scatter": (0, "tensor", 3, "p2p"),
    # Object collectives pickle into tensors and call the ones above; wrapping them (kind "none")
    # makes those inner calls nested, hence uncounted.
    "all_gather_object": (0, "object_list", 2, "none"),
    "broadcast_object_list": (0, "object_list", 2, "none"),
    "gather_object": (0, "obj", 3, "none"),
    "scatter_object_list": (0, "scatter_object_output_list", 3, "none"),
    "send_object_list": (0, "object_list", 2, "none"),
    "recv_object_list": (0, "object_list", 2, "none"),
}

# lookahead_dist._comm's import-time aliases -> the spec they follow.
_ALIASES = {"_REDUCE_SCATTER": "reduce_scatter_single", "_ALL_GATHER": "all_gather_single"}


class CommCounter:
    """Patches the ``torch.distributed`` collectives to add up the bytes sent by this rank.

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
        by_op: ``{op name: estimated bytes}``.
    """

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Callable]] = []
        self._local = threading.local()
        self._paused = 0
        self.reset()

    def reset(self) -> None:
        self.bytes = 0.0
        self.payload = 0
        self.calls = 0
        self.by_op: dict[str, float] = defaultdict(float)

    def _record(self, name: str, kind: str, payload: int, world: int) -> None:
        op = {"allreduce": "all_reduce", "gather": "all_gather", "scatter": "reduce_scatter"}.get(kind, kind)
        sent = wire_factor(op, world) * payload
        self.bytes += sent
        self.payload += payload
        self.calls += 1
        self.by_op[name] += sent

    def _wrap(self, name: str, fn: Callable) -> Callable:
        pos, key, group_pos, kind = _SPECS[name]

        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._local, "depth", 0)
            if depth == 0 and not self._paused and kind != "none":
                payload = args[pos] if len(args) > pos else kwargs.get(key)
                group = args[group_pos] if len(args) > group_pos else None
                self._record(name, kind, _nbytes(payload), _world(kwargs, group))
            self._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = depth

        counted.__wrapped_by_commcounter__ = True  # type: ignore[attr-defined]
        return counted

    def __enter__(self) -> CommCounter:
        targets = [(module, name, name) for module in (dist, c10d) for name in _SPECS]
        # Modules that bound a collective to a name of their own at import time.
        from .. import _comm

        targets += [(_comm, alias, spec) for alias, spec in _ALIASES.items()]
        for module, attr, spec in targets:
            fn = getattr(module, attr, None)
            if fn is None or getattr(fn, "__wrapped_by_commcounter__", False):
                continue
            self._saved.append((module, attr, fn))
            setattr(module, attr, self._wrap(spec, fn))
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Collectives inside the block are not counted."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


def counting_ddp_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook equal to DDP's default (average by all-reduce) but issued via ``dist.all_reduce``.

    Going through the Python function lets :class:`CommCounter` see DDP's gradient traffic.
    ``state`` is the process group (or None for the default group).
    """
    group = state if state is not None else dist.group.WORLD
    tensor = bucket.buffer()
    tensor.div_(dist.get_world_size(group))
    work = dist.all_reduce(tensor, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


# DDP validates a hook's annotations against the real classes; `from __future__ import
# annotations` turned them into strings, so give it the objects.
counting_ddp_hook.__annotations__ = {
    "state": Any,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}
