"""The communication plans of local SGD: which slices of which tensors travel together.

A step unit (a param group's tensors) is split into fragments (Note [Fragments] in streaming.py),
each fragment into flat buckets of at most ``bucket_cap_mb``; a :class:`Plan` is one bucket, built
once and reused at every sync. :class:`Launched` is a bucket's collective in flight and
:class:`Reduced` its averaged pseudo-gradient; :class:`BlockLayout` places the tensors of a bucket
in the send buffer. :class:`PlanBuilder` is the part of ``LocalSGD`` that builds the plans.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .. import _comm
from .._comm import ShardLayout, flat_view
from .._keys import OUTER_MOMENTUM_KEY, SLOW_KEY
from .._sync import local_tensor
from .options import is_ddp

if TYPE_CHECKING:
    from .base import SyncHost

__all__ = [
    "UNDECIDED",
    "BlockLayout",
    "Launched",
    "Plan",
    "PlanBuilder",
    "Reduced",
    "Unit",
    "chunk_offsets",
    "cut",
    "shaped_like",
]


@dataclass
class Plan:
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
    quant: BlockLayout | None = None     # int8/int4: the send tensors over the reduce group (Note [Quantised sync])
    # Per entry, where a tensor split over fragments (Note [Fragments] in streaming.py) has one entry
    # per chunk part of its piece: the range of the per-parameter state shaped like the slow weight
    # (None: all of it), and of ``lookahead_ef_owner``.
    sl: list[slice | None] = field(default_factory=list)
    osl: list[slice | None] = field(default_factory=list)
    # Per entry, its range in the parameter's own flat elements (None: all of it); equals ``sl``
    # unless sharded, where ``sl`` indexes the owned chunk. For state shaped like the parameter
    # (the sharded eager start point, Note [Eager outer updates] in _outer.py).
    fsl: list[slice | None] = field(default_factory=list)
    report: list[torch.Tensor] = field(default_factory=list)  # handed to host.on_synced once this bucket is applied


@dataclass
class Unit:
    """A step unit split into fragments, each a list of buckets; built once per parameter set."""

    params: list[torch.Tensor]
    n: int
    index: int                       # the param group's index (-1: a subset, from sync_now)
    fragments: list[list[Plan]]
    frag_params: list[list[torch.Tensor]]


@dataclass
class Launched:
    """One bucket's collective in flight (see ``LocalSGD._launch``)."""

    plan: Plan
    work: Any
    buf: torch.Tensor                # receives the reduced values (the stage dtype)
    wire: torch.Tensor               # what the collective works on (buf, or a cast of it)
    views: list[torch.Tensor]        # per-tensor views of the progress in ``buf`` (flat: the stage; hier: own chunks)
    qstage: torch.Tensor | None = None   # int8/int4: the fp32 buffer of the quantised reduce
    owner_res: torch.Tensor | None = None
    full: torch.Tensor | None = None     # sharded: the full stage (all ranks' chunks), reused by the gather
    group: Any = None                # the process group of ``work`` (its backend traits decide the wait)
    pooled: list[torch.Tensor | None] = field(default_factory=list)  # given back to POOL once applied
    progress: bool = False           # sharded: ``buf`` holds a sum of progress, not of fast weights
    quant_scatter: bool = False      # sharded eager: ``buf`` is a segment of ``plan.quant`` (padded to blocks)


UNDECIDED: Any = object()


@dataclass
class Reduced:
    """One bucket's reduced result: the averaged pseudo-gradient ``d`` (aligned with plan.slow).

    Whether it holds NaN/inf (``bad``) is decided for all the buckets of a fragment at once, with
    one host read (``LocalSGD._decide``): ``probe`` is what the probe reduces, ``locate`` the
    per-tensor views that name the culprit on a hit (None: index 0).

    A quantised flat bucket may arrive as ``mean``, the mean progress in the block layout of
    ``plan.quant`` (``chunk_views`` order), with ``d_`` None: the built-in outer step then runs
    on it as it is (``LocalSGD._apply``), and ``d`` (per tensor, ``-mean``) is made from it by
    ``make_d`` only where something asks for it (an outer optimizer, a checkpoint in flight, the
    eager rule, naming a non-finite tensor)."""

    plan: Plan
    d_: list[torch.Tensor] | None
    bad: Any = UNDECIDED            # index of a non-finite tensor (flat) / 0 (sharded), or None
    seg: torch.Tensor | None = None  # buffers the sharded gather may reuse
    full: torch.Tensor | None = None
    probe: list[torch.Tensor] = field(default_factory=list)
    locate: list[torch.Tensor] | None = None
    mean: list[torch.Tensor] | None = None
    make_d: Callable[[], list[torch.Tensor]] | None = None

    @property
    def d(self) -> list[torch.Tensor]:
        if self.d_ is None:
            self.d_ = self.make_d()
        return self.d_


