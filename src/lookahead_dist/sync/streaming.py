r"""Streaming local SGD: which tensors sync when (fragments), and the work in flight in between.

The local-SGD strategy (:mod:`lookahead_dist.sync.local_sgd`) packs, reduces and applies; this
module decides *which* tensors a sync moves and *when* its result is applied, and holds what is in
flight between the two. Nothing here touches weights.

Note [Fragments]
----------------
A step unit (a param group) is split into ``F = num_fragments`` fragments. Default rule: lay the
unit's tensors end to end in parameter order, ``B`` slow-weight bytes in all, and cut that byte
stream at ``c_f = f * B / F`` (``f = 1 .. F-1``).

1. A tensor of more than ``b`` elements (``b = quant_block_size``, 512 by default, also when the
   sync is not quantised) that a cut falls inside is split there, at the multiple of ``b``
   elements (counted from the tensor's start) nearest to the cut; a split that would leave an
   empty piece is dropped. Smaller tensors are never split.
2. Every piece (a whole tensor, or an element range ``[a, b)`` of a split one) goes to fragment
   ``floor(F * m / B)``, where ``m`` is the byte offset of the piece's *midpoint* in the stream;
   adjacent pieces of one tensor that land in the same fragment are merged.

So each fragment is a contiguous run of the stream of ``B / F`` bytes, give or take one block
(half a block of rounding at each of its two ends, or half of a small tensor kept whole): a
DeepSpeed ZeRO partition (one flat tensor per param group or sub-group) or a large embedding is
spread over the fragments like any other bytes. For ``F = 1`` nothing is split. The rule reads
only the tensors' sizes and element sizes, so every rank of the group computes the same split.

A piece is a range of the tensor's *flat* elements (memory order, as :func:`~lookahead_dist._comm.
flat_view`). Where a mode cuts every tensor into chunks (the shard chunks of ``sharded=True``, the
owner chunks of the quantised reduce, both in the hierarchical-sharded int8/int4 mode), the piece
``[a, b)`` of a tensor of ``M`` elements is instead the same fraction of *every* chunk: elements
``floor(a * c / M) .. floor(b * c / M)`` of a chunk of ``c`` elements. Each chunk's part stays on
the rank that owns the chunk, so the per-parameter state keeps its shape and meaning (the sharded
slow weight and outer momentum, ``lookahead_ef_residual``, ``lookahead_ef_owner``,
``lookahead_inflight`` are sliced, not re-laid-out, and checkpoints have the same format); without
chunks (flat fp32/bf16 sync) the fraction of the one chunk is ``[a, b)`` itself. A tensor split
over fragments takes one outer step per cycle on each piece, at the piece's fragment; its inner
state's ``pullback`` (``"pullback"``/``"reset"``) happens once per cycle, at the sync of the
fragment that holds its first element.

Not split: with ``outer_optimizer=`` (a user optimizer's state such as Adam's step count is one per
tensor; the tensors keep the midpoint rule above, whole), and with explicit ``fragments=``.
With ``fragments=[[prefix, ...], ...]`` (module FQN prefixes, needs ``module=``) fragment f holds
the parameters whose name is one of its prefixes or starts with ``prefix + "."``; every parameter
must match exactly one fragment.

Note [Streaming schedule]
-------------------------
Lookahead counts applied steps of a unit, ``n = 1 .. k``. With ``s = k / F`` (``k % F == 0``):

- fragment ``f >= 1`` is *launched* at ``n == f * s``, fragment 0 at ``n == k``: its
  pseudo-gradient is packed and its collective started, and ``step()`` returns;
- it is *applied* ``tau = fragment_sync_delay`` counted steps of the unit later (``tau < s``, so at
  most one fragment of a unit is in flight): wait for the collective, the outer step on the
  fragment's slow weights, then the merge
  ``theta <- a * theta_local + (1 - a) * phi_new`` (``a = fragment_update_alpha``).

``tau = 0`` applies at the launch step (blocking); ``F = 1, tau = 0, a = 0`` is the plain blocking
sync, bit for bit. With ``eager_update=True``/``"naive"`` a fragment's collective is instead applied
at that fragment's next launch, ``k`` counted steps later, so up to F are in flight (Note [Eager
outer updates] in _outer.py). The timeline is drawn in ``docs/img/streaming-timeline.png``.

Note [Overlap on each backend]
------------------------------
- gloo (CPU): ``async_op=True`` collectives run on gloo's own worker threads; the training thread
  only packs the buffer and later calls ``work.wait(timeout)``.
- NCCL: an ``async_op=True`` collective is enqueued on the process group's internal NCCL stream
  after an event wait on the current (compute) stream, so the packing kernels finish first; the
  compute stream keeps running inner steps. ``work.wait()`` makes the current stream wait on the
  collective's end event (it does not block the host), so the kernels of the apply step are ordered
  after the transfer. The buffers in flight are referenced by the :class:`InFlight` record until
  the wait, so the caching allocator cannot reuse them early. With ``timeout=`` the apply step
  first polls ``work.is_completed()`` on the host until the deadline (``wait(timeout)`` is never
  called on NCCL: it blocks the host and aborts the communicators on expiry), so a timeout costs
  the host the wait for the transfer at the apply step, bounded by the deadline.
- Fragments travel on a process group of their own (``fragment_sync_delay > 0``, made at
  construction, Note [Collective group creation] in :mod:`lookahead_dist._backend`): a user's
  all-reduce of the loss during the tau steps does not queue behind a fragment on the same NCCL
  stream, nor an FSDP/HSDP collective on a shared group.
- Quantised (``comm_dtype="int8"/"int4"``): :func:`lookahead_dist._quant.quantized_all_reduce_async`
  quantises on the caller's stream, then runs its all-to-all, fp32 sum and all-gather on that
  group: on gloo from a worker thread; on NCCL enqueued from the caller's thread on a side stream
  ordered by events (no thread issues NCCL collectives), with ``timeout`` a host poll of the event
  recorded after the last stage. The backend decides through :mod:`lookahead_dist._backend`.

Note [What the tau steps keep]
------------------------------
The pseudo-gradient sent at launch is ``phi - theta(launch)``; the tau steps taken after it are
not in the average. At the apply step, ``a = 0`` (default) sets the fragment's fast weights to the
new slow weights: the tau local steps of *that fragment* are discarded, those of the other
fragments are untouched. ``0 < a <= 1`` keeps ``a`` of the current local weights (including the
tau steps) and takes ``1 - a`` of the global ones; ``a = 1`` never pulls the fragment back (the
replicas would drift apart: only meaningful for a single replica).
"""

