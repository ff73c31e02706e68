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
rank owns in the reduce is its 1/N chunk of every tensor.

With ``error_feedback=True`` (default) each rank adds the quantisation error of its previous
send to the next one (``lookahead_ef_residual``, shaped like the slow weight), and the owner of a
chunk does the same for the requantised mean (``lookahead_ef_owner``, 1/N of it): the sums of the
values sent track the sums of the true values. Both residuals are per-parameter state: they are
checkpointed and, with fragments, naturally kept per fragment (a tensor split over fragments
updates the slices of its pieces: Note [Fragments] in streaming.py). A sync skipped for NaN/inf zeroes
them. Quantisation needs progress, so it runs in the flat and the hierarchical-sharded modes; the
plain sharded mode (which reduce-scatters weights) refuses it, like bf16. The reduce runs on a
process group of its own (the same ranks, made at construction: Note [Collective group creation]
in _backend.py), also when ``fragment_sync_delay=0``; on gloo from a worker thread, on NCCL
enqueued from the caller's thread (Note [Asynchronous quantised all-reduce] in _quant.py).

Note [Outer optimizer]
----------------------
``outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True)`` is called
once, at construction, with one param-group dict per Lookahead param group. Its parameters are
*proxies*: empty tensors that, at each outer step, alias this rank's slow weights
(``proxy.data = slow``; a chunk when sharded) and get the averaged pseudo-gradient
``d = phi - mean theta`` as ``.grad``; the step updates the slow weights in place. So the
optimizer exists before the first step (build an LR scheduler on ``opt.local_sgd.outer_optimizer``
right away), survives ``load_state_dict`` (which replaces the slow tensors), and its state is keyed
by objects that never change. Its per-parameter state is mirrored into the Lookahead state under
``lookahead_outer_state_<key>`` (same tensor objects), with ``lookahead_outer_steps`` counting its
steps, so checkpoints and DCP carry it with the slow weights; template slots are allocated with the
slow weights, shaped as a twin optimizer on a 2-element probe reveals them (state of another shape
appears after the first outer step). The learning rate and other hyperparameters live in its
``param_groups``: checkpoint the LR scheduler as usual. Each bucket steps once per sync of its
fragment; tensors of other fragments have ``grad=None`` and are skipped. ``alpha`` is then unused by
the outer step (it still drives ``pullback="pullback"``). The built-in step (Note [The outer step])
equals ``SGD(lr=alpha, momentum=outer_momentum, nesterov=nesterov)`` here (tested).

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
import datetime
import math
import operator
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from .. import _backend, _comm, _sync
from .._comm import CommStats, ShardLayout, flat_view
from .._keys import K_KEY, SLOW_KEY, STEP_KEY
from .._sync import local_tensor
from . import streaming
from .base import SyncHost, SyncStrategy

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

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

#: Per-parameter state key of the outer momentum (shaped like the slow weight; only when
#: ``outer_momentum > 0``).
OUTER_MOMENTUM_KEY = "lookahead_outer_momentum"
#: Per-parameter state (``fragment_sync_delay > 0``): the averaged pseudo-gradient of a fragment
#: whose collective was in flight at ``state_dict()``, shaped like the slow weight; applied at its
#: due step after a resume (Note [Checkpoints in flight]).
INFLIGHT_KEY = "lookahead_inflight"
#: Per-parameter int: counted steps until ``INFLIGHT_KEY`` is applied; 0 = nothing in flight.
INFLIGHT_DUE_KEY = "lookahead_inflight_due"
#: Per-parameter fp32 error-feedback residual of the values this rank sends (int8/int4 with
#: ``error_feedback=True``), shaped like the slow weight.
EF_RESIDUAL_KEY = "lookahead_ef_residual"
#: Per-parameter fp32 error-feedback residual of the reduced chunk this rank owns (1-D, about 1/N
#: of the slow weight).
EF_OWNER_KEY = "lookahead_ef_owner"
#: Prefix of the per-parameter mirror of a user outer optimizer's state (``outer_optimizer=``):
#: its key ``momentum_buffer`` is kept as ``lookahead_outer_state_momentum_buffer``.
OUTER_STATE_PREFIX = "lookahead_outer_state_"
#: Per-parameter int: outer-optimizer steps taken for this tensor (0: its mirror holds placeholders).
OUTER_STEPS_KEY = "lookahead_outer_steps"

InitMode = Literal["broadcast", "check", "none"]
DDPPolicy = Literal["warn", "raise"]
_COMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_QUANT_BITS = {"int8": 8, "int4": 4}