class BlockLayout(ShardLayout):
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


def chunk_offsets(numel: int, n: int) -> list[tuple[int, int]]:
    """``(offset, size)`` of the chunks of ``tensor_split(n)`` of ``numel`` elements."""
    out, o = [], 0
    for c in _comm.chunk_sizes(numel, n):
        out.append((o, c))
        o += c
    return out


def zero_pads(layout: Any, buf: torch.Tensor) -> torch.Tensor:
    """``buf`` with the padding of ``layout`` zeroed (the chunks are about to be written whole)."""
    for pad in layout.pad_views(buf):
        pad.zero_()
    return buf


def cut(t: torch.Tensor, sl: slice | None) -> torch.Tensor:
    """The flat view of per-parameter state ``t``, or its range ``sl`` (a piece's part)."""
    v = flat_view(t)
    return v if sl is None else v[sl]


def shaped_like(d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The 1-D memory-order values ``d`` as a tensor shaped and strided like ``s`` (no copy)."""
    if s.is_contiguous():
        return d.view(s.shape)
    return torch.as_strided(d, s.shape, s.stride(), d.storage_offset())


class PlanBuilder:
    """Plan building of :class:`~lookahead_dist.sync.local_sgd.LocalSGD` (a mixin: it reads the
    strategy's mode attributes, ``shard_size``/``shard_rank``, ``quant_size``/``quant_rank``, ...)."""

    def _param_names(self) -> dict[int, str]:
        module = self.options.module
        if is_ddp(module):
            module = module.module
        return {id(p): name for name, p in module.named_parameters()}

    def _build_plans(self, host: SyncHost, pieces: list[tuple[torch.Tensor, int, int]],
                     names: list[str]) -> list[Plan]:
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
            plan = Plan(layout=None, fast=[], fast_chunks=[], fast_own=[], slow=[], mom=[],  # type: ignore[arg-type]
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
                    leaves = [(fv, parts, sv, mv, None, None, None)]
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
                        leaves.append((piece, parts, sv[sl], mv[sl] if mv is not None else None, sl, osl,
                                       slice(lo, hi)))
                for piece, parts, s_view, m_view, sl, osl, fsl in leaves:
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
                    plan.fsl.append(fsl)
            plan.fast_chunks = [t for k in range(n) for t in per_rank[k]]
            plan.layout = BlockLayout(chunks, n)
            if self.quant_bits is not None:
                # plain sharded: the reduce-scatter's chunks are the shard chunks themselves
                plan.quant = BlockLayout(chunks if self._scatter_quant else qchunks, self.quant_size,
                                         self.options.quant_block_size)
            plans.append(plan)
        return plans

    def _leaves(self, m: int, a: int, b: int) -> list[tuple[int, int, int | None, int, int, int | None, int, int]]:
        """The parts of piece ``[a, b)`` of a tensor of ``m`` elements, one per chunk of the mode
        (Note [Fragments] in streaming.py): ``(lo, hi)`` in the tensor's flat elements, its shard
        rank (None: unsharded), ``(u, v)`` in the slow weight's flat elements (the owned chunk when
        sharded), its owner in the quantised reduce (None: not quantised) and ``(ou, ov)`` in that
        owner's ``lookahead_ef_owner``. Empty parts are left out (the same on every rank)."""
        out = []
        quant = self.quant_bits is not None and not self._scatter_quant
        for rr, (o, c) in enumerate(chunk_offsets(m, self.shard_size)):
            subs = chunk_offsets(c, self.quant_size) if quant else [(0, c)]
            for q, (e, d) in enumerate(subs):
                lo, hi = a * d // m, b * d // m
                if hi > lo:
                    out.append((o + e + lo, o + e + hi, rr if self.sharded else None,
                                (e + lo) if self.sharded else (o + e + lo), (e + hi) if self.sharded else (o + e + hi),
                                q if quant else None, lo, hi))
        return out
