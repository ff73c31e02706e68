"""The three wire modes of local SGD (Note [What goes on the wire] in local_sgd.py), one object each.

A wire decides how one bucket (a :class:`~._plan.Plan`) travels: what is packed and which collective
is launched (:meth:`launch`), what the waited-for result means (:meth:`reduced`), and how the fast
weights are restored from the slow ones (:meth:`restore` after an outer step, :meth:`reset` after a
non-finite sync). The strategy does the rest (the wait, the average, the outer step) alike for all.

- :class:`FlatWire`: every rank holds the full slow weights and all-reduces its progress.
- :class:`ShardedWire`: rank r owns chunk r of the slow weights; the fast weights are
  reduce-scattered and the new slow chunks all-gathered.
- :class:`HierarchicalWire`: sharded inside ``intra_group`` (identical replicas); chunk r's progress
  is all-reduced across the groups, then all-gathered inside the group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import _comm, _sync
from .._buffers import POOL
from .._keys import EF_RESIDUAL_KEY
from . import streaming
from ._plan import Launched, Plan, Reduced, cut, zero_pads

if TYPE_CHECKING:
    from .base import SyncHost

__all__ = ["FlatWire", "HierarchicalWire", "ShardedWire", "Wire"]


class Wire:
    """Base of the wire modes; ``strategy`` is the :class:`~.local_sgd.LocalSGD` it serves (its groups,
    statistics, timeout, the wire-dtype cast, the quantised launch and the merge)."""

    #: The mode's name (``LocalSGD.mode``).
    name = ""

    def __init__(self, strategy: Any) -> None:
        self.s = strategy

    def launch(self, host: SyncHost, plan: Plan) -> Launched:
        """Pack the bucket and launch its collective (asynchronous)."""
        raise NotImplementedError

    def reduced(self, item: Launched, buf: torch.Tensor) -> Reduced:
        """The bucket's result, ``buf`` holding the negated mean (of progress, or of fast weights)."""
        raise NotImplementedError

    def nonfinite_what(self, plan: Plan, red: Reduced) -> str:
        """What held NaN/inf, for the message."""
        return f"averaged fast weights of {plan.names[0]}..{plan.names[-1]}: non-finite on some rank"

    def restore(self, plan: Plan, red: Reduced, describe: str) -> None:
        """After the outer step: the new slow weights into the fast weights (the merge)."""
        raise NotImplementedError

    def reset(self, plan: Plan, describe: str) -> None:
        """After a non-finite sync: fast <- slow (no merge)."""
        raise NotImplementedError

    def _send(self, plan: Plan, buf: torch.Tensor, views: list[torch.Tensor]) -> Launched:
        """All-reduce ``buf`` (the progress, ``views`` per tensor) in the wire dtype."""
        s = self.s
        wire = s._wire(buf)
        work = _comm.all_reduce(wire, s._frag_group, s.stats, "params")
        return Launched(plan, work, buf, wire, views, group=s._frag_group)


class FlatWire(Wire):
    """Full slow weights on every rank; one all-reduce of the progress per bucket."""

    name = "flat"

    def launch(self, host: SyncHost, plan: Plan) -> Launched:
        lay = plan.layout
        if plan.quant is not None and plan.stage_dtype == torch.float32:
            # the progress straight into the quantised reduce's fp32 stage; the per-tensor stage
            # is made when the result arrives (LocalSGD._reduce)
            return self.s._launch_quant(host, plan, None, None)
        stage = POOL.take(lay.numel, plan.stage_dtype, plan.device)  # Note [Buffer reuse]
        views = list(stage.split(lay.segment_sizes))
        torch._foreach_copy_(views, plan.fast)
        torch._foreach_sub_(views, plan.slow)  # progress theta_i - phi
        if plan.quant is not None:
            return self.s._launch_quant(host, plan, stage, views)
        item = self._send(plan, stage, views)
        item.pooled = [stage]
        return item

    def reduced(self, item: Launched, buf: torch.Tensor) -> Reduced:
        # buf is the views end to end: one probe of the whole buffer
        return Reduced(item.plan, item.views, probe=[buf], locate=item.views)

    def nonfinite_what(self, plan: Plan, red: Reduced) -> str:
        return f"averaged pseudo-gradient of {plan.names[red.bad]}, shape {tuple(plan.params[red.bad].shape)}"

    def restore(self, plan: Plan, red: Reduced, describe: str) -> None:
        self.s._merge(plan.fast, plan.slow)

    def reset(self, plan: Plan, describe: str) -> None:
        torch._foreach_copy_(plan.fast, plan.slow)


