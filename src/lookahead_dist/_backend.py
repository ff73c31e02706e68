"""What a sync may assume about the backend that runs its collectives: decided here, in one place.

The sync code never asks ``dist.get_backend(...) == "nccl"``; it asks :func:`traits` for a
:class:`BackendTraits` and follows it. Two families exist:

- **host-blocking** (gloo, MPI; any backend given CPU tensors): a collective runs on the backend's
  own host threads and ``work.wait()`` blocks the calling thread until it is done.
  ``work.wait(timeout)`` is honoured and leaves the communicator usable. The quantised reduce,
  whose fp32 sum must run between its two collectives, needs a worker thread here so that both
  transfers overlap the caller's compute.
- **stream-ordered** (NCCL, XCCL and other device backends, TorchComms): a collective is enqueued on
  a device stream and ``work.wait()`` only makes the caller's current stream wait for it (the host
  goes on). ``work.wait(timeout)`` is *not* a host deadline there: NCCL blocks the host and, on
  expiry, aborts the communicators; TorchComms refuses it ("wait timeout not supported"). So a
  deadline is enforced on the host by polling ``work.is_completed()`` (or a CUDA event's
  ``query()``) before anything reads a result, and every stage of the quantised reduce is enqueued
  from the caller's thread on a side stream: a worker thread issuing NCCL collectives beside the
  caller's own (FSDP2, DDP, a user's all-reduce) could order them differently on different ranks,
  which NCCL documents as a hang.

Note [Collective group creation]
--------------------------------
:func:`dedicated_group` makes a process group of the same ranks as a given one, for sync traffic
that must not queue behind (or in front of) anything else on that group. ``new_group(...,
use_local_synchronization=True)`` would let only the members call it, but it turns into a blocking
split of the world communicator when ``init_process_group(device_id=...)`` bound a device, and it
raises under TorchComms. So it is a plain ``new_group``: a collective over the *whole world*. Every
rank gathers the member lists of every rank's group (one ``all_gather_object`` over the default
group) and calls ``new_group`` for each distinct list in the same order, so hierarchical set-ups
(a different "across" group per rank) work too. Hence: build the optimizer at the same point of the
program on every rank of the world, as you build DDP/FSDP.

Tests force a family with :func:`forced` (the stream-ordered, caller-thread path then runs on gloo,
where ``wait()`` happens to block; the arithmetic is the same).
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "HOST_BLOCKING",
    "STREAM_ORDERED",
    "BackendTraits",
    "backend_name",
    "dedicated_group",
    "forced",
    "poll_until",
    "traits",
    "wait_within",
]


@dataclass(frozen=True)
class BackendTraits:
    """How collectives behave on one backend (see the module docstring)."""

    name: str
    #: a collective's ``wait()`` blocks the host until the data is there (gloo) rather than ordering
    #: device streams (NCCL)
    blocks_host: bool
    #: ``work.wait(timedelta)`` is a host deadline that leaves the communicator usable
    supports_wait_timeout: bool

    @property
    def needs_worker_thread(self) -> bool:
        """Multi-stage work (the quantised reduce) runs on a worker thread to overlap the caller."""
        return self.blocks_host

    @property
    def host_deadline(self) -> bool:
        """A timeout is enforced by polling ``is_completed()`` on the host, never by ``wait(timeout)``."""
        return not self.supports_wait_timeout


HOST_BLOCKING = BackendTraits("host-blocking", blocks_host=True, supports_wait_timeout=True)
STREAM_ORDERED = BackendTraits("stream-ordered", blocks_host=False, supports_wait_timeout=False)

_HOST_BACKENDS = frozenset({"gloo", "mpi"})
_forced: BackendTraits | None = None


def backend_name(group: Any, device: torch.device | str) -> str:
    """The backend that serves ``device`` tensors on ``group`` ("gloo", "nccl", ...; "" if unknown)."""
    try:
        name = str(dist.get_backend(group))
    except Exception:  # noqa: BLE001 - a group torch cannot name (a fake or a wrapped one)
        return ""
    if ":" in name:  # "cpu:gloo,cuda:nccl"
        table = dict(part.split(":", 1) for part in name.split(",") if ":" in part)
        return table.get(torch.device(device).type, "")
    return name


def traits(group: Any, device: torch.device | str) -> BackendTraits:
    """The traits of the collectives on ``group`` for tensors on ``device``."""
    if _forced is not None:
        return _forced
    if torch.device(device).type == "cpu":
        return HOST_BLOCKING  # CPU tensors only ever go through host-thread backends
    return HOST_BLOCKING if backend_name(group, device) in _HOST_BACKENDS else STREAM_ORDERED


@contextlib.contextmanager
def forced(t: BackendTraits) -> Iterator[None]:
    """Within the block, :func:`traits` answers ``t`` for every group and device (tests)."""
    global _forced
    old, _forced = _forced, t
    try:
        yield
    finally:
        _forced = old


def poll_until(done: Callable[[], bool], deadline: float) -> None:
    """Return once ``done()`` is True; raise ``TimeoutError`` at ``deadline`` (``time.monotonic()``).

    Polls with a back-off from 20 us to 1 ms: a finished collective is seen within a millisecond."""
    delay = 2e-5
    while not done():
        if time.monotonic() >= deadline:
            raise TimeoutError("the collective did not complete before the deadline")
        time.sleep(delay)
        delay = min(2 * delay, 1e-3)


def wait_within(work: Any, seconds: float | None, t: BackendTraits) -> Any:
    """``work.wait()`` with a host deadline of ``seconds`` (None: the backend's own timeout).

    Raises ``TimeoutError`` when the deadline passes; any other failure propagates unchanged. The
    kind of failure is decided by type and by the clock, never by the text of a message.
    Works that enforce a deadline themselves (``enforces_deadline = True``, the quantised reduce)
    are handed the seconds."""
    if seconds is None:
        return work.wait()
    if getattr(work, "enforces_deadline", False):
        return work.wait(seconds)
    deadline = time.monotonic() + seconds
    if t.supports_wait_timeout:
        try:
            return work.wait(datetime.timedelta(seconds=seconds))
        except TimeoutError:
            raise
        except Exception as exc:
            if time.monotonic() >= deadline:  # gloo raises its timeout as a RuntimeError
                raise TimeoutError(f"the collective did not complete within {seconds} s") from exc
            raise
    if hasattr(work, "is_completed"):
        poll_until(work.is_completed, deadline)
    return work.wait()  # completed: only orders the current stream after it


def dedicated_group(group: Any) -> Any:
    """A new process group of ``group``'s ranks (None: the world); a collective over the whole world
    (Note [Collective group creation]). Every rank gets its own group's twin; the rank order of
    ``new_group`` is ascending."""
    world = dist.get_world_size()
    mine = tuple(sorted(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)))
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    out = None
    for ranks in sorted(set(every)):
        g = dist.new_group(list(ranks))
        if ranks == mine:
            out = g
    return out