@dataclass
class LocalSGDOptions:
    """Settings of the local-SGD mode; every field is checked at construction.

    Args:
        process_group: the ranks whose fast weights are averaged (default: the world).
        outer_momentum: beta in [0, 1) of Note [The outer step]; 0 = Lookahead (default).
        nesterov: Nesterov outer momentum (DiLoCo); needs ``outer_momentum > 0``.
        sharded: keep 1/N of the slow weights and outer momenta per rank (Note [What goes on the wire]).
        comm_dtype: dtype of the pseudo-gradient on the wire (``torch.bfloat16``/``float16``), or
            ``"int8"``/``"int4"``: blockwise absmax-quantised, summed in fp32 (Note [Quantised sync]);
            None sends the slow weights' dtype. Not with ``sharded=True`` unless ``intra_group`` is set.
        module: the trained module (or its DDP wrapper): its buffers are averaged at each sync,
            and a DDP wrapper is watched for per-step gradient all-reduces.
        buffers: explicit buffers to average instead of ``module``'s.
        intra_group: hierarchical mode: this rank's group of identical replicas (DDP inside).
        init: ``"broadcast"`` | ``"check"`` | ``"none"``: Note [Same starting weights].
        on_ddp_sync: ``"warn"`` | ``"raise"``: Note [DDP still all-reducing].
        bucket_cap_mb: largest flat communication bucket, in MiB (a larger tensor gets its own).
        num_fragments: F, the step unit is split into F fragments synced at staggered steps, each
            moving 1/F of the model; ``k % F == 0`` (Note [Fragments], Note [Streaming schedule]).
        fragment_sync_delay: tau, counted steps between a fragment's launch and its application
            (0: blocking); ``tau < k / F``. torchtitan/torchft name it alike.
        fragment_update_alpha: a in [0, 1]: at the apply step the fragment's fast weights become
            ``a * theta_local + (1 - a) * phi_new`` (Note [What the tau steps keep]).
        fragments: explicit fragments, a list (one per fragment) of lists of module FQN prefixes;
            needs ``module``. Overrides the equal-bytes split; ``num_fragments`` is its length.
        outer_optimizer: a callable ``params -> torch.optim.Optimizer`` (``params``: one param-group
            dict per Lookahead param group) stepped on the (sharded) slow weights with the averaged
            pseudo-gradient as ``.grad``; replaces the built-in outer step (``alpha``,
            ``outer_momentum``, ``nesterov``). Reach it as ``opt.local_sgd.outer_optimizer``.
        quant_block_size: elements per fp32 scale with ``comm_dtype="int8"/"int4"`` (even, default 512).
        error_feedback: with ``comm_dtype="int8"/"int4"``, keep each rank's quantisation error and
            add it to the next send (per parameter, checkpointed); default True.
        timeout: seconds (or a ``datetime.timedelta``) a sync waits for its collectives before
            raising ``TimeoutError`` naming the sync, the step and the group; None: the process
            group's own timeout.
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
    num_fragments: int = 1
    fragment_sync_delay: int = 0
    fragment_update_alpha: float = 0.0
    fragments: list[list[str]] | None = None
    outer_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None
    quant_block_size: int = 512
    error_feedback: bool = True
    timeout: float | datetime.timedelta | None = None
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
        if self.comm_dtype is not None and self.comm_dtype not in _COMM_DTYPES and not (
                isinstance(self.comm_dtype, str) and self.comm_dtype in _QUANT_BITS):
            raise ValueError(
                f"LocalSGDOptions `comm_dtype` must be None, one of {_COMM_DTYPES} or 'int8'/'int4', got "
                f"{self.comm_dtype!r}")
        if self.sharded and self.intra_group is None and self.comm_dtype not in (None, torch.float32):
            raise ValueError(
                f"LocalSGDOptions `comm_dtype={self.comm_dtype}` needs the full slow weights on each rank to "
                "send progress; with `sharded=True` the fast weights themselves are reduce-scattered. Use "
                "sharded=False, or an intra_group (hierarchical sharding sends progress)"
            )
        self._check_streaming()
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

    def _check_streaming(self) -> None:
        """Checks of the streaming, quantisation, outer-optimizer and timeout fields."""
        for name in ("num_fragments", "fragment_sync_delay", "quant_block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"LocalSGDOptions `{name}` must be an int, got {v!r}")
        if self.num_fragments < 1:
            raise ValueError(f"LocalSGDOptions `num_fragments` must be >= 1, got {self.num_fragments}")
        if self.fragment_sync_delay < 0:
            raise ValueError(f"LocalSGDOptions `fragment_sync_delay` must be >= 0, got {self.fragment_sync_delay}")
        a = self.fragment_update_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or math.isnan(a) or not 0.0 <= a <= 1.0:
            raise ValueError(f"LocalSGDOptions `fragment_update_alpha` must be a float in [0, 1], got {a!r}")
        self.fragment_update_alpha = float(a)
        if self.fragments is not None:
            fr = self.fragments
            if (isinstance(fr, (str, bytes)) or not isinstance(fr, (list, tuple)) or not fr
                    or any(isinstance(g, (str, bytes)) or not isinstance(g, (list, tuple)) or not g
                           or not all(isinstance(x, str) and x for x in g) for g in fr)):
                raise TypeError(
                    "LocalSGDOptions `fragments` must be a non-empty list of non-empty lists of module FQN "
                    f"prefixes (str), one list per fragment, e.g. [['layers.0', 'layers.1'], ['layers.2']]; got {fr!r}")
            if self.module is None:
                raise ValueError("LocalSGDOptions `fragments` names module parameters: pass `module=` too")
            if self.num_fragments not in (1, len(fr)):
                raise ValueError(f"LocalSGDOptions `num_fragments={self.num_fragments}` disagrees with the "
                                 f"{len(fr)} lists in `fragments`; drop num_fragments")
            self.fragments = [list(g) for g in fr]
            self.num_fragments = len(fr)
        if self.outer_optimizer is not None:
            if not callable(self.outer_optimizer) or isinstance(self.outer_optimizer, torch.optim.Optimizer):
                raise TypeError(
                    "LocalSGDOptions `outer_optimizer` must be a callable params -> torch.optim.Optimizer, e.g. "
                    "lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True); got "
                    f"{type(self.outer_optimizer).__name__}")
            if self.outer_momentum or self.nesterov:
                raise ValueError(
                    "LocalSGDOptions `outer_optimizer` replaces the built-in outer step; drop `outer_momentum`/"
                    f"`nesterov` (got outer_momentum={self.outer_momentum}, nesterov={self.nesterov}) and give "
                    "them to the outer optimizer")
        if self.quant_block_size < 2 or self.quant_block_size % 2:
            raise ValueError(f"LocalSGDOptions `quant_block_size` must be an even number >= 2, got "
                             f"{self.quant_block_size}")
        if not isinstance(self.error_feedback, bool):
            raise TypeError(f"LocalSGDOptions `error_feedback` must be a bool, got {self.error_feedback!r}")
        t = self.timeout
        if t is not None:
            secs = t.total_seconds() if isinstance(t, datetime.timedelta) else t
            if isinstance(secs, bool) or not isinstance(secs, (int, float)) or not secs > 0 or math.isinf(secs):
                raise ValueError(f"LocalSGDOptions `timeout` must be None, a number of seconds > 0 or a "
                                 f"datetime.timedelta, got {t!r}")

    @property
    def quant_bits(self) -> int | None:
        """8 or 4 with ``comm_dtype="int8"/"int4"``, else None."""
        return _QUANT_BITS.get(self.comm_dtype) if isinstance(self.comm_dtype, str) else None

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
    params: list[torch.Tensor] = field(default_factory=list)  # the bucket's parameters, in order
    slow_t: list[torch.Tensor] = field(default_factory=list)  # the slow weights themselves
    names: list[str] = field(default_factory=list)            # "param_groups[g][i]", for messages
    quant: _Layout | None = None     # int8/int4: the send tensors over the reduce group (Note [Quantised sync])
    # Per entry, where a tensor split over fragments (Note [Fragments] in streaming.py) has one entry
    # per chunk part of its piece: the range of the per-parameter state shaped like the slow weight
    # (None: all of it), and of ``lookahead_ef_owner``.
    sl: list[slice | None] = field(default_factory=list)
    osl: list[slice | None] = field(default_factory=list)
    report: list[torch.Tensor] = field(default_factory=list)  # handed to host.on_synced once this bucket is applied


@dataclass
class _Unit:
    """A step unit split into fragments, each a list of buckets; built once per parameter set."""

    params: list[torch.Tensor]
    n: int
    index: int                       # the param group's index (-1: a subset, from sync_now)
    fragments: list[list[_Plan]]
    frag_params: list[list[torch.Tensor]]


@dataclass
class _Launched:
    """One bucket's collective in flight (see ``LocalSGD._launch``)."""

    plan: _Plan
    work: Any
    buf: torch.Tensor                # receives the reduced values (the stage dtype)
    wire: torch.Tensor               # what the collective works on (buf, or a cast of it)
    extra: Any                       # flat: per-tensor stage views; sharded: the full stage; hier: own views
    qstage: torch.Tensor | None = None   # int8/int4: the fp32 buffer of the quantised reduce
    owner_res: torch.Tensor | None = None
    group: Any = None                # the process group of ``work`` (its backend traits decide the wait)