class _GatheringWire(Wire):
    """The sharded modes: each rank owns a chunk of the slow weights and all-gathers it back."""

    def _poison(self, plan: Plan) -> torch.Tensor | None:
        # Note [Non-finite syncs in local SGD]: 1 if every local fast weight is finite, else NaN; a
        # device scalar (no host read), multiplied into the send buffer.
        return _sync.finite_scale(plan.fast)

    def restore(self, plan: Plan, red: Reduced, describe: str) -> None:
        self._gather(plan, red.seg, red.full, describe)

    def reset(self, plan: Plan, describe: str) -> None:
        self._gather(plan, None, None, describe, merge=False)

    def gather_slow(self, plan: Plan, describe: str) -> list[torch.Tensor]:
        """The full slow weights of the bucket in their own dtype, as ``plan.layout.chunk_views``
        (aligned with ``plan.fast_chunks``): one blocking all-gather of the owned chunks. Every
        rank of the shard group calls it together (the sharded eager restart point)."""
        return plan.layout.chunk_views(self._all_gather(plan, plan.stage_dtype, None, None, describe))

    def _gather(self, plan: Plan, seg: torch.Tensor | None, full: torch.Tensor | None, describe: str,
                merge: bool = True) -> None:
        """fast <- slow on every rank of the shard group: all-gather the owned chunks, then merge."""
        full = self._all_gather(plan, plan.fast_dtype, seg, full, describe)  # in the parameters' dtype
        self.s._merge(plan.fast_chunks, plan.layout.chunk_views(full), None if merge else 0.0)

    def _all_gather(self, plan: Plan, dtype: torch.dtype, seg: torch.Tensor | None, full: torch.Tensor | None,
                    describe: str) -> torch.Tensor:
        """The owned slow chunks of every rank, all-gathered in ``dtype`` (into ``seg``/``full`` when
        they have it)."""
        s = self.s
        lay = plan.layout
        if seg is None or seg.dtype != dtype:
            seg = torch.empty(lay.segment, dtype=dtype, device=plan.device)
            full = None
        if full is None or full.dtype != dtype:
            full = torch.empty(lay.numel, dtype=dtype, device=plan.device)
        own = lay.own_views(seg, s.shard_rank)
        torch._foreach_copy_(own, plan.slow)
        if lay.pads[s.shard_rank]:
            seg[lay.segment - lay.pads[s.shard_rank]:].zero_()
        work = _comm.all_gather(full, seg, s.shard_group, s.stats, "params", async_op=True)
        streaming.wait_work(work, s.timeout, describe, s._traits(s.shard_group, plan.device))
        return full