from __future__ import annotations

import datetime
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import _backend

__all__ = [
    "InFlight",
    "ScheduleSuggestion",
    "check_schedule",
    "fragments_from_prefixes",
    "launch_fragment",
    "split_fragments",
    "split_ranges",
    "suggest_schedule",
    "wait_work",
]


# -- which tensors --------------------------------------------------------------------------------
def split_fragments(nbytes: Sequence[int], num_fragments: int) -> list[list[int]]:
    """Indices of each fragment under the midpoint rule of Note [Fragments], tensors kept whole."""
    total = sum(nbytes)
    out: list[list[int]] = [[] for _ in range(num_fragments)]
    start = 0
    for i, nb in enumerate(nbytes):
        if total > 0:
            f = min(num_fragments - 1, int(num_fragments * (2 * start + nb) // (2 * total)))
        else:
            f = min(num_fragments - 1, i * num_fragments // max(len(nbytes), 1))
        out[f].append(i)
        start += nb
    return out


def split_ranges(numels: Sequence[int], elsizes: Sequence[int], num_fragments: int,
                 block: int | None) -> list[list[tuple[int, int, int]]]:
    """Each fragment's pieces ``(tensor index, start, stop)`` (flat element ranges, in stream order)
    under Note [Fragments]: tensors of more than ``block`` elements are split at the block-aligned
    element nearest to each cut inside them; ``block=None`` never splits (:func:`split_fragments`)."""
    F = num_fragments
    nbytes = [m * e for m, e in zip(numels, elsizes)]
    total = sum(nbytes)
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(F)]
    if total == 0 or F == 1 or block is None:
        for f, idx in enumerate(split_fragments(nbytes, F)):
            out[f] = [(i, 0, numels[i]) for i in idx]
        return out
    start = 0
    for i, (m, e) in enumerate(zip(numels, elsizes)):
        bounds = [0]
        if m > block:
            for f in range(1, F):
                num = f * total - F * start  # F * (cut f - tensor start), in bytes
                if not 0 < num < F * m * e:
                    continue
                den = F * e * block
                x = (2 * num + den) // (2 * den) * block  # nearest multiple of the block
                if bounds[-1] < x < m:
                    bounds.append(x)
        bounds.append(m)
        for a, b in itertools.pairwise(bounds):
            f = min(F - 1, F * (2 * start + (a + b) * e) // (2 * total))
            frag = out[f]
            if frag and frag[-1][0] == i and frag[-1][2] == a:
                frag[-1] = (i, frag[-1][1], b)
            else:
                frag.append((i, a, b))
        start += m * e
    return out


def fragments_from_prefixes(names: Sequence[str | None], prefixes: Sequence[Sequence[str]],
                            unit: str) -> list[list[int]]:
    """Indices of each fragment: parameter i goes where one of its module FQN prefixes matches."""
    out: list[list[int]] = [[] for _ in prefixes]
    for i, name in enumerate(names):
        if name is None:
            raise ValueError(
                f"LocalSGDOptions `fragments`: tensor {i} of {unit} is not a parameter of `module`; "
                "give the module whose named_parameters() hold every optimised parameter"
            )
        hits = [f for f, group in enumerate(prefixes)
                if any(name == pre or name.startswith(pre + ".") for pre in group)]
        if len(hits) != 1:
            what = "no fragment" if not hits else f"fragments {hits}"
            raise ValueError(
                f"LocalSGDOptions `fragments`: parameter {name!r} ({unit}) matches {what}; every parameter "
                "must match the module FQN prefixes of exactly one fragment"
            )
        out[hits[0]].append(i)
    return out


# -- when -----------------------------------------------------------------------------------------
def check_schedule(k: int, num_fragments: int, delay: int, unit: str) -> int:
    """The steps between launches, ``k / F``; errors name k, F and tau."""
    if k % num_fragments:
        raise ValueError(
            f"LocalSGDOptions `num_fragments={num_fragments}` needs k ({unit}: lookahead_k={k}) to be a "
            f"multiple of it; use a k that num_fragments divides (e.g. k={num_fragments * max(1, round(k / num_fragments))}) "
            f"or another num_fragments"
        )
    stride = k // num_fragments
    if delay >= stride:
        raise ValueError(
            f"LocalSGDOptions `fragment_sync_delay={delay}` must be < k / num_fragments = {k} / {num_fragments} "
            f"= {stride} ({unit}), so that a fragment is applied before the next one is launched; lower it "
            "or use fewer fragments"
        )
    return stride


def launch_fragment(n: int, k: int, num_fragments: int) -> int | None:
    """The fragment launched at count ``n`` (1..k) of a unit, or None (Note [Streaming schedule])."""
    stride = k // num_fragments
    if n % stride:
        return None
    return (n // stride) % num_fragments


# -- in flight ------------------------------------------------------------------------------------
@dataclass
class InFlight:
    """A fragment whose collective was launched and whose result is not applied yet."""

    fragment: int
    due_in: int                      # counted steps of the unit until it is applied
    launched: list[Any]              # per bucket: what the strategy's launch returned
    describe: str                    # for errors: which sync, launched at which step, which group
    reduced: list[Any] | None = None  # per bucket, once waited for: the reduced result
    parked: bool = False             # the reduced result is also in per-parameter state (checkpoint)
    works: list[Any] = field(default_factory=list)

    def pending(self) -> bool:
        """True while a collective of this fragment has not completed (a debugging aid)."""
        return any(not w.is_completed() for w in self.works if w is not None)


def _seconds(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    return float(timeout)


def wait_work(work: Any, timeout: Any, describe: str, traits: Any = None) -> Any:
    """``work.wait`` within ``timeout`` (seconds or timedelta; None: the process group's own);
    a timeout or a failed peer becomes an error naming the sync (``describe``).

    ``traits`` (a :class:`lookahead_dist._backend.BackendTraits`, default host-blocking) says how
    the deadline is enforced: ``wait(timeout)`` on gloo, a host poll of ``is_completed()`` on
    stream-ordered backends (NCCL), where ``wait(timeout)`` would block the host and abort the
    communicators on expiry. Errors are told apart by type (``TimeoutError``) and by the deadline's
    clock, never by the words of a message (Note [Timeouts] in local_sgd.py)."""
    if work is None:
        return None
    secs = _seconds(timeout)
    try:
        return _backend.wait_within(work, secs, traits if traits is not None else _backend.HOST_BLOCKING)
    except TimeoutError as exc:
        raise TimeoutError(
            f"Lookahead local SGD: {describe} did not complete within timeout={secs} s; a peer is hung, "
            "died or skipped this sync (a rank that calls step() fewer times than the others never "
            f"joins it). Original error: {exc}"
        ) from exc
    except Exception as exc:
        raise RuntimeError(f"Lookahead local SGD: {describe} failed: {exc}") from exc


# -- choosing F and tau ---------------------------------------------------------------------------
@dataclass
class ScheduleSuggestion:
    """What :func:`suggest_schedule` proposes, with the numbers behind it."""

    num_fragments: int
    fragment_sync_delay: int
    fragment_seconds: float      # one fragment's collective on the link
    exposed_seconds_per_k: float  # communication not hidden, per k steps
    utilisation: float           # compute time / (compute + exposed communication)
    blocking_utilisation: float  # the same for the blocking sync (F=1, tau=0)

    def __str__(self) -> str:
        return (
            f"num_fragments={self.num_fragments}, fragment_sync_delay={self.fragment_sync_delay}: one fragment "
            f"takes {self.fragment_seconds * 1e3:.1f} ms on the link; exposed communication "
            f"{self.exposed_seconds_per_k * 1e3:.1f} ms per k steps; expected utilisation "
            f"{100 * self.utilisation:.1f}% (blocking sync: {100 * self.blocking_utilisation:.1f}%)"
        )


def suggest_schedule(param_bytes: float, link_bytes_per_s: float, step_time_s: float, k: int, *,
                     group_size: int = 2, bits: int = 32, latency_s: float = 0.0,
                     max_delay: int | None = None, verbose: bool = True) -> ScheduleSuggestion:
    r"""Suggest ``num_fragments`` and ``fragment_sync_delay`` from the measured link.

    A fragment of ``P / F`` parameter bytes, all-reduced over ``N`` ranks as ``bits`` per value
    (ring model, Note [Payload and wire bytes] of :mod:`lookahead_dist._comm`), takes

    .. math::
        t_F = \text{latency} + \frac{2 (N-1)}{N} \cdot \frac{P}{F} \cdot \frac{\text{bits}}{32}
              \Big/ \text{link}

    and is hidden by ``tau`` inner steps of ``step_time`` when :math:`\tau \ge t_F / \text{step}`.
    ``tau < k / F`` must hold, so the smallest delay that hides a fragment is
    :math:`\tau_F = \max(1, \lceil t_F / \text{step} \rceil)`. Among the F that divide k, the
    suggestion is the one with the highest expected utilisation
    ``k step / (k step + F max(0, t_F - tau step))``, then the smallest tau (staleness), then the
    smallest F (fewer collectives). ``max_delay`` caps tau (the Streaming-DiLoCo paper advises
    tau <= 5).

    Args:
        param_bytes: bytes of the parameters as fp32 (4 per value), e.g. ``4 * numel``.
        link_bytes_per_s: measured bandwidth of the slowest link, bytes per second.
        step_time_s: measured time of one inner step (forward, backward, optimizer), seconds.
        k: the sync period.
        group_size: ranks in the local-SGD group.
        bits: bits per value on the wire: 32 (fp32), 16 (bf16), 8 or 4 (+ about 1-2 % of scales).
        latency_s: fixed cost of one collective.
        max_delay: largest tau to consider (default k / F - 1).
        verbose: print the suggestion.

    Example:
        >>> # a 25 MB (fp32) model, 2 ranks on a 1 Gbit/s link, 50 ms per inner step, k = 16
        >>> s = suggest_schedule(25e6, 125e6, 0.05, k=16, verbose=False)
        >>> (s.num_fragments, s.fragment_sync_delay, round(s.fragment_seconds, 3))
        (4, 1, 0.05)
        >>> print(s)  # doctest: +NORMALIZE_WHITESPACE
        num_fragments=4, fragment_sync_delay=1: one fragment takes 50.0 ms on the link; exposed
        communication 0.0 ms per k steps; expected utilisation 100.0% (blocking sync: 80.0%)
    """
    if k < 1 or param_bytes < 0 or link_bytes_per_s <= 0 or step_time_s <= 0 or group_size < 1:
        raise ValueError(
            f"suggest_schedule needs k >= 1, param_bytes >= 0, link_bytes_per_s > 0, step_time_s > 0 and "
            f"group_size >= 1; got k={k}, param_bytes={param_bytes}, link_bytes_per_s={link_bytes_per_s}, "
            f"step_time_s={step_time_s}, group_size={group_size}"
        )
    if bits not in (32, 16, 8, 4):
        raise ValueError(f"suggest_schedule `bits` must be 32, 16, 8 or 4, got {bits!r}")
    ring = 2.0 * (group_size - 1) / group_size
    scale = 1.0 + (32.0 / (bits * 512) if bits < 16 else 0.0)
    compute = k * step_time_s

    def fragment_time(f: int) -> float:
        return (latency_s if group_size > 1 else 0.0) + ring * param_bytes / f * bits / 32 * scale / link_bytes_per_s

    def utilisation(f: int, tau: int) -> tuple[float, float]:
        exposed = f * max(0.0, fragment_time(f) - tau * step_time_s)
        return compute / (compute + exposed), exposed

    blocking_util, _ = utilisation(1, 0)
    best: tuple | None = None
    for f in range(1, k + 1):
        if k % f:
            continue
        top = k // f - 1
        if max_delay is not None:
            top = min(top, max_delay)
        if top < 0:
            continue
        need = max(1, math.ceil(fragment_time(f) / step_time_s - 1e-12)) if fragment_time(f) > 0 else 0
        tau = min(need, top)
        util, exposed = utilisation(f, tau)
        key = (-round(util, 6), tau, f)
        if best is None or key < best[0]:
            best = (key, f, tau, exposed, util)
    assert best is not None
    _, f, tau, exposed, util = best
    out = ScheduleSuggestion(f, tau, fragment_time(f), exposed, util, blocking_util)
    if verbose:
        print(out)
    return out
