r"""Local-SGD mode: the Lookahead sync is the only communication, once every k steps.

Each rank runs its inner optimizer on its own data with *no* per-step gradient all-reduce (a
plain module, or DDP inside ``no_sync()``). Every k-th step the fast weights are averaged over the
process group and the slow weights take an outer step towards the average; then every rank
restarts from the slow weights. See ``docs/local-sgd.md`` for when this pays off.

Note [The outer step]
---------------------
With N ranks holding fast weights :math:`\theta^{(i)}` after k inner steps from the shared slow
weights :math:`\phi`, the sync computes the *pseudo-gradient* (the average progress, negated)

.. math::
    d = \phi - \frac{1}{N}\sum_i \theta^{(i)}

and an outer SGD step with learning rate :math:`\alpha` and momentum :math:`\beta` (state
:math:`u`, zero at first):

.. math::
    \begin{aligned}
        u &\leftarrow \beta u + d \\
        \phi &\leftarrow \phi - \alpha\,(d + \beta u) \quad &\text{(nesterov=True)} \\
        \phi &\leftarrow \phi - \alpha\,u \quad &\text{(nesterov=False)} \\
        \theta^{(i)} &\leftarrow \phi \quad &\text{(every rank)}
    \end{aligned}

:math:`\beta = 0` (the default) is Lookahead's own step, :math:`\phi \leftarrow \phi +
\alpha(\bar\theta - \phi)`; with :math:`\alpha = 1` as well it is periodic model averaging
(local SGD). :math:`\beta > 0` is SlowMo's slow momentum (without its division by the inner LR:
fold that into :math:`\alpha`), and ``nesterov=True`` is the DiLoCo outer optimizer (typically
:math:`\alpha = 0.7, \beta = 0.9`). Both are exactly ``torch.optim.SGD(lr=alpha, momentum=beta,
nesterov=...)`` applied to :math:`\phi` with gradient :math:`d`.

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

Note [Same starting weights]
----------------------------
Ranks that start from different weights average into a meaningless point at the first sync.
``init="broadcast"`` (default) copies the first rank's parameters and buffers to the others at
construction (over ``process_group``, then ``intra_group``), before the first forward pass,
as DDP does; ``init="check"`` compares fingerprints instead and raises ``ValueError`` naming
the ranks that differ; ``init="none"`` trusts the caller. Either way the parameter shapes are
checked first, so a mismatch is an error rather than a hang. Parameters added later with
``add_param_group`` are aligned when added. Resuming *mid-cycle* (fast weights legitimately
differ per rank): build the optimizer first, then load each rank's model and optimizer state,
or pass ``init="none"``.

Note [Buffers]
--------------
The optimizer sees parameters only, so buffers are declared: ``module=model`` (its buffers are
re-read at each sync, so ``model.to(...)`` is fine) or ``buffers=[...]``. Floating-point buffers
(BatchNorm running statistics) are averaged at the sync of the first param group; integer
buffers (``num_batches_tracked``) advance identically on every rank and are left alone. They are
plain averages: no outer step, no slow copy.

Note [DDP still all-reducing]
-----------------------------
A DDP module whose forward runs outside ``no_sync()`` all-reduces gradients every step, so the
mode would save nothing. When ``module`` is such a DDP (over ranks of ``process_group``; DDP
inside an ``intra_group`` is the hierarchical set-up and is fine), a forward pre-hook counts the
forwards that will synchronise, and the next sync emits a ``UserWarning`` (``on_ddp_sync="warn"``,
once) or raises ``RuntimeError`` (``"raise"``). Cheaper still: train the plain module.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from .. import _comm
from .._comm import CommStats, ShardLayout, flat_view
from .._keys import SLOW_KEY
from .._sync import local_tensor
from .base import SyncHost, SyncStrategy

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["LocalSGDOptions", "LocalSGD", "OUTER_MOMENTUM_KEY", "make_local_sgd"]

#: Per-parameter state key of the outer momentum (shaped like the slow weight; only when
#: ``outer_momentum > 0``).
OUTER_MOMENTUM_KEY = "lookahead_outer_momentum"

InitMode = Literal["broadcast", "check", "none"]
DDPPolicy = Literal["warn", "raise"]
_COMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class LocalSGDOptions:
    """Settings of the local-SGD mode; every field is checked at construction.

    Args:
        process_group: the ranks whose fast weights are averaged (default: the world).
        outer_momentum: beta in [0, 1) of Note [The outer step]; 0 = Lookahead (default).
        nesterov: Nesterov outer momentum (DiLoCo); needs ``outer_momentum > 0``.
        sharded: keep 1/N of the slow weights and outer momenta per rank (Note [What goes on the wire]).
        comm_dtype: dtype of the pseudo-gradient on the wire (``torch.bfloat16``/``float16``);
            None sends the slow weights' dtype. Not with ``sharded=True`` unless ``intra_group`` is set.
        module: the trained module (or its DDP wrapper): its buffers are averaged at each sync,
            and a DDP wrapper is watched for per-step gradient all-reduces.
        buffers: explicit buffers to average instead of ``module``'s.
        intra_group: hierarchical mode: this rank's group of identical replicas (DDP inside).
        init: ``"broadcast"`` | ``"check"`` | ``"none"``: Note [Same starting weights].
        on_ddp_sync: ``"warn"`` | ``"raise"``: Note [DDP still all-reducing].
        bucket_cap_mb: largest flat communication bucket, in MiB (a larger tensor gets its own).
        manager: a ``torchft.Manager``: the sync goes through it and survives lost replica groups
            (:mod:`lookahead_dist.sync.ft`, ``docs/fault-tolerance.md``; extra ``[ft]``).
    """

    process_group: dist.ProcessGroup | None = None
    outer_momentum: float = 0.0
    nesterov: bool = False
    sharded: bool = False
    comm_dtype: torch.dtype | None = None
    module: torch.nn.Module | None = None
    buffers: Iterable[torch.Tensor] | None = None
    intra_group: dist.ProcessGroup | None = None
    init: InitMode = "broadcast"
    on_ddp_sync: DDPPolicy = "warn"
    bucket_cap_mb: float = 25.0
    manager: Any = None
    _buffers: list[torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        beta = self.outer_momentum
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise TypeError(f"LocalSGDOptions `outer_momentum` must be a float in [0, 1), got {beta!r}")
        if math.isnan(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"LocalSGDOptions `outer_momentum` must be in [0, 1), got {beta}")
        self.outer_momentum = float(beta)
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"LocalSGDOptions `nesterov` must be a bool, got {self.nesterov!r}")
        if self.nesterov and self.outer_momentum == 0.0:
            raise ValueError("LocalSGDOptions `nesterov=True` needs `outer_momentum` > 0, got 0.0")
        if not isinstance(self.sharded, bool):
            raise TypeError(f"LocalSGDOptions `sharded` must be a bool, got {self.sharded!r}")
        if self.comm_dtype is not None and self.comm_dtype not in _COMM_DTYPES:
            raise ValueError(
                f"LocalSGDOptions `comm_dtype` must be None or one of {_COMM_DTYPES}, got {self.comm_dtype!r}")
        if self.sharded and self.intra_group is None and self.comm_dtype not in (None, torch.float32):
            raise ValueError(
                f"LocalSGDOptions `comm_dtype={self.comm_dtype}` needs the full slow weights on each rank to "
                "send progress; with `sharded=True` the fast weights themselves are reduce-scattered. Use "
                "sharded=False, or an intra_group (hierarchical sharding sends progress)"
            )
        if self.init not in ("broadcast", "check", "none"):
            raise ValueError(f"LocalSGDOptions `init` must be 'broadcast', 'check' or 'none', got {self.init!r}")
        if self.on_ddp_sync not in ("warn", "raise"):
            raise ValueError(f"LocalSGDOptions `on_ddp_sync` must be 'warn' or 'raise', got {self.on_ddp_sync!r}")
        cap = self.bucket_cap_mb
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0 or math.isinf(cap):
            raise ValueError(f"LocalSGDOptions `bucket_cap_mb` must be a finite number > 0, got {cap!r}")
        if self.module is not None and not isinstance(self.module, torch.nn.Module):
            raise TypeError(f"LocalSGDOptions `module` must be a torch.nn.Module, got {type(self.module).__name__}")
        if self.buffers is not None:
            bufs = list(self.buffers)
            bad = [type(b).__name__ for b in bufs if not isinstance(b, torch.Tensor)]
            if bad:
                raise TypeError(f"LocalSGDOptions `buffers` must hold tensors, got {bad[:3]}")
            # An iterator (module.buffers()) would be spent after one read: keep the list.
            self.buffers = self._buffers = bufs
        if self.manager is not None:
            from .ft import check_options

            check_options(self)
        for name in ("process_group", "intra_group"):
            pg = getattr(self, name)
            if pg is not None and not isinstance(pg, dist.ProcessGroup):
                raise TypeError(f"LocalSGDOptions `{name}` must be a torch.distributed.ProcessGroup or None, "
                                f"got {type(pg).__name__}")

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh, across: str | int = 0, within: str | int | None = None,
                  **kwargs: Any) -> LocalSGDOptions:
        """Options for a 2-D mesh: local SGD across dimension ``across``; ``within`` is the
        dimension of identical replicas (DDP inside a node), or None for FSDP2/HSDP inside."""
        if mesh.ndim not in (1, 2):
            raise ValueError(f"LocalSGDOptions.from_mesh needs a 1-D or 2-D DeviceMesh, got {mesh.ndim}-D")
        intra = None if within is None else mesh.get_group(within)
        return cls(process_group=mesh.get_group(across), intra_group=intra, **kwargs)

    def buffer_list(self) -> list[torch.Tensor]:
        if self._buffers is not None:
            return self._buffers
        if self.module is None:
            return []
        module = getattr(self.module, "module", self.module) if _is_ddp(self.module) else self.module
        return list(module.buffers())


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
        from .ft import FaultTolerantLocalSGD

        return FaultTolerantLocalSGD(options)  # type: ignore[return-value]
    return LocalSGD(options)


def _is_ddp(module: Any) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(module, DistributedDataParallel)


def _ranks(group: dist.ProcessGroup | None) -> list[int]:
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


@dataclass
class _Plan:
    """One flat communication bucket of a step unit; built once, reused at every sync."""

    layout: ShardLayout
    fast: list[torch.Tensor]         # flat views of the local fast tensors
    fast_chunks: list[torch.Tensor]  # [chunk r of fast i for r, i] (== fast when unsharded)
    fast_own: list[torch.Tensor]     # this rank's chunk of each fast tensor
    slow: list[torch.Tensor]         # flat views of the owned slow weights
    mom: list[torch.Tensor]          # flat views of the owned outer momenta (empty when beta = 0)
    stage_dtype: torch.dtype         # the slow weights' dtype: the update arithmetic's
    fast_dtype: torch.dtype
    device: torch.device


class LocalSGD(SyncStrategy):
    """The communication and outer step of one Lookahead in local-SGD mode (see module notes).

    Built by ``Lookahead(..., local_sgd=True | LocalSGDOptions(...))``; reach it as
    ``opt.local_sgd`` (e.g. ``opt.local_sgd.stats``, a :class:`~lookahead_dist._comm.CommStats`).
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
            shared = set(_ranks(self.group)) & set(_ranks(self.intra))
            if shared != {dist.get_rank()}:
                raise ValueError(
                    "LocalSGDOptions `intra_group` and `process_group` must meet in this rank only "
                    f"(one replica per group); they share ranks {sorted(shared)}"
                )
        self.sharded = o.sharded
        if o.sharded:
            self.mode = "hier_sharded" if self.intra is not None else "sharded"
            self.shard_group = self.intra if self.intra is not None else self.group
            self.shard_size = dist.get_world_size(self.shard_group)
            self.shard_rank = dist.get_rank(self.shard_group)
        else:
            self.mode = "flat"
            self.shard_group, self.shard_size, self.shard_rank = None, 1, 0
        self.beta = o.outer_momentum
        self.nesterov = o.nesterov
        self.cap_bytes = int(o.bucket_cap_mb * 2**20)
        self.stats = CommStats()
        self._plans: dict[torch.Tensor, tuple[list, int, list[_Plan]]] = {}
        self._buffers_aligned = False
        self._ddp_syncs = 0
        self._ddp_warned = False
        self._ddp_handle = None
        if o.module is not None and _is_ddp(o.module):
            self._watch_ddp(o.module)
        self.state_keys = (OUTER_MOMENTUM_KEY,) if self.beta > 0 else ()

    communicates = True

    def close(self) -> None:
        """Remove the forward pre-hook that watches a DDP module (``module=`` a DDP)."""
        if self._ddp_handle is not None:
            self._ddp_handle.remove()
            self._ddp_handle = None

    def reset_cache(self) -> None:
        self._plans = {}

    # -- construction: same starting point on every rank ---------------------------------------
    @torch.no_grad()
    def align(self, params: Iterable[torch.Tensor]) -> None:
        """Make (or check) ``params`` -- and, the first time, the buffers -- equal on every rank."""
        tensors = [local_tensor(p).detach() for p in params]
        if not self._buffers_aligned:
            tensors += [b.detach() for b in self.options.buffer_list()]
            self._buffers_aligned = True
        for group in [self.group] + ([self.intra] if self.intra is not None else []):
            self._check_shapes(tensors, group)
            if self.options.init == "broadcast":
                self._broadcast(tensors, group)
            elif self.options.init == "check":
                self._check_equal(tensors, group)

    def _device(self, tensors: list[torch.Tensor]) -> torch.device:
        return tensors[0].device if tensors else torch.device("cpu")

    def _check_shapes(self, tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
        # Mismatched shapes would make the collectives below hang or garble; fail clearly instead.
        code = sum((i + 1) * t.numel() for i, t in enumerate(tensors)) % (2**61)
        row = torch.tensor([len(tensors), sum(t.numel() for t in tensors), code], dtype=torch.int64,
                           device=self._device(tensors))
        rows = _comm.all_gather_rows(row, group, self.stats, "init")
        bad = [r for r in range(rows.shape[0]) if not torch.equal(rows[r], rows[0])]
        if bad:
            raise ValueError(
                f"local SGD: ranks {_ranks_of(group, bad)} hold parameters (or buffers) of other shapes than "
                f"rank {_ranks_of(group, [0])[0]} (count, total numel per rank: "
                f"{[tuple(r[:2].tolist()) for r in rows]}); every rank must build the same model"
            )

    def _packed(self, tensors: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        out = []
        by_key = _comm.split_by_key(tensors, lambda t: (t.device, t.dtype))
        for ts in by_key.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            out.append((ts, flat))
        return out

    def _broadcast(self, tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
        for ts, flat in self._packed(tensors):
            _comm.broadcast(flat, group, self.stats, "init")
            torch._foreach_copy_(ts, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in ts]), ts)])

    def _check_equal(self, tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
        sums = []
        for _, flat in self._packed(tensors):
            x = flat.double()
            w = torch.linspace(-1.0, 1.0, x.numel(), dtype=torch.float64, device=x.device)
            sums += [x.sum(), (x * w).sum(), (x * x).sum()]
        row = torch.stack(sums) if sums else torch.zeros(1, dtype=torch.float64, device=self._device(tensors))
        rows = _comm.all_gather_rows(row, group, self.stats, "init")
        bad = [r for r in range(rows.shape[0]) if not torch.equal(rows[r], rows[0])]
        if bad:
            raise ValueError(
                f"local SGD (init='check'): ranks {_ranks_of(group, bad)} start from other weights than rank "
                f"{_ranks_of(group, [0])[0]}; seed the model identically or use init='broadcast'"
            )

    # -- slow weights --------------------------------------------------------------------------
    def new_entry(self, p: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """This rank's slow weight for ``p`` (a full copy, or sharded: its own 1-D chunk) and,
        with outer momentum, a zero momentum of the same shape (allocated now so that state-dict
        templates made before the first sync carry it)."""
        src = local_tensor(p).detach()
        if self.sharded:
            src = flat_view(src).tensor_split(self.shard_size)[self.shard_rank]
        slow = src.to(dtype=dtype, copy=True)
        entry = {SLOW_KEY: slow}
        if self.beta > 0:
            entry[OUTER_MOMENTUM_KEY] = torch.zeros_like(slow)
        return entry

    def expected_shape(self, p: torch.Tensor) -> torch.Size:
        local = local_tensor(p)
        if not self.sharded:
            return local.shape
        return torch.Size([_comm.chunk_sizes(local.numel(), self.shard_size)[self.shard_rank]])

    def restore_entry(self, p: torch.Tensor, saved: dict[str, Any], dtype: torch.dtype,
                      name: str) -> dict[str, Any]:
        out = super().restore_entry(p, saved, dtype, name)
        if self.beta > 0 and OUTER_MOMENTUM_KEY in saved:  # the slow weight's dtype
            out[OUTER_MOMENTUM_KEY] = self._restore_tensor(p, saved[OUTER_MOMENTUM_KEY], dtype, name,
                                                           OUTER_MOMENTUM_KEY)
        return out

    def _plans_for(self, host: SyncHost, params: list[torch.Tensor]) -> list[_Plan]:
        cached = self._plans.get(params[0])
        if cached is not None and cached[0] is params and cached[1] == len(params):
            return cached[2]
        n, r = self.shard_size, self.shard_rank
        fast = [local_tensor(p) for p in params]
        entries = [host.state_entry(p) for p in params]
        slow = [e[SLOW_KEY] for e in entries]
        for f, s in zip(fast, slow):
            want = _comm.chunk_sizes(f.numel(), n)[r] if self.sharded else f.numel()
            if s.numel() != want:
                raise ValueError(
                    f"local SGD: a slow weight has {s.numel()} elements where this mode expects {want} "
                    f"(parameter shape {tuple(f.shape)}, shard {r} of {n}); was the checkpoint saved with "
                    "another world size or sharding? Sharded slow weights do not reshard"
                )
        mom: list[torch.Tensor | None] = [None] * len(params)
        if self.beta > 0:
            for i, e in enumerate(entries):
                if OUTER_MOMENTUM_KEY not in e:
                    e[OUTER_MOMENTUM_KEY] = torch.zeros_like(slow[i])
                mom[i] = e[OUTER_MOMENTUM_KEY]
        keys = [(f.device, f.dtype, s.dtype) for f, s in zip(fast, slow)]
        nbytes = [f.numel() * s.element_size() for f, s in zip(fast, slow)]
        plans = []
        for idx in _comm.plan_buckets(keys, nbytes, self.cap_bytes):
            fv = [flat_view(fast[i]) for i in idx]
            layout = ShardLayout([f.numel() for f in fv], n)
            chunks = [f.tensor_split(n) for f in fv]
            plans.append(_Plan(
                layout=layout,
                fast=fv,
                fast_chunks=[c[rr] for rr in range(n) for c in chunks],
                fast_own=[c[r] for c in chunks],
                slow=[flat_view(slow[i]) for i in idx],
                mom=[flat_view(mom[i]) for i in idx] if self.beta > 0 else [],
                stage_dtype=slow[idx[0]].dtype,
                fast_dtype=fast[idx[0]].dtype,
                device=fast[idx[0]].device,
            ))
        self._plans[params[0]] = (params, len(params), plans)
        return plans

    # -- the sync ------------------------------------------------------------------------------
    @torch.no_grad()
    def sync(self, host: SyncHost, params: list[torch.Tensor], alpha: float) -> None:
        """Average the fast weights of ``params`` over the group, outer step, fast <- slow."""
        self._check_ddp()
        plans = self._plans_for(host, params)
        groups = host.param_groups
        buffer_work = self._launch_buffers() if groups and params is groups[0]["params"] else None
        inflight: deque = deque()
        for plan in plans:
            if len(inflight) == 2:  # double buffering: pack bucket j+2 only after j is applied
                self._finish(inflight.popleft(), alpha)
            inflight.append(self._launch(plan))
        while inflight:
            self._finish(inflight.popleft(), alpha)
        if buffer_work is not None:
            self._finish_buffers(buffer_work)
        host.on_synced(params, alpha)

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        cd = self.options.comm_dtype
        return t if cd is None or cd == t.dtype else t.to(cd)

    def _launch(self, plan: _Plan) -> tuple:
        lay, dt, dev = plan.layout, plan.stage_dtype, plan.device
        if self.mode == "flat":
            stage = torch.empty(lay.numel, dtype=dt, device=dev)
            views = list(stage.split(lay.segment_sizes))
            torch._foreach_copy_(views, plan.fast)
            torch._foreach_sub_(views, plan.slow)  # progress theta_i - phi
            wire = self._wire(stage)
            return plan, _comm.all_reduce(wire, self.group, self.stats, "params"), stage, wire, views
        if self.mode == "sharded":
            stage = torch.empty(lay.numel, dtype=dt, device=dev)
            torch._foreach_copy_(lay.chunk_views(stage), plan.fast_chunks)
            for pad in lay.pad_views(stage):
                pad.zero_()
            seg = torch.empty(lay.segment, dtype=dt, device=dev)
            work = _comm.reduce_scatter(seg, stage, self.group, self.stats, "params")
            return plan, work, seg, seg, stage
        # hier_sharded: identical replicas inside the group; this rank carries chunk r across groups.
        seg = torch.zeros(lay.segment, dtype=dt, device=dev)
        views = lay.own_views(seg, self.shard_rank)
        torch._foreach_copy_(views, plan.fast_own)
        torch._foreach_sub_(views, plan.slow)
        wire = self._wire(seg)
        return plan, _comm.all_reduce(wire, self.group, self.stats, "params"), seg, wire, views

    def _finish(self, launched: tuple, alpha: float) -> None:
        plan, work, buf, wire, extra = launched
        if work is not None:
            work.wait()
        if wire is not buf:
            buf.copy_(wire)
        if self.mode == "flat":
            buf.mul_(-1.0 / self.group_size)  # d = phi - mean_i theta_i
            self._outer(plan, extra, alpha)
            torch._foreach_copy_(plan.fast, plan.slow)
            return
        if self.mode == "sharded":
            buf.mul_(-1.0 / self.group_size)
            d = plan.layout.own_views(buf, self.shard_rank)
            torch._foreach_add_(d, plan.slow)  # d = phi - mean_i theta_i, on the owned chunk
            self._outer(plan, d, alpha)
            self._gather(plan, buf, extra)
            return
        buf.mul_(-1.0 / self.group_size)
        self._outer(plan, extra, alpha)
        self._gather(plan, buf, None)

    def _outer(self, plan: _Plan, d: list[torch.Tensor], alpha: float) -> None:
        """Note [The outer step], in place on the owned slow weights; ``d`` may be overwritten."""
        if self.beta == 0.0:
            torch._foreach_add_(plan.slow, d, alpha=-alpha)
            return
        torch._foreach_mul_(plan.mom, self.beta)
        torch._foreach_add_(plan.mom, d)
        if self.nesterov:
            torch._foreach_add_(d, plan.mom, alpha=self.beta)
            torch._foreach_add_(plan.slow, d, alpha=-alpha)
        else:
            torch._foreach_add_(plan.slow, plan.mom, alpha=-alpha)

    def _gather(self, plan: _Plan, seg: torch.Tensor, full: torch.Tensor | None) -> None:
        """fast <- slow on every rank of the shard group: all-gather the owned chunks."""
        lay = plan.layout
        if seg.dtype != plan.fast_dtype:  # gather in the parameters' dtype: what they will hold
            seg = torch.empty(lay.segment, dtype=plan.fast_dtype, device=plan.device)
            full = None
        if full is None or full.dtype != plan.fast_dtype:
            full = torch.empty(lay.numel, dtype=plan.fast_dtype, device=plan.device)
        own = lay.own_views(seg, self.shard_rank)
        torch._foreach_copy_(own, plan.slow)
        if lay.pads[self.shard_rank]:
            seg[lay.segment - lay.pads[self.shard_rank]:].zero_()
        _comm.all_gather(full, seg, self.shard_group, self.stats, "params")
        torch._foreach_copy_(plan.fast_chunks, lay.chunk_views(full))

    # -- buffers -------------------------------------------------------------------------------
    def _launch_buffers(self) -> list | None:
        bufs = [b for b in self.options.buffer_list() if b.is_floating_point()]
        if not bufs:
            return None
        launched = []
        for ts, flat in self._packed([b.detach() for b in bufs]):
            launched.append((ts, flat, _comm.all_reduce(flat, self.group, self.stats, "buffers")))
        return launched

    def _finish_buffers(self, launched: list) -> None:
        for ts, flat, work in launched:
            work.wait()
            flat.div_(self.group_size)
            if self.intra is not None:  # mean of equal-sized group means = mean over all ranks
                _comm.all_reduce(flat, self.intra, self.stats, "buffers", async_op=False)
                flat.div_(dist.get_world_size(self.intra))
            torch._foreach_copy_(ts, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in ts]), ts)])

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
            for plan in self._plans_for(host, params):
                lay = plan.layout
                seg = torch.zeros(lay.segment, dtype=plan.stage_dtype, device=plan.device)
                torch._foreach_copy_(lay.own_views(seg, self.shard_rank), plan.slow)
                full = torch.empty(lay.numel, dtype=plan.stage_dtype, device=plan.device)
                _comm.all_gather(full, seg, self.shard_group, self.stats, "slow_weights")
                fast += plan.fast_chunks
                slow += lay.chunk_views(full)
        return fast, slow

    # -- DDP that still all-reduces ------------------------------------------------------------
    def _watch_ddp(self, ddp: torch.nn.Module) -> None:
        ddp_ranks = set(_ranks(getattr(ddp, "process_group", None)))
        if len(ddp_ranks & set(_ranks(self.group))) < 2:
            return  # DDP inside an intra group only: the hierarchical set-up, expected to sync

        def count_syncing_forward(module: torch.nn.Module, args: Any) -> None:
            if torch.is_grad_enabled() and module.require_backward_grad_sync:
                self._ddp_syncs += 1

        self._ddp_handle = ddp.register_forward_pre_hook(count_syncing_forward)

    def _check_ddp(self) -> None:
        if not self._ddp_syncs:
            return
        n, self._ddp_syncs = self._ddp_syncs, 0
        msg = (
            f"Lookahead local SGD: the DistributedDataParallel module ran {n} forward pass(es) outside "
            "no_sync() since the last sync, so it all-reduced gradients every step and local SGD saves "
            "no communication. Run forward and backward inside `with model.no_sync():`, or train the "
            "plain module (the optimizer aligns the starting weights itself)"
        )
        if self.options.on_ddp_sync == "raise":
            raise RuntimeError(msg)
        if not self._ddp_warned:
            self._ddp_warned = True
            warnings.warn(msg, UserWarning, stacklevel=4)


def _ranks_of(group: dist.ProcessGroup | None, group_ranks: list[int]) -> list[int]:
    return [dist.get_global_rank(group, r) if group is not None else r for r in group_ranks]