class ShardedWire(_GatheringWire):
    """Rank r owns chunk r: reduce-scatter of the fast weights, all-gather of the new slow chunks."""

    name = "sharded"

    def launch(self, host: SyncHost, plan: Plan) -> Launched:
        return self._reduce_scatter(plan, None)

    def launch_progress(self, host: SyncHost, plan: Plan, start: list[torch.Tensor]) -> Launched:
        """Reduce-scatter the progress ``fast - start`` (``start``: full per-rank start points aligned
        with ``plan.fast``), for the eager rule (Note [Eager outer updates] in _outer.py): its
        outer gradient is measured from each rank's own start, which the owner of a chunk cannot
        know, so the ranks send progress instead of weights."""
        if plan.quant is not None:
            return self._reduce_scatter_quant(host, plan, start)
        return self._reduce_scatter(plan, start)

    def _reduce_scatter_quant(self, host: SyncHost, plan: Plan, start: list[torch.Tensor]) -> Launched:
        """The progress ``fast - start`` reduce-scattered at ``comm_dtype="int8"/"int4"/"int2"``
        (:func:`~lookahead_dist._quant.quantized_reduce_scatter_async`, or with ``topk_fraction``
        :func:`~lookahead_dist._sparse.sparse_reduce_scatter_async`): laid out in ``plan.quant``
        (the shard chunks, each rank's segment padded to whole blocks), quantised with this rank's
        whole error-feedback residual, and summed by each chunk's owner in fp32."""
        from .. import _quant

        s, ql = self.s, plan.quant
        poison = self._poison(plan)
        stage = zero_pads(ql, POOL.take(ql.numel, torch.float32, plan.device))
        views = ql.chunk_views(stage)
        torch._foreach_copy_(views, plan.fast_chunks)
        torch._foreach_sub_(views, ql.split_each(start))
        if poison is not None:  # every block, pads included: every owner sees it
            stage.mul_(poison)
        residual = None
        if s._ef:
            res_views = ql.split_each([cut(host.state_entry(p)[EF_RESIDUAL_KEY], fsl)
                                       for p, fsl in zip(plan.params, plan.fsl)])
            residual = zero_pads(ql, POOL.take(ql.numel, torch.float32, plan.device))
            torch._foreach_copy_(ql.chunk_views(residual), res_views)
        seg = torch.empty(ql.segment, dtype=torch.float32, device=plan.device)
        if s.options.topk_fraction is not None:  # each segment top-k encoded, one all-to-all (_sparse.py)
            from .. import _sparse

            work = _sparse.sparse_reduce_scatter_async(
                stage, s._qgroup, seg, fraction=s.options.topk_fraction, bits=s.quant_bits, average=False,
                residual=residual, stats=s.stats, label="params")
        else:
            work = _quant.quantized_reduce_scatter_async(
                stage, s._qgroup, seg, bits=s.quant_bits, block_size=s.options.quant_block_size, average=False,
                residual=residual, stats=s.stats, label="params", fused=s.options.fused_kernels)
        if residual is not None:  # updated at launch (the send is quantised on this thread)
            torch._foreach_copy_(res_views, ql.chunk_views(residual))
            POOL.give(residual)
        POOL.give(stage)  # read at launch
        return Launched(plan, work, seg, seg, [], group=s._qgroup, progress=True, quant_scatter=True)

    def _reduce_scatter(self, plan: Plan, start: list[torch.Tensor] | None) -> Launched:
        """Reduce-scatter the fast weights (``start`` None) or the progress ``fast - start``."""
        s, lay = self.s, plan.layout
        poison = self._poison(plan)
        stage = torch.empty(lay.numel, dtype=plan.stage_dtype, device=plan.device)
        views = lay.chunk_views(stage)
        torch._foreach_copy_(views, plan.fast_chunks)
        if start is not None:
            torch._foreach_sub_(views, lay.split_each(start))
        for pad in lay.pad_views(stage):
            pad.zero_()
        if poison is not None:
            stage.mul_(poison)
        seg = torch.empty(lay.segment, dtype=plan.stage_dtype, device=plan.device)
        wire = stage if start is None else s._wire(stage)  # progress: comm_dtype (bf16) applies, as flat
        got = seg if wire is stage else torch.empty(lay.segment, dtype=wire.dtype, device=plan.device)
        work = _comm.reduce_scatter(got, wire, s._frag_group, s.stats, "params")
        return Launched(plan, work, seg, got, [], full=stage, group=s._frag_group, progress=start is not None)

    def reduced(self, item: Launched, buf: torch.Tensor) -> Reduced:
        plan = item.plan
        if item.quant_scatter:  # the quantised reduce-scatter: a segment padded to whole blocks
            return Reduced(plan, plan.quant.own_views(buf, self.s.shard_rank), probe=[buf])
        d = plan.layout.own_views(buf, self.s.shard_rank)
        if not item.progress:
            torch._foreach_add_(d, plan.slow)  # d = phi - mean_i theta_i, on the owned chunk
        return Reduced(plan, d, seg=buf, full=item.full, probe=[buf])


class HierarchicalWire(_GatheringWire):
    """Identical replicas inside the group; this rank carries chunk r's progress across groups."""

    name = "hier_sharded"

    def launch(self, host: SyncHost, plan: Plan) -> Launched:
        s, lay = self.s, plan.layout
        poison = self._poison(plan)
        seg = torch.zeros(lay.segment, dtype=plan.stage_dtype, device=plan.device)
        views = lay.own_views(seg, s.shard_rank)
        torch._foreach_copy_(views, plan.fast_own)
        torch._foreach_sub_(views, plan.slow)
        if poison is not None:  # NaN * 0 = NaN: the pads too, so every block of a quantised send
            seg.mul_(poison)
        if plan.quant is not None:
            return s._launch_quant(host, plan, seg, views, poison)
        return self._send(plan, seg, views)

    def reduced(self, item: Launched, buf: torch.Tensor) -> Reduced:
        check = item.views if item.qstage is not None else [buf]  # the pads of a quantised seg are not reduced
        return Reduced(item.plan, item.views, seg=buf, probe=check)
