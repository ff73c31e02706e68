r"""Local-SGD mode: the Lookahead sync is the only communication, once every k steps.

Each rank runs its inner optimizer on its own data with *no* per-step gradient all-reduce (a
plain module, or DDP inside ``no_sync()``). Every k-th step the fast weights are averaged over the
process group and the slow weights take an outer step towards the average; then every rank
restarts from the slow weights. See ``docs/local-sgd.md`` for when this pays off.

This module is the strategy itself: per-parameter state, the schedule, checkpoints in flight, and
the launch/reduce/apply of one bucket. Its parts live one concern per file: the options and their
checks in ``options.py``, the plans in ``_plan.py``, the three wire modes (flat, sharded,
hierarchical: Note [What goes on the wire]) as objects in ``_wire.py``, the outer step and the
user's outer optimizer in ``_outer.py`` (Note [The outer step], Note [Outer optimizer]), the
replicas' alignment, buffers and DDP watch in ``_replicas.py`` (Note [Same starting weights], Note
[Buffers], Note [DDP still all-reducing]); the state keys are in ``lookahead_dist._keys``.

Note [What goes on the wire]
----------------------------
- Flat mode (default): every rank sends its progress :math:`\theta^{(i)} - \phi` in one
  all-reduce per bucket (``bucket_cap_mb``; up to two buckets in flight so packing overlaps the
  transfer), total payload = the parameter bytes. Sending the progress rather than the weights
  is what makes ``comm_dtype=torch.bfloat16`` safe: the progress is small, so bf16 keeps its
  relative precision, and the update arithmetic stays in the slow weights' dtype.
- Sharded mode (``sharded=True``): each rank keeps only its 1/N chunk of every slow weight and
  outer momentum (see :class:`~lookahead_dist._comm.ShardLayout`). The fast weights are
  reduce-scattered, each rank updates its own chunk in place, and the new slow weights are
  all-gathered into every rank's parameters: the same bytes on the wire as one all-reduce.
  The ranks do not hold the full slow weights, so they cannot send progress; they send weights,
  and ``comm_dtype`` is refused in this mode.
- Hierarchical (``intra_group=...``): the ranks of one intra group hold identical replicas (DDP
  all-reduces their gradients every step); ``process_group`` connects the groups. Flat: every
  rank averages its whole replica with its peers in the other groups. With ``sharded=True`` the
  work is split *inside* the group: rank r of the group averages only chunk r across groups
  (progress, so ``comm_dtype`` applies), keeps only that chunk of the slow weights, and the
  group all-gathers the result: each rank sends 1/S of the model across groups.
  With FSDP2/HSDP inside a group, the replicas are sharded rather than identical: pass the
  replicate dimension's group as ``process_group`` and no ``intra_group``; each rank then
  averages its own local shard.

Note [Quantised sync]
---------------------
``comm_dtype="int8"`` / ``"int4"`` sends the progress in blockwise absmax-quantised form
(:mod:`lookahead_dist._quant`: one fp32 scale per ``quant_block_size`` values, symmetric grids of
255 / 15 levels, int4 packed two per byte). An all-reduce cannot add quantised values, so each
bucket runs the quantised mean of ``_quant``: all-to-all of the quantised chunks, dequantise and
add in fp32 on the chunk's owner, divide by N, requantise, all-gather. On 2 ranks the wire bytes
are ``bits/32 * (1 + 32/(bits * B))`` of an fp32 all-reduce (0.25 x 1.0078 for int8, 0.125 x
1.0156 for int4 at B = 512), plus padding to whole blocks. The bucket is laid out like a
:class:`ShardLayout` whose segments are padded to whole blocks (``_Layout``), so the chunk a
rank owns in the reduce is its 1/N chunk of every tensor. In the flat mode (fp32 slow weights)
the progress ``fast - slow`` is written straight into that layout, the result is dequantised
straight into it, and the built-in outer step reads it there (the slow weights split alike;
without momentum not even negated: ``Reduced.mean``); per-tensor views of ``d`` are made only
for an outer optimizer, the eager rule, a checkpoint in flight or a non-finite result.
``fused_kernels=True`` runs the quantisation stages as compiled kernels (Note [Fused
quantisation kernels] in _fused.py).

With ``error_feedback=True`` (default) each rank adds the quantisation error of its previous
send to the next one (``lookahead_ef_residual``, shaped like the slow weight), and the owner of a
chunk does the same for the requantised mean (``lookahead_ef_owner``, 1/N of it): the sums of the
values sent track the sums of the true values. Both residuals are per-parameter state: they are
checkpointed and, with fragments, naturally kept per fragment (a tensor split over fragments
updates the slices of its pieces: Note [Fragments] in streaming.py). A sync skipped for NaN/inf zeroes
them. Quantisation needs progress, so it runs in the flat and the hierarchical-sharded modes; the
plain sharded mode (which reduce-scatters weights) refuses it, like bf16, except with
``eager_update``, which reduce-scatters progress: there each rank quantises its whole progress
(``lookahead_ef_residual`` is then shaped like the parameter, ``lookahead_ef_owner`` is empty)
and each owner keeps its fp32 sum (``_quant.quantized_reduce_scatter_async``). The reduce runs on a
process group of its own (the same ranks, made at construction: Note [Collective group creation]
in _backend.py), also when ``fragment_sync_delay=0``; on gloo from a worker thread, on NCCL
enqueued from the caller's thread (Note [Asynchronous quantised all-reduce] in _quant.py).

``comm_dtype="int2"`` is the same reduce on a ternary grid (3 levels, four codes per byte).
``topk_fraction=f`` (with ``comm_dtype`` int8/int4/int2 for the value bits) replaces the reduce of
the same block-laid-out bucket by the sparse exchange of :mod:`lookahead_dist._sparse` (top
``round(256 f)`` of every 256 entries, all-gathered, decoded and averaged in fp32 on every rank:
Note [Sparse outer gradients]); ``lookahead_ef_residual`` keeps everything not sent, and
``lookahead_ef_owner`` stays zero (nothing is requantised). Hierarchical sharded: local rank r's
chunk, the same path; plain sharded with ``eager_update``: each shard segment encoded on its own
and reduce-scattered by one all-to-all (``_sparse``).

Note [Checkpoints in flight]
----------------------------
``state_dict()`` calls ``flush()``, which *waits* for a fragment's collective in flight but does
not apply it: the averaged pseudo-gradient is parked in per-parameter state (``lookahead_inflight``,
shaped like the slow weight, allocated with it when ``fragment_sync_delay > 0``) with the steps
left until it is due (``lookahead_inflight_due``), next to the error-feedback residuals and the
outer optimizer's state. The run goes on unchanged (the parked copy equals the in-memory result),
and a resumed run rebuilds the fragment in flight from that state and applies it at the same step:
bit-identical to not stopping (tested with fp32, sharded, and int8 + error feedback + Adam as
outer optimizer). No collective is re-issued at load.

Note [Non-finite syncs in local SGD]
------------------------------------
Every rank must skip the same outer updates, with no extra collective. Flat modes check the
averaged pseudo-gradient, identical on every rank. In the sharded modes each rank only sees its own
chunk of the average, so a rank whose local fast weights hold NaN/inf fills the whole send buffer
with NaN (a multiplication by a device scalar, 1 or NaN, from a probe of the fast weights: no host
read at launch; on CPU a fast weight whose fp32 sum overflows counts as non-finite): every chunk of the reduced result is then NaN on
every rank, and all ranks decide alike. The guard's unit is a bucket's result, but on a hit the
*whole step unit* restarts from its slow weights (every fragment: a NaN in one fragment reaches all
of them through the next forward pass) and ``host.on_nonfinite`` resets the unit's inner state.
A sum of finite values that overflows is not covered in the sharded modes.

Note [Timeouts]
---------------
Every collective of a sync is issued ``async_op=True`` and waited within ``timeout``
(``LocalSGDOptions(timeout=...)``; None waits as long as the process group allows, gloo's default
being 30 minutes). A peer that hangs, dies or skips the sync makes the wait raise
``TimeoutError`` naming the sync (fragment, param group), the ``step()`` call that launched it and
the ranks of the group; other failures become ``RuntimeError`` with the same context. How the
deadline is enforced is the backend's (:func:`lookahead_dist._backend.traits`): ``work.wait(timeout)``
on gloo; on NCCL a host poll of ``work.is_completed()`` (the quantised reduce: of the event after
its last stage) before anything reads the result, never ``wait(timeout)``, which there blocks the
host and aborts the communicators on expiry (and raises under TorchComms). Errors are told apart by
type and by the deadline's clock, not by their text. Without a timeout, ``wait()`` on NCCL only
orders the streams.

Note [Host reads at a sync]
---------------------------
A step that launches a fragment reads nothing on the host: the sharded modes multiply the send
buffer by :func:`~lookahead_dist._sync.finite_scale` of the local fast weights (a device scalar, 1
or NaN) instead of asking the host. A step that applies a fragment reads one flag, the non-finite
decision of all its buckets (``_decide``); a blocking sync, which applies each bucket as it arrives
to keep at most two stage buffers, reads one per bucket.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from .. import _backend, _comm, _sync
from .._buffers import POOL
from .._comm import CommStats, flat_view
from .._keys import (
    EF_OWNER_KEY,
    EF_RESIDUAL_KEY,
    INFLIGHT_DUE_KEY,
    INFLIGHT_KEY,
    K_KEY,
    OUTER_MOMENTUM_KEY,
    OUTER_STATE_PREFIX,
    OUTER_STEPS_KEY,
    SLOW_KEY,
    STEP_KEY,
)
from .._sync import local_tensor
from . import streaming
from ._outer import EagerOuter, OuterOptimizerProxy, outer_step_
from ._plan import UNDECIDED, Launched, Plan, PlanBuilder, Reduced, Unit, cut, zero_pads
from ._replicas import ReplicaSync, ranks_in
from ._wire import FlatWire, HierarchicalWire, ShardedWire, Wire
from .base import SyncHost, SyncStrategy
from .ft import FaultTolerantLocalSGD
from .options import DDPPolicy, InitMode, LocalSGDOptions, is_ddp  # noqa: F401 - DDPPolicy, InitMode: old home

__all__ = [
    "EF_OWNER_KEY",
    "EF_RESIDUAL_KEY",
    "INFLIGHT_DUE_KEY",
    "INFLIGHT_KEY",
    "OUTER_MOMENTUM_KEY",
    "OUTER_STATE_PREFIX",
    "OUTER_STEPS_KEY",
    "LocalSGD",
    "LocalSGDOptions",
    "make_local_sgd",
]


def make_local_sgd(local_sgd: bool | LocalSGDOptions, process_group: Any = None) -> LocalSGD:
    """The engine for ``Lookahead(..., local_sgd=..., process_group=...)``."""
    if isinstance(local_sgd, LocalSGDOptions):
        options = local_sgd
        if process_group is not None:
            if options.process_group is not None and options.process_group is not process_group:
                raise ValueError("Lookahead got a `process_group` and LocalSGDOptions with another "
                                 "process_group; give it in one place")
            options = dataclasses.replace(options, process_group=process_group)
    elif local_sgd is True or local_sgd is False:  # False with a process_group: the group asks for it
        options = LocalSGDOptions(process_group=process_group)
    else:
        raise TypeError(f"Lookahead `local_sgd` must be a bool or LocalSGDOptions, got {local_sgd!r}")
    if options.manager is not None:
        return FaultTolerantLocalSGD(options)  # type: ignore[return-value]
    return LocalSGD(options)


class LocalSGD(ReplicaSync, PlanBuilder, OuterOptimizerProxy, EagerOuter, SyncStrategy):
    """The communication and outer step of one Lookahead in local-SGD mode (see module notes).

    Built by ``Lookahead(..., local_sgd=True | LocalSGDOptions(...))``; reach it as
    ``opt.local_sgd`` (e.g. ``opt.local_sgd.stats``, a :class:`~lookahead_dist._comm.CommStats`).
    Streaming (fragments, delayed application) follows :mod:`lookahead_dist.sync.streaming`.
    """

    def __init__(self, options: LocalSGDOptions) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("Lookahead(local_sgd=...) needs torch.distributed to be initialised "
                               "(dist.init_process_group) before the optimizer is built")
        o = self.options = options
        self.group = o.process_group
        self.group_size = dist.get_world_size(self.group)
        self.intra = o.intra_group
        if self.intra is not None:
            shared = set(ranks_in(self.group)) & set(ranks_in(self.intra))
            if shared != {dist.get_rank()}:
                raise ValueError(
                    "LocalSGDOptions `intra_group` and `process_group` must meet in this rank only "
                    f"(one replica per group); they share ranks {sorted(shared)}"
                )
        self.sharded = o.sharded
        if o.sharded:
            self.wire: Wire = HierarchicalWire(self) if self.intra is not None else ShardedWire(self)
            self.shard_group = self.intra if self.intra is not None else self.group
            self.shard_size = dist.get_world_size(self.shard_group)
            self.shard_rank = dist.get_rank(self.shard_group)
        else:
            self.wire = FlatWire(self)
            self.shard_group, self.shard_size, self.shard_rank = None, 1, 0
        self.beta = o.outer_momentum
        self.nesterov = o.nesterov
        self.cap_bytes = int(o.bucket_cap_mb * 2**20)
        self.num_fragments = o.num_fragments
        self.delay = o.fragment_sync_delay
        self.merge_alpha = o.fragment_update_alpha
        self.timeout = o.timeout
        self.stats = CommStats()
        self._units: dict[torch.Tensor, Unit] = {}
        self._inflight: dict[torch.Tensor, streaming.InFlight] = {}
        self._buffers_aligned = False
        self._ddp_syncs = 0
        self._ddp_warned = False
        self._ddp_handle = None
        if o.module is not None and is_ddp(o.module):
            self._watch_ddp(o.module)
        # Sync traffic that overlaps the caller (fragments in flight, the quantised reduce) gets a
        # process group of its own, made collectively at construction (Note [Collective group
        # creation] in _backend.py): on NCCL its own communicator and stream.
        self.quant_bits = o.quant_bits
        self._qgroup = None
        self._frag_group = self.group
        self.eager_rule = o.eager_rule  # Note [Eager outer updates] in _outer.py
        self._eager: dict[torch.Tensor, dict[int, streaming.InFlight]] = {}
        if self.quant_bits is not None or self.delay > 0 or self.eager_rule is not None:
            own = _backend.dedicated_group(self.group)
            if ranks_in(own) == ranks_in(self.group):  # the same rank order: chunk r goes to the same rank
                self._frag_group = own
            if self.quant_bits is not None:
                self._qgroup = own
        self.quant_size = self.group_size
        self.quant_rank = dist.get_rank(self._qgroup if self._qgroup is not None else self.group)
        self._ef = self.quant_bits is not None and o.error_feedback
        # Plain sharded (eager only): a quantised reduce-scatter of progress (Note [Quantised sync])
        self._scatter_quant = self.quant_bits is not None and self.sharded and self.intra is None
        if self._scatter_quant and self.quant_rank != self.shard_rank:
            raise RuntimeError(
                f"local SGD: the quantised reduce-scatter's group numbers this rank {self.quant_rank} where the "
                f"shard group numbers it {self.shard_rank}; chunk r would reach the wrong owner")
        if o.fused_kernels:  # Note [Fused quantisation kernels]: compiled here, not inside the first sync
            from .. import _quant

            cuda = dist.get_backend(self._qgroup) == "nccl" and torch.cuda.is_available()
            _quant.warm_fused(self.quant_bits, dist.get_world_size(self._qgroup), o.quant_block_size, self._ef,
                           torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu")
        # outer_optimizer=: built over proxies that alias the slow weights at each outer step.
        self._proxies: dict[torch.Tensor, torch.Tensor] = {}
        self._outer_opt: torch.optim.Optimizer | None = None
        self._outer_spec: dict[str, Any] | None = None

    communicates = True
    # Pickling drops these (SyncStrategy.__getstate__): the groups, the DDP hook, the options that
    # hold groups and the module, and identity-keyed caches. The Lookahead flushes work in flight
    # into per-parameter state before it pickles its strategy.
    _unpicklable = ("group", "intra", "shard_group", "_qgroup", "_frag_group", "_ddp_handle", "options", "_units",
                    "_inflight", "_eager")

    def reset_cache(self) -> None:
        # Work in flight belongs to the state being replaced (load_state_dict): its collectives
        # finish on their own; a fragment due after a resume comes back from per-parameter state.
        self._units = {}
        self._inflight = {}
        self._eager = {}

    @property
    def mode(self) -> str:
        """The wire mode's name: ``"flat"``, ``"sharded"`` or ``"hier_sharded"`` (``self.wire``)."""
        return self.wire.name

    @property
    def outer_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer built by ``LocalSGDOptions(outer_optimizer=...)`` (for an LR scheduler), or None.

        Its parameters are placeholders that alias the slow weights while it steps (Note [Outer
        optimizer]); its per-parameter state is mirrored into the Lookahead state dict.
        """
        return self._outer_opt

    def in_flight(self) -> list[tuple[int, int]]:
        """``(fragment, steps until applied)`` of each fragment whose result is not applied yet."""
        return ([(r.fragment, r.due_in) for r in self._inflight.values()]
                + [(r.fragment, r.due_in) for per in self._eager.values() for r in per.values()])

    def pending(self) -> bool:
        """True while a launched collective has not completed (non-blocking check, for tests)."""
        return any(r.pending() for r in self._inflight.values()) or any(
            r.pending() for per in self._eager.values() for r in per.values())

    # -- per-parameter state -------------------------------------------------------------------
    def new_entry(self, p: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        """This rank's slow weight for ``p`` (a full copy, or sharded: its own 1-D chunk) and every
        other key the options need, allocated now so that state-dict templates made before the
        first sync (DCP) carry them: the outer momentum, the in-flight buffer and its due count,
        the error-feedback residuals, the outer optimizer's mirrored state."""
        src = local_tensor(p).detach()
        if self.sharded:
            src = flat_view(src).tensor_split(self.shard_size)[self.shard_rank]
        slow = src.to(dtype=dtype, copy=True)
        entry: dict[str, Any] = {SLOW_KEY: slow}
        if self.beta > 0:
            entry[OUTER_MOMENTUM_KEY] = torch.zeros_like(slow)
        if self.delay > 0:
            entry[INFLIGHT_KEY] = torch.zeros_like(slow)
            entry[INFLIGHT_DUE_KEY] = 0
        if self._ef:
            entry[EF_RESIDUAL_KEY] = torch.zeros(self._residual_shape(p), dtype=torch.float32, device=slow.device)
            entry[EF_OWNER_KEY] = torch.zeros(self._owner_numel(slow.numel()), dtype=torch.float32,
                                              device=slow.device)
        if self.eager_rule is not None:
            entry.update(self._eager_entry(p, slow))
        if self.options.outer_optimizer is not None:
            entry.update(self._outer_placeholders(slow))
            entry[OUTER_STEPS_KEY] = 0
        return entry

    def _owner_numel(self, numel: int) -> int:
        if self._scatter_quant:  # the owner's chunk stays fp32: nothing to requantise
            return 0
        return _comm.chunk_sizes(numel, self.quant_size)[self.quant_rank]

    def _residual_shape(self, p: torch.Tensor) -> torch.Size:
        """The sender's error-feedback residual: shaped like the slow weight, or, plain sharded,
        like the whole parameter (this rank sends its whole progress)."""
        return local_tensor(p).shape if self._scatter_quant else self.expected_shape(p)

    def expected_shape(self, p: torch.Tensor) -> torch.Size:
        local = local_tensor(p)
        if not self.sharded:
            return local.shape
        return torch.Size([_comm.chunk_sizes(local.numel(), self.shard_size)[self.shard_rank]])

    def restore_entry(self, p: torch.Tensor, saved: dict[str, Any], dtype: torch.dtype,
                      name: str) -> dict[str, Any]:
        out = super().restore_entry(p, saved, dtype, name)
        shape = self.expected_shape(p)
        device = local_tensor(p).device
        if self.beta > 0 and OUTER_MOMENTUM_KEY in saved:  # the slow weight's dtype
            out[OUTER_MOMENTUM_KEY] = self._restore_tensor(p, saved[OUTER_MOMENTUM_KEY], dtype, name,
                                                           OUTER_MOMENTUM_KEY)
        if self.delay > 0:
            if INFLIGHT_KEY in saved:
                out[INFLIGHT_KEY] = self._restore_tensor(p, saved[INFLIGHT_KEY], dtype, name, INFLIGHT_KEY)
            else:
                out[INFLIGHT_KEY] = torch.zeros(shape, dtype=dtype, device=device)
            out[INFLIGHT_DUE_KEY] = int(saved.get(INFLIGHT_DUE_KEY, 0))
        if self._ef:
            rshape = self._residual_shape(p)
            out[EF_RESIDUAL_KEY] = (
                self._restore_tensor(p, saved[EF_RESIDUAL_KEY], torch.float32, name, EF_RESIDUAL_KEY, shape=rshape)
                if EF_RESIDUAL_KEY in saved else torch.zeros(rshape, dtype=torch.float32, device=device))
            owner = torch.Size([self._owner_numel(shape.numel())])
            value = saved.get(EF_OWNER_KEY)
            if value is None:
                out[EF_OWNER_KEY] = torch.zeros(owner, dtype=torch.float32, device=device)
            elif not isinstance(value, torch.Tensor) or value.shape != owner:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"Lookahead checkpoint: {name} `{EF_OWNER_KEY}` is {got} where this rank's chunk of the "
                    f"quantised reduce needs {tuple(owner)}; was it saved with another world size, "
                    "sharding or comm_dtype?")
            else:
                out[EF_OWNER_KEY] = value.to(device=device, dtype=torch.float32, copy=True)
        if self.eager_rule is not None:
            out.update(self._eager_restore(p, saved, dtype, name, out[SLOW_KEY]))
        if self.options.outer_optimizer is not None:
            out.update(self._restore_outer(p, saved, name))
        return out

    # -- fragments and buckets -----------------------------------------------------------------
    def _unit(self, host: SyncHost, params: list[torch.Tensor]) -> Unit:
        unit = self._units.get(params[0])
        if unit is not None and unit.n == len(params):
            if unit.params is params:
                return unit
            # DeepSpeed ZeRO-3 hands every step() a new list holding the same sub-group partition:
            # the same tensors, so the same plans. Rebuilding them would be per-parameter Python
            # work on every step (this runs at every step, not only at syncs).
            if all(map(operator.is_, unit.params, params)):
                unit.params = params
                return unit
        index = next((i for i, g in enumerate(host.param_groups) if g["params"] is params), -1)
        where = f"param group {index}" if index >= 0 else "a param-group subset"
        slow = [host.state_entry(p)[SLOW_KEY] for p in params]
        F = self.num_fragments
        numels = [local_tensor(p).numel() for p in params]
        if self.options.fragments is not None:
            names = self._param_names()
            split = streaming.fragments_from_prefixes([names.get(id(p)) for p in params],
                                                      self.options.fragments, where)
            pieces = [[(i, 0, numels[i]) for i in idx] for idx in split]
        else:  # Note [Fragments]: large tensors (a ZeRO partition) are split; not under a user outer optimizer
            block = None if self.options.outer_optimizer is not None else self.options.quant_block_size
            pieces = streaming.split_ranges(numels, [s.element_size() for s in slow], F, block)
        labels = [f"param_groups[{index}][{i}]" for i in range(len(params))]
        fragments = [self._build_plans(host, [(params[i], a, b) for i, a, b in fr],
                                       [labels[i] if (a, b) == (0, numels[i]) else f"{labels[i]}[{a}:{b}]"
                                        for i, a, b in fr])
                     for fr in pieces]
        frag_params = [list({id(params[i]): params[i] for i, _, _ in fr}.values()) for fr in pieces]
        unit = Unit(params, len(params), index, fragments, frag_params)
        self._units[params[0]] = unit
        if self.delay > 0 and params[0] not in self._inflight:
            self._resume_inflight(host, unit)
        if self.eager_rule is not None and params[0] not in self._eager:
            self._resume_eager(host, unit)
        return unit


    # -- the schedule (Note [Streaming schedule] in streaming.py) ------------------------------
    @torch.no_grad()
    def advance(self, host: SyncHost, params: list[torch.Tensor], n: int, k: int, alpha: float) -> None:
        """After each counted step of a unit: apply a fragment that is due, launch the one whose turn it is."""
        unit = self._unit(host, params)
        streaming.check_schedule(k, self.num_fragments, self.delay, f"param group {unit.index}")
        if self.eager_rule is not None:  # Note [Eager outer updates] in _outer.py
            self._eager_advance(host, unit, n, k, alpha)
            return
        rec = self._inflight.get(params[0])
        if rec is not None:
            rec.due_in -= 1
            if rec.due_in <= 0:
                del self._inflight[params[0]]
                self._complete(host, unit, rec, alpha)
        f = streaming.launch_fragment(n, k, self.num_fragments)
        if f is None:
            return
        describe = self._describe(host, unit, f, n, k)
        if self.delay == 0:
            self._sync_now(host, unit, [f], alpha, describe)
        else:
            self._inflight[params[0]] = self._launch_fragment(host, unit, f, describe)

    @torch.no_grad()
    def sync(self, host: SyncHost, params: list[torch.Tensor], alpha: float) -> None:
        """Sync the whole unit now (``sync_now()``): a fragment in flight is applied first, then
        every fragment is averaged and stepped, blocking."""
        unit = self._unit(host, params)
        if self.eager_rule is not None:
            self._eager_sync(host, unit, alpha)
            return
        rec = self._inflight.pop(params[0], None)
        if rec is not None:
            self._complete(host, unit, rec, alpha)
        self._sync_now(host, unit, range(len(unit.fragments)), alpha,
                       self._describe(host, unit, None, None, None))

    def _describe(self, host: SyncHost, unit: Unit, f: int | None, n: int | None, k: int | None) -> str:
        what = (f"the sync of param group {unit.index}" if f is None else
                f"the sync of fragment {f} of {self.num_fragments} of param group {unit.index}")
        step = getattr(host, "step_calls", None)
        when = f" at step() call {step}" if step is not None else ""
        if n is not None:
            when += f" (count {n} of k={k})"
        return f"{what}{when}, on the process group of ranks {ranks_in(self.group)}"

    def _sync_now(self, host: SyncHost, unit: Unit, fragments: Iterable[int], alpha: float, describe: str) -> None:
        """Blocking: launch, wait and apply the buckets of ``fragments`` (two buckets in flight)."""
        for f in fragments:
            self._fragment_start(host, unit, f, describe)
            ok: list[torch.Tensor] = []
            bad: list[tuple[list[torch.Tensor], str]] = []
            inflight: deque = deque()
            for plan in unit.fragments[f]:
                if len(inflight) == 2:  # double buffering: pack bucket j+2 only after j is applied
                    item = inflight.popleft()
                    self._apply(host, self._reduce(host, item, describe), alpha, describe, ok, bad)
                    POOL.give(*item.pooled)
                inflight.append(self._launch(host, plan, describe))
            while inflight:
                item = inflight.popleft()
                self._apply(host, self._reduce(host, item, describe), alpha, describe, ok, bad)
                POOL.give(*item.pooled)
            self._after(host, unit, ok, bad, alpha, describe)

    def _fragment_start(self, host: SyncHost, unit: Unit, f: int, describe: str) -> None:
        """Once per cycle, with fragment 0: the DDP check and the (blocking) buffer average."""
        if f != 0:
            return
        self._check_ddp()
        groups = host.param_groups
        if groups and unit.params is groups[0]["params"]:
            self._average_buffers(describe)

    def _launch_fragment(self, host: SyncHost, unit: Unit, f: int, describe: str) -> streaming.InFlight:
        self._fragment_start(host, unit, f, describe)
        launched = [self._launch(host, plan, describe) for plan in unit.fragments[f]]
        return streaming.InFlight(fragment=f, due_in=self.delay, launched=launched, describe=describe,
                                  works=[item.work for item in launched])

    def _complete(self, host: SyncHost, unit: Unit, rec: streaming.InFlight, alpha: float) -> None:
        """Wait for a fragment launched ``tau`` steps ago and apply it."""
        if rec.reduced is None:
            rec.reduced = [self._reduce(host, item, rec.describe) for item in rec.launched]
        self._decide(rec.reduced)  # the fragment's one host read
        ok: list[torch.Tensor] = []
        bad: list[tuple[list[torch.Tensor], str]] = []
        for red in rec.reduced:
            self._apply(host, red, alpha, rec.describe, ok, bad)
            if rec.parked:
                for p in red.plan.params:
                    host.state_entry(p)[INFLIGHT_DUE_KEY] = 0
        for item in rec.launched:  # applied: the buffers are free again (Note [Buffer reuse])
            POOL.give(*item.pooled)
        self._after(host, unit, ok, bad, alpha, rec.describe)

    def _after(self, host: SyncHost, unit: Unit, ok: list[torch.Tensor], bad: list, alpha: float,
               describe: str) -> None:
        if not bad:
            if ok:
                host.on_synced(ok, alpha)
            return
        # Note [Non-finite syncs in local SGD]: the whole unit restarts from its slow weights.
        for plans in unit.fragments:
            for plan in plans:
                self.wire.reset(plan, describe)
        host.on_nonfinite(unit.params, bad[0][1])

    # -- checkpoints in flight -----------------------------------------------------------------
    @torch.no_grad()
    def flush(self, host: SyncHost) -> None:
        """Wait for the collectives in flight and park their results in per-parameter state, *without*
        applying them: they are applied at their due step, also after a resume (Note [Checkpoints in
        flight])."""
        for rec in self._inflight.values():
            if rec.reduced is None:
                rec.reduced = [self._reduce(host, item, rec.describe) for item in rec.launched]
            self._decide(rec.reduced)
            for red in rec.reduced:
                for i, p in enumerate(red.plan.params):
                    entry = host.state_entry(p)
                    if not rec.parked:
                        cut(entry[INFLIGHT_KEY], red.plan.sl[i]).copy_(red.d[i])
                        if red.bad is not None:
                            cut(entry[INFLIGHT_KEY], red.plan.sl[i]).fill_(math.nan)
                    entry[INFLIGHT_DUE_KEY] = rec.due_in
            rec.parked = True
        self._eager_flush(host)

    def _resume_inflight(self, host: SyncHost, unit: Unit) -> None:
        """Rebuild the fragment in flight at a checkpoint from per-parameter state (after a load)."""
        found: list[tuple[int, int]] = []
        for f, plans in enumerate(unit.fragments):
            # A tensor split over fragments (plan.sl) carries the due count of whichever of its
            # fragments is in flight: the fragment's whole tensors decide, if it has any.
            whole = {host.state_entry(p).get(INFLIGHT_DUE_KEY, 0)
                     for plan in plans for p, sl in zip(plan.params, plan.sl) if sl is None}
            split = {host.state_entry(p).get(INFLIGHT_DUE_KEY, 0)
                     for plan in plans for p, sl in zip(plan.params, plan.sl) if sl is not None}
            due = whole or split
            if due == {0} or not due:
                continue
            if len(due) != 1 or (whole and split and split != whole):
                raise ValueError(
                    f"Lookahead checkpoint: the tensors of fragment {f} of param group {unit.index} disagree on "
                    f"`{INFLIGHT_DUE_KEY}` ({sorted(whole | split)}); the checkpoint is inconsistent")
            found.append((f, due.pop()))
        if not found:
            return
        f, due = found[0]
        if len(found) > 1:  # a tensor split over fragments carries the due count of the one in flight
            f = self._launched_fragment(host, unit, due, found)
        reduced = []
        for plan in unit.fragments[f]:
            d = [cut(host.state_entry(p)[INFLIGHT_KEY], sl) for p, sl in zip(plan.params, plan.sl)]
            reduced.append(Reduced(plan, d, bad=_sync.first_nonfinite(d)))
        self._inflight[unit.params[0]] = streaming.InFlight(
            fragment=f, due_in=due, launched=[], reduced=reduced, parked=True,
            describe=self._describe(host, unit, f, None, None) + " (resumed from a checkpoint)")

    def _launched_fragment(self, host: SyncHost, unit: Unit, due: int, found: list[tuple[int, int]]) -> int:
        """Which of the fragments ``found`` (all sharing tensors split over fragments) was in flight:
        the one launched ``tau - due`` counted steps before the unit's saved count."""
        group = host.param_groups[unit.index] if unit.index >= 0 else {}
        k = group.get(K_KEY, getattr(host, "defaults", {}).get(K_KEY))
        if not isinstance(k, int) or k < 1:
            return found[0][0]
        n = host.state_entry(unit.params[0]).get(STEP_KEY, 0) or k
        launched = (n - (self.delay - due) - 1) % k + 1
        f = streaming.launch_fragment(launched, k, self.num_fragments)
        if f not in [g for g, _ in found]:
            raise ValueError(
                f"Lookahead checkpoint: param group {unit.index} has `{INFLIGHT_DUE_KEY}`={due} at count {n} of k={k}, "
                f"which no fragment launched; the checkpoint is inconsistent")
        return f

    # -- one bucket: launch, reduce, apply -----------------------------------------------------
    def _traits(self, group: Any, device: torch.device) -> _backend.BackendTraits:
        return _backend.traits(group, device)

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        cd = self.options.comm_dtype
        return t if cd is None or isinstance(cd, str) or cd == t.dtype else t.to(cd)

    def _launch(self, host: SyncHost, plan: Plan, describe: str) -> Launched:
        return self.wire.launch(host, plan)

    def _launch_quant(self, host: SyncHost, plan: Plan, buf: torch.Tensor | None, views: list[torch.Tensor] | None,
                      poison: torch.Tensor | None = None) -> Launched:
        """Note [Quantised sync]: the progress ``views`` into the block layout, launch the quantised
        mean. ``views=None`` (the flat wire, fp32 slow weights): the progress ``fast - slow`` is
        computed straight into the block layout (one pass over the fragment fewer), and ``buf`` and
        ``views`` (per-tensor ``d``) are made only on demand (:meth:`_stage_d`)."""
        from .. import _quant

        ql = plan.quant
        qstage = zero_pads(ql, POOL.take(ql.numel, torch.float32, plan.device))  # Note [Buffer reuse]
        if views is None:
            qviews = ql.chunk_views(qstage)
            torch._foreach_copy_(qviews, ql.split_each(plan.fast))
            torch._foreach_sub_(qviews, ql.split_each(plan.slow))  # progress theta_i - phi
        else:
            torch._foreach_copy_(ql.chunk_views(qstage), ql.split_each(views))
        if poison is not None:  # every block, so that every owner sees it
            qstage.mul_(poison)
        residual = owner = None
        sparse = self.options.topk_fraction is not None
        if self._ef:
            entries = [host.state_entry(p) for p in plan.params]
            residual = zero_pads(ql, POOL.take(ql.numel, torch.float32, plan.device))
            res_views = ql.split_each([cut(e[EF_RESIDUAL_KEY], sl) for e, sl in zip(entries, plan.sl)])
            torch._foreach_copy_(ql.chunk_views(residual), res_views)
            if not sparse:  # the sparse exchange does not requantise: its owner residual stays zero
                owner = POOL.zeros(ql.segment, torch.float32, plan.device)
                torch._foreach_copy_(ql.own_views(owner, self.quant_rank),
                                     [cut(e[EF_OWNER_KEY], sl) for e, sl in zip(entries, plan.osl)])
        if sparse:  # Note [Sparse outer gradients] in _sparse.py: encoded here, all-gathered
            from .. import _sparse

            work = _sparse.sparse_all_reduce_async(
                qstage, self._qgroup, fraction=self.options.topk_fraction, bits=self.quant_bits,
                residual=residual, out=qstage, stats=self.stats, label="params")
        else:
            work = _quant.quantized_all_reduce_async(
                qstage, self._qgroup, bits=self.quant_bits, block_size=self.options.quant_block_size,
                average=True, residual=residual, owner_residual=owner, out=qstage, stats=self.stats,
                label="params", fused=self.options.fused_kernels)
        if residual is not None:  # updated at launch (the send is quantised on this thread)
            torch._foreach_copy_(res_views, ql.chunk_views(residual))
            POOL.give(residual)
        return Launched(plan, work, buf, buf, views, qstage=qstage, owner_res=owner, group=self._qgroup,
                        pooled=[buf, qstage, owner])

    def _reduce(self, host: SyncHost, item: Launched, describe: str) -> Reduced:
        """Wait for one bucket's collective; the averaged pseudo-gradient ``d = phi - mean theta``."""
        plan, buf = item.plan, item.buf
        start = time.perf_counter()
        streaming.wait_work(item.work, self.timeout, describe, self._traits(item.group, plan.device))
        self.stats.record_wait(time.perf_counter() - start)  # the exposed part (CommStats.wait_seconds)
        if item.qstage is not None:  # already the mean (of progress): back into the stage layout
            ql = plan.quant
            if item.owner_res is not None:
                torch._foreach_copy_([cut(host.state_entry(p)[EF_OWNER_KEY], sl) for p, sl in zip(plan.params, plan.osl)],
                                     ql.own_views(item.owner_res, self.quant_rank))
            if buf is None:  # launched from the block layout (_launch_quant): d per tensor only on demand
                return Reduced(plan, None, probe=[item.qstage], mean=ql.chunk_views(item.qstage),
                               make_d=lambda: self._stage_d(item))
            torch._foreach_copy_(ql.split_each(item.views), ql.chunk_views(item.qstage))
            buf.neg_()
        else:
            if item.wire is not buf:
                buf.copy_(item.wire)
            buf.mul_(-1.0 / self.group_size)
        return self.wire.reduced(item, buf)

    def _stage_d(self, item: Launched) -> list[torch.Tensor]:
        """``d = -mean`` per tensor, from the block layout of a bucket launched from it (Reduced.d)."""
        plan, ql = item.plan, item.plan.quant
        buf = item.buf = item.wire = POOL.take(plan.layout.numel, plan.stage_dtype, plan.device)
        item.views = list(buf.split(plan.layout.segment_sizes))
        item.pooled.append(buf)
        torch._foreach_copy_(ql.split_each(item.views), ql.chunk_views(item.qstage))
        buf.neg_()
        return item.views

    def _decide(self, reds: list[Reduced]) -> None:
        """Set ``bad`` of every undecided bucket: one host read when all are finite (Note [Host
        syncs] in lookahead.py: the apply's one read, the non-finite decision); a few more to name
        the culprits otherwise."""
        todo = [r for r in reds if r.bad is UNDECIDED]
        if not todo:
            return
        hit = _sync.first_nonfinite_of([r.probe for r in todo])
        for r in todo:
            if hit is None or _sync.first_nonfinite(r.probe) is None:
                r.bad = None
            else:
                # a bucket that arrived in the block layout: its per-tensor d names the culprit
                loc = r.d if r.make_d is not None else r.locate
                r.bad = (_sync.first_nonfinite(loc) if loc is not None else None) or 0

    def _apply(self, host: SyncHost, red: Reduced, alpha: float, describe: str, ok: list, bad: list) -> None:
        """Outer step on the owned slow weights, then the merge into the fast weights (or, on NaN/inf,
        fast <- slow and no outer step)."""
        plan = red.plan
        self._decide([red])
        if red.bad is not None:
            if self._ef:  # a residual that absorbed a NaN would poison every later send
                for p in plan.params:
                    e = host.state_entry(p)
                    e[EF_RESIDUAL_KEY].zero_()
                    e[EF_OWNER_KEY].zero_()
            what = self.wire.nonfinite_what(plan, red)
            bad.append((plan.params, f"{what}; {describe}"))
            return
        if self.options.outer_optimizer is not None:
            self._outer_user(host, plan, red.d)
        elif red.d_ is None:
            self._outer_blocks(plan, red.mean, alpha)
        else:
            self._outer(plan, red.d, alpha)
        self.wire.restore(plan, red, describe)
        ok += plan.report

    def _merge(self, fast: list[torch.Tensor], new: list[torch.Tensor], alpha_local: float | None = None) -> None:
        """``fast <- a * fast + (1 - a) * new``, ``a = fragment_update_alpha`` (a copy when a = 0)."""
        a = self.merge_alpha if alpha_local is None else alpha_local
        if not fast:
            return
        if a == 0.0:
            torch._foreach_copy_(fast, new)
            return
        if new[0].dtype != fast[0].dtype:
            new = [t.to(fast[0].dtype) for t in new]
        torch._foreach_lerp_(fast, new, 1.0 - a)

    def _outer(self, plan: Plan, d: list[torch.Tensor], alpha: float) -> None:
        """Note [The outer step], in place on the owned slow weights; ``d`` may be overwritten."""
        outer_step_(plan.slow, plan.mom, d, alpha, self.beta, self.nesterov)

    def _outer_blocks(self, plan: Plan, mean: list[torch.Tensor], alpha: float) -> None:
        """:meth:`_outer` from the mean progress in the block layout (``mean``, overwritten), the
        slow weights and momenta split alike: the same arithmetic element by element, without
        the copy to per-tensor views. Without momentum ``slow + alpha * mean`` is exactly
        ``slow - alpha * d`` (``d = -mean``; a product's sign is exact), so not even the negation."""
        ql = plan.quant
        slow = ql.split_each(plan.slow)
        if self.beta == 0.0:
            torch._foreach_add_(slow, mean, alpha=alpha)
            return
        torch._foreach_neg_(mean)
        outer_step_(slow, ql.split_each(plan.mom), mean, alpha, self.beta, self.nesterov)

    # -- evaluation on the slow weights --------------------------------------------------------
    @torch.no_grad()
    def slow_pairs(self, host: SyncHost) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(fast views, full slow values) for ``use_slow_weights``; gathers the chunks when sharded.

        A collective when sharded: every rank of the shard group must call it together.
        """
        if not self.sharded:
            return super().slow_pairs(host)
        fast: list[torch.Tensor] = []
        slow: list[torch.Tensor] = []
        for group in host.param_groups:
            params = group["params"]
            if not params or any(host.slow_weight(p) is None for p in params):
                continue
            for plans in self._unit(host, params).fragments:
                for plan in plans:
                    lay = plan.layout
                    seg = torch.zeros(lay.segment, dtype=plan.stage_dtype, device=plan.device)
                    torch._foreach_copy_(lay.own_views(seg, self.shard_rank), plan.slow)
                    full = torch.empty(lay.numel, dtype=plan.stage_dtype, device=plan.device)
                    work = _comm.all_gather(full, seg, self.shard_group, self.stats, "slow_weights", async_op=True)
                    streaming.wait_work(work, self.timeout, "the slow-weight gather of use_slow_weights()",
                                        self._traits(self.shard_group, plan.device))
                    fast += plan.fast_chunks
                    slow += lay.chunk_views(full)
        return fast, slow