_UNDECIDED: Any = object()


@dataclass
class _Reduced:
    """One bucket's reduced result: the averaged pseudo-gradient ``d`` (aligned with plan.slow).

    Whether it holds NaN/inf (``bad``) is decided for all the buckets of a fragment at once, with
    one host read (``LocalSGD._decide``): ``probe`` is what the probe reduces, ``locate`` the
    per-tensor views that name the culprit on a hit (None: index 0)."""

    plan: _Plan
    d: list[torch.Tensor]
    bad: Any = _UNDECIDED            # index of a non-finite tensor (flat) / 0 (sharded), or None
    seg: torch.Tensor | None = None  # buffers the sharded gather may reuse
    full: torch.Tensor | None = None
    probe: list[torch.Tensor] = field(default_factory=list)
    locate: list[torch.Tensor] | None = None


class _Layout(ShardLayout):
    """A :class:`ShardLayout` whose chunk sizes are given per tensor (``chunks[i][r]``), and whose
    segments may be padded to a multiple of ``multiple`` elements.

    Whole tensors get ``chunk_sizes(numel, n)`` (then it is the plain layout); the part of a piece
    that lies in chunk r of a tensor split over fragments gets ``[0, .., len, .., 0]`` (Note
    [Fragments] in streaming.py). With ``multiple`` = the quantisation block, the quantised reduce,
    which splits its flat buffer into N equal chunks of whole blocks, hands rank r exactly segment
    r, i.e. its chunk of every tensor, so the residual of the chunk a rank owns is a per-parameter
    tensor (chunk r of each), like a sharded slow weight.
    """

    def __init__(self, chunks: list[list[int]], n: int, multiple: int = 1) -> None:
        self.m = len(chunks)
        self.n = n
        self.chunks = chunks
        seg = max((sum(c[r] for c in chunks) for r in range(n)), default=0)
        if multiple > 1:
            seg = -(-max(seg, 1) // multiple) * multiple
        self.segment = seg
        self.pads = [seg - sum(c[r] for c in chunks) for r in range(n)]
        self.numel = n * seg
        self.split_sizes = [s for r in range(n) for s in ([c[r] for c in chunks] + [self.pads[r]])]
        self.segment_sizes = [c[0] for c in chunks]

    def split_each(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[chunk r of views[i] for r for i]``: the order of :meth:`chunk_views`."""
        parts = [v.split(c) for v, c in zip(views, self.chunks)]
        return [c[r] for r in range(self.n) for c in parts]


def _offsets(numel: int, n: int) -> list[tuple[int, int]]:
    """``(offset, size)`` of the chunks of ``tensor_split(n)`` of ``numel`` elements."""
    out, o = [], 0
    for c in _comm.chunk_sizes(numel, n):
        out.append((o, c))
        o += c
    return out


def _cut(t: torch.Tensor, sl: slice | None) -> torch.Tensor:
    """The flat view of per-parameter state ``t``, or its range ``sl`` (a piece's part)."""
    v = flat_view(t)
    return v if sl is None else v[sl]


def _shaped_like(d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The 1-D memory-order values ``d`` as a tensor shaped and strided like ``s`` (no copy)."""
    if s.is_contiguous():
        return d.view(s.shape)
    return torch.as_strided(d, s.shape, s.stride(), d.storage_offset())


class LocalSGD(SyncStrategy):
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
        self.num_fragments = o.num_fragments
        self.delay = o.fragment_sync_delay
        self.merge_alpha = o.fragment_update_alpha
        self.timeout = o.timeout
        self.stats = CommStats()
        self._units: dict[torch.Tensor, _Unit] = {}
        self._inflight: dict[torch.Tensor, streaming.InFlight] = {}
        self._buffers_aligned = False
        self._ddp_syncs = 0
        self._ddp_warned = False
        self._ddp_handle = None
        if o.module is not None and _is_ddp(o.module):
            self._watch_ddp(o.module)
        # Sync traffic that overlaps the caller (fragments in flight, the quantised reduce) gets a
        # process group of its own, made collectively at construction (Note [Collective group
        # creation] in _backend.py): on NCCL its own communicator and stream.
        self.quant_bits = o.quant_bits
        self._qgroup = None
        self._frag_group = self.group
        if self.quant_bits is not None or self.delay > 0:
            own = _backend.dedicated_group(self.group)
            if _ranks(own) == _ranks(self.group):  # the same rank order: chunk r goes to the same rank
                self._frag_group = own
            if self.quant_bits is not None:
                self._qgroup = own
        self.quant_size = self.group_size
        self.quant_rank = dist.get_rank(self._qgroup if self._qgroup is not None else self.group)
        self._ef = self.quant_bits is not None and o.error_feedback
        # outer_optimizer=: built over proxies that alias the slow weights at each outer step.
        self._proxies: dict[torch.Tensor, torch.Tensor] = {}
        self._outer_opt: torch.optim.Optimizer | None = None
        self._outer_spec: dict[str, Any] | None = None
        keys: list[str] = []
        if self.beta > 0:
            keys.append(OUTER_MOMENTUM_KEY)
        if self.delay > 0:
            keys += [INFLIGHT_KEY, INFLIGHT_DUE_KEY]
        if self._ef:
            keys += [EF_RESIDUAL_KEY, EF_OWNER_KEY]
        if o.outer_optimizer is not None:
            keys.append(OUTER_STEPS_KEY)
        self.state_keys = tuple(keys)

    communicates = True
    # Pickling drops these (SyncStrategy.__getstate__): the groups, the DDP hook, the options that
    # hold groups and the module, and identity-keyed caches. The Lookahead flushes work in flight
    # into per-parameter state before it pickles its strategy.
    _unpicklable = ("group", "intra", "shard_group", "_qgroup", "_frag_group", "_ddp_handle", "options", "_units",
                    "_inflight")

    def close(self) -> None:
        """Remove the forward pre-hook that watches a DDP module (``module=`` a DDP)."""
        if self._ddp_handle is not None:
            self._ddp_handle.remove()
            self._ddp_handle = None

    def reset_cache(self) -> None:
        # Work in flight belongs to the state being replaced (load_state_dict): its collectives
        # finish on their own; a fragment due after a resume comes back from per-parameter state.
        self._units = {}
        self._inflight = {}

    @property
    def outer_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer built by ``LocalSGDOptions(outer_optimizer=...)`` (for an LR scheduler), or None.

        Its parameters are placeholders that alias the slow weights while it steps (Note [Outer
        optimizer]); its per-parameter state is mirrored into the Lookahead state dict.
        """
        return self._outer_opt

    def in_flight(self) -> list[tuple[int, int]]:
        """``(fragment, steps until applied)`` of each fragment whose result is not applied yet."""
        return [(r.fragment, r.due_in) for r in self._inflight.values()]

    def pending(self) -> bool:
        """True while a launched collective has not completed (non-blocking check, for tests)."""
        return any(r.pending() for r in self._inflight.values())

    # -- construction: same starting point on every rank ---------------------------------------
    @torch.no_grad()
    def align(self, params: Iterable[torch.Tensor]) -> None:
        """Make (or check) ``params`` -- and, the first time, the buffers -- equal on every rank."""
        params = list(params)
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
        if self.options.outer_optimizer is not None:
            self._add_outer_group(params)

    def _device(self, tensors: list[torch.Tensor]) -> torch.device:
        return tensors[0].device if tensors else torch.device("cpu")

    def _check_shapes(self, tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
        # Mismatched shapes would make the collectives below hang or garble; fail clearly instead.
        code = sum((i + 1) * t.numel() for i, t in enumerate(tensors)) % (2**61)
        row = torch.tensor([len(tensors), sum(t.numel() for t in tensors), code], dtype=torch.int64,
                           device=self._device(tensors))
        rows, bad = self._ranks_unlike_first(row, group)
        if bad:
            raise ValueError(
                f"local SGD: ranks {_ranks_of(group, bad)} hold parameters (or buffers) of other shapes than "
                f"rank {_ranks_of(group, [0])[0]} (count, total numel per rank: "
                f"{[tuple(r[:2].tolist()) for r in rows]}); every rank must build the same model"
            )

    def _ranks_unlike_first(self, row: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, list[int]]:
        """Every rank's ``row`` (gathered over ``group``) and the group ranks whose row differs from rank 0's."""
        rows = _comm.all_gather_rows(row, group, self.stats, "init")
        return rows, [r for r in range(rows.shape[0]) if not torch.equal(rows[r], rows[0])]

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
        _, bad = self._ranks_unlike_first(row, group)
        if bad:
            raise ValueError(
                f"local SGD (init='check'): ranks {_ranks_of(group, bad)} start from other weights than rank "
                f"{_ranks_of(group, [0])[0]}; seed the model identically or use init='broadcast'"
            )

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
            entry[EF_RESIDUAL_KEY] = torch.zeros_like(slow, dtype=torch.float32)
            entry[EF_OWNER_KEY] = torch.zeros(self._owner_numel(slow.numel()), dtype=torch.float32,
                                              device=slow.device)
        if self.options.outer_optimizer is not None:
            entry.update(self._outer_placeholders(slow))
            entry[OUTER_STEPS_KEY] = 0
        return entry

    def _owner_numel(self, numel: int) -> int:
        return _comm.chunk_sizes(numel, self.quant_size)[self.quant_rank]

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
            out[EF_RESIDUAL_KEY] = (
                self._restore_tensor(p, saved[EF_RESIDUAL_KEY], torch.float32, name, EF_RESIDUAL_KEY)
                if EF_RESIDUAL_KEY in saved else torch.zeros(shape, dtype=torch.float32, device=device))
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
        if self.options.outer_optimizer is not None:
            out.update(self._restore_outer(p, saved, name))
        return out

    # -- fragments and buckets -----------------------------------------------------------------
    def _unit(self, host: SyncHost, params: list[torch.Tensor]) -> _Unit:
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
        unit = _Unit(params, len(params), index, fragments, frag_params)
        self._units[params[0]] = unit
        if self.delay > 0 and params[0] not in self._inflight:
            self._resume_inflight(host, unit)
        return unit

    def _param_names(self) -> dict[int, str]:
        module = self.options.module
        if _is_ddp(module):
            module = module.module
        return {id(p): name for name, p in module.named_parameters()}

    def _build_plans(self, host: SyncHost, pieces: list[tuple[torch.Tensor, int, int]],
                     names: list[str]) -> list[_Plan]:
        """The buckets of one fragment: ``pieces`` are ``(param, a, b)``, flat element ranges (whole
        tensors: ``(p, 0, numel)``), Note [Fragments] in streaming.py."""
        if not pieces:
            return []
        n, r = self.shard_size, self.shard_rank
        params = [pc[0] for pc in pieces]
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
        nbytes = [(b - a) * s.element_size() for (_, a, b), s in zip(pieces, slow)]
        plans = []
        for idx in _comm.plan_buckets(keys, nbytes, self.cap_bytes):
            plan = _Plan(layout=None, fast=[], fast_chunks=[], fast_own=[], slow=[], mom=[],  # type: ignore[arg-type]
                         stage_dtype=slow[idx[0]].dtype, fast_dtype=fast[idx[0]].dtype, device=fast[idx[0]].device)
            chunks: list[list[int]] = []
            qchunks: list[list[int]] = []
            per_rank: list[list[torch.Tensor]] = [[] for _ in range(n)]
            for i in idx:
                p, a, b = pieces[i]
                fv, sv = flat_view(fast[i]), flat_view(slow[i])
                mv = flat_view(mom[i]) if self.beta > 0 else None
                if a == 0:
                    plan.report.append(p)  # once per cycle: with the fragment of its first element
                if (a, b) == (0, fv.numel()):  # a whole tensor: the plain layout
                    parts = fv.tensor_split(n)
                    chunks.append(_comm.chunk_sizes(fv.numel(), n))
                    qchunks.append(_comm.chunk_sizes(sv.numel(), self.quant_size))
                    leaves = [(fv, parts, sv, mv, None, None)]
                else:
                    leaves = []
                    for lo, hi, rr, u, v, q, ou, ov in self._leaves(fv.numel(), a, b):
                        own = rr is None or rr == r
                        sl = slice(u, v) if own else slice(0, 0)
                        piece = fv[lo:hi]
                        parts = tuple(piece if rr is None or k == rr else piece[:0] for k in range(n))
                        ch = [0] * n
                        ch[0 if rr is None else rr] = hi - lo
                        chunks.append(ch)
                        qc = [0] * self.quant_size
                        if q is not None and own:
                            qc[q] = v - u
                        qchunks.append(qc)
                        osl = slice(ou, ov) if q is not None and own and q == self.quant_rank else slice(0, 0)
                        leaves.append((piece, parts, sv[sl], mv[sl] if mv is not None else None, sl, osl))
                for piece, parts, s_view, m_view, sl, osl in leaves:
                    plan.fast.append(piece)
                    for k in range(n):
                        per_rank[k].append(parts[k])
                    plan.fast_own.append(parts[r])
                    plan.slow.append(s_view)
                    if m_view is not None:
                        plan.mom.append(m_view)
                    plan.params.append(p)
                    plan.slow_t.append(slow[i])
                    plan.names.append(names[i])
                    plan.sl.append(sl)
                    plan.osl.append(osl)
            plan.fast_chunks = [t for k in range(n) for t in per_rank[k]]
            plan.layout = _Layout(chunks, n)
            if self.quant_bits is not None:
                plan.quant = _Layout(qchunks, self.quant_size, self.options.quant_block_size)
            plans.append(plan)
        return plans

    def _leaves(self, m: int, a: int, b: int) -> list[tuple[int, int, int | None, int, int, int | None, int, int]]:
        """The parts of piece ``[a, b)`` of a tensor of ``m`` elements, one per chunk of the mode
        (Note [Fragments] in streaming.py): ``(lo, hi)`` in the tensor's flat elements, its shard
        rank (None: unsharded), ``(u, v)`` in the slow weight's flat elements (the owned chunk when
        sharded), its owner in the quantised reduce (None: not quantised) and ``(ou, ov)`` in that
        owner's ``lookahead_ef_owner``. Empty parts are left out (the same on every rank)."""
        out = []
        quant = self.quant_bits is not None
        for rr, (o, c) in enumerate(_offsets(m, self.shard_size)):
            subs = _offsets(c, self.quant_size) if quant else [(0, c)]
            for q, (e, d) in enumerate(subs):
                lo, hi = a * d // m, b * d // m
                if hi > lo:
                    out.append((o + e + lo, o + e + hi, rr if self.sharded else None,
                                (e + lo) if self.sharded else (o + e + lo), (e + hi) if self.sharded else (o + e + hi),
                                q if quant else None, lo, hi))
        return out

    # -- the schedule (Note [Streaming schedule] in streaming.py) ------------------------------
    @torch.no_grad()
    def advance(self, host: SyncHost, params: list[torch.Tensor], n: int, k: int, alpha: float) -> None:
        """After each counted step of a unit: apply a fragment that is due, launch the one whose turn it is."""
        unit = self._unit(host, params)
        streaming.check_schedule(k, self.num_fragments, self.delay, f"param group {unit.index}")
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
        rec = self._inflight.pop(params[0], None)
        if rec is not None:
            self._complete(host, unit, rec, alpha)
        self._sync_now(host, unit, range(len(unit.fragments)), alpha,
                       self._describe(host, unit, None, None, None))

    def _describe(self, host: SyncHost, unit: _Unit, f: int | None, n: int | None, k: int | None) -> str:
        what = (f"the sync of param group {unit.index}" if f is None else
                f"the sync of fragment {f} of {self.num_fragments} of param group {unit.index}")
        step = getattr(host, "step_calls", None)
        when = f" at step() call {step}" if step is not None else ""
        if n is not None:
            when += f" (count {n} of k={k})"
        return f"{what}{when}, on the process group of ranks {_ranks(self.group)}"

    def _sync_now(self, host: SyncHost, unit: _Unit, fragments: Iterable[int], alpha: float, describe: str) -> None:
        """Blocking: launch, wait and apply the buckets of ``fragments`` (two buckets in flight)."""
        for f in fragments:
            self._fragment_start(host, unit, f, describe)
            ok: list[torch.Tensor] = []
            bad: list[tuple[list[torch.Tensor], str]] = []
            inflight: deque = deque()
            for plan in unit.fragments[f]:
                if len(inflight) == 2:  # double buffering: pack bucket j+2 only after j is applied
                    self._apply(host, self._reduce(host, inflight.popleft(), describe), alpha, describe, ok, bad)
                inflight.append(self._launch(host, plan, describe))
            while inflight:
                self._apply(host, self._reduce(host, inflight.popleft(), describe), alpha, describe, ok, bad)
            self._after(host, unit, ok, bad, alpha, describe)

    def _fragment_start(self, host: SyncHost, unit: _Unit, f: int, describe: str) -> None:
        """Once per cycle, with fragment 0: the DDP check and the (blocking) buffer average."""
        if f != 0:
            return
        self._check_ddp()
        groups = host.param_groups
        if groups and unit.params is groups[0]["params"]:
            self._average_buffers(describe)

    def _launch_fragment(self, host: SyncHost, unit: _Unit, f: int, describe: str) -> streaming.InFlight:
        self._fragment_start(host, unit, f, describe)
        launched = [self._launch(host, plan, describe) for plan in unit.fragments[f]]
        return streaming.InFlight(fragment=f, due_in=self.delay, launched=launched, describe=describe,
                                  works=[item.work for item in launched])

    def _complete(self, host: SyncHost, unit: _Unit, rec: streaming.InFlight, alpha: float) -> None:
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
        self._after(host, unit, ok, bad, alpha, rec.describe)

    def _after(self, host: SyncHost, unit: _Unit, ok: list[torch.Tensor], bad: list, alpha: float,
               describe: str) -> None:
        if not bad:
            if ok:
                host.on_synced(ok, alpha)
            return
        # Note [Non-finite syncs in local SGD]: the whole unit restarts from its slow weights.
        for plans in unit.fragments:
            for plan in plans:
                if self.mode == "flat":
                    torch._foreach_copy_(plan.fast, plan.slow)
                else:
                    self._gather(plan, None, None, describe, merge=False)
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
                        _cut(entry[INFLIGHT_KEY], red.plan.sl[i]).copy_(red.d[i])
                        if red.bad is not None:
                            _cut(entry[INFLIGHT_KEY], red.plan.sl[i]).fill_(math.nan)
                    entry[INFLIGHT_DUE_KEY] = rec.due_in
            rec.parked = True

    def _resume_inflight(self, host: SyncHost, unit: _Unit) -> None:
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
            d = [_cut(host.state_entry(p)[INFLIGHT_KEY], sl) for p, sl in zip(plan.params, plan.sl)]
            reduced.append(_Reduced(plan, d, bad=_sync.first_nonfinite(d)))
        self._inflight[unit.params[0]] = streaming.InFlight(
            fragment=f, due_in=due, launched=[], reduced=reduced, parked=True,
            describe=self._describe(host, unit, f, None, None) + " (resumed from a checkpoint)")

    def _launched_fragment(self, host: SyncHost, unit: _Unit, due: int, found: list[tuple[int, int]]) -> int:
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

    def _launch(self, host: SyncHost, plan: _Plan, describe: str) -> _Launched:
        lay, dt, dev = plan.layout, plan.stage_dtype, plan.device
        if self.mode == "flat":
            stage = torch.empty(lay.numel, dtype=dt, device=dev)
            views = list(stage.split(lay.segment_sizes))
            torch._foreach_copy_(views, plan.fast)
            torch._foreach_sub_(views, plan.slow)  # progress theta_i - phi
            if plan.quant is not None:
                return self._launch_quant(host, plan, stage, views)
            wire = self._wire(stage)
            work = _comm.all_reduce(wire, self._frag_group, self.stats, "params")
            return _Launched(plan, work, stage, wire, views, group=self._frag_group)
        # Note [Non-finite syncs in local SGD]: 1 if every local fast weight is finite, else NaN; a
        # device scalar (no host read), multiplied into the send buffer.
        poison = _sync.finite_scale(plan.fast)
        if self.mode == "sharded":
            stage = torch.empty(lay.numel, dtype=dt, device=dev)
            torch._foreach_copy_(lay.chunk_views(stage), plan.fast_chunks)
            for pad in lay.pad_views(stage):
                pad.zero_()
            if poison is not None:
                stage.mul_(poison)
            seg = torch.empty(lay.segment, dtype=dt, device=dev)
            work = _comm.reduce_scatter(seg, stage, self._frag_group, self.stats, "params")
            return _Launched(plan, work, seg, seg, stage, group=self._frag_group)
        # hier_sharded: identical replicas inside the group; this rank carries chunk r across groups.
        seg = torch.zeros(lay.segment, dtype=dt, device=dev)
        views = lay.own_views(seg, self.shard_rank)
        torch._foreach_copy_(views, plan.fast_own)
        torch._foreach_sub_(views, plan.slow)
        if poison is not None:  # NaN * 0 = NaN: the pads too, so every block of a quantised send
            seg.mul_(poison)
        if plan.quant is not None:
            return self._launch_quant(host, plan, seg, views, poison)
        wire = self._wire(seg)
        work = _comm.all_reduce(wire, self._frag_group, self.stats, "params")
        return _Launched(plan, work, seg, wire, views, group=self._frag_group)

    def _launch_quant(self, host: SyncHost, plan: _Plan, buf: torch.Tensor, views: list[torch.Tensor],
                      poison: torch.Tensor | None = None) -> _Launched:
        """Note [Quantised sync]: the progress ``views`` into the block layout, launch the quantised mean."""
        from .. import _quant

        ql = plan.quant
        qstage = torch.zeros(ql.numel, dtype=torch.float32, device=plan.device)
        torch._foreach_copy_(ql.chunk_views(qstage), ql.split_each(views))
        if poison is not None:  # every block, so that every owner sees it
            qstage.mul_(poison)
        residual = owner = None
        if self._ef:
            entries = [host.state_entry(p) for p in plan.params]
            residual = torch.zeros(ql.numel, dtype=torch.float32, device=plan.device)
            res_views = ql.split_each([_cut(e[EF_RESIDUAL_KEY], sl) for e, sl in zip(entries, plan.sl)])
            torch._foreach_copy_(ql.chunk_views(residual), res_views)
            owner = torch.zeros(ql.segment, dtype=torch.float32, device=plan.device)
            torch._foreach_copy_(ql.own_views(owner, self.quant_rank),
                                 [_cut(e[EF_OWNER_KEY], sl) for e, sl in zip(entries, plan.osl)])
        work = _quant.quantized_all_reduce_async(
            qstage, self._qgroup, bits=self.quant_bits, block_size=self.options.quant_block_size,
            average=True, residual=residual, owner_residual=owner, out=qstage, stats=self.stats, label="params")
        if residual is not None:  # updated at launch (the send is quantised on this thread)
            torch._foreach_copy_(res_views, ql.chunk_views(residual))
        return _Launched(plan, work, buf, buf, views, qstage=qstage, owner_res=owner, group=self._qgroup)

    def _reduce(self, host: SyncHost, item: _Launched, describe: str) -> _Reduced:
        """Wait for one bucket's collective; the averaged pseudo-gradient ``d = phi - mean theta``."""
        plan, buf = item.plan, item.buf
        streaming.wait_work(item.work, self.timeout, describe, self._traits(item.group, plan.device))
        if item.qstage is not None:  # already the mean (of progress): back into the stage layout
            ql = plan.quant
            torch._foreach_copy_(ql.split_each(item.extra), ql.chunk_views(item.qstage))
            if item.owner_res is not None:
                torch._foreach_copy_([_cut(host.state_entry(p)[EF_OWNER_KEY], sl) for p, sl in zip(plan.params, plan.osl)],
                                     ql.own_views(item.owner_res, self.quant_rank))
            buf.neg_()
        else:
            if item.wire is not buf:
                buf.copy_(item.wire)
            buf.mul_(-1.0 / self.group_size)
        if self.mode == "flat":  # buf is the views end to end: one probe of the whole buffer
            return _Reduced(plan, item.extra, probe=[buf], locate=item.extra)
        if self.mode == "sharded":
            d = plan.layout.own_views(buf, self.shard_rank)
            torch._foreach_add_(d, plan.slow)  # d = phi - mean_i theta_i, on the owned chunk
            return _Reduced(plan, d, seg=buf, full=item.extra, probe=[buf])
        check = item.extra if item.qstage is not None else [buf]  # the pads of a quantised seg are not reduced
        return _Reduced(plan, item.extra, seg=buf, probe=check)

    def _decide(self, reds: list[_Reduced]) -> None:
        """Set ``bad`` of every undecided bucket: one host read when all are finite (Note [Host
        syncs] in lookahead.py: the apply's one read, the non-finite decision); a few more to name
        the culprits otherwise."""
        todo = [r for r in reds if r.bad is _UNDECIDED]
        if not todo:
            return
        hit = _sync.first_nonfinite_of([r.probe for r in todo])
        for r in todo:
            if hit is None or _sync.first_nonfinite(r.probe) is None:
                r.bad = None
            else:
                r.bad = (_sync.first_nonfinite(r.locate) if r.locate is not None else None) or 0

    def _apply(self, host: SyncHost, red: _Reduced, alpha: float, describe: str, ok: list, bad: list) -> None:
        """Outer step on the owned slow weights, then the merge into the fast weights (or, on NaN/inf,
        fast <- slow and no outer step)."""
        plan, d = red.plan, red.d
        self._decide([red])
        if red.bad is not None:
            if self._ef:  # a residual that absorbed a NaN would poison every later send
                for p in plan.params:
                    e = host.state_entry(p)
                    e[EF_RESIDUAL_KEY].zero_()
                    e[EF_OWNER_KEY].zero_()
            if self.mode == "flat":
                what = f"averaged pseudo-gradient of {plan.names[red.bad]}, shape {tuple(plan.params[red.bad].shape)}"
            else:
                what = f"averaged fast weights of {plan.names[0]}..{plan.names[-1]}: non-finite on some rank"
            bad.append((plan.params, f"{what}; {describe}"))
            return
        if self.options.outer_optimizer is not None:
            self._outer_user(host, plan, d)
        else:
            self._outer(plan, d, alpha)
        if self.mode == "flat":
            self._merge(plan.fast, plan.slow)
        else:
            self._gather(plan, red.seg, red.full, describe)
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

    def _gather(self, plan: _Plan, seg: torch.Tensor | None, full: torch.Tensor | None, describe: str,
                merge: bool = True) -> None:
        """fast <- slow on every rank of the shard group: all-gather the owned chunks, then merge."""
        lay = plan.layout
        if seg is None or seg.dtype != plan.fast_dtype:  # gather in the parameters' dtype
            seg = torch.empty(lay.segment, dtype=plan.fast_dtype, device=plan.device)
            full = None
        if full is None or full.dtype != plan.fast_dtype:
            full = torch.empty(lay.numel, dtype=plan.fast_dtype, device=plan.device)
        own = lay.own_views(seg, self.shard_rank)
        torch._foreach_copy_(own, plan.slow)
        if lay.pads[self.shard_rank]:
            seg[lay.segment - lay.pads[self.shard_rank]:].zero_()
        work = _comm.all_gather(full, seg, self.shard_group, self.stats, "params", async_op=True)
        streaming.wait_work(work, self.timeout, describe, self._traits(self.shard_group, plan.device))
        self._merge(plan.fast_chunks, lay.chunk_views(full), None if merge else 0.0)

    # -- outer_optimizer= (Note [Outer optimizer]) ---------------------------------------------
    def _add_outer_group(self, params: list[torch.Tensor]) -> None:
        proxies = []
        for p in params:
            if p not in self._proxies:
                local = local_tensor(p)
                self._proxies[p] = torch.empty(0, dtype=local.dtype, device=local.device)
            proxies.append(self._proxies[p])
        if self._outer_opt is None:
            opt = self.options.outer_optimizer([{"params": proxies}])
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"LocalSGDOptions `outer_optimizer` must return a torch.optim.Optimizer, got "
                                f"{type(opt).__name__}")
            self._outer_opt = opt
        else:
            self._outer_opt.add_param_group({"params": proxies})

    def _outer_placeholders(self, slow: torch.Tensor) -> dict[str, Any]:
        """Template slots for the outer optimizer's state, shaped as a probe step reveals them."""
        if self._outer_spec is None:
            self._outer_spec = {}
            try:  # a twin of the outer optimizer on a 2-element probe: which keys, which shapes
                probe = torch.zeros(2)
                opt = self._outer_opt
                popt = type(opt)([probe], **opt.defaults)
                probe.grad = torch.zeros(2)
                popt.step()
                for key, v in popt.state[probe].items():
                    if isinstance(v, torch.Tensor) and v.shape == probe.shape:
                        self._outer_spec[key] = "param"
                    elif isinstance(v, torch.Tensor) and v.dim() == 0:
                        self._outer_spec[key] = torch.zeros_like(v)
            except Exception:  # noqa: BLE001 - an optimizer that cannot step on a CPU probe: no slots
                self._outer_spec = {}
        out: dict[str, Any] = {}
        for key, kind in self._outer_spec.items():
            out[OUTER_STATE_PREFIX + key] = torch.zeros_like(slow) if kind == "param" else kind.clone()
        return out

    def _restore_outer(self, p: torch.Tensor, saved: dict[str, Any], name: str) -> dict[str, Any]:
        steps = int(saved.get(OUTER_STEPS_KEY, 0))
        device = local_tensor(p).device
        shape = self.expected_shape(p)
        out: dict[str, Any] = {OUTER_STEPS_KEY: steps}
        live: dict[str, Any] = {}
        for key, v in saved.items():
            if not (isinstance(key, str) and key.startswith(OUTER_STATE_PREFIX)):
                continue
            if isinstance(v, torch.Tensor):
                if v.dim() > 0 and v.numel() != shape.numel():
                    raise ValueError(
                        f"Lookahead checkpoint: {name} `{key}` has shape {tuple(v.shape)} where the slow weight "
                        f"has {tuple(shape)}; was it saved with another world size or sharding?")
                v = v.to(device=device, copy=True).reshape(shape) if v.dim() > 0 else v.clone()
            out[key] = v
            live[key[len(OUTER_STATE_PREFIX):]] = v
        proxy = self._proxies.get(p)
        if steps > 0 and proxy is not None and self._outer_opt is not None:
            self._outer_opt.state[proxy] = live
        for key, v in self._outer_placeholders(torch.zeros(shape, device=device)).items():
            out.setdefault(key, v)
        return out

    def _outer_user(self, host: SyncHost, plan: _Plan, d: list[torch.Tensor]) -> None:
        """One step of the user's outer optimizer on the bucket's slow weights, gradient ``d``."""
        opt = self._outer_opt
        proxies = [self._proxies[p] for p in plan.params]
        for px, s, g in zip(proxies, plan.slow_t, d):
            px.data = s  # alias: the step updates the slow weight in place
            px.grad = _shaped_like(g, s)
        opt.step()
        for px, p in zip(proxies, plan.params):
            px.grad = None
            entry = host.state_entry(p)
            for key, v in opt.state.get(px, {}).items():
                entry[OUTER_STATE_PREFIX + key] = v
            entry[OUTER_STEPS_KEY] = entry.get(OUTER_STEPS_KEY, 0) + 1

    # -- buffers -------------------------------------------------------------------------------
    def _average_buffers(self, describe: str) -> None:
        bufs = [b for b in self.options.buffer_list() if b.is_floating_point()]
        if not bufs:
            return
        launched = []
        for ts, flat in self._packed([b.detach() for b in bufs]):
            launched.append((ts, flat, _comm.all_reduce(flat, self.group, self.stats, "buffers")))
        for ts, flat, work in launched:
            streaming.wait_work(work, self.timeout, f"the buffer average of {describe}",
                                self._traits(self.group, flat.device))
            flat.div_(self.group_size)
            if self.intra is not None:  # mean of equal-sized group means = mean over all ranks
                work = _comm.all_reduce(flat, self.intra, self.stats, "buffers")
                streaming.wait_work(work, self.timeout, f"the intra-group buffer average of {describe}",
                                    self._traits(self.intra, flat.device))
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
            warnings.warn(msg, UserWarning, stacklevel=6)


def _ranks_of(group: dist.ProcessGroup | None, group_ranks: list[int]) -> list[int]:
    return [dist.get_global_rank(group, r) if group is not None else r for r in group_ranks]
